"""Fuzzing the checkpoint readers: damaged and crafted files give tensors from the file or one CheckpointError.

For each format (torch.save zip, torch.save legacy, safetensors, np.savez) a small valid file is
written by the format's own writer, then damaged: cut at every offset, bytes changed at seeded random
places, and headers crafted to reach past the data (strides, offsets, sizes), to declare huge or
negative shapes, unsupported dtypes, or pickled calls of os.system. Each batch is read by
`h2t.checkpoints.read_tensors` in a child process, so a crash fails the test instead of ending
pytest. For every file the reader must either raise CheckpointError naming the file, or return
tensors whose bytes all occur in the file (the base files hold only contiguous tensors, so a
correct read is a substring of the file; bytes from outside the file are not). Crafted files must
be refused. Everything is seeded: the same files every run.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import unittest
import zipfile

import numpy as np
from absl.testing import absltest
from safetensors.numpy import save_file

from tests import checkpoint_craft as craft

try:
  import torch
except ImportError:  # The test extra installs torch; without it the torch formats are skipped.
  torch = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_FLIPS = 250  # seeded damaged copies per format

# Reads each file named in a JSON list; one JSON line per file. Runs in a child process.
CHILD = r"""
import json, sys
from h2t import checkpoints
for path in json.load(open(sys.argv[1])):
  with open(path, "rb") as f:
    data = f.read()
  try:
    tensors = checkpoints.read_tensors(path)
  except checkpoints.CheckpointError as e:
    result = {"outcome": "error", "names_file": path in str(e), "message": str(e)[:300]}
  except BaseException as e:
    result = {"outcome": "other", "message": f"{type(e).__name__}: {e}"[:300]}
  else:
    outside = [k for k, v in tensors.items() if v.tobytes() not in data]
    result = {"outcome": "ok" if not outside else "outside", "keys": sorted(tensors), "outside": outside}
  result["path"] = path
  print(json.dumps(result), flush=True)
"""


def run_batch(paths: list[str], workdir: str, *, cwd: str = ROOT) -> tuple[int, list[dict], str]:
  """Reads `paths` in one child process: (return code, one result per file read, stderr)."""
  listing = os.path.join(workdir, f"batch_{len(os.listdir(workdir))}.json")
  with open(listing, "w") as f:
    json.dump(paths, f)
  child = subprocess.run(
    [sys.executable, "-c", CHILD, listing], cwd=cwd, capture_output=True, text=True, timeout=300
  )
  results = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
  return child.returncode, results, child.stderr


def truncations(data: bytes) -> dict[str, bytes]:
  return {f"cut{n}": data[:n] for n in range(len(data))}


def flips(data: bytes, seed0: int) -> dict[str, bytes]:
  """Copies with 1-3 bytes changed: a random value or one flipped bit, at seeded places."""
  out = {}
  for i in range(NUM_FLIPS):
    rng = np.random.default_rng(seed0 + i)
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
      pos = int(rng.integers(len(buf)))
      buf[pos] = int(rng.integers(256)) if rng.random() < 0.5 else buf[pos] ^ (1 << int(rng.integers(8)))
    out[f"flip{i}"] = bytes(buf)
  return out


class _Call:
  """Pickles as a call of `fn(*args)`: what a hostile checkpoint would run on an unsafe load."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _torch_crafted(marker: str) -> dict[str, tuple[str, object]]:
  """Crafted torch files: name -> (layout, payload). Payloads are dicts of craft.Tensor or raw pickles."""
  f32 = np.arange(12, dtype=np.float32)

  def one(offset=0, size=(12,), stride=(1,), numel=None, storage_name=None, data=f32):
    s = craft.Storage("0", data, numel=numel, storage_name=storage_name)
    return {"w": craft.Tensor(s, offset, size, stride)}

  evil = {"w": _Call(os.system, f"touch {marker}")}
  big = craft.Tensor(craft.Storage("0", np.zeros(1 << 18, np.float32)), 0, (1 << 18,), (1,))  # 1 MiB
  cases = {
    "stride_past_end": one(size=(4,), stride=(1_000_000,)),
    "stride_segfault": one(size=(4,), stride=(10**10,)),
    "stride_2d_last_element": one(size=(3, 5), stride=(5, 1)),  # reaches element 14 of 12
    "offset_past_end": one(offset=10**9, size=(2,)),
    "offset_at_end_nonempty": one(offset=12, size=(1,)),
    "negative_stride": one(size=(4,), stride=(-1,)),
    "negative_offset": one(offset=-4, size=(4,)),
    "negative_size": one(size=(-3,)),
    "huge_size_stride0": one(size=(10**6, 10**6), stride=(0, 0)),  # one element, a terabyte of view
    "overflowing_size": one(size=(2**63, 2**63), stride=(1, 1)),
    "rank_mismatch": one(size=(3, 4), stride=(1,)),
    "float_size": one(size=(3.5,)),
    "numel_larger_than_record": one(numel=10**6),
    "numel_smaller_than_record": one(numel=5, size=(5,)),
    "complex_dtype": one(storage_name="ComplexFloatStorage"),
    "quantized_dtype": one(storage_name="QInt8Storage"),
    "os_system_in_data_pkl": evil,
    "eval_in_data_pkl": {"w": _Call(eval, "1+1")},
    "not_a_state_dict": [1, 2, 3],
    "non_tensor_value": {"w": 3},
    "many_names_one_tensor": {f"w{i}": big for i in range(400)},  # 400 MiB from a 1 MiB file
  }
  out = {f"zip_{k}": ("zip", v) for k, v in cases.items()}
  out.update(
    {f"legacy_{k}": ("legacy", v) for k, v in cases.items() if k not in ("numel_smaller_than_record",)}
  )
  out["legacy_os_system_in_magic"] = ("legacy_raw_magic", pickle.dumps(_Call(os.system, f"touch {marker}")))
  out["legacy_count_mismatch"] = ("legacy_counts", {"0": 10**6})
  out["legacy_count_negative"] = ("legacy_counts", {"0": -1})
  out["legacy_count_huge"] = ("legacy_counts", {"0": 2**62})
  out["zip_compressed_storage"] = ("zip_deflated", one())
  out["zip_missing_storage_entry"] = ("zip_no_storage", one())
  return out


