"""Reads PyTorch checkpoint files into numpy arrays, without importing torch.

Two on-disk layouts exist:

* the legacy layout (torch < 1.6, and `_use_new_zipfile_serialization=False`):
  a stream of pickles -- magic number, protocol version, system info, the
  object itself (tensors refer to storages by key), the list of storage keys,
  then each storage's raw bytes preceded by its element count;
* the zip layout (torch >= 1.6): `<name>/data.pkl` plus one uncompressed
  entry per storage under `<name>/data/`.

A checkpoint is untrusted input. Every pickle in it, the legacy headers
included, goes through a restricted unpickler that resolves only the handful
of globals a state dict needs, so no code in the file runs. Every number the
file declares is checked, in Python integers, before any byte is read on its
behalf: a storage's element count against the bytes the file holds for it, a
tensor's offset, sizes and strides against its storage (the last element it
reaches, `offset + sum(stride * (size - 1))`, must lie inside), dtypes against
an allow-list, and the total size of the tensors against the file's size
(strides of 0 could otherwise expand a few bytes into terabytes). Any damage
is one `TorchPickleError` (a `CheckpointError`) naming the file.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from h2t.checkpoints import CheckpointError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch storage class -> little-endian numpy dtype. Anything else (complex,
# quantised, float8) is refused by name.
_STORAGE_DTYPES = {
  "DoubleStorage": np.dtype("<f8"),
  "FloatStorage": np.dtype("<f4"),
  "HalfStorage": np.dtype("<f2"),
  "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
  "LongStorage": np.dtype("<i8"),
  "IntStorage": np.dtype("<i4"),
  "ShortStorage": np.dtype("<i2"),
  "CharStorage": np.dtype("i1"),
  "ByteStorage": np.dtype("u1"),
  "BoolStorage": np.dtype("?"),
}
MAX_DIMS = 64  # torch's own limit on a tensor's rank
# The tensors may take at most this many times the file's size (plus a small
# allowance): tied weights and expanded views share storage, but no real state
# dict expands further.
EXPANSION_LIMIT = 4
EXPANSION_SLACK_BYTES = 64 << 20


class TorchPickleError(CheckpointError):
  """A file is not a state dict this reader understands, or is damaged."""


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


class _Frozen:
  """Objects the unpickler hands out: pickle's BUILD opcode may not modify them."""

  __slots__ = ()

  def __setstate__(self, state):
    raise TorchPickleError(f"the pickle tries to modify a {type(self).__name__.strip('_')}")


class _StorageRef(_Frozen):
  __slots__ = ("key", "dtype", "numel", "data")

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.data: np.ndarray | None = None  # [numel], once read


