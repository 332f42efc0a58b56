"""`.safetensors` and `.npz` files read as untrusted input: every header is checked before any read.

* safetensors: an 8-byte little-endian header length, a JSON header
  `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
  then the data buffer. The header must lie inside the file; each tensor's
  dtype must be one of `SAFETENSORS_DTYPES`, its byte range `end - begin` must
  equal its element count times its item size, and the ranges, sorted, must
  tile the buffer exactly (no gap, no overlap, nothing after the last).
* npz: a zip of `.npy` files (np.savez, np.savez_compressed). Each member's
  header is parsed before its data: the dtype must be a plain number or bool
  (no object arrays, so no pickle), and the bytes after the header must be
  exactly what the declared shape needs.

Sizes are computed in Python integers, so no header can overflow them, and no
read goes past a file's end. Damage is one `CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile

import ml_dtypes
import numpy as np

from h2t.checkpoints import CheckpointError

SAFETENSORS_DTYPES = {
  "BOOL": np.dtype("?"),
  "U8": np.dtype("u1"),
  "I8": np.dtype("i1"),
  "U16": np.dtype("<u2"),
  "I16": np.dtype("<i2"),
  "U32": np.dtype("<u4"),
  "I32": np.dtype("<i4"),
  "U64": np.dtype("<u8"),
  "I64": np.dtype("<i8"),
  "F16": np.dtype("<f2"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F32": np.dtype("<f4"),
  "F64": np.dtype("<f8"),
}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header
MAX_DIMS = 64
NPY_KINDS = "biuf"  # bool, signed, unsigned, float: what a weight file holds
# Deflate expands at most ~1032x; a member claiming more is not a real npz.
MAX_DEFLATE_RATIO = 1100


def _numel(shape) -> int:
  n = 1
  for s in shape:
    n *= s
  return n


def _unique_keys(pairs):
  out = {}
  for k, v in pairs:
    if k in out:
      raise CheckpointError(f"its header names {k!r} twice")
    out[k] = v
  return out


def _check_shape(name: str, shape) -> tuple[int, ...]:
  if not (isinstance(shape, list) and len(shape) <= MAX_DIMS):
    raise CheckpointError(f"tensor {name!r} has shape {shape!r:.100}, not a list of at most {MAX_DIMS} sizes")
  if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
    raise CheckpointError(f"tensor {name!r} has shape {shape!r:.100} with a negative or non-integer size")
  return tuple(shape)


def _safetensors_header(
  f, file_size: int
) -> tuple[int, dict[str, tuple[np.dtype, tuple[int, ...], int, int]]]:
  """Checks the header; returns (data start, {name: (dtype, shape, begin, end)})."""
  prefix = f.read(8)
  if len(prefix) != 8:
    raise CheckpointError(f"it has {file_size} bytes, fewer than the 8-byte header length")
  (header_len,) = struct.unpack("<Q", prefix)
  if header_len > min(MAX_HEADER_BYTES, file_size - 8):
    raise CheckpointError(
      f"its header declares {header_len} bytes but the file has {file_size - 8} after the length field"
    )
  try:
    header = json.loads(f.read(header_len).decode("utf-8"), object_pairs_hook=_unique_keys)
  except (UnicodeDecodeError, ValueError) as e:
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f"its header is not valid JSON ({e})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"its header is a JSON {type(header).__name__}, not an object")
  metadata = header.pop("__metadata__", {})
  if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
    raise CheckpointError("its __metadata__ is not a map of strings")
  data_size = file_size - 8 - header_len
  entries = {}
  for name, info in header.items():
    if not (isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}):
      raise CheckpointError(f"tensor {name!r} has header {info!r:.200}; expected dtype, shape, data_offsets")
    if info["dtype"] not in SAFETENSORS_DTYPES:
      raise CheckpointError(
        f"tensor {name!r} has dtype {info['dtype']!r:.50}; supported: {', '.join(SAFETENSORS_DTYPES)}"
      )
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    shape = _check_shape(name, info["shape"])
    offsets = info["data_offsets"]
    if not (
      isinstance(offsets, list)
      and len(offsets) == 2
      and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
      and 0 <= offsets[0] <= offsets[1] <= data_size
    ):
      raise CheckpointError(
        f"tensor {name!r} has data_offsets {offsets!r:.100}, not [begin, end] within the {data_size}-byte buffer"
      )
    begin, end = offsets
    if end - begin != _numel(shape) * dtype.itemsize:
      raise CheckpointError(
        f"tensor {name!r} of shape {shape} and dtype {info['dtype']} needs "
        f"{_numel(shape) * dtype.itemsize} bytes but its data_offsets span {end - begin}"
      )
    entries[name] = (dtype, shape, begin, end)
  position = 0
  for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
    if begin != position:
      raise CheckpointError(f"tensor {name!r} starts at byte {begin} of the buffer, expected {position}")
    position = end
  if position != data_size:
    raise CheckpointError(f"its tensors cover {position} bytes of a {data_size}-byte buffer")
  return 8 + header_len, entries


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """`{name: array}` of a `.safetensors` file, its header checked first."""
  try:
    with open(path, "rb") as f:
      file_size = os.fstat(f.fileno()).st_size
      start, entries = _safetensors_header(f, file_size)
      out = {}
      for name, (dtype, shape, begin, end) in entries.items():
        f.seek(start + begin)
        buf = bytearray(end - begin)
        if f.readinto(buf) != len(buf):
          raise CheckpointError(f"the file ended while reading tensor {name!r}")
        out[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
      return out
  except CheckpointError as e:
    raise CheckpointError(f"checkpoint {path!r} is not a valid safetensors file: {e}") from None


def _npy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
  name = info.filename
  if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
    raise CheckpointError(f"member {name!r} uses an unsupported compression")
  if info.file_size > MAX_DEFLATE_RATIO * max(info.compress_size, 1) + 1024:
    raise CheckpointError(f"member {name!r} claims {info.file_size} bytes from {info.compress_size}")
  with zf.open(info) as f:
    try:
      version = np.lib.format.read_magic(f)
      read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
      if version not in read_header:
        raise ValueError(f"npy format version {version}")
      shape, fortran_order, dtype = read_header[version](f)
    except ValueError as e:
      raise CheckpointError(f"member {name!r} has a damaged .npy header ({e})") from None
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in NPY_KINDS:
      raise CheckpointError(
        f"member {name!r} has dtype {dtype}; only numbers and booleans are read (no object arrays)"
      )
    header_size = f.tell()
    nbytes = _numel(shape) * dtype.itemsize
    if info.file_size - header_size != nbytes:
      raise CheckpointError(
        f"member {name!r} declares shape {shape} of {dtype} ({nbytes} bytes) "
        f"but holds {info.file_size - header_size} bytes of data"
      )
    buf = bytearray(nbytes)
    if f.readinto(buf) != nbytes:
      raise CheckpointError(f"member {name!r} ends early")
  array = np.frombuffer(buf, dtype=dtype)
  if fortran_order:
    return array.reshape(shape[::-1]).transpose()
  return array.reshape(shape)


def read_npz(path: str) -> dict[str, np.ndarray]:
  """`{name: array}` of an `.npz` file (`.npy` members; no pickled objects)."""
  try:
    with zipfile.ZipFile(path) as zf:
      out = {}
      for info in zf.infolist():
        if not info.filename.endswith(".npy"):
          raise CheckpointError(f"member {info.filename!r} is not a .npy array")
        out[info.filename[: -len(".npy")]] = _npy_member(zf, info)
      return out
  except CheckpointError as e:
    raise CheckpointError(f"checkpoint {path!r} is not a valid npz file: {e}") from None
  except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as e:
    raise CheckpointError(f"checkpoint {path!r} is a damaged npz file ({type(e).__name__}: {e})") from e