def _write_torch_crafted(path: str, layout: str, payload) -> None:
  f32 = np.arange(12, dtype=np.float32)
  if layout == "zip":
    craft.write_zip(path, payload)
  elif layout == "legacy":
    craft.write_legacy(path, payload)
  elif layout == "legacy_raw_magic":
    with open(path, "wb") as f:
      f.write(payload)
      pickle.dump(1001, f, protocol=2)
  elif layout == "legacy_counts":
    s = craft.Storage("0", f32)
    craft.write_legacy(path, {"w": craft.Tensor(s, 0, (12,), (1,))}, counts=payload)
  elif layout in ("zip_deflated", "zip_no_storage"):
    craft.write_zip(path + ".tmp", payload)
    with zipfile.ZipFile(path + ".tmp") as src, zipfile.ZipFile(path, "w") as dst:
      for info in src.infolist():
        if info.filename.endswith("/data/0"):
          if layout == "zip_no_storage":
            continue
          dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
        else:
          dst.writestr(info.filename, src.read(info))
    os.remove(path + ".tmp")
  else:
    raise AssertionError(layout)


def _safetensors_file(header: dict, data: bytes, *, declared_len: int | None = None) -> bytes:
  text = json.dumps(header).encode()
  return struct.pack("<Q", len(text) if declared_len is None else declared_len) + text + data


def _safetensors_crafted() -> dict[str, bytes]:
  data = np.arange(6, dtype=np.float32).tobytes()

  def one(dtype="F32", shape=(2, 3), offsets=(0, 24), extra=None, data=data, **kw):
    header = {"w": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}, **(extra or {})}
    return _safetensors_file(header, data, **kw)

  two = {
    "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
    "b": {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]},
  }
  return {
    "header_len_past_end": one(declared_len=10**6),
    "header_len_huge": one(declared_len=2**63 + 5),
    "header_not_json": struct.pack("<Q", 5) + b"{{{{{" + data,
    "header_is_a_list": struct.pack("<Q", 2) + b"[]",
    "offsets_past_end": one(offsets=(0, 2400)),
    "offsets_reversed": one(offsets=(24, 0)),
    "offsets_negative": one(offsets=(-24, 0)),
    "offsets_overlap": _safetensors_file(two, data[:20]),
    "offsets_gap": one(offsets=(4, 24), shape=(5,), data=data),
    "trailing_bytes": one(data=data + b"\0" * 8),
    "shape_mismatch": one(shape=(2, 2)),
    "shape_huge": one(shape=(2**40, 2**40), offsets=(0, 24)),
    "shape_negative": one(shape=(-2, -3)),
    "shape_float": one(shape=(2.0, 3)),
    "dtype_unsupported": one(dtype="F8_E4M3"),
    "dtype_object": one(dtype="O"),
    "duplicate_key": struct.pack("<Q", 10) + b'{"a":1,"a"' + data,
    "metadata_not_strings": one(extra={"__metadata__": {"a": 1}}),
    "offsets_not_a_pair": one(offsets=(0,)),
  }


def _npy(descr: str, shape, data: bytes, *, fortran=False) -> bytes:
  import io

  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
  return buf.getvalue() + data


def _npz_bytes(members: dict[str, bytes], compress=zipfile.ZIP_STORED) -> bytes:
  import io

  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", compress) as zf:
    for name, content in members.items():
      zf.writestr(name, content)
  return buf.getvalue()


