"""Labels reach the probe as int32 class indices in [0, num_classes), or the task refuses them by name."""

from __future__ import annotations

import gzip
import os
import struct
import tempfile

import numpy as np
from absl.testing import absltest, parameterized

from h2t.data import base, local


def _splits(labels) -> dict:
  images = np.zeros((len(labels), 4, 4, 3), np.uint8)
  return {"train800val200": (images, labels), "test": (images[:2], np.array([0, 1]))}


class LabelTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("fraction", np.array([0.0, 2.7, 1.0]), "label 2.7 at index 1 is not a whole number"),
    ("nan", np.array([0.0, np.nan]), "is not a whole number"),
    ("too_large", np.array([0, 3, 1]), "label 3 at index 1 is outside [0, 3)"),
    ("negative", np.array([0, -1, 1]), "label -1 at index 1 is outside [0, 3)"),
    ("strings", np.array(["cat", "dog"]), "dtype <U3"),
    ("two_d", np.zeros((2, 3), np.int64), "1-D array"),
    ("objects", np.array([1, None], dtype=object), "dtype object"),
  )
  def test_array_task_refuses(self, labels, message):
    with self.assertRaises(ValueError) as cm:
      base.array_task("toy", 3, _splits(labels))
    self.assertIn(message, str(cm.exception))
    self.assertIn("task 'toy', split 'train800val200'", str(cm.exception))

  @parameterized.parameters(
    (np.array([0, 2, 1], np.int64),),
    (np.array([0.0, 2.0, 1.0]),),
    (np.array([0, 2, 1], np.uint8),),
    ([0, 2, 1],),
  )
  def test_whole_numbers_of_any_type_become_int32(self, labels):
    task = base.array_task("toy", 3, _splits(labels))
    _, got = task.arrays("train800val200", image_size=4)
    self.assertEqual(got.dtype, np.int32)
    np.testing.assert_array_equal(got, [0, 2, 1])

  def test_num_classes_must_be_positive(self):
    with self.assertRaisesRegex(ValueError, "num_classes must be a positive integer"):
      base.array_task("toy", 0, _splits(np.array([0])))

  def test_a_task_with_its_own_reader_is_checked_batch_by_batch(self):
    def read(split, batch_size, image_size):
      yield np.zeros((2, 4, 4, 3)), np.array([0, 1])
      yield np.zeros((2, 4, 4, 3)), np.array([1.5, 0.0])  # float labels a user computed

    task = base.Task("mine", 2, {"test": 4}, read)
    batches = task.batches("test", 2, image_size=4)
    _, first = next(batches)
    self.assertEqual(first.dtype, np.int32)
    with self.assertRaisesRegex(ValueError, r"task 'mine', split 'test': label 1\.5 at index 0"):
      next(batches)
    with self.assertRaisesRegex(ValueError, "has no split 'train'"):
      task.batches("train", 2, image_size=4)  # before any batch is read


class ShareTest(absltest.TestCase):
  """A process's share of a split: batch i of `count` processes' run goes to process i % count."""

  def test_shares_tile_the_split_in_batches(self):
    self.assertEqual(base.Share(1, 3).positions(10, 2), [(2, 2), (8, 2)])
    self.assertEqual(base.Share(2, 3).positions(11, 2), [(4, 2), (10, 1)])
    for count in (1, 2, 3, 7):
      rows = sorted(
        r for p in range(count) for s, n in base.Share(p, count).positions(23, 4) for r in range(s, s + n)
      )
      self.assertEqual(rows, list(range(23)))
    self.assertEqual(list(base.Share(1, 2).chunks("abcdefg", 2)), ["cd", "g"])
    with self.assertRaisesRegex(ValueError, "share 2 of 2"):
      base.Share(2, 2)

  def test_an_array_task_yields_its_shares_batches_only(self):
    images = np.arange(7, dtype=np.float32).reshape(7, 1, 1, 1) * np.ones((1, 2, 2, 3), np.float32)
    task = base.array_task("toy", 7, {"test": (images, np.arange(7))})
    self.assertTrue(task.reads_shares)
    got = [labels.tolist() for _, labels in task.batches("test", 2, image_size=2, share=base.Share(1, 2))]
    self.assertEqual(got, [[2, 3], [6]])
    whole = [labels.tolist() for _, labels in task.batches("test", 2, image_size=2)]
    self.assertEqual(whole, [[0, 1], [2, 3], [4, 5], [6]])

  def test_a_reader_without_shares_is_read_whole_and_filtered(self):
    read_batches = []

    def read(split, batch_size, image_size):  # a user's reader: three arguments, every batch
      for start in range(0, 5, batch_size):
        read_batches.append(start)
        yield np.zeros((min(batch_size, 5 - start), 2, 2, 3)), np.arange(start, min(start + batch_size, 5))

    task = base.Task("mine", 5, {"test": 5}, read)
    got = [labels.tolist() for _, labels in task.batches("test", 2, image_size=2, share=base.Share(0, 2))]
    self.assertEqual(got, [[0, 1], [4]])
    self.assertEqual(read_batches, [0, 2, 4])

  def test_a_reader_that_ignores_its_share_is_an_error(self):
    def read(split, batch_size, image_size, share=base.WHOLE):  # claims shares, reads everything
      for start in range(0, 5, batch_size):
        yield np.zeros((min(batch_size, 5 - start), 2, 2, 3)), np.zeros(min(batch_size, 5 - start), np.int32)

    task = base.Task("liar", 2, {"test": 5}, read, reads_shares=True)
    with self.assertRaisesRegex(ValueError, "batch 1 of this process's share has 2 examples, expected 1"):
      list(task.batches("test", 2, image_size=2, share=base.Share(0, 2)))
    with self.assertRaisesRegex(ValueError, "batch 1 of this process's share has 2 examples, expected none"):
      list(task.batches("test", 2, image_size=2, share=base.Share(1, 2)))


class IdxFileTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.dir = tmp.name

  def _write(self, name, content, gz=False):
    path = os.path.join(self.dir, name)
    with (gzip.open if gz else open)(path, "wb") as f:
      f.write(content)
    return path

  def test_round_trip(self):
    labels = np.array([3, 1, 4], np.uint8)
    path = self._write("l.gz", struct.pack(">HBBI", 0, 8, 1, 3) + labels.tobytes(), gz=True)
    np.testing.assert_array_equal(local.read_idx(path), labels)

  @parameterized.named_parameters(
    ("empty", b"", False, "too short"),
    ("header_cut", struct.pack(">HBB", 0, 8, 3) + b"\0\0", False, "ends inside its header"),
    ("data_cut", struct.pack(">HBBI", 0, 8, 1, 10) + b"\1\2", False, "expected 10 values, found 2"),
    ("not_gzip", b"plain bytes, not gzip", True, "cannot read it"),
  )
  def test_damaged_files_name_themselves(self, content, named_gz, message):
    path = self._write("bad.gz" if named_gz else "bad", content)
    with self.assertRaises(ValueError) as cm:
      local.read_idx(path)
    self.assertIn(path, str(cm.exception))
    self.assertIn(message, str(cm.exception))


if __name__ == "__main__":
  absltest.main()
