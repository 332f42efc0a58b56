"""Bad settings fail before anything is loaded, with one line naming the key and the value."""

import glob
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest, parameterized

import configs.vtab as vtab_config
from h2t import config as config_lib
from h2t import evaluate
from tests import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN, INF = float("nan"), float("inf")

# (case name, {path: value}, words the message must contain)
BAD = [
  ("unknown_task", {"dataset": "mnist"}, ["config.dataset", "'mnist'", "digits"]),
  ("unknown_backbone", {"backbone.name": "resnet18"}, ["config.backbone.name", "resnet18", "resnet50"]),
  ("unknown_method", {"methods": ("head2toe", "svm")}, ["config.methods", "svm", "ridge"]),
  ("no_method", {"methods": ()}, ["config.methods", "non-empty"]),
  ("eval_mode", {"eval_mode": "train"}, ["config.eval_mode", "'train'", "'valid'"]),
  ("optimizer", {"learning.optimizer": "rmsprop"}, ["config.learning.optimizer", "rmsprop", "'adam'"]),
  ("lr_nan", {"learning.learning_rate": NAN}, ["config.learning.learning_rate", "nan", "finite"]),
  ("lr_inf", {"learning.learning_rate": INF}, ["config.learning.learning_rate", "inf", "finite"]),
  ("lr_negative", {"learning.learning_rate": -0.1}, ["config.learning.learning_rate", "-0.1", ">= 0"]),
  ("l1_negative", {"learning.l1_regularizer": -1e-3}, ["config.learning.l1_regularizer", "-0.001"]),
  ("l2_nan", {"learning.l2_regularizer": NAN}, ["config.learning.l2_regularizer", "nan"]),
  ("group_negative", {"learning.group_lrp_regularizer_coef": -1.0}, ["group_lrp_regularizer_coef", "-1.0"]),
  ("norm_order", {"learning.group_lrp_regularizer_r": -2.0}, ["group_lrp_regularizer_r", "-2.0", "positive"]),
  ("steps_zero", {"learning.training_steps": 0}, ["config.learning.training_steps", "0", ">= 1"]),
  ("batch_zero", {"learning.train_batch_size": 0}, ["train_batch_size", "0"]),
  (
    "normalization",
    {"learning.feature_normalization": "l2"},
    ["feature_normalization", "'l2'", "unit_vector"],
  ),
  ("head_type", {"learning.output_head_type": "hidden_5"}, ["output_head_type", "hidden_5", "random_N"]),
  ("data_fraction", {"learning.data_fraction": 1.5}, ["data_fraction", "1.5", "<= 1.0"]),
  (
    "selection_type",
    {"learning.feature_selection.type": "l2"},
    ["feature_selection.type", "'l2'", "connectivity_l2"],
  ),
  ("keep_zero", {"learning.feature_selection.keep_fraction": 0.0}, ["keep_fraction", "0.0", "> 0.0"]),
  ("keep_big", {"learning.feature_selection.keep_fraction": 1.2}, ["keep_fraction", "1.2", "<= 1.0"]),
  ("keep_nan", {"learning.feature_selection.keep_fraction": NAN}, ["keep_fraction", "nan"]),
  (
    "offset_negative",
    {"learning.feature_selection.keep_fraction_offset": -3},
    ["keep_fraction_offset", "-3"],
  ),
  ("interp", {"learning.feature_selection.mean_interpolation_coef": 2.0}, ["mean_interpolation_coef", "2.0"]),
  ("average_k", {"learning.feature_selection.average_over_k": 0}, ["average_over_k", "0", ">= 1"]),
  ("fs_dataset", {"learning.feature_selection.fs_dataset": "mnist"}, ["fs_dataset", "'mnist'"]),
  (
    "overwrite_value",
    {"learning.feature_selection.learning_config_overwrite.group_lrp_regularizer_coef": NAN},
    ["learning_config_overwrite.group_lrp_regularizer_coef", "nan"],
  ),
  ("cls_pool", {"backbone.cls_token_pool": "mean"}, ["cls_token_pool", "'mean'", "only_cls"]),
  (
    "multi_sizes",
    {"backbone.additional_features_multi_target_sizes": "1024,x"},
    ["multi_target_sizes", "1024,x"],
  ),
  (
    "target_negative",
    {"backbone.additional_features_target_size": -1},
    ["additional_features_target_size", "-1"],
  ),
  ("input_size", {"backbone.input_size": -32}, ["backbone.input_size", "-32"]),
  (
    "feature_dtype",
    {"learning.feature_dtype": "float16"},
    ["learning.feature_dtype", "'float16'", "bfloat16"],
  ),
  (
    "finetune_composite",
    {"methods": ("finetune",), "backbone.name": "efficientnet_lite0+efficientnet_lite0"},
    ["finetune", "several"],
  ),
  # Grid values are checked too, point by point, and the point is named.
  ("sweep_lr", {"sweep": "learning.learning_rate=0.1,nan"}, ["config.sweep point", "learning_rate", "nan"]),
  (
    "sweep_keep",
    {"sweep": "learning.feature_selection.keep_fraction=0.1,2.0"},
    ["sweep point", "keep_fraction", "2.0"],
  ),
  ("sweep_optimizer", {"sweep": "learning.optimizer=adam,adagrad"}, ["sweep point", "adagrad"]),
  ("sweep_offset", {"sweep": "learning.feature_selection.keep_fraction_offset=0,-1"}, ["sweep point", "-1"]),
  ("sweep_unknown_field", {"sweep": "learning.momentum=0.9"}, ["learning.momentum", "not a config field"]),
  ("sweep_wrong_type", {"sweep": "learning.training_steps=ten"}, ["training_steps", "int"]),
  ("sweep_backbone", {"sweep": "backbone.name=efficientnet_lite0,vgg16"}, ["sweep point", "vgg16"]),
]


