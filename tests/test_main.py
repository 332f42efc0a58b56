"""`python -m h2t.main` end to end, and its errors."""

import glob
import os
import tempfile

from absl.testing import absltest

from tests import toy


class MainTest(absltest.TestCase):
  def test_end_to_end_on_digits(self):
    with tempfile.TemporaryDirectory() as workdir:
      proc = toy.run_main(workdir)
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      self.assertRegex(proc.stdout, r"head2toe +CV accuracy +[\d.]+% +test accuracy +[\d.]+%")
      self.assertRegex(proc.stdout, r"linear +CV accuracy +[\d.]+% +test accuracy +[\d.]+%")
      results = toy.results(workdir)
      self.assertEqual(results["task"], "digits")
      self.assertEqual(results["config"]["learning"]["training_steps"], 30)
      for method in ("head2toe", "linear"):
        r = results["methods"][method]
        self.assertBetween(r["test_accuracy"], 0.0, 1.0)
        self.assertTrue(os.path.exists(os.path.join(workdir, r["head_file"])))
      h2t = results["methods"]["head2toe"]
      # The CV chose a keep fraction from the grid; the head keeps exactly that share.
      keep = h2t["chosen_point"]["learning.feature_selection.keep_fraction"]
      self.assertIn(keep, (0.05, 0.1))
      self.assertEqual(h2t["num_kept"], int(results["num_features"] * keep))
      best = max(e["mean"] for e in results["grid"]["head2toe"])
      self.assertEqual(h2t["valid_accuracy"], best)
      self.assertEqual(sum(h2t["kept_per_tap"].values()), h2t["num_kept"])
      self.assertEqual(set(h2t["kept_per_tap"]), set(results["taps"]))
      self.assertEqual(results["methods"]["linear"]["num_kept"], 1280)
      for phase in ("load", "extract_train", "fit_head2toe", "fit_linear", "test"):
        self.assertGreater(results["timings_s"][phase], 0)
      self.assertTrue(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))
      self.assertTrue(os.path.getsize(os.path.join(workdir, "log.txt")) > 0)
      self.assertFalse(results["train_features_cached"])

      # A second run reads the training features from the cache, with the same result.
      again = toy.run_main(workdir)
      self.assertEqual(again.returncode, 0, again.stderr[-3000:])
      second = toy.results(workdir)
      self.assertTrue(second["train_features_cached"])
      self.assertEqual(second["methods"]["head2toe"]["test_accuracy"], h2t["test_accuracy"])

  def test_unknown_values_list_the_choices(self):
    with tempfile.TemporaryDirectory() as workdir:
      cases = {
        "--config.backbone.name=resnet51": ["resnet51", "efficientnet_lite0", "resnet50", "vit_b16"],
        "--config.dataset=mnist": ["mnist", "digits", "fashion_mnist", "caltech101"],
        "--config.learning.keep_fraction=0.05": [
          "learning.keep_fraction",
          "learning.feature_selection.keep_fraction",
        ],
      }
      for flag, needles in cases.items():
        proc = toy.run_main(workdir, flag, fast=())
        self.assertNotEqual(proc.returncode, 0)
        for needle in needles:
          self.assertIn(needle, proc.stderr, flag)
        self.assertNotIn("Traceback", proc.stderr, flag)


if __name__ == "__main__":
  absltest.main()
