"""The protocol's promises: the feature cache, resuming, and several devices."""

import glob
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
from absl.testing import absltest

from h2t import cache
from tests import toy
from tests.toy import results

# The protocol's runs: 20 training steps, a grid of two keep fractions.
FAST = (*toy.fast(steps=20), "--config.sweep=learning.feature_selection.keep_fraction=0.05,0.1")


def run_main(workdir, *overrides, env_extra=None):
  return toy.run_main(workdir, *overrides, fast=FAST, env_extra=env_extra, timeout=900)


def outcome(r):
  """What must not change between equivalent runs (timings may)."""
  keys = ("test_accuracy", "valid_accuracy", "chosen_point", "kept_per_tap", "num_kept", "final_train_loss")
  return {m: {k: v.get(k) for k in keys} for m, v in r["methods"].items()}


class ProtocolRunsTest(absltest.TestCase):
  """One reference run, then the cache, resuming and 4 devices are checked against it."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    cls.workdir = cls._tmp.name
    proc = run_main(cls.workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cls.reference = results(cls.workdir)

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def test_reference_run_records_the_grid(self):
    r = self.reference
    self.assertFalse(r["train_features_cached"])
    self.assertLen(r["grid"]["head2toe"], 2)
    for entry in r["grid"]["head2toe"]:
      self.assertLen(entry["fold_accuracies"], 5)
      self.assertAlmostEqual(entry["mean"], sum(entry["fold_accuracies"]) / 5)
    best = max(e["mean"] for e in r["grid"]["head2toe"])
    self.assertEqual(r["methods"]["head2toe"]["valid_accuracy"], best)

  def test_cache_reuse_invalidation_and_corruption(self):
    with tempfile.TemporaryDirectory() as workdir:
      shutil.copytree(os.path.join(self.workdir, "cache"), os.path.join(workdir, "cache"))
      (cache_file,) = glob.glob(os.path.join(workdir, "cache", "*.npz"))

      # Same config: read from the cache, same numbers.
      self.assertEqual(run_main(workdir).returncode, 0)
      r2 = results(workdir)
      self.assertTrue(r2["train_features_cached"])
      self.assertEqual(outcome(r2), outcome(self.reference))
      self.assertEqual(r2["grid"], self.reference["grid"])

      # A changed target size must not read the old features.
      changed = run_main(
        workdir, "--config.backbone.additional_features_target_size=128", "--config.methods=('linear',)"
      )
      self.assertEqual(changed.returncode, 0, changed.stderr[-3000:])
      self.assertFalse(results(workdir)["train_features_cached"])
      self.assertLen(glob.glob(os.path.join(workdir, "cache", "*.npz")), 2)

      # A damaged cache file is detected and rebuilt, never used.
      with open(cache_file, "r+b") as f:
        f.seek(os.path.getsize(cache_file) // 2)
        f.write(b"\x00" * 64)
      again = run_main(workdir)
      self.assertEqual(again.returncode, 0, again.stderr[-3000:])
      self.assertIn("rebuilding", again.stderr)
      r3 = results(workdir)
      self.assertFalse(r3["train_features_cached"])
      self.assertEqual(outcome(r3), outcome(self.reference))

  def test_killed_during_extraction_then_resumed(self):
    with tempfile.TemporaryDirectory() as workdir:
      cmd = toy.main_command(workdir, fast=FAST)
      proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=toy.environ(), cwd=toy.ROOT
      )
      # Kill it once extraction has started: the log names the grid just before it.
      log = os.path.join(workdir, "log.txt")
      for _ in range(3000):  # up to ~5 minutes of polling
        if proc.poll() is not None or (os.path.exists(log) and "grid point" in open(log).read()):
          break
        time.sleep(0.1)
      time.sleep(1.0)
      proc.kill()
      proc.wait()
      # Nothing half-done is presented as done.
      self.assertFalse(os.path.exists(os.path.join(workdir, "results.json")))
      resumed = run_main(workdir)
      self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
      self.assertEqual(outcome(results(workdir)), outcome(self.reference))

  def test_four_simulated_devices_give_the_same_results(self):
    with tempfile.TemporaryDirectory() as four:
      b = run_main(four, env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
      self.assertEqual(b.returncode, 0, b.stderr[-3000:])
      rb = results(four)
      self.assertLen(rb["devices"], 4)
      for method, ra in self.reference["methods"].items():
        self.assertAlmostEqual(ra["test_accuracy"], rb["methods"][method]["test_accuracy"], places=6)
        self.assertEqual(ra["kept_per_tap"], rb["methods"][method]["kept_per_tap"])


class CacheFileTest(absltest.TestCase):
  def test_truncated_cache_file_is_not_used(self):
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "c.npz")
      cache.write(path, {"a": np.ones((3, 2), np.float32)}, np.arange(3))
      self.assertIsNotNone(cache.read(path))
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
      self.assertIsNone(cache.read(path))

  def test_changed_checkpoint_changes_the_cache_key(self):
    class FakeBackbone:
      name, input_size = "efficientnet_lite0", 224

      def __init__(self, checkpoint_id):
        self.checkpoint_id = checkpoint_id

    import configs.vtab as vtab_config

    bcfg = vtab_config.get_config().backbone
    a = cache.cache_key(FakeBackbone("lite0.pth:aaaa"), "digits", "train800val200", ("stem",), bcfg)
    b = cache.cache_key(FakeBackbone("lite0.pth:bbbb"), "digits", "train800val200", ("stem",), bcfg)
    self.assertNotEqual(a, b)


if __name__ == "__main__":
  absltest.main()