def config_with(values):
  return toy.override(vtab_config.get_config(), **values)


class ValidateTest(parameterized.TestCase):
  @parameterized.named_parameters(BAD)
  def test_bad_setting_is_named(self, values, words):
    with self.assertRaises(config_lib.ConfigError) as e:
      config_lib.validate(config_with(values))
    message = str(e.exception)
    self.assertNotIn("\n", message)
    for w in words:
      self.assertIn(w, message)

  def test_default_and_paper_configs_are_valid(self):
    config_lib.validate(vtab_config.get_config())
    config_lib.validate(vtab_config.get_config("paper"))

  def test_feature_fields_cover_the_network_and_pooling(self):
    for path in (
      "backbone.name",
      "backbone.checkpoint",
      "backbone.input_size",
      "backbone.cls_token_pool",
      "backbone.additional_features_target_size",
      "backbone.additional_features",
    ):
      self.assertIn(path, config_lib.FEATURE_FIELDS)
    self.assertNotIn("backbone.batch_size", config_lib.FEATURE_FIELDS)

  def test_command_line_value_wins_over_the_sweep(self):
    config = vtab_config.get_config()
    keys = config_lib.cli_keys(["--config.learning.feature_selection.keep_fraction=0.3"])
    dropped = config_lib.resolve_cli_overrides(config, keys)
    self.assertEqual(dropped, ["learning.feature_selection.keep_fraction"])
    self.assertNotIn("keep_fraction", config.sweep)
    self.assertIn("group_lrp_regularizer_coef=0.0001,1e-05", config.sweep)

  def test_sweep_and_its_field_both_given_is_an_error(self):
    config = config_with({"sweep": "learning.learning_rate=0.1,0.01"})
    keys = config_lib.cli_keys(
      ["--config.sweep=learning.learning_rate=0.1,0.01", "--config.learning.learning_rate=1"]
    )
    with self.assertRaisesRegex(config_lib.ConfigError, "learning.learning_rate.*given on the command line"):
      config_lib.resolve_cli_overrides(config, keys)

  def test_offset_beyond_the_features_fails_at_selection(self):
    feats, labels = toy.two_taps()
    from h2t import head2toe

    with self.assertRaisesRegex(ValueError, "keep_fraction_offset=49"):
      head2toe.fit(feats, labels, toy.learning(5, **{"feature_selection.keep_fraction_offset": 49}), seed=0)


class CommandLineTest(parameterized.TestCase):
  """Through `python -m h2t.main`: one `error:` line, no traceback, nothing written."""

  @parameterized.named_parameters(
    ("nan_lr", ["--config.learning.learning_rate=nan"], "learning_rate=nan"),
    ("bad_grid", ["--config.sweep=learning.feature_selection.keep_fraction=0.1,7"], "keep_fraction=7"),
    ("optimizer", ["--config.learning.optimizer=adagrad"], "'adagrad'"),
    ("unknown_key", ["--config.learning.learnin_rate=0.1"], "unknown config key 'learning.learnin_rate'"),
    (
      "both_sweep_and_field",
      ["--config.sweep=learning.learning_rate=0.1,0.01", "--config.learning.learning_rate=0.5"],
      "given on the command line",
    ),
  )
  def test_fails_before_loading(self, overrides, expected):
    with tempfile.TemporaryDirectory() as tmp:
      workdir = os.path.join(tmp, "w")
      cmd = [
        sys.executable,
        "-m",
        "h2t.main",
        "--config=" + os.path.join(ROOT, "configs/vtab.py"),
        f"--workdir={workdir}",
      ]
      proc = subprocess.run(cmd + overrides, capture_output=True, text=True, cwd=ROOT, timeout=300)
      self.assertNotEqual(proc.returncode, 0)
      last = proc.stderr.strip().splitlines()[-1]
      self.assertTrue(last.startswith("error: "), proc.stderr[-2000:])
      self.assertIn(expected, last)
      self.assertNotIn("Traceback", proc.stderr)
      self.assertFalse(os.path.exists(workdir))  # no workdir, so no cache, no log


class BackboneSweepTest(absltest.TestCase):
  def test_each_input_size_gets_its_own_features(self):
    def cv(size_setting):
      config = config_with(
        {
          "eval_mode": "valid",
          "methods": ("head2toe",),
          "backbone.additional_features_target_size": 64,
          "learning.training_steps": 20,
          **size_setting,
        }
      )
      with tempfile.TemporaryDirectory() as workdir:
        r = evaluate.run(config, workdir)
        return r, sorted(os.path.basename(p) for p in glob.glob(os.path.join(workdir, "cache", "*.npz")))

    swept, files = cv({"sweep": "backbone.input_size=32,48"})
    self.assertLen(files, 2)  # one extraction per input size
    entries = swept["grid"]["head2toe"]
    self.assertEqual(
      [e["point"] for e in entries], [{"backbone.input_size": 32}, {"backbone.input_size": 48}]
    )
    for size, entry in zip((32, 48), entries, strict=True):
      alone, _ = cv({"sweep": "", "backbone.input_size": size})
      self.assertEqual(entry["fold_accuracies"], alone["grid"]["head2toe"][0]["fold_accuracies"], size)


if __name__ == "__main__":
  absltest.main()
