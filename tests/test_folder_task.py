"""Folders of images as tasks (`--config.dataset=folder:PATH`): layouts, splits, errors, end to end."""

import glob
import os
from unittest import mock

import ml_collections
import numpy as np
from absl.testing import absltest
from PIL import Image

import configs.vtab as vtab_config
from h2t import data, evaluate
from h2t.data import base, folder
from tests import toy

COLOURS = {"blue": 2, "green": 1, "red": 0}


def write_images(directory, n, channel, *, seed, size=(20, 24), ext="png"):
  """`n` noisy images in which one colour channel dominates."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(n):
    im = rng.integers(0, 80, size + (3,), dtype=np.uint8)
    im[..., channel] += 150
    Image.fromarray(im).save(os.path.join(directory, f"img{i:03d}.{ext}"))


def make_tempdir(test):
  return toy.make_tempdir(test, prefix="h2t_folder_")


class FolderLayoutTest(absltest.TestCase):
  def test_train_test_layout(self):
    root = make_tempdir(self)
    for c, ch in COLOURS.items():
      write_images(os.path.join(root, "train", c), 7, ch, seed=ch)
      write_images(os.path.join(root, "test", c), 2, ch, seed=10 + ch, ext="jpg")
    task = data.get_task(f"folder:{root}")
    self.assertEqual(task.class_names, ("blue", "green", "red"))
    self.assertEqual(task.num_classes, 3)
    self.assertEqual(task.layout, "train_test")
    self.assertEqual(task.size("train800val200"), 21)
    self.assertEqual(task.size("test"), 6)
    self.assertEqual(task.size("train800") + task.size("val200"), 21)
    images, labels = task.arrays("test", image_size=16)
    self.assertEqual(images.shape, (6, 16, 16, 3))
    self.assertEqual(images.dtype, np.uint8)
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])
    # The dominant channel survives decoding and resizing: label i is class_names[i].
    np.testing.assert_array_equal(
      images.mean(axis=(1, 2)).argmax(axis=1),
      [COLOURS[c] for c in ("blue",) * 2 + ("green",) * 2 + ("red",) * 2],
    )
    # Training images are shuffled once, so that each contiguous CV fold holds several classes.
    _, train_labels = task.arrays("train800val200", image_size=16)
    for fold in range(base.NUM_FOLDS):
      _, valid = base.fold_indices(fold, len(train_labels))
      self.assertGreater(len(set(train_labels[valid].tolist())), 1)
    np.testing.assert_array_equal(np.bincount(train_labels), [7, 7, 7])

  def test_single_folder_is_split_per_class_deterministically(self):
    root = make_tempdir(self)
    for c, ch in COLOURS.items():
      write_images(os.path.join(root, c), 10, ch, seed=ch)
    write_images(os.path.join(root, "pair"), 2, 0, seed=5)
    write_images(os.path.join(root, "single"), 1, 1, seed=6)
    with open(os.path.join(root, "red", "README.txt"), "w") as f:
      f.write("ignored")
    layout, names, files = folder.split_files(root)
    self.assertEqual(layout, "single")
    self.assertEqual(names, ("blue", "green", "pair", "red", "single"))
    test_counts = np.bincount([y for _, y in files["test"]], minlength=5)
    # 20% of each class to test, at least one when the class has two images, none when it has one.
    np.testing.assert_array_equal(test_counts, [2, 2, 1, 2, 0])
    self.assertEqual(len(files["train"]), 8 * 3 + 1 + 1)
    self.assertEqual(folder.split_files(root), (layout, names, files))  # deterministic
    self.assertFalse({p for p, _ in files["train"]} & {p for p, _ in files["test"]})

  def test_name_is_safe_and_follows_the_data(self):
    root = os.path.join(make_tempdir(self), "my photos")
    for c, ch in COLOURS.items():
      write_images(os.path.join(root, c), 6, ch, seed=ch)
    name = data.get_task(f"folder:{root}").name
    self.assertRegex(name, r"^folder_my_photos_[0-9a-f]{10}$")
    self.assertEqual(data.get_task(f"folder:{root}/").name, name)
    write_images(os.path.join(root, "red", "more"), 0, 0, seed=0)  # an empty subfolder changes nothing
    self.assertEqual(data.get_task(f"folder:{root}").name, name)
    Image.new("RGB", (5, 5)).save(os.path.join(root, "red", "new.png"))
    self.assertNotEqual(data.get_task(f"folder:{root}").name, name)  # the feature cache is not reused

  def test_errors_name_the_problem(self):
    root = make_tempdir(self)
    with self.assertRaisesRegex(FileNotFoundError, "does not exist; expected either"):
      data.get_task(f"folder:{root}/nothing")
    write_images(os.path.join(root, "a"), 6, 0, seed=0)
    with self.assertRaisesRegex(ValueError, "1 class folder"):
      data.get_task(f"folder:{root}")
    os.makedirs(os.path.join(root, "b"))
    with self.assertRaisesRegex(ValueError, r"/b hold no \.png/\.jpg/\.jpeg files"):
      data.get_task(f"folder:{root}")
    split = make_tempdir(self)
    write_images(os.path.join(split, "train", "a"), 3, 0, seed=0)
    write_images(os.path.join(split, "train", "b"), 3, 1, seed=1)
    write_images(os.path.join(split, "test", "c"), 1, 2, seed=2)
    with self.assertRaisesRegex(ValueError, "test has classes that .*train lacks: c"):
      data.get_task(f"folder:{split}")
    bad = os.path.join(root, "a", "broken.png")
    with open(bad, "wb") as f:
      f.write(b"not a png")
    with self.assertRaisesRegex(ValueError, "cannot read image .*broken.png"):
      folder.load_image(bad, 8)

  def test_image_modes_become_rgb(self):
    root = make_tempdir(self)
    grey = Image.fromarray(np.full((6, 9), 200, np.uint8))
    rgba = Image.fromarray(np.full((6, 9, 4), 100, np.uint8))
    palette = Image.fromarray(np.full((6, 9, 3), 50, np.uint8)).convert("P")
    for name, im in (("grey.png", grey), ("rgba.png", rgba), ("palette.png", palette), ("photo.JPEG", grey)):
      im.save(os.path.join(root, name))
    self.assertTrue(folder.is_image_file("photo.JPEG"))
    self.assertFalse(folder.is_image_file(".hidden.png"))
    # rgba.png is colour 100 at alpha 100: composited on black, 100 * 100 / 255 = 39.
    for name, value in (("grey.png", 200), ("rgba.png", 39), ("palette.png", 50), ("photo.JPEG", 200)):
      x = folder.load_image(os.path.join(root, name), 12)
      self.assertEqual(x.shape, (12, 12, 3))
      self.assertAlmostEqual(float(x.mean()), value, delta=2)

  def test_each_share_decodes_only_its_own_files(self):
    root = make_tempdir(self)
    for c, ch in COLOURS.items():
      write_images(os.path.join(root, "train", c), 7, ch, seed=ch)
      write_images(os.path.join(root, "test", c), 3, ch, seed=10 + ch, ext="jpg")
    task = data.get_task(f"folder:{root}")
    decoded = []
    real = folder.load_image

    def counted(path, image_size):
      decoded.append(path)
      return real(path, image_size)

    whole = {split: list(task.batches(split, 4, image_size=8)) for split in ("train800val200", "test")}
    with mock.patch.object(folder, "load_image", counted):
      for split, want in whole.items():
        per_share = []
        for p in range(3):
          share = base.Share(p, 3)
          decoded.clear()
          mine = list(task.batches(split, 4, image_size=8, share=share))
          self.assertLen(decoded, sum(n for _, n in share.positions(task.size(split), 4)))
          for (images, labels), i in zip(mine, range(p, len(want), 3), strict=True):
            np.testing.assert_array_equal(images, want[i][0])
            np.testing.assert_array_equal(labels, want[i][1])
          per_share.append(list(decoded))
          decoded.clear()
          task.verify(split, 4, share)  # checks the very files this share reads
          self.assertCountEqual(decoded, per_share[-1])
        got = sum(per_share, [])
        self.assertLen(set(got), len(got))  # no file decoded by two shares
        self.assertLen(got, task.size(split))  # and every file by one

  def test_config_accepts_folder_names(self):
    self.assertIn("folder:/any/path", data.task_names())
    self.assertNotIn("folder:", data.task_names())
    self.assertIn("folder:PATH", ", ".join(data.task_names()))
    data.check_task_name("folder:~/photos")
    config = ml_collections.ConfigDict({"dataset": "folder:/x"})
    self.assertIn(config.dataset, data.task_names())
    with self.assertRaisesRegex(ValueError, "unknown task 'folders:/x'.*folder:PATH"):
      data.check_task_name("folders:/x")


class FolderEndToEndTest(absltest.TestCase):
  def test_main_on_a_folder(self):
    root = make_tempdir(self)
    for c, ch in COLOURS.items():
      write_images(os.path.join(root, "images", "train", c), 8, ch, seed=ch)
      write_images(os.path.join(root, "images", "test", c), 3, ch, seed=10 + ch)
    workdir = os.path.join(root, "run")
    dataset = "--config.dataset=folder:"
    proc = toy.run_main(workdir, dataset + os.path.join(root, "images"), toy.NO_GRID)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    results = toy.results(workdir)
    self.assertRegex(results["task"], r"^folder_images_[0-9a-f]{10}$")
    self.assertEqual(results["num_classes"], 3)
    # Colour is easy: the real backbone's features separate the classes.
    self.assertGreaterEqual(results["methods"]["head2toe"]["test_accuracy"], 8 / 9)
    self.assertLen(glob.glob(os.path.join(workdir, "cache", "*.npz")), 1)  # one feature file

    # A missing folder stops the run with a message naming the layouts.
    proc = toy.run_main(workdir, dataset + os.path.join(root, "nope"), toy.NO_GRID)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("does not exist; expected either", proc.stderr)

  def test_validate_accepts_a_folder(self):
    config = vtab_config.get_config()
    config.dataset = "folder:/somewhere"
    evaluate.validate(config)  # the folder is read (and checked) when the run loads the task
    config.dataset = "folder"
    with self.assertRaisesRegex(ValueError, "config.dataset='folder': expected one of .*folder:PATH"):
      evaluate.validate(config)


if __name__ == "__main__":
  absltest.main()