def _npz_crafted(workdir: str) -> dict[str, bytes]:
  data = np.arange(6, dtype=np.float32).tobytes()
  obj_path = os.path.join(workdir, "object_array.npz")
  np.savez(obj_path, w=np.array([{"a": 1}, None], dtype=object))
  with open(obj_path, "rb") as f:
    object_array = f.read()
  return {
    "object_array": object_array,
    "shape_huge": _npz_bytes({"w.npy": _npy("<f4", (10**12,), data)}),
    "shape_larger_than_data": _npz_bytes({"w.npy": _npy("<f4", (7,), data)}),
    "shape_smaller_than_data": _npz_bytes({"w.npy": _npy("<f4", (5,), data)}),
    "shape_overflowing": _npz_bytes({"w.npy": _npy("<f4", (2**62, 2**62), data)}),
    "structured_dtype": _npz_bytes({"w.npy": _npy("[('a', '<f4'), ('b', '<f4')]", (3,), data)}),
    "string_dtype": _npz_bytes({"w.npy": _npy("<U2", (3,), data)}),
    "complex_dtype": _npz_bytes({"w.npy": _npy("<c8", (3,), data)}),
    "header_garbage": _npz_bytes({"w.npy": b"\x93NUMPY\x01\x00\x10\x00{'descr': __import__('os')}" + data}),
    "not_npy_member": _npz_bytes({"w.txt": b"hello"}),
    "compressed_shape_past_data": _npz_bytes({"w.npy": _npy("<f4", (10**9,), data)}, zipfile.ZIP_DEFLATED),
  }


class CheckpointFuzzTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.dir = tmp.name
    self.marker = os.path.join(self.dir, "pickle_code_ran")

  def _write(self, name: str, content: bytes) -> str:
    path = os.path.join(self.dir, name)
    with open(path, "wb") as f:
      f.write(content)
    return path

  def _check(self, paths: list[str], *, must_fail: bool) -> list[dict]:
    code, results, stderr = run_batch(paths, self.dir)
    crashed = paths[len(results)] if len(results) < len(paths) else None
    self.assertEqual(code, 0, f"the reader crashed on {crashed}: {stderr[-2000:]}")
    self.assertLen(results, len(paths))
    for r in results:
      self.assertIn(r["outcome"], ("ok", "error"), r)
      if r["outcome"] == "error":
        self.assertTrue(r["names_file"], r)
      if must_fail:
        self.assertEqual(r["outcome"], "error", r)
    self.assertFalse(os.path.exists(self.marker), "a pickled call ran")
    return results

  def _fuzz(self, base_name: str, data: bytes, seed0: int) -> None:
    ext = os.path.splitext(base_name)[1]
    stem = os.path.splitext(base_name)[0]
    paths = [
      self._write(f"{stem}_{k}{ext}", v) for k, v in {**truncations(data), **flips(data, seed0)}.items()
    ]
    results = self._check(paths, must_fail=False)
    # Cutting a file anywhere loses something every reader checks: no truncated file reads.
    cut = [r for r in results if "_cut" in r["path"] and r["outcome"] == "ok"]
    self.assertEqual(cut, [])

  def _base_tensors(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
      "conv": rng.normal(size=(2, 3, 3, 3)).astype(np.float32),
      "bias": rng.normal(size=5).astype(np.float16),
      "steps": np.array(7, np.int64),
      "mask": np.array([True, False, True]),
      "ids": np.arange(4, dtype=np.int32),
    }

  @unittest.skipIf(torch is None, "needs torch (pip install -e '.[test]')")
  def test_torch_zip_and_legacy(self):
    sd = collections.OrderedDict((k, torch.from_numpy(v.copy())) for k, v in self._base_tensors().items())
    base = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    sd["base"], sd["rows"] = base, base[1:3]  # a view at an offset into a shared storage
    sd["bf16"] = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    for layout, use_zip, seed0 in (("zip", True, 0), ("legacy", False, 10_000)):
      path = os.path.join(self.dir, f"{layout}.pth")
      torch.save(sd, path, _use_new_zipfile_serialization=use_zip)
      (result,) = self._check([path], must_fail=False)
      self.assertEqual(result["keys"], sorted(sd))
      with open(path, "rb") as f:
        self._fuzz(f"{layout}.pth", f.read(), seed0)
    crafted = []
    for name, (layout, payload) in _torch_crafted(self.marker).items():
      path = os.path.join(self.dir, f"crafted_{name}.pth")
      _write_torch_crafted(path, layout, payload)
      crafted.append(path)
    self._check(crafted, must_fail=True)

  def test_safetensors(self):
    path = os.path.join(self.dir, "model.safetensors")
    save_file(self._base_tensors(), path)
    (result,) = self._check([path], must_fail=False)
    self.assertEqual(result["keys"], sorted(self._base_tensors()))
    with open(path, "rb") as f:
      self._fuzz("model.safetensors", f.read(), 20_000)
    crafted = [self._write(f"crafted_{k}.safetensors", v) for k, v in _safetensors_crafted().items()]
    self._check(crafted, must_fail=True)

  def test_npz(self):
    path = os.path.join(self.dir, "vit.npz")
    np.savez(path, **self._base_tensors())
    (result,) = self._check([path], must_fail=False)
    self.assertEqual(result["keys"], sorted(self._base_tensors()))
    with open(path, "rb") as f:
      self._fuzz("vit.npz", f.read(), 30_000)
    crafted = [self._write(f"crafted_{k}.npz", v) for k, v in _npz_crafted(self.dir).items()]
    self._check(crafted, must_fail=True)


if __name__ == "__main__":
  absltest.main()
