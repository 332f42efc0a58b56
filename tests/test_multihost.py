"""Two `h2t.main` processes on this machine (CPU, gloo) are one run: the one-process result, one writer."""

import collections
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import numpy as np
from absl.testing import absltest
from PIL import Image

from h2t import grid, multihost
from h2t.data import base
from tests import toy

# 20 training steps, two keep fractions: a grid whose choice and kept features can differ.
FAST = (*toy.fast(steps=20), "--config.sweep=learning.feature_selection.keep_fraction=0.05,0.1")
ENV = {"JAX_PLATFORMS": "cpu"}
WAIT_S = 600  # the most a run may take here; a hang fails the test instead of blocking it


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def write_digits_folder(root: str) -> None:
  """scikit-learn's digits as PNG files, `root/train/<digit>/` (1000 images) and `root/test/<digit>/` (797)."""
  from sklearn import datasets

  digits = datasets.load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  for n, i in enumerate(order):
    folder = os.path.join(root, "train" if n < 1000 else "test", str(digits.target[i]))
    os.makedirs(folder, exist_ok=True)
    pixels = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, f"{n:04d}.png"))


def counted(cmd, reads: str):
  """`cmd` (an `h2t.main` command) run through tests/read_counter.py, which lists its decodes in `reads`."""
  assert cmd[1:3] == ["-m", "h2t.main"], cmd
  return [sys.executable, "-m", "tests.read_counter", reads, *cmd[3:]]


def decoded(reads: str) -> collections.Counter:
  """`(path, size)` -> how many times the process decoded that file at that size."""
  with open(reads) as f:
    return collections.Counter(map(tuple, json.load(f)["decoded"]))


def trained(reads: str, cv: bool = True) -> collections.Counter:
  """`(point id, fold)` -> how many times the process trained that head: the CV's (folds 0..4) or the fits'."""
  with open(reads) as f:
    heads = map(tuple, json.load(f)["trained"])
    return collections.Counter(h for h in heads if (h[1] < base.NUM_FOLDS) == cv)


def start_processes(workdirs, *overrides, cwds=None, n=2, reads=None):
  """Starts `n` `h2t.main` processes of one run on 127.0.0.1; process i uses `workdirs[i]`.

  `reads`: if given, process i lists the image files it decodes in `reads[i]` (`counted`).
  """
  port = free_port()
  procs = []
  for i in range(n):
    cmd = toy.main_command(
      workdirs[i],
      *overrides,
      "--multihost",
      f"--coordinator_address=127.0.0.1:{port}",
      f"--num_processes={n}",
      f"--process_id={i}",
      fast=FAST,
    )
    if reads:
      cmd = counted(cmd, reads[i])
    procs.append(
      subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=toy.environ(ENV),
        cwd=cwds[i] if cwds else toy.ROOT,
      )
    )
  return procs


def finish(procs, timeout=WAIT_S):
  """`[(returncode, stdout, stderr)]`; kills every process if one is still running after `timeout`."""
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=timeout)
      out.append((p.returncode, stdout, stderr))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return out


def outcome(r):
  keys = ("test_accuracy", "valid_accuracy", "fold_accuracies", "chosen_point", "kept_per_tap", "num_kept")
  return {m: {k: v.get(k) for k in keys} for m, v in r["methods"].items()}


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


