"""Hostile and damaged checkpoint files: each is refused with one CheckpointError naming the file.

The files are written in the real formats (torch.save, safetensors' writer, np.savez) and then
damaged, or crafted with `tests.checkpoint_craft` where torch itself would refuse to write them.
A read that could crash the process runs in a child process, so a segfault fails the test instead
of ending pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np
from absl.testing import absltest

from h2t import checkpoints
from tests import checkpoint_craft as craft

try:
  import torch
except ImportError:  # The test extra installs torch; without it the torch tests skip.
  torch = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import sys
from h2t import checkpoints
try:
  tensors = checkpoints.read_tensors(sys.argv[1])
except checkpoints.CheckpointError as e:
  print("CheckpointError:", e)
else:
  for k, v in sorted(tensors.items()):
    print("tensor", k, v.dtype, v.shape, v.tolist())
"""


def read_in_child(path: str) -> subprocess.CompletedProcess:
  """`read_tensors(path)` in a fresh interpreter: its return code and what it printed."""
  return subprocess.run(
    [sys.executable, "-c", _CHILD, path], cwd=ROOT, capture_output=True, text=True, timeout=120
  )


class CheckpointSafetyTestCase(absltest.TestCase):
  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.dir = tmp.name

  def path(self, name: str) -> str:
    return os.path.join(self.dir, name)

  def assertRefused(self, path: str, *fragments: str) -> str:
    """`read_tensors(path)` raises CheckpointError naming the file and each fragment."""
    with self.assertRaises(checkpoints.CheckpointError) as cm:
      checkpoints.read_tensors(path)
    msg = str(cm.exception)
    self.assertIn(path, msg)
    for fragment in fragments:
      self.assertIn(fragment, msg)
    return msg


@unittest.skipIf(torch is None, "needs torch (pip install -e '.[test]')")
class TorchStrideTest(CheckpointSafetyTestCase):
  def test_stride_past_the_storage_is_refused_without_crashing(self):
    # Four floats of storage; a tensor of 4 elements 1,000,000 apart would read ~4 MB of the heap.
    storage = craft.Storage("0", np.arange(4, dtype=np.float32))
    craft.write_zip(self.path("strided.pth"), {"w": craft.Tensor(storage, 0, (4,), (1_000_000,))})
    child = read_in_child(self.path("strided.pth"))
    self.assertEqual(child.returncode, 0, f"the reader crashed: {child.stderr[-2000:]}")
    self.assertIn("CheckpointError:", child.stdout)
    self.assertIn("past the end of its storage", child.stdout)
    self.assertIn(self.path("strided.pth"), child.stdout)


if __name__ == "__main__":
  absltest.main()
