"""Faults a careful user or a crash can cause: each ends in a clear error, never a wrong result or lost work."""

import fcntl
import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

import numpy as np
from absl.testing import absltest

import configs.vtab as vtab_config
from h2t import evaluate, files, head2toe
from h2t.head import Head, HeadFileError
from tests import toy


def fast_config(**values):
  config = vtab_config.get_config()
  config.backbone.input_size = 32
  config.backbone.additional_features_target_size = 64
  config.learning.training_steps = 20
  config.sweep = ""
  return toy.override(config, **values)


def strict_load(path):
  def refuse(name):
    raise ValueError(f"non-JSON constant {name}")

  with open(path) as f:
    return json.load(f, parse_constant=refuse)


class NumericsTest(absltest.TestCase):
  def test_diverging_training_names_the_setting(self):
    feats, labels = toy.two_taps()
    feats = {k: v * 1e10 for k, v in feats.items()}  # plain SGD at this rate blows the weights up
    learning = toy.learning(10, learning_rate=1e30, optimizer="sgd", feature_normalization="")
    with self.assertRaisesRegex(FloatingPointError, r"diverged.*learning_rate=1e\+30"):
      head2toe.fit(feats, labels, learning, seed=0)

  def test_infinite_feature_is_refused_not_a_nan_head(self):
    feats, labels = toy.two_taps()
    feats["a"][7, 3] = -np.inf
    with self.assertRaisesRegex(ValueError, r"tap 'a' holds 1 non-finite.*\[7\]"):
      head2toe.fit(feats, labels, toy.learning(5), seed=0)

  def test_fractional_labels_are_refused(self):
    feats, labels = toy.two_taps()
    with self.assertRaisesRegex(ValueError, "label 2.7 at index 0 is not a whole number"):
      head2toe.fit(feats, np.r_[2.7, labels[1:]].astype(np.float64), toy.learning(5), seed=0)
    with self.assertRaisesRegex(ValueError, "outside \\[0, 3\\)"):
      head2toe.fit(feats, np.r_[3, labels[1:]], toy.learning(5), seed=0, num_classes=3)


class HeadFileTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self._tmp = tempfile.TemporaryDirectory()
    self.addCleanup(self._tmp.cleanup)
    self.tmp = self._tmp.name
    feats, labels = toy.two_taps()
    self.head = head2toe.fit(feats, labels, toy.learning(5), seed=0)
    self.path = os.path.join(self.tmp, "head.npz")
    self.head.save(self.path)

  def _write(self, data: bytes) -> str:
    path = os.path.join(self.tmp, "bad.npz")
    with open(path, "wb") as f:
      f.write(data)
    return path

  def test_damaged_files_name_the_file(self):
    good = open(self.path, "rb").read()
    for data in (b"", good[: len(good) // 2], b"PK\x03\x04" + os.urandom(200), os.urandom(300)):
      with self.assertRaisesRegex(HeadFileError, "bad.npz"):
        Head.load(self._write(data))

  def test_foreign_npz_and_inconsistent_heads(self):
    foreign = os.path.join(self.tmp, "bad.npz")
    np.savez(foreign, weights=np.ones(3))
    with self.assertRaisesRegex(HeadFileError, "no 'header'"):
      Head.load(foreign)
    broken = Head(self.head.kept, {**self.head.params, "w": self.head.params["w"][:-1]}, "unit_vector")
    broken.save(foreign)
    with self.assertRaisesRegex(HeadFileError, "keeps .* features"):
      Head.load(foreign)
    nan = Head(self.head.kept, {**self.head.params, "b": np.full(3, np.nan, np.float32)}, "unit_vector")
    nan.save(foreign)
    with self.assertRaisesRegex(HeadFileError, "params/b is not finite"):
      Head.load(foreign)

  def test_predict_command_errors_are_one_line(self):
    empty = self._write(b"")
    for args in (
      [f"--head={empty}", self.tmp],
      [f"--head={self.path}", f"--output={self.tmp}/no/dir/p.csv", self.tmp],
    ):
      proc = toy.run_python("-m", "h2t.predict", *args, timeout=300)
      self.assertNotEqual(proc.returncode, 0)
      self.assertTrue(proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr[-1500:])
      self.assertNotIn("Traceback", proc.stderr)


class WorkdirTest(absltest.TestCase):
  """A run is a transaction on its workdir."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    cls.workdir = os.path.join(cls._tmp.name, "w")
    cls.first = evaluate.run(fast_config(methods=("head2toe", "ridge")), cls.workdir)

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def _bytes(self, name):
    with open(os.path.join(self.workdir, name), "rb") as f:
      return f.read()

  def test_results_are_strict_json(self):
    r = strict_load(os.path.join(self.workdir, "results.json"))
    self.assertIsNone(r["methods"]["ridge"]["final_train_loss"])  # closed form: no loss, null not NaN

  def test_a_failed_run_leaves_the_previous_outputs_whole(self):
    before = {n: self._bytes(n) for n in ("results.json", "head_head2toe.npz", "head_ridge.npz")}
    config = fast_config(methods=("head2toe", "ridge"), **{"learning.feature_selection.keep_fraction": 0.2})
    with mock.patch.object(evaluate, "stream_test", side_effect=RuntimeError("test phase failed")):
      with self.assertRaisesRegex(RuntimeError, "test phase failed"):
        evaluate.run(config, self.workdir)
    for name, data in before.items():
      self.assertEqual(self._bytes(name), data, name)

  def test_second_run_on_a_busy_workdir_refuses(self):
    lock = os.path.join(self.workdir, files.LOCK_NAME)
    holder = subprocess.Popen(
      [
        sys.executable,
        "-c",
        f"import fcntl,os,time;fd=os.open({lock!r},os.O_RDWR);fcntl.flock(fd,fcntl.LOCK_EX);print(1,flush=True);time.sleep(60)",
      ],
      stdout=subprocess.PIPE,
      text=True,
    )
    try:
      holder.stdout.readline()
      with self.assertRaisesRegex(files.WorkdirBusy, "in use by another h2t run"):
        evaluate.run(fast_config(), self.workdir)
    finally:
      holder.kill()
      holder.wait()
    # The holder died: its lock went with it, and the next run takes the workdir.
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)

  def test_temporaries_of_a_killed_run_are_swept(self):
    stale = os.path.join(self.workdir, ".head_head2toe.npz.abc" + files.TMP_SUFFIX)
    with open(stale, "wb") as f:
      f.write(b"half a file")
    with files.workdir_lock(self.workdir):
      self.assertFalse(os.path.exists(stale))

  def test_unwritable_cache_is_a_warning(self):
    with tempfile.TemporaryDirectory() as tmp:
      blocker = os.path.join(tmp, "not_a_folder")
      open(blocker, "w").close()
      r = evaluate.run(fast_config(cache_dir=os.path.join(blocker, "cache")), os.path.join(tmp, "w"))
      self.assertIn("test_accuracy", r["methods"]["head2toe"])
      self.assertEqual(
        r["methods"]["head2toe"]["test_accuracy"], self.first["methods"]["head2toe"]["test_accuracy"]
      )


if __name__ == "__main__":
  absltest.main()


class TestImagesTest(absltest.TestCase):
  def test_a_damaged_test_image_fails_before_training(self):
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
      root = os.path.join(tmp, "data")
      for split in ("train", "test"):
        for c, colour in (("cat", 40), ("dog", 200)):
          os.makedirs(os.path.join(root, split, c))
          for i in range(6):
            Image.new("RGB", (12, 12), (colour, i * 10, 0)).save(os.path.join(root, split, c, f"{i}.png"))
      bad = os.path.join(root, "test", "dog", "3.png")
      with open(bad, "r+b") as f:
        f.truncate(40)
      workdir = os.path.join(tmp, "w")
      with self.assertRaisesRegex(ValueError, "3.png"):
        evaluate.run(fast_config(dataset=f"folder:{root}"), workdir)
      self.assertFalse(os.path.exists(os.path.join(workdir, "cache")))  # nothing was extracted
