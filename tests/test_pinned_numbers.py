"""The engine's numbers at a fixed config, pinned: a refactor must not move them.

`tests/data/pinned_numbers.json` was written by the engine before its
redesign (3b413c5): the offline default at 32 px (EfficientNet-Lite0 on
digits, 30 steps, the default 4-point grid, head2toe / linear / all_features /
ridge) and `head2toe.fit` under each reference option on toy features. Test
accuracies, every (grid point, fold) accuracy and the kept feature indices
must stay bit-identical; weights may move by float rounding only.
"""

import hashlib
import json
import os
import tempfile

import numpy as np
from absl.testing import absltest, parameterized

import configs.vtab as vtab_config
from h2t import evaluate, head2toe
from tests import toy

PINS = os.path.join(os.path.dirname(__file__), "data", "pinned_numbers.json")
with open(PINS) as f:
  PINNED = json.load(f)

VARIANTS = {
  "default": {},
  "per_feature": {"feature_normalization": "per_feature"},
  "none_norm": {"feature_normalization": ""},
  "trainable": {"output_head_type": "trainable_8"},
  "random": {"output_head_type": "random_8"},
  "sgd_clip": {"optimizer": "sgd", "grad_clip_value": 0.5, "use_cosine_decay": False},
  "l1l2": {"l1_regularizer": 1e-3, "l2_regularizer": 1e-3},
  "embed": {"group_lrp_is_embedding": True},
  "avgk": {"feature_selection.average_over_k": 2},
  "interp": {"feature_selection.mean_interpolation_coef": 0.5},
  "offset": {"feature_selection.keep_fraction_offset": 2},
  "variance": {"feature_selection.type": "variance"},
  "l2layer": {"feature_selection.type": "connectivity_l2layer"},
  "zero": {"output_head_zeroinit": True},
  "frac": {"data_fraction": 0.3},
}


def digest(arrays: dict) -> str:
  h = hashlib.sha256()
  for k in sorted(arrays):
    h.update(k.encode())
    h.update(np.ascontiguousarray(arrays[k]).tobytes())
  return h.hexdigest()[:16]


class PinnedFitTest(parameterized.TestCase):
  @parameterized.named_parameters((name, name) for name in VARIANTS)
  def test_fit_option(self, name):
    feats, labels = toy.two_taps(seed=1, n=200)
    learning = toy.learning(40, **{"feature_selection.keep_fraction": 0.2, **VARIANTS[name]})
    head = head2toe.fit(feats, labels, learning, seed=3)
    pin = PINNED[f"fit/{name}"]
    self.assertEqual(digest(head.kept), pin["kept"])
    self.assertEqual(float((head.predict(feats).argmax(-1) == labels).mean()), pin["acc"])
    for k, v in pin["params"].items():
      np.testing.assert_allclose(float(np.abs(head.params[k]).sum()), v, rtol=1e-6, err_msg=k)


class PinnedRunTest(absltest.TestCase):
  def test_offline_default_at_32px(self):
    config = vtab_config.get_config()
    config.backbone.input_size = 32
    config.backbone.additional_features_target_size = 64
    config.learning.training_steps = 30
    config.methods = ("head2toe", "linear", "all_features", "ridge")
    with tempfile.TemporaryDirectory() as workdir:
      results = evaluate.run(config, workdir)
      for method, r in results["methods"].items():
        pin = PINNED[f"run/{method}"]
        self.assertEqual(r["test_accuracy"], pin["test_accuracy"], method)
        head = head2toe.Head.load(os.path.join(workdir, r["head_file"]))
        self.assertEqual(digest(head.kept), pin["kept"], method)
        if "w_sum" in pin:  # ridge's weights moved by float rounding (host -> device normalisation)
          np.testing.assert_allclose(float(np.abs(head.params["w"]).sum()), pin["w_sum"], rtol=1e-6)
      for method, entries in results["grid"].items():
        self.assertEqual([e["fold_accuracies"] for e in entries], PINNED[f"grid/{method}"], method)


if __name__ == "__main__":
  absltest.main()