class TwoProcessRunTest(absltest.TestCase):
  """A one-process run, then the same run as two processes; process 1 gets a workdir it must never make.

  The task is scikit-learn's digits as a folder of PNG files, so that every
  image is decoded from a file, and each process lists the files it decoded.
  """

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(prefix="h2t_multihost_")
    cls.single, cls.shared, cls.elsewhere = (os.path.join(cls.tmp, d) for d in ("single", "shared", "p1"))
    write_digits_folder(os.path.join(cls.tmp, "digits"))
    cls.dataset = f"--config.dataset=folder:{os.path.join(cls.tmp, 'digits')}"
    cls.reads = [os.path.join(cls.tmp, f"reads_{who}.json") for who in ("single", "p0", "p1")]
    # The one-process run goes alongside the two processes (the machine's cores are shared either way).
    single = subprocess.Popen(
      counted(toy.main_command(cls.single, cls.dataset, fast=FAST), cls.reads[0]),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=toy.environ(ENV),
      cwd=toy.ROOT,
    )
    cls.procs = finish(start_processes([cls.shared, cls.elsewhere], cls.dataset, reads=cls.reads[1:]))
    ((rc, _, err),) = finish([single])
    assert rc == 0, err[-3000:]

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_two_processes_give_the_one_process_run(self):
    (rc0, out0, err0), (rc1, out1, err1) = self.procs
    self.assertEqual(rc0, 0, err0[-3000:])
    self.assertEqual(rc1, 0, err1[-3000:])
    one, two = toy.results(self.single), toy.results(self.shared)
    self.assertEqual((one["num_processes"], two["num_processes"]), (1, 2))
    self.assertEqual(two["taps"], one["taps"])  # network order survives the gather
    self.assertEqual(outcome(two), outcome(one))  # choice, fold and test accuracies, kept features
    self.assertEqual(two["grid"], one["grid"])  # every point's fold accuracies
    for name in one["methods"]:
      a = np.load(os.path.join(self.single, f"head_{name}.npz"))
      b = np.load(os.path.join(self.shared, f"head_{name}.npz"))
      kept = [k for k in a.files if k.startswith("kept/")]
      self.assertTrue(kept, a.files)
      self.assertEqual(b.files, a.files)
      for k in kept:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    # The gathered training features are the one-process ones (same cache file, same checksum).
    (c1,), (c2,) = glob.glob(f"{self.single}/cache/*.npz"), glob.glob(f"{self.shared}/cache/*.npz")
    self.assertEqual(os.path.basename(c1), os.path.basename(c2))
    self.assertEqual(str(np.load(c1)["checksum"]), str(np.load(c2)["checksum"]))
    # Both print the same accuracies and choices; only process 0 names its results file.
    self.assertEqual(
      [line for line in out1.splitlines() if "accuracy" in line],
      [line for line in out0.splitlines() if "accuracy" in line],
    )
    self.assertIn("results: ", out0)
    self.assertNotIn("results: ", out1)

  def test_no_image_is_read_by_two_processes(self):
    for rc, _, err in self.procs:
      self.assertEqual(rc, 0, err[-3000:])
    one, p0, p1 = map(decoded, self.reads)
    images = glob.glob(os.path.join(self.tmp, "digits", "*", "*", "*.png"))
    self.assertLen(images, 1797)
    self.assertCountEqual({path for path, _ in one}, images)  # the one-process run reads every file
    files0, files1 = {path for path, _ in p0}, {path for path, _ in p1}
    self.assertEqual(files0 & files1, set())  # no file is opened by both processes
    self.assertEqual(p0 + p1, one)  # every decode of the one-process run happens on exactly one process
    # Each reads its share of the batches: 8 of the 16 training batches of 64 and 7 of the 13 test batches.
    for p, files in enumerate((files0, files1)):
      share = base.Share(p, 2)
      expected = sum(n for _, n in share.positions(1000, 64)) + sum(n for _, n in share.positions(797, 64))
      self.assertLen(files, expected)

  def test_the_cv_heads_are_split_over_the_processes(self):
    for rc, _, err in self.procs:
      self.assertEqual(rc, 0, err[-3000:])
    one, p0, p1 = (trained(r) for r in self.reads)
    # head2toe's 2 keep fractions and linear's 1 distinct point (it ignores them), 5 folds each.
    self.assertLen(one, 15)
    self.assertEqual(set(one.values()), {1})  # one process trains each head once
    self.assertTrue(p0 and p1)
    self.assertEqual(set(p0) & set(p1), set())  # no head is trained by both processes
    self.assertEqual(p0 + p1, one)  # together they train the one-process run's heads
    # Unit k = (batch, fold) runs on process k % 2: head2toe folds 0, 2, 4 and linear folds 1, 3 on process 0.
    self.assertEqual((len(p0), len(p1)), (2 * 3 + 2, 2 * 2 + 3))
    self.assertEqual(toy.results(self.shared)["cv_heads_per_process"], [len(p0), len(p1)])
    self.assertEqual(toy.results(self.single)["cv_heads_per_process"], [15])
    self.assertIn("cv: 15 heads (distinct point x fold) split over the processes: 8, 7", self.procs[1][1])
    # The final fits (one per method, on all images) run on every process.
    fits = [trained(r, cv=False) for r in self.reads]
    self.assertLen(fits[0], 2)
    self.assertEqual(fits[1], fits[0])
    self.assertEqual(fits[2], fits[0])

  def test_process_0_alone_writes(self):
    self.assertFalse(os.path.exists(self.elsewhere))
    self.assertCountEqual(
      [n for n in os.listdir(self.shared) if not n.startswith("events.")],
      [".h2t.lock", "cache", "head_head2toe.npz", "head_linear.npz", "log.txt", "results.json"],
    )
    self.assertLen(glob.glob(f"{self.shared}/events.out.tfevents.*"), 1)
    self.assertLen(glob.glob(f"{self.shared}/cache/*.npz"), 1)  # beside it: the compilation cache

  def test_a_rerun_reads_process_0s_cache_and_shares_it(self):
    # Process 0 reads the first run's cache and hands the features to process 1, which has none.
    rerun = os.path.join(self.tmp, "rerun")
    cache_dir = f"--config.cache_dir={os.path.join(self.shared, 'cache')}"
    procs = start_processes([rerun, self.elsewhere], self.dataset, "--config.eval_mode=valid", cache_dir)
    (rc0, _, err0), (rc1, _, err1) = finish(procs)
    self.assertEqual(rc0, 0, err0[-3000:])
    self.assertEqual(rc1, 0, err1[-3000:])
    again = toy.results(rerun)
    self.assertTrue(again["train_features_cached"])
    self.assertEqual(again["taps"], toy.results(self.single)["taps"])
    self.assertEqual(again["grid"], toy.results(self.single)["grid"])
    self.assertFalse(os.path.exists(self.elsewhere))


