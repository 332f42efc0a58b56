"""experiments/vtab_sweep.py: a workdir per task, damaged results, one-line user errors."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(ROOT, "experiments", "vtab_sweep.py")
CONFIG = os.path.join(ROOT, "configs", "vtab.py")


def load_sweep_module():
  spec = importlib.util.spec_from_file_location("vtab_sweep", SWEEP)
  module = importlib.util.module_from_spec(spec)
  sys.modules["vtab_sweep"] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def load_config():
  spec = importlib.util.spec_from_file_location("vtab_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tempdir(test: absltest.TestCase) -> str:
  path = tempfile.mkdtemp(prefix="h2t_sweep_")
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def run_sweep_cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmd = [sys.executable, SWEEP, *args]
  return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


class WorkdirTest(absltest.TestCase):
  def test_folders_with_one_basename_get_their_own_workdirs(self):
    sweep = load_sweep_module()
    tasks = sweep.expand_tasks(["folder:/data/a/photos", "folder:/data/b/photos", "folder:/data/c/other"])
    self.assertLen(tasks, 3)
    dirs = [j.workdir for j in sweep.plan("/r", ["m"], tasks)]
    self.assertLen(set(dirs), 3)
    self.assertRegex(dirs[0], r"^/r/m/folder_photos_[0-9a-f]{8}$")
    self.assertRegex(dirs[1], r"^/r/m/folder_photos_[0-9a-f]{8}$")
    self.assertEqual(dirs[2], "/r/m/folder_other")  # no clash: the plain name
    # The suffix depends on the folder alone, so a rerun finds the same workdir.
    again = sweep.plan("/r", ["m"], ["folder:/data/b/photos", "folder:/data/a/photos"])
    self.assertEqual([j.workdir for j in again], [dirs[1], dirs[0]])

  def test_one_folder_spelled_twice_is_one_task(self):
    sweep = load_sweep_module()
    self.assertEqual(
      sweep.expand_tasks(["folder:/data/a/photos", "folder:/data/a/./photos/", "digits"]),
      ["folder:/data/a/photos", "digits"],
    )


class DamagedResultsTest(absltest.TestCase):
  def test_damaged_results_is_named_and_not_finished(self):
    sweep = load_sweep_module()
    root = tempdir(self)
    config = load_config()
    missing = os.path.join(root, "no_such_folder")
    jobs = sweep.plan(root, ["efficientnet_lite0"], ["folder:" + missing])
    os.makedirs(jobs[0].workdir)
    with open(jobs[0].results_path, "w") as f:
      f.write('{"config": {"dataset": ')  # cut short, as by a full disk
    self.assertFalse(jobs[0].finished)
    results, why = sweep.read_results(jobs[0].results_path)
    self.assertIsNone(results)
    self.assertIn("JSONDecodeError", why)
    with self.assertLogs("absl", level="WARNING") as logs:
      failed = sweep.run_sweep(config, root, jobs, {})
    self.assertTrue(any(jobs[0].results_path in m and "damaged" in m for m in logs.output), logs.output)
    # It was run again (and failed: its folder does not exist), not skipped as finished.
    self.assertLen(failed, 1)
    self.assertIn("does not exist", failed[0][1])

  def test_results_without_config_or_methods_are_damaged(self):
    sweep = load_sweep_module()
    path = os.path.join(tempdir(self), "results.json")
    with open(path, "w") as f:
      f.write("[1, 2]")
    self.assertEqual(
      sweep.read_results(path), (None, "not an h2t results file (it lacks a config or methods)")
    )


class CommandLineErrorsTest(absltest.TestCase):
  """User errors end in one `error:` line, exit status 1, no traceback."""

  def assert_one_error_line(self, proc: subprocess.CompletedProcess, pattern: str) -> None:
    self.assertEqual(proc.returncode, 1, proc.stderr[-2000:])
    self.assertNotIn("Traceback", proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    self.assertLen(errors, 1, proc.stderr[-2000:])
    self.assertEqual(proc.stderr.rstrip().splitlines()[-1], errors[0])
    self.assertRegex(errors[0], pattern)

  def test_unknown_config_key(self):
    proc = run_sweep_cli(f"--config={CONFIG}", "--root=/tmp/unused", "--config.learning.lrate=0.1")
    self.assert_one_error_line(
      proc, r"unknown config key 'learning.lrate'; the keys under 'learning' are: .*learning_rate"
    )

  def test_missing_config_file(self):
    proc = run_sweep_cli("--config=/no/such/config.py", "--root=/tmp/unused")
    self.assert_one_error_line(proc, r"cannot load the config file: .*No such file or directory")

  def test_root_is_a_file_and_unknown_task(self):
    root = tempdir(self)
    afile = os.path.join(root, "afile")
    open(afile, "w").close()
    self.assert_one_error_line(run_sweep_cli(f"--config={CONFIG}", f"--root={afile}"), r"is a file")
    proc = run_sweep_cli(f"--config={CONFIG}", f"--root={root}", "--tasks=mnist")
    self.assert_one_error_line(proc, r"unknown task 'mnist'")

  def test_failed_run_and_damaged_results(self):
    root = tempdir(self)
    missing = os.path.join(root, "no_such_folder")
    sweep = load_sweep_module()
    (job,) = sweep.plan(root, ["efficientnet_lite0"], ["folder:" + missing])
    os.makedirs(job.workdir)
    with open(job.results_path, "w") as f:
      f.write("\0\0\0")
    proc = run_sweep_cli(f"--config={CONFIG}", f"--root={root}", f"--tasks=folder:{missing}")
    self.assert_one_error_line(proc, r"^error: 1 of 1 runs failed \(efficientnet_lite0/folder:")
    self.assertIn(f"{job.results_path} is damaged", proc.stderr)
    self.assertIn("does not exist", proc.stderr)


if __name__ == "__main__":
  absltest.main()