class _LazyTensor(_Frozen):
  """A tensor's place in its storage, checked to lie inside it."""

  __slots__ = ("storage", "offset", "size", "stride")

  def __init__(self, storage: _StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  @property
  def numel(self) -> int:
    n = 1
    for s in self.size:
      n *= s
    return n

  def materialise(self) -> np.ndarray:
    flat = self.storage.data
    if flat is None:
      raise TorchPickleError(f"storage {self.storage.key!r} was never read")
    if self.numel == 0:
      return np.zeros(self.size, flat.dtype)
    if not self.size:
      return np.array(flat[self.offset])  # a 0-d array, not a numpy scalar
    # A dimension of size 1 never moves: stride 0 keeps numpy's byte strides small.
    strides = tuple(0 if n == 1 else s * flat.dtype.itemsize for n, s in zip(self.size, self.stride))
    view = np.lib.stride_tricks.as_strided(
      flat[self.offset :], shape=self.size, strides=strides, writeable=False
    )
    return np.array(view, order="C")


def _as_dims(value, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS:
    raise TorchPickleError(f"a tensor's {what} is {value!r}, not a tuple of at most {MAX_DIMS} integers")
  if not all(_is_int(v) and v >= 0 for v in value):
    raise TorchPickleError(f"a tensor's {what} {tuple(value)!r} holds a negative or non-integer entry")
  return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args) -> _LazyTensor:
  """Checks torch._utils._rebuild_tensor_v2's arguments; the tensor is read later."""
  if not isinstance(storage, _StorageRef):
    raise TorchPickleError(f"a tensor refers to a {type(storage).__name__}, not to a storage")
  if not (_is_int(storage_offset) and storage_offset >= 0):
    raise TorchPickleError(f"a tensor of storage {storage.key!r} has storage offset {storage_offset!r}")
  size, stride = _as_dims(size, "size"), _as_dims(stride, "stride")
  if len(size) != len(stride):
    raise TorchPickleError(f"a tensor has size {size} but strides {stride}: their lengths differ")
  tensor = _LazyTensor(storage, storage_offset, size, stride)
  if tensor.numel == 0:
    last = storage_offset - 1  # reads nothing; the offset may point just past the end
  else:
    last = storage_offset + sum(s * (n - 1) for n, s in zip(size, stride))
  if last >= storage.numel:
    raise TorchPickleError(
      f"a tensor of size {size}, strides {stride} at offset {storage_offset} reaches element {last} "
      f"of storage {storage.key!r}, past the end of its storage of {storage.numel} elements"
    )
  return tensor


def _rebuild_parameter(data, *unused_args) -> _LazyTensor:
  if not isinstance(data, _LazyTensor):
    raise TorchPickleError(f"a parameter wraps a {type(data).__name__}, not a tensor")
  return data


class _Global(_Frozen):
  """A global the unpickler allows: callable, but never modified by the pickle."""

  __slots__ = ("name", "_fn")

  def __init__(self, name: str, fn):
    self.name, self._fn = name, fn

  def __call__(self, *args):
    return self._fn(*args)


class _StorageType(_Frozen):
  __slots__ = ("name", "dtype")

  def __init__(self, name: str):
    self.name, self.dtype = name, _STORAGE_DTYPES[name]


_ALLOWED_GLOBALS = {
  ("collections", "OrderedDict"): lambda: _Global("OrderedDict", collections.OrderedDict),
  ("torch._utils", "_rebuild_tensor_v2"): lambda: _Global("_rebuild_tensor_v2", _rebuild_tensor),
  ("torch._utils", "_rebuild_parameter"): lambda: _Global("_rebuild_parameter", _rebuild_parameter),
  ("torch._utils", "_rebuild_parameter_with_state"): lambda: _Global(
    "_rebuild_parameter_with_state", _rebuild_parameter
  ),
}


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals that appear in plain state dicts (none when `storages` is None)."""

  def __init__(self, stream: io.BytesIO, storages: dict[str, _StorageRef] | None, load_storage=None):
    super().__init__(stream)
    self._storages = storages
    self._load_storage = load_storage

  def find_class(self, module: str, name: str):
    if self._storages is not None:
      if (module, name) in _ALLOWED_GLOBALS:
        return _ALLOWED_GLOBALS[module, name]()
      if module == "torch" and name in _STORAGE_DTYPES:
        return _StorageType(name)
      if module == "torch" and name.endswith("Storage"):
        raise TorchPickleError(
          f"it holds a torch.{name}; supported storages: {', '.join(sorted(_STORAGE_DTYPES))}"
        )
    raise TorchPickleError(
      f"it refers to {module}.{name}, which a plain state dict does not contain "
      "(nothing was run); re-save it with torch.save(model.state_dict())"
    )

  def persistent_load(self, pid):
    if self._storages is None:
      raise TorchPickleError("a header refers to a storage")
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
      raise TorchPickleError(f"unexpected persistent id {pid!r}")
    _, storage_type, key, location, numel = pid[:5]
    if len(pid) == 6 and pid[5] is not None:
      raise TorchPickleError(f"storage {key!r} is a view of another storage (torch < 0.4); re-save it")
    if not isinstance(storage_type, _StorageType):
      raise TorchPickleError(f"storage {key!r} has type {storage_type!r}, not a torch storage type")
    if not (isinstance(key, str) and isinstance(location, str) and _is_int(numel) and numel >= 0):
      raise TorchPickleError(f"malformed storage record {pid!r}")
    ref = self._storages.get(key)
    if ref is None:
      ref = self._storages[key] = _StorageRef(key, storage_type.dtype, numel)
      if self._load_storage is not None:
        ref.data = self._load_storage(ref)
    elif (ref.dtype, ref.numel) != (storage_type.dtype, numel):
      raise TorchPickleError(f"storage {key!r} is declared twice, with different types or sizes")
    return ref


def _read_legacy(raw: bytes) -> tuple[Any, dict[str, _StorageRef]]:
  stream = io.BytesIO(raw)

  def next_pickle(storages=None):
    # Each pickle continues where the last stopped; headers may name no global and no storage.
    return _Unpickler(stream, storages).load()

  magic = next_pickle()
  if magic != _LEGACY_MAGIC:
    raise TorchPickleError("not a PyTorch checkpoint (neither a zip file nor the legacy magic number)")
  protocol = next_pickle()
  if protocol != _LEGACY_PROTOCOL:
    raise TorchPickleError(f"unsupported legacy protocol version {protocol!r}")
  sys_info = next_pickle()
  if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) is not True:
    raise TorchPickleError("it was written on a big-endian machine or has a malformed header")
  storages: dict[str, _StorageRef] = {}
  obj = next_pickle(storages)
  keys = next_pickle()
  if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)) or len(set(keys)) != len(keys):
    raise TorchPickleError(f"its list of storage keys is malformed: {keys!r:.200}")
  if set(keys) != set(storages):
    raise TorchPickleError(
      f"the tensors use storages {sorted(storages)} but the file lists {sorted(keys)}"[:500]
    )
  for key in keys:
    ref = storages[key]
    header = stream.read(8)
    if len(header) != 8:
      raise TorchPickleError(f"the file ends before storage {key!r}: it is truncated")
    (count,) = struct.unpack("<q", header)
    if count != ref.numel:
      raise TorchPickleError(f"storage {key!r} holds {count} elements but the pickle declares {ref.numel}")
    nbytes = count * ref.dtype.itemsize
    left = len(raw) - stream.tell()
    if nbytes > left:
      raise TorchPickleError(
        f"the file ends inside storage {key!r} ({nbytes} bytes declared, {left} left): it is truncated"
      )
    start = stream.tell()
    ref.data = np.frombuffer(raw, dtype=ref.dtype, count=count, offset=start)
    stream.seek(start + nbytes)
  trailing = len(raw) - stream.tell()
  if trailing:
    raise TorchPickleError(f"{trailing} unexpected bytes follow the last storage")
  return obj, storages


def _read_zip(raw: bytes) -> tuple[Any, dict[str, _StorageRef]]:
  with zipfile.ZipFile(io.BytesIO(raw)) as zf:
    infos = {info.filename: info for info in zf.infolist()}
    pkl = [n for n in infos if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pkl) != 1:
      raise TorchPickleError("it is a zip file but not a torch.save archive (no single <name>/data.pkl)")
    prefix = pkl[0][: -len("data.pkl")]

    def read_entry(name: str, expected_size: int | None = None) -> bytes:
      info = infos[name]
      if info.compress_type != zipfile.ZIP_STORED:
        raise TorchPickleError(f"entry {name!r} is compressed; torch.save stores entries uncompressed")
      if info.file_size != info.compress_size or info.header_offset + info.compress_size > len(raw):
        raise TorchPickleError(f"entry {name!r} declares {info.file_size} bytes that the file does not hold")
      if expected_size is not None and info.file_size != expected_size:
        raise TorchPickleError(
          f"storage entry {name!r} holds {info.file_size} bytes but the pickle declares {expected_size}"
        )
      return zf.read(name)

    byteorder = f"{prefix}byteorder"
    if byteorder in infos and read_entry(byteorder) != b"little":
      raise TorchPickleError("it was written on a big-endian machine")

    def load_storage(ref: _StorageRef) -> np.ndarray:
      name = f"{prefix}data/{ref.key}"
      if name not in infos:
        raise TorchPickleError(f"storage {ref.key!r} has no entry {name!r}")
      data = read_entry(name, ref.numel * ref.dtype.itemsize)
      return np.frombuffer(data, dtype=ref.dtype)

    storages: dict[str, _StorageRef] = {}
    obj = _Unpickler(io.BytesIO(read_entry(pkl[0])), storages, load_storage).load()
  return obj, storages


def _state_dict(obj, storages: dict[str, _StorageRef], budget: int) -> dict[str, np.ndarray]:
  """The unwrapped state dict, every tensor a contiguous numpy array."""
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise TorchPickleError(f"expected a state dict, got a {type(obj).__name__}")
  lazy = {}
  for key, value in obj.items():
    if not isinstance(key, str):
      raise TorchPickleError(f"state dict key {key!r} is not a string")
    if not isinstance(value, _LazyTensor):
      raise TorchPickleError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
    lazy[key] = value
  # Counted per name: a crafted pickle can name one tensor under a million keys.
  total = sum(t.numel * t.storage.dtype.itemsize for t in lazy.values())
  if total > budget:
    raise TorchPickleError(
      f"its tensors would take {total} bytes, more than {EXPANSION_LIMIT} times the file's size "
      "(sizes and strides that expand a small storage, or one tensor under very many names)"
    )
  return {key: t.materialise() for key, t in lazy.items()}


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads a PyTorch state dict file as `{name: np.ndarray}`.

  Args:
    path: a `.pth`/`.pt`/`.bin` file written by `torch.save(state_dict)`, in
      either the legacy or the zip layout.

  Returns:
    The state dict with every tensor as a contiguous numpy array. A checkpoint
    that wraps the state dict (`{'state_dict': ...}` or `{'model': ...}`) is
    unwrapped; every name gets its own array, also where the file shares
    storage between tensors (views, tied weights).

  Raises:
    TorchPickleError: the file is damaged, hostile, or not a state dict; the
      message names the file and what is wrong.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      raw = f.read()
    obj, storages = _read_zip(raw) if raw[:4] == b"PK\x03\x04" else _read_legacy(raw)
    budget = EXPANSION_LIMIT * len(raw) + EXPANSION_SLACK_BYTES
    return _state_dict(obj, storages, budget)
  except TorchPickleError as e:
    raise TorchPickleError(f"checkpoint {path!r} is not a usable PyTorch state dict: {e}") from None
  except OSError as e:
    raise TorchPickleError(f"cannot read checkpoint {path!r}: {e}") from e
  except Exception as e:  # noqa: BLE001 -- any other failure of a parser is a damaged file.
    raise TorchPickleError(
      f"checkpoint {path!r} is damaged (not a readable PyTorch file: {type(e).__name__}: {e}); "
      "download or save it again"
    ) from e
