"""Reads PyTorch checkpoint files into numpy arrays, without importing torch.

Two on-disk layouts exist:

* the legacy layout (torch < 1.6, and `_use_new_zipfile_serialization=False`):
  a stream of pickles -- magic number, protocol version, system info, the
  object itself (tensors refer to storages by key), the list of storage keys,
  then each storage's raw bytes preceded by its element count;
* the zip layout (torch >= 1.6): `archive/data.pkl` plus one file per storage
  under `archive/data/`.

Both are read with a restricted unpickler that only resolves the handful of
globals a state dict needs, so a checkpoint cannot run arbitrary code.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}


class TorchPickleError(ValueError):
  """Raised when a file is not a state dict this reader understands."""


@dataclasses.dataclass
class _StorageRef:
  key: str
  dtype: Any
  numel: int
  data: np.ndarray | None = None


@dataclasses.dataclass
class _LazyTensor:
  storage: _StorageRef
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]

  def materialise(self) -> np.ndarray:
    flat = self.storage.data
    if flat is None:
      raise TorchPickleError(f"storage {self.storage.key!r} was never read")
    if not self.size:
      return flat[self.offset].copy()
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
      flat[self.offset :],
      shape=self.size,
      strides=tuple(s * itemsize for s in self.stride),
      writeable=False,
    )
    return np.ascontiguousarray(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args):
  return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused_args):
  return data


class _StorageType:
  def __init__(self, name: str):
    self.dtype = _STORAGE_DTYPES[name]


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals that appear in plain state dicts."""

  def __init__(self, file, storages: dict[str, _StorageRef], zip_loader=None):
    super().__init__(file)
    self._storages = storages
    self._zip_loader = zip_loader

  def find_class(self, module: str, name: str):
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise TorchPickleError(
      f"the checkpoint refers to {module}.{name}, which a plain state dict "
      "does not contain; re-save it with torch.save(model.state_dict())"
    )

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise TorchPickleError(f"unexpected persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid[:5]
    if key not in self._storages:
      ref = _StorageRef(str(key), storage_type.dtype, int(numel))
      if self._zip_loader is not None:
        ref.data = self._zip_loader(str(key), ref.dtype)
      self._storages[key] = ref
    return self._storages[key]


def _materialise(obj):
  if isinstance(obj, _LazyTensor):
    return obj.materialise()
  if isinstance(obj, dict):
    return type(obj)((k, _materialise(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v) for v in obj)
  return obj


def _read_legacy(f) -> Any:
  magic = pickle.load(f)
  if magic != _LEGACY_MAGIC:
    raise TorchPickleError("not a PyTorch checkpoint (bad magic number)")
  protocol = pickle.load(f)
  if protocol != _LEGACY_PROTOCOL:
    raise TorchPickleError(f"unsupported legacy protocol version {protocol}")
  sys_info = pickle.load(f)
  if not sys_info.get("little_endian", True):
    raise TorchPickleError("big-endian checkpoints are not supported")
  storages: dict[str, _StorageRef] = {}
  obj = _Unpickler(f, storages).load()
  keys = pickle.load(f)
  for key in keys:
    ref = storages[key]
    (numel,) = struct.unpack("<q", f.read(8))
    nbytes = numel * np.dtype(ref.dtype).itemsize
    buf = f.read(nbytes)
    if len(buf) != nbytes:
      raise TorchPickleError(f"the file ends inside storage {key!r}: it is truncated")
    ref.data = np.frombuffer(buf, dtype=ref.dtype)
  return _materialise(obj)


def _read_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
      raise TorchPickleError(f"{path}: zip file without data.pkl")
    prefix = pkl[0][: -len("data.pkl")]

    def load_storage(key: str, dtype) -> np.ndarray:
      return np.frombuffer(zf.read(f"{prefix}data/{key}"), dtype=dtype)

    with zf.open(pkl[0]) as f:
      obj = _Unpickler(io.BytesIO(f.read()), {}, load_storage).load()
  return _materialise(obj)


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads a PyTorch state dict file as `{name: np.ndarray}`.

  Args:
    path: a `.pth`/`.pt`/`.bin` file written by `torch.save(state_dict)`, in
      either the legacy or the zip layout.

  Returns:
    The state dict with every tensor as a contiguous numpy array. A checkpoint
    that wraps the state dict (`{'state_dict': ...}` or `{'model': ...}`) is
    unwrapped.
  """
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    obj = _read_zip(path)
  else:
    with open(path, "rb") as f:
      obj = _read_legacy(f)
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise TorchPickleError(f"{path}: expected a state dict, got {type(obj).__name__}")
  return dict(obj)
