"""Writers of PyTorch checkpoint files with chosen (possibly hostile) headers, for the reader tests.

A real `torch.save` file is a zip (or, in the legacy layout, a stream of pickles) whose pickle names
each tensor's storage, offset, sizes and strides. torch refuses to build a tensor that reaches past
its storage, so a hostile file cannot come from `torch.save`; these writers emit the same records
as `torch.save` (same globals, same persistent ids, same archive entries) with whatever numbers a
test asks for. `torch` is needed to name its globals in the pickle.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import struct
import zipfile

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_NAMES = {
  np.dtype(np.float32): "FloatStorage",
  np.dtype(np.float64): "DoubleStorage",
  np.dtype(np.float16): "HalfStorage",
  np.dtype(np.int64): "LongStorage",
  np.dtype(np.int32): "IntStorage",
  np.dtype(np.uint8): "ByteStorage",
}


@dataclasses.dataclass
class Storage:
  """A storage record: `data` is written as the storage's bytes; `numel` is what the pickle declares."""

  key: str
  data: np.ndarray
  numel: int | None = None  # default: data.size
  storage_name: str | None = None  # default: from data's dtype

  def pid(self):
    import torch

    name = self.storage_name or _STORAGE_NAMES[self.data.dtype]
    numel = self.data.size if self.numel is None else self.numel
    return ("storage", getattr(torch, name), self.key, "cpu", numel)


@dataclasses.dataclass
class Tensor:
  storage: Storage
  offset: int
  size: tuple
  stride: tuple


class _Pickler(pickle.Pickler):
  def __init__(self, f, *, legacy: bool):
    super().__init__(f, protocol=2)
    self._legacy = legacy

  def persistent_id(self, obj):
    if isinstance(obj, Storage):
      pid = obj.pid()
      return pid + (None,) if self._legacy else pid
    return None

  def reducer_override(self, obj):
    import torch

    if isinstance(obj, Tensor):
      args = (obj.storage, obj.offset, obj.size, obj.stride, False, collections.OrderedDict())
      return torch._utils._rebuild_tensor_v2, args
    return NotImplemented


def state_dict_pickle(obj, *, legacy: bool = False) -> bytes:
  """Pickles `obj` (dicts of `Tensor`s) as torch.save does."""
  buf = io.BytesIO()
  _Pickler(buf, legacy=legacy).dump(obj)
  return buf.getvalue()


def storages_of(obj) -> list[Storage]:
  seen = {}

  def visit(node):
    if isinstance(node, Tensor):
      seen.setdefault(node.storage.key, node.storage)
    elif isinstance(node, dict):
      for v in node.values():
        visit(v)

  visit(obj)
  return list(seen.values())


def write_zip(path: str, obj=None, *, pickle_bytes: bytes | None = None, prefix: str = "archive") -> None:
  """A zip-layout checkpoint holding `obj` (or a given data.pkl) and the storages it names."""
  data_pkl = state_dict_pickle(obj) if pickle_bytes is None else pickle_bytes
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{prefix}/data.pkl", data_pkl)
    zf.writestr(f"{prefix}/byteorder", "little")
    for s in storages_of(obj) if obj is not None else []:
      zf.writestr(f"{prefix}/data/{s.key}", np.ascontiguousarray(s.data).tobytes())
    zf.writestr(f"{prefix}/version", "3\n")


def write_legacy(path: str, obj, *, counts: dict[str, int] | None = None) -> None:
  """A legacy-layout checkpoint; `counts` overrides the element count written before a storage."""
  storages = storages_of(obj)
  out = io.BytesIO()
  for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
    pickle.dump(header, out, protocol=2)
  out.write(state_dict_pickle(obj, legacy=True))
  pickle.dump([s.key for s in storages], out, protocol=2)
  for s in storages:
    count = (counts or {}).get(s.key, s.data.size)
    out.write(struct.pack("<q", count))
    out.write(np.ascontiguousarray(s.data).tobytes())
  with open(path, "wb") as f:
    f.write(out.getvalue())