class FailureTest(absltest.TestCase):
  def test_a_failure_on_one_process_stops_both(self):
    tmp = toy.make_tempdir(self)
    from h2t.models import efficientnet

    # The same relative path names good weights on "host 0" and a damaged file on "host 1".
    cwds = [os.path.join(tmp, "host0"), os.path.join(tmp, "host1")]
    for d in cwds:
      os.makedirs(d)
    good = efficientnet.default_checkpoint()
    shutil.copyfile(good, os.path.join(cwds[0], "weights.pth"))
    with open(good, "rb") as f, open(os.path.join(cwds[1], "weights.pth"), "wb") as g:
      g.write(f.read(4096))
    workdirs = [os.path.join(tmp, "w0"), os.path.join(tmp, "w1")]
    procs = start_processes(workdirs, "--config.backbone.checkpoint=weights.pth", cwds=cwds)
    (rc0, _, err0), (rc1, _, err1) = finish(procs, timeout=180)
    self.assertNotEqual(rc1, 0)
    self.assertNotEqual(rc0, 0)
    lines1, lines0 = error_lines(err1), error_lines(err0)
    self.assertLen(lines1, 1, err1[-3000:])
    self.assertIn("process 1 of 2", lines1[0])
    self.assertIn("weights.pth", lines1[0])
    self.assertLen(lines0, 1, err0[-3000:])
    self.assertIn("process 1 of 2 failed, so process 0 stops too", lines0[0])
    self.assertIn("weights.pth", lines0[0])
    self.assertFalse(os.path.exists(os.path.join(workdirs[0], "results.json")))
    self.assertFalse(os.path.exists(workdirs[1]))

  def test_processes_with_different_configs_refuse_to_run(self):
    tmp = toy.make_tempdir(self)
    workdirs = [os.path.join(tmp, "w0"), os.path.join(tmp, "w1")]
    port = free_port()
    procs = [
      subprocess.Popen(
        toy.main_command(
          workdirs[i],
          f"--config.seed={i}",  # the mistake: process 1's command line differs
          "--multihost",
          f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2",
          f"--process_id={i}",
          fast=FAST,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=toy.environ(ENV),
        cwd=toy.ROOT,
      )
      for i in range(2)
    ]
    for i, (rc, _, err) in enumerate(finish(procs, timeout=180)):
      self.assertNotEqual(rc, 0)
      lines = error_lines(err)
      self.assertLen(lines, 1, err[-3000:])
      self.assertIn(
        f"error: process {i} of 2: the config of process(es) 1 differs from process 0's", lines[0]
      )
    self.assertFalse(os.path.exists(workdirs[1]))
    self.assertFalse(os.path.exists(os.path.join(workdirs[0], "results.json")))


class FlagsTest(absltest.TestCase):
  def test_settings_are_checked(self):
    self.assertIsNone(multihost.resolve(False, None, None, None))
    detected = multihost.resolve(True, None, None, None)
    self.assertTrue(detected.detected)
    spec = multihost.resolve(True, "127.0.0.1:1234", 2, 1)
    self.assertEqual(
      (spec.coordinator_address, spec.num_processes, spec.process_id), ("127.0.0.1:1234", 2, 1)
    )
    bad = {
      (False, None, 2, None): "--num_processes given without --multihost",
      (True, "127.0.0.1:1234", 2, None): "but no --process_id",
      (True, "127.0.0.1:1234", 2, 2): "--process_id=2: must lie in [0, 2)",
      (True, "127.0.0.1:1234", 0, 0): "--num_processes=0",
      (True, "127.0.0.1", 2, 0): "expected HOST:PORT",
      (True, "127.0.0.1:99999", 2, 0): "expected HOST:PORT",
    }
    for args, needle in bad.items():
      with self.assertRaises(ValueError, msg=str(args)) as e:
        multihost.resolve(*args)
      self.assertIn(needle, str(e.exception))

  def test_a_bad_combination_is_one_error_line(self):
    workdir = os.path.join(tempfile.gettempdir(), "h2t_multihost_never_made")
    proc = toy.run_main(
      workdir,
      "--multihost",
      "--num_processes=2",
      "--process_id=3",
      "--coordinator_address=127.0.0.1:1",
      env_extra=ENV,
      timeout=120,
    )
    self.assertNotEqual(proc.returncode, 0)
    self.assertEqual(error_lines(proc.stderr), [proc.stderr.strip().splitlines()[-1]])
    self.assertIn("--process_id=3", proc.stderr)
    self.assertNotIn("Traceback", proc.stderr)
    self.assertFalse(os.path.exists(workdir))


class OneProcessTest(absltest.TestCase):
  def test_one_process_reads_every_batch(self):
    share = multihost.share()
    self.assertEqual((share.index, share.count), (0, 1))
    self.assertEqual(share.positions(10, 4), [(0, 4), (4, 4), (8, 2)])
    self.assertEqual(multihost.sum_counts({"a": 3}), {"a": 3})
    self.assertTrue(multihost.writer_decides(True))
    cells = np.array([[0.5, 0.25]])
    np.testing.assert_array_equal(multihost.gather_cells(cells, np.ones((1, 2), bool)), cells)
    with self.assertRaisesRegex(RuntimeError, "never computed"):
      multihost.gather_cells(cells, np.array([[True, False]]))

  def test_cv_units_go_round_robin(self):
    np.testing.assert_array_equal(grid.cv_units(2, 1), np.zeros((2, 5), int))
    np.testing.assert_array_equal(grid.cv_units(2, 2), [[0, 1, 0, 1, 0], [1, 0, 1, 0, 1]])
    np.testing.assert_array_equal(grid.cv_units(1, 7), [[0, 1, 2, 3, 4]])  # more processes than units


if __name__ == "__main__":
  absltest.main()
