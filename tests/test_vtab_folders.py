"""Prepared VTAB-1k folders (NOAH's layout) as a data source: lists, labels, folds, errors, end to end.

The folders are written here in the real layout: image files written by
Pillow under `images/<split>/NNNNNN.jpg` (PNG for the structured task), one
copy per split as NOAH's get_vtab1k.py stores them, and list files of
`relative/path label` lines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized
from PIL import Image

from h2t import data
from h2t.data import base, vtab, vtab_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Ten well separated colours: the label is learnable from the colour.
PALETTE = np.array(
  [
    [255, 0, 0],
    [0, 255, 0],
    [0, 0, 255],
    [255, 255, 0],
    [255, 0, 255],
    [0, 255, 255],
    [128, 128, 128],
    [255, 128, 0],
    [0, 0, 0],
    [255, 255, 255],
  ],
  np.int32,
)
NUM_TEST = 60
IMAGE_SIDE = 8


def make_image(label: int, rng: np.random.Generator) -> np.ndarray:
  """An 8x8 RGB image: the label's colour plus noise, so that every image differs."""
  noise = rng.integers(-30, 31, size=(IMAGE_SIDE, IMAGE_SIDE, 3))
  return np.clip(PALETTE[label % len(PALETTE)] + noise, 0, 255).astype(np.uint8)


def write_prepared_task(root: str, folder: str, num_labels: int, ext: str = "jpg", seed: int = 0) -> dict:
  """Writes `<root>/<folder>/` as get_vtab1k.py does; returns `{split: [(relative path, label)]}`."""
  rng = np.random.default_rng(seed)
  task_dir = os.path.join(root, folder)
  splits: dict[str, list[tuple[str, int]]] = {}

  def write_split(split: str, labels) -> None:
    os.makedirs(os.path.join(task_dir, "images", split), exist_ok=True)
    splits[split] = []
    for i, label in enumerate(labels):
      relative = f"images/{split}/{i:06d}.{ext}"
      Image.fromarray(make_image(int(label), rng)).save(os.path.join(task_dir, relative))
      splits[split].append((relative, int(label)))

  write_split("train800", rng.integers(0, num_labels, 800))
  write_split("val200", rng.integers(0, num_labels, 200))
  write_split("test", rng.integers(0, num_labels, NUM_TEST))
  # train800val200 holds its own copies of the train800 and val200 files, in that order.
  os.makedirs(os.path.join(task_dir, "images", "train800val200"))
  splits["train800val200"] = []
  for i, (source, label) in enumerate(splits["train800"] + splits["val200"]):
    relative = f"images/train800val200/{i:06d}.{ext}"
    shutil.copyfile(os.path.join(task_dir, source), os.path.join(task_dir, relative))
    splits["train800val200"].append((relative, label))
  for split, entries in splits.items():
    with open(os.path.join(task_dir, f"{split}.txt"), "w") as f:
      f.writelines(f"{path} {label}\n" for path, label in entries)
  return splits


def make_root(test: absltest.TestCase) -> tuple[str, dict, dict]:
  root = tempfile.mkdtemp(prefix="vtab1k_")
  test.addCleanup(shutil.rmtree, root, ignore_errors=True)
  natural = write_prepared_task(root, "cifar", num_labels=10, ext="jpg", seed=1)
  structured = write_prepared_task(root, "clevr_dist", num_labels=6, ext="png", seed=2)
  return root, natural, structured


def tempdir(test: absltest.TestCase) -> str:
  path = tempfile.mkdtemp(prefix="h2t_test_")
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def edit_lines(path: str, edit) -> None:
  with open(path) as f:
    lines = f.read().splitlines()
  with open(path, "w") as f:
    f.write("\n".join(edit(lines)) + "\n")


class PreparedFolderTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root, cls.natural, cls.structured = make_root(cls)

  @classmethod
  def addCleanup(cls, *args, **kwargs):  # make_root's cleanup, at class level
    cls.addClassCleanup(*args, **kwargs)

  def test_folder_names_cover_every_task(self):
    self.assertCountEqual(vtab_folder.FOLDERS, vtab.TASKS)
    self.assertEqual(vtab_folder.FOLDERS["cifar100"], "cifar")
    self.assertEqual(vtab_folder.FOLDERS["kitti_distance"], "kitti")
    self.assertEqual(vtab_folder.FOLDERS["smallnorb_elevation"], "smallnorb_ele")

  def test_splits_labels_and_classes(self):
    for name, lists, classes in (("cifar100", self.natural, 100), ("clevr_distance", self.structured, 6)):
      task = data.get_task(name, data_dir=self.root)
      self.assertIsInstance(task, vtab_folder.PreparedVtabTask)
      self.assertEqual(task.name, name)  # results and reports group it as the VTAB task
      self.assertEqual(task.num_classes, classes)
      self.assertEqual(
        dict(task.split_sizes), {"train800": 800, "val200": 200, "train800val200": 1000, "test": NUM_TEST}
      )
      self.assertEqual(task.folder, os.path.join(self.root, vtab_folder.FOLDERS[name]))
      for split in ("train800", "test"):
        images, labels = task.arrays(split, image_size=16, batch_size=128)
        self.assertEqual(images.shape, (task.size(split), 16, 16, 3))
        self.assertEqual(images.dtype, np.float32)
        np.testing.assert_array_equal(labels, [label for _, label in lists[split]])
        self.assertBetween(float(images.min()), 0.0, 255.0)
        self.assertBetween(float(images.max()), 0.0, 255.0)

  def test_folds_are_index_ranges_and_fold_4_is_train800_val200(self):
    task = data.get_task("cifar100", data_dir=self.root)
    trainval = task.arrays("train800val200", image_size=IMAGE_SIDE)
    train800 = task.arrays("train800", image_size=IMAGE_SIDE)
    val200 = task.arrays("val200", image_size=IMAGE_SIDE)
    train_idx, valid_idx = base.fold_indices(4)
    for got, want in ((train_idx, train800), (valid_idx, val200)):
      np.testing.assert_array_equal(trainval[0][got], want[0])
      np.testing.assert_array_equal(trainval[1][got], want[1])
    # Fold 0 validates on the first 200 of train800.
    _, valid0 = base.fold_indices(0)
    np.testing.assert_array_equal(trainval[0][valid0], train800[0][:200])

  def test_each_share_decodes_only_its_own_files(self):
    task = data.get_task("cifar100", data_dir=self.root)
    decoded = []
    real = vtab_folder.load_image

    def counted(entry, image_size):
      decoded.append(entry.path)
      return real(entry, image_size)

    want = list(task.batches("test", 16, image_size=IMAGE_SIDE))
    got = []
    with mock.patch.object(vtab_folder, "load_image", counted):
      for p in range(2):
        decoded.clear()
        mine = list(task.batches("test", 16, image_size=IMAGE_SIDE, share=base.Share(p, 2)))
        for (images, labels), i in zip(mine, range(p, len(want), 2), strict=True):
          np.testing.assert_array_equal(images, want[i][0])
          np.testing.assert_array_equal(labels, want[i][1])
        self.assertLen(decoded, sum(len(b[1]) for b in mine))  # no other share's file was opened
        got += decoded
    self.assertLen(set(got), len(got))
    self.assertLen(got, NUM_TEST)

  def test_pixels_are_the_files_decoded_and_resized_as_tfds_does(self):
    task = data.get_task("clevr_distance", data_dir=self.root)
    images, _ = next(task.batches("test", 4, image_size=20))
    path = os.path.join(self.root, "clevr_dist", self.structured["test"][0][0])
    with Image.open(path) as im:
      decoded = np.asarray(im.convert("RGB"))
    want = tf.image.resize(decoded, [20, 20], method="bilinear").numpy()
    np.testing.assert_allclose(images[0], want, atol=1e-3)

  def test_resize_matches_tf_image_resize(self):
    rng = np.random.default_rng(0)
    for (h, w), size in (((5, 7), 32), ((300, 200), 224), ((240, 240), 224), ((8, 8), 8), ((1, 3), 4)):
      image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      want = tf.image.resize(image, [size, size], method="bilinear").numpy()
      np.testing.assert_allclose(
        vtab_folder.resize_bilinear(image, size), want, atol=1e-3, err_msg=f"{h}x{w}"
      )

  def test_without_lists_the_tfds_path_is_unchanged(self):
    self.assertFalse(vtab_folder.has_lists("dtd", self.root))
    self.assertTrue(vtab_folder.has_lists("cifar100", self.root))
    self.assertFalse(vtab_folder.has_lists("cifar100", None))
    with self.assertRaises(vtab.NotPreparedError) as e:
      data.get_task("dtd", data_dir=self.root)
    message = str(e.exception)
    self.assertIn("python -m h2t.data.prepare --tasks=dtd", message)
    self.assertIn(os.path.join(self.root, "dtd") + "/", message)


