"""h2t.predict: a saved head, rebuilt with its backbone, classifies as the run that saved it."""

import csv
import os
import shutil
import tempfile

import numpy as np
from absl.testing import absltest
from PIL import Image

from h2t import data, predict
from h2t.data import folder
from h2t.head2toe import Head
from tests import toy

INPUT_SIZE = toy.FAST_INPUT_SIZE  # the run's


class PredictTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # A real run, small: the packaged EfficientNet-Lite0 at 32 px on digits, few steps, no grid.
    cls.dir = tempfile.mkdtemp(prefix="h2t_predict_")
    cls.workdir = os.path.join(cls.dir, "run")
    proc = toy.run_main(cls.workdir, toy.NO_GRID)
    if proc.returncode != 0:
      raise RuntimeError(proc.stderr[-3000:])
    cls.results = toy.results(cls.workdir)
    cls.images, cls.labels = data.get_task("digits").arrays("test", image_size=INPUT_SIZE)
    cls.head = Head.load(os.path.join(cls.workdir, "head_head2toe.npz"))
    cls.backbone = predict.backbone_for(cls.head)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.dir, ignore_errors=True)
    super().tearDownClass()

  def test_reproduces_the_run_test_accuracy(self):
    for method in ("head2toe", "linear"):
      head = Head.load(os.path.join(self.workdir, f"head_{method}.npz"))
      labels, probs = predict.predict_images(head, self.images, self.backbone)
      self.assertEqual(labels.shape, (len(self.labels),))
      self.assertEqual(probs.shape, (len(self.labels), 10))
      np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
      np.testing.assert_array_equal(labels, probs.argmax(axis=1))
      # Exactly the run's accuracy: same preprocessing, pooling, normalisation and weights.
      self.assertEqual(
        float((labels == self.labels).mean()), self.results["methods"][method]["test_accuracy"]
      )

  def test_builds_its_backbone_from_the_head(self):
    labels, _ = predict.predict_images(self.head, self.images[:5])  # no backbone given
    expected, _ = predict.predict_images(self.head, self.images[:5], self.backbone)
    np.testing.assert_array_equal(labels, expected)
    # The same through the Head API.
    np.testing.assert_array_equal(self.head.predict_images(self.images[:5], self.backbone)[0], expected)

  def test_list_of_images_of_different_sizes(self):
    small = list(self.images[:3])
    big = np.asarray(Image.fromarray(self.images[3].astype(np.uint8)).resize((20, 20)), np.float32)
    labels, probs = predict.predict_images(self.head, small + [big], self.backbone)
    alone_small = predict.predict_images(self.head, self.images[:3], self.backbone)
    alone_big = predict.predict_images(self.head, big[None], self.backbone)
    # Each image is resized alone to the input size, as the backbone resizes a batch of one.
    np.testing.assert_allclose(probs[:3], alone_small[1], atol=1e-5)
    np.testing.assert_allclose(probs[3:], alone_big[1], atol=1e-5)
    self.assertLen(labels, 4)

  def test_another_checkpoint_is_refused(self):
    head = Head.load(os.path.join(self.workdir, "head_head2toe.npz"))
    head.meta["checkpoint_id"] = "other-weights.pth:0123456789abcdef"
    with self.assertRaisesRegex(ValueError, r"checkpoint 'other-weights.pth.*--checkpoint=PATH"):
      predict.predict_images(head, self.images[:2], self.backbone)
    with self.assertRaisesRegex(ValueError, "other-weights.pth"):
      predict.backbone_for(head)
    head.meta = {"task": "digits"}
    with self.assertRaisesRegex(
      ValueError, "lacks backbone, checkpoint_id, input_size, .*not saved by a run"
    ):
      predict.backbone_for(head)

  def test_no_images(self):
    labels, probs = predict.predict_images(self.head, [], self.backbone)
    self.assertEqual((labels.shape, probs.shape), ((0,), (0, 10)))

  def test_head_is_a_small_fraction_of_the_backbone(self):
    # The paper's storage claim: a task costs a mask and a small matrix, not a backbone.
    head_bytes = os.path.getsize(os.path.join(self.workdir, "head_head2toe.npz"))
    backbone_bytes = predict.parameter_bytes(self.backbone.params)
    self.assertGreater(backbone_bytes, 4_652_008 * 4)  # learnable weights alone, float32
    self.assertLess(head_bytes, 0.02 * backbone_bytes)

  def test_command_line_on_image_files(self):
    # PNGs of a few test digits (rounded to 8 bits), in a folder tree; the CLI reads them as folder tasks do.
    images_dir = os.path.join(self.dir, "pngs")
    paths = []
    for i in range(12):
      sub = os.path.join(images_dir, f"part{i % 2}")
      os.makedirs(sub, exist_ok=True)
      paths.append(os.path.join(sub, f"{i:02d}.png"))
      Image.fromarray(np.round(self.images[i]).astype(np.uint8)).save(paths[-1])
    with open(os.path.join(images_dir, "notes.txt"), "w") as f:
      f.write("not an image")
    out = os.path.join(self.dir, "preds.csv")
    cmd = ["-m", "h2t.predict", "--head=" + os.path.join(self.workdir, "head_head2toe.npz")]
    proc = toy.run_python(*cmd, images_dir, f"--output={out}")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("% of the backbone's", proc.stdout)
    with open(out) as f:
      rows = list(csv.DictReader(f))
    self.assertEqual([r["path"] for r in rows], sorted(paths))
    expected, probs = predict.predict_images(
      self.head, folder.load_images(sorted(paths), INPUT_SIZE), self.backbone
    )
    np.testing.assert_array_equal([int(r["label"]) for r in rows], expected)
    np.testing.assert_allclose([float(r["probability"]) for r in rows], probs.max(axis=1), atol=1e-5)

    proc = toy.run_python(*cmd, os.path.join(self.dir, "missing.png"))
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("missing.png' is neither an image file nor a folder", proc.stderr)


if __name__ == "__main__":
  absltest.main()
