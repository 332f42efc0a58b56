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
import unittest

import numpy as np
from absl.testing import absltest, parameterized
from safetensors.numpy import save_file

from h2t import checkpoints
from tests import checkpoint_craft as craft
from tests import toy

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


class CheckpointSafetyTestCase(toy.TempDirTestCase):
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

  def test_legacy_header_pickle_runs_no_code(self):
    marker = self.path("ran")
    with open(self.path("evil.pth"), "wb") as f:
      f.write(f"cos\nsystem\n(Vtouch {marker}\ntR.".encode())  # protocol-0 pickle of os.system(...)
    self.assertRefused(self.path("evil.pth"), "os.system", "nothing was run")
    self.assertFalse(os.path.exists(marker))

  def test_storage_record_smaller_than_declared(self):
    storage = craft.Storage("0", np.arange(4, dtype=np.float32), numel=400)
    craft.write_zip(self.path("short.pth"), {"w": craft.Tensor(storage, 0, (4,), (1,))})
    self.assertRefused(self.path("short.pth"), "holds 16 bytes but the pickle declares 1600")

  def test_expanded_storage_is_bounded(self):
    storage = craft.Storage("0", np.arange(4, dtype=np.float32))
    craft.write_zip(self.path("big.pth"), {"w": craft.Tensor(storage, 0, (10**5, 10**5), (0, 0))})
    self.assertRefused(self.path("big.pth"), "40000000000 bytes")

  @parameterized.parameters(True, False)
  def test_real_files_with_bfloat16_views_and_expansions_read_exactly(self, zip_layout):
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    sd = {
      "bf16": base.to(torch.bfloat16),
      "tail": base[2:],  # a view at an offset
      "transposed": base.t(),
      "expanded": torch.ones(3).expand(5, 3),  # stride 0, as torch.save keeps it
      "empty": torch.zeros(0, 7),
      "scalar": torch.tensor(7, dtype=torch.int64),
    }
    torch.save(sd, self.path("m.pth"), _use_new_zipfile_serialization=zip_layout)
    loaded = checkpoints.read_tensors(self.path("m.pth"))
    for key, value in sd.items():
      self.assertIsInstance(loaded[key], np.ndarray, key)  # a 0-d tensor too, not a numpy scalar
      want = value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
      self.assertEqual(loaded[key].shape, tuple(value.shape), key)
      np.testing.assert_array_equal(loaded[key].astype(want.dtype), want, err_msg=key)


class SafetensorsTest(CheckpointSafetyTestCase):
  def test_round_trip_of_the_libraries_own_files(self):
    tensors = {
      "a": np.arange(6, dtype=np.float32).reshape(2, 3),
      "b": np.array([True, False]),
      "c": np.zeros((0, 3)),
    }
    save_file(tensors, self.path("m.safetensors"))
    loaded = checkpoints.read_tensors(self.path("m.safetensors"))
    self.assertEqual(sorted(loaded), ["a", "b", "c"])
    for key, value in tensors.items():
      self.assertEqual(loaded[key].dtype, value.dtype)
      np.testing.assert_array_equal(loaded[key], value)
    loaded["a"][0, 0] = 5.0  # writable, like safetensors.numpy's arrays

  @unittest.skipIf(torch is None, "needs torch (pip install -e '.[test]')")
  def test_bfloat16_written_by_safetensors_torch(self):
    from safetensors.torch import save_file as save_torch

    value = torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16)
    save_torch({"w": value}, self.path("bf16.safetensors"))
    loaded = checkpoints.read_tensors(self.path("bf16.safetensors"))["w"]
    np.testing.assert_array_equal(loaded.astype(np.float32), [1.5, -2.25, 3.0])

  def test_offsets_past_the_data_are_refused(self):
    save_file({"w": np.arange(6, dtype=np.float32)}, self.path("m.safetensors"))
    with open(self.path("m.safetensors"), "r+b") as f:
      f.truncate(os.path.getsize(self.path("m.safetensors")) - 4)
    self.assertRefused(self.path("m.safetensors"), "data_offsets [0, 24]", "20-byte buffer")


class NpzTest(CheckpointSafetyTestCase):
  def test_savez_compressed_and_fortran_order_read_as_np_load(self):
    tensors = {"a/b": np.asfortranarray(np.arange(12.0).reshape(3, 4)), "i": np.arange(5, dtype=">i4")}
    np.savez_compressed(self.path("m.npz"), **tensors)
    loaded = checkpoints.read_tensors(self.path("m.npz"))
    with np.load(self.path("m.npz")) as z:
      self.assertEqual(sorted(loaded), sorted(z.files))
      for key in z.files:
        np.testing.assert_array_equal(loaded[key], z[key])

  def test_object_arrays_are_refused_without_unpickling(self):
    np.savez(self.path("obj.npz"), w=np.array([None, {}], dtype=object))
    self.assertRefused(self.path("obj.npz"), "member 'w.npy' has dtype object", "no object arrays")

  def test_not_a_zip(self):
    with open(self.path("x.npz"), "wb") as f:
      f.write(b"not a zip file at all")
    self.assertRefused(self.path("x.npz"), "damaged npz")


class CallersTest(CheckpointSafetyTestCase):
  """What a user meets: the model loaders and backbones.create raise one CheckpointError naming the file."""

  def test_truncated_checkpoint_through_backbones_create(self):
    from h2t import backbones

    save_file({"conv1.weight": np.zeros((8, 3, 7, 7), np.float32)}, self.path("r.safetensors"))
    with open(self.path("r.safetensors"), "r+b") as f:
      f.truncate(100)
    with self.assertRaises(checkpoints.CheckpointError) as cm:
      backbones.create("resnet50", self.path("r.safetensors"))
    self.assertIn(self.path("r.safetensors"), str(cm.exception))
    self.assertIsInstance(cm.exception, ValueError)  # what h2t.main turns into an `error:` line

  def test_tensor_of_the_wrong_rank_names_the_file(self):
    from h2t.models import vit

    save_file({"patch_embed.proj.weight": np.zeros((), np.float32)}, self.path("v.safetensors"))
    with self.assertRaisesRegex(checkpoints.CheckpointError, "unexpected shapes for a ViT") as cm:
      vit.load(self.path("v.safetensors"))
    self.assertIn(self.path("v.safetensors"), str(cm.exception))


if __name__ == "__main__":
  absltest.main()
