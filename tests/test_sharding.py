"""The grid's heads split over several (simulated) devices give the one-device results."""

import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs a 6-point grid (3 distinct stage-1 settings, padded to 4 heads on 4
# devices; 6 stage-2 heads padded to 8) and saves what it got.
SCRIPT = textwrap.dedent(
  """
  import sys
  import jax
  import numpy as np
  sys.path.insert(0, {root!r})
  sys.path.insert(0, {tests!r})
  from test_head2toe import _learning, _toy_task
  from h2t import head2toe, probe, sharding, stages

  feats, labels = _toy_task(n=100, informative=("a", "b"))
  prep = head2toe.prepare(feats)
  folds = [(np.arange(0, 80), np.arange(80, 100)), (np.arange(20, 100), np.arange(0, 20))]
  points = [
    _learning(**{{
      "feature_selection.keep_fraction": kf,
      "feature_selection.learning_config_overwrite.group_lrp_regularizer_coef": coef,
      "training_steps": 30,
    }})
    for coef in (1e-3, 1e-4, 1e-5) for kf in (0.05, 0.2)
  ]
  run = head2toe.run_grid(prep, labels, points, folds, [0, 1], seed=4, num_classes=3)
  heads = sharding.HeadSharding()
  hp = heads.shard(np.asarray([0.1, 0.01, 0.001], np.float32))
  zero = heads.shard(np.zeros(3, np.float32))
  w, _ = stages.train_all_features(
    heads.replicate(prep.unit_vector()), labels, np.arange(80), probe.HParams(hp, zero, zero, zero),
    jax.random.key(0), spec=probe.TrainSpec(num_classes=3, training_steps=5),
  )
  np.savez(
    {out!r}, kept_idx=run.kept_idx, accuracy=run.accuracy, w=run.params["w"], losses=run.losses,
    devices=len(jax.devices()), hp_devices=len(hp.sharding.device_set), w_shape=np.asarray(w.shape),
    w_devices=len(w.sharding.device_set), w_replicated=w.sharding.is_fully_replicated,
  )
  """
)


def run_script(out, devices):
  code = SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), out=out)
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(np.load(out))


class HeadShardingTest(absltest.TestCase):
  def test_four_devices_equal_one(self):
    with tempfile.TemporaryDirectory() as tmp:
      one = run_script(os.path.join(tmp, "one.npz"), 1)
      four = run_script(os.path.join(tmp, "four.npz"), 4)
    self.assertEqual((int(one["devices"]), int(four["devices"])), (1, 4))
    # The heads really are split: 3 learning rates padded to 4, one per device.
    self.assertEqual(int(four["hp_devices"]), 4)
    self.assertEqual(four["w_shape"].tolist(), [4, 90, 3])  # [heads, D, classes]
    self.assertEqual(int(four["w_devices"]), 4)
    self.assertFalse(bool(four["w_replicated"]))
    # And the grid's results do not change (padding heads dropped).
    self.assertEqual(four["accuracy"].shape, (2, 6))
    np.testing.assert_array_equal(four["kept_idx"], one["kept_idx"])
    np.testing.assert_array_equal(four["accuracy"], one["accuracy"])
    np.testing.assert_allclose(four["w"], one["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  absltest.main()