def _set_label(line: str, label: int) -> str:
  return f"{line.rsplit(maxsplit=1)[0]} {label}"


def _swap_first_two(lines):
  return [lines[1], lines[0]] + lines[2:]


class BadListsTest(parameterized.TestCase):
  """Every broken list is a ValueError naming the file and the line."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.pristine = tempfile.mkdtemp(prefix="vtab1k_")
    cls.addClassCleanup(shutil.rmtree, cls.pristine, ignore_errors=True)
    write_prepared_task(cls.pristine, "cifar", num_labels=10, seed=3)

  def setUp(self):
    super().setUp()
    self.root = os.path.join(tempdir(self), "root")
    shutil.copytree(self.pristine, self.root)
    self.dir = os.path.join(self.root, "cifar")

  def edit(self, list_name: str, edit) -> str:
    path = os.path.join(self.dir, list_name)
    edit_lines(path, edit)
    return path

  def assert_fails(self, pattern: str):
    with self.assertRaisesRegex(ValueError, pattern):
      data.get_task("cifar100", data_dir=self.root)

  def test_byte_order_mark_and_windows_line_ends_are_read(self):
    path = os.path.join(self.dir, "train800.txt")
    with open(path) as f:
      lines = f.read().splitlines()
    with open(path, "w", encoding="utf-8-sig", newline="\r\n") as f:
      f.write("\n".join(lines) + "\n")
    task = data.get_task("cifar100", data_dir=self.root)
    _, labels = task.arrays("train800", image_size=8)
    np.testing.assert_array_equal(labels, [int(line.rsplit(maxsplit=1)[1]) for line in lines])

  def test_label_outside_the_classes(self):
    path = self.edit("train800.txt", lambda ls: ls[:4] + [_set_label(ls[4], 100)] + ls[5:])
    self.assert_fails(rf"^{path} line 5: label 100 is outside \[0, 100\)")

  def test_negative_label(self):
    path = self.edit("test.txt", lambda ls: ls[:9] + [_set_label(ls[9], -1)] + ls[10:])
    self.assert_fails(rf"^{path} line 10: label -1 is outside")

  @parameterized.parameters(
    "images/train800/000002.jpg", "images/train800/000002.jpg three", "images/train800/000002.jpg --3", ""
  )
  def test_malformed_line(self, bad):
    # An empty third line is skipped: the list then has 799 entries, which is its own error.
    path = self.edit("train800.txt", lambda ls: ls[:2] + [bad] + ls[3:])
    if bad:
      self.assert_fails(rf"^{path} line 3: '{bad}' is not of the form '<image path")
    else:
      self.assert_fails(rf"^{path} lists 799 images; VTAB-1k's train800 has exactly 800")

  def test_path_listed_twice(self):
    path = self.edit("val200.txt", lambda ls: ls[:5] + [ls[0]] + ls[6:])
    self.assert_fails(rf"^{path} line 6: 'images/val200/000000.jpg' is listed twice \(line 1\)")

  def test_wrong_number_of_lines(self):
    path = self.edit("val200.txt", lambda ls: ls[:-1])
    self.assert_fails(rf"^{path} lists 199 images; VTAB-1k's val200 has exactly 200")

  def test_missing_list(self):
    os.remove(os.path.join(self.dir, "test.txt"))
    self.assert_fails(rf"the prepared folder {self.dir} lacks test.txt")

  def test_missing_image(self):
    os.remove(os.path.join(self.dir, "images", "test", "000007.jpg"))
    path = os.path.join(self.dir, "test.txt")
    self.assert_fails(rf"^{path} line 8: image 'images/test/000007.jpg' not found .*1 of the {NUM_TEST}")

  def test_unreadable_image_fails_when_read_naming_the_line(self):
    with open(os.path.join(self.dir, "images", "test", "000002.jpg"), "wb") as f:
      f.write(b"not a JPEG file")
    task = data.get_task("cifar100", data_dir=self.root)
    path = os.path.join(self.dir, "test.txt")
    with self.assertRaisesRegex(ValueError, rf"^{path} line 3: cannot read image .*000002.jpg"):
      task.arrays("test", image_size=8)

  def test_trainval_in_another_order(self):
    path = self.edit("train800val200.txt", _swap_first_two)
    self.assert_fails(rf"^{path} line 1: .*train800.txt line 1.* another order")

  def test_trainval_with_another_image(self):
    other = os.path.join(self.dir, "images", "train800val200", "000899.jpg")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(other)
    path = os.path.join(self.dir, "train800val200.txt")
    self.assert_fails(
      rf"^{path} line 900: '000899.jpg' .* is not the image of .*val200.txt line 100.*disagree"
    )

  def test_each_process_compares_its_share_of_trainval(self):
    other = os.path.join(self.dir, "images", "train800val200", "000899.jpg")  # line 900: index 899
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(other)
    with self.assertRaisesRegex(ValueError, "line 900: '000899.jpg'"):
      data.get_task("cifar100", data_dir=self.root, share=base.Share(899 % 3, 3))
    opened = []
    real = vtab_folder._same_file_content

    def counted(a, b):
      opened.append(a)
      return real(a, b)

    with mock.patch.object(vtab_folder, "_same_file_content", counted):
      data.get_task("cifar100", data_dir=self.root, share=base.Share(1, 3))  # not its pair: no error
    trainval = vtab_folder.parse_list(os.path.join(self.dir, "train800val200.txt"), self.dir, 100)
    self.assertEqual(opened, [e.path for e in trainval[1::3]])  # its third of the pairs, no other

  def test_trainval_with_another_label(self):
    def relabel(lines):
      label = int(lines[9].rsplit(maxsplit=1)[1])
      return lines[:9] + [_set_label(lines[9], (label + 1) % 10)] + lines[10:]

    path = self.edit("train800val200.txt", relabel)
    self.assert_fails(rf"^{path} line 10: .*train800.txt line 10")


class EndToEndTest(parameterized.TestCase):
  """`python -m h2t.main --config.dataset=<task> --config.data_dir=<root>` on a prepared folder."""

  @parameterized.parameters(("cifar100", "cifar", 10), ("clevr_distance", "clevr_dist", 6))
  def test_main_reads_the_prepared_folder(self, name, folder, num_labels):
    root = tempdir(self)
    write_prepared_task(root, folder, num_labels=num_labels, ext="jpg" if folder == "cifar" else "png")
    workdir = os.path.join(tempdir(self), "w")
    cmd = [
      sys.executable,
      "-m",
      "h2t.main",
      "--config=" + os.path.join(ROOT, "configs", "vtab.py"),
      f"--workdir={workdir}",
      f"--config.dataset={name}",
      f"--config.data_dir={root}",
      "--config.backbone.input_size=32",
      "--config.backbone.additional_features_target_size=64",
      "--config.learning.training_steps=20",
      "--config.sweep=",
    ]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(os.path.join(workdir, "results.json")) as f:
      results = json.load(f)
    self.assertEqual(results["task"], name)
    self.assertEqual(results["num_classes"], vtab.TASKS[name].num_classes)
    # The colour gives the label away: far above chance (1 / num_labels).
    self.assertGreater(results["methods"]["head2toe"]["test_accuracy"], 0.5)
    with open(os.path.join(workdir, "log.txt")) as f:
      self.assertIn(f"reading the prepared folder {os.path.join(root, folder)}", f.read())


if __name__ == "__main__":
  absltest.main()
