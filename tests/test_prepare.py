"""`python -m h2t.data.prepare`: each mistake a user can make ends in one `error:` line, with no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs prepare's main with some modules hidden, as on a machine where they are not installed.
_HIDING = """
import sys
for module in sys.argv[1].split(","):
  sys.modules[module] = None  # `import module` now raises ModuleNotFoundError
sys.argv = ["prepare"] + sys.argv[2:]
from absl import app
from h2t.data import prepare
app.run(prepare.main)
"""


def run_prepare(*args: str, hide: str = "") -> subprocess.CompletedProcess:
  command = (
    [sys.executable, "-c", _HIDING, hide, *args]
    if hide
    else [sys.executable, "-m", "h2t.data.prepare", *args]
  )
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


class PrepareErrorsTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.dir = tmp.name

  def assertOneErrorLine(self, child: subprocess.CompletedProcess, *fragments: str) -> str:
    self.assertEqual(child.returncode, 1, child.stderr[-2000:])
    output = child.stdout + child.stderr
    self.assertNotIn("Traceback", output)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    self.assertLen(errors, 1, output[-2000:])
    for fragment in fragments:
      self.assertIn(fragment, errors[0])
    return errors[0]

  def test_unknown_task(self):
    child = run_prepare("--tasks=dtd,no_such_task", f"--data_dir={self.dir}")
    self.assertOneErrorLine(child, "no_such_task", "expected 'all' or names from", "dtd")

  def test_missing_dependency_names_the_pip_command(self):
    child = run_prepare("--tasks=dtd", f"--data_dir={self.dir}", hide="importlib_resources")
    self.assertOneErrorLine(child, "importlib_resources (for dtd)", "pip install importlib_resources")

  def test_missing_dependencies_of_several_tasks_in_one_command(self):
    child = run_prepare(
      "--tasks=dtd,patch_camelyon", f"--data_dir={self.dir}", hide="importlib_resources,h5py"
    )
    self.assertOneErrorLine(child, "pip install importlib_resources h5py", "h5py (for patch_camelyon)")

  def test_data_dir_that_cannot_be_written(self):
    a_file = os.path.join(self.dir, "file.txt")
    with open(a_file, "w") as f:
      f.write("a file where a folder should be")
    child = run_prepare("--tasks=dtd", f"--data_dir={a_file}/tfds")
    self.assertOneErrorLine(child, "cannot write into the data directory", f"{a_file}/tfds", "--data_dir")


if __name__ == "__main__":
  absltest.main()
