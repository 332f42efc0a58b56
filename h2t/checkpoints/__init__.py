"""Checkpoint files -> Flax parameter trees, merged strictly.

Each external format has one pure converter, `convert(tensors) -> tree`, that
maps a flat `{name: array}` dict (as read from the file) to the nested
parameter tree of the h2t model. `merge_strict` then compares that tree with
the tree the model expects and raises one error naming every missing,
unexpected and mis-shaped parameter.

Readers (a checkpoint is untrusted input: each reader checks every size,
offset and dtype a file declares before it reads, runs no code from the file,
and reports damage as one `CheckpointError` naming the file):
  * `.pth` / `.pt` / `.bin`: PyTorch state dicts, read without torch
    (`torch_pickle`).
  * `.safetensors`: `tensor_files.read_safetensors`.
  * `.npz`: numpy archives (the Google ViT checkpoints), `tensor_files.read_npz`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

Tree = Any  # nested dict of arrays


class CheckpointError(ValueError):
  """A checkpoint file is missing, unreadable, damaged, or does not fit the model.

  A ValueError, so that callers that report ValueErrors (h2t.main's `error:`
  line) report it too.
  """


def flatten(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """Flattens a nested dict into `{'a/b/c': leaf}`."""
  out = {}

  def visit(prefix, node):
    if isinstance(node, Mapping):
      for k, v in node.items():
        visit(f"{prefix}{sep}{k}" if prefix else str(k), v)
    else:
      out[prefix] = node

  visit("", tree)
  return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """Inverse of `flatten`."""
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split(sep)
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every tensor of a checkpoint file as `{name: np.ndarray}`.

  The format is chosen by the extension: `.npz`, `.safetensors`, or a PyTorch
  pickle (`.pth`, `.pt`, `.bin`).

  Raises:
    CheckpointError: the file is missing, has another extension, or is
      damaged; the message names the file and what is wrong.
  """
  # Imported here: the readers import CheckpointError from this module.
  from h2t.checkpoints import tensor_files, torch_pickle

  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(
      f"checkpoint file {path!r} does not exist; see README.md ('Real checkpoints') for where to download it"
    )
  if os.path.isdir(path):
    raise CheckpointError(f"checkpoint {path!r} is a folder; expected a checkpoint file")
  if not os.path.isfile(path):  # a pipe or a device would block or never end
    raise CheckpointError(f"checkpoint {path!r} is not a regular file; expected a checkpoint file")
  ext = os.path.splitext(path)[1].lower()
  readers = {
    ".npz": tensor_files.read_npz,
    ".safetensors": tensor_files.read_safetensors,
    ".pth": torch_pickle.load,
    ".pt": torch_pickle.load,
    ".bin": torch_pickle.load,
  }
  if ext in readers:
    try:
      return readers[ext](path)
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 -- whatever a damaged file sets off, it is reported as one error.
      raise CheckpointError(
        f"checkpoint {path!r} is damaged or unreadable ({type(e).__name__}: {e}); download or save it again"
      ) from e
  raise CheckpointError(
    f"checkpoint {path!r} has extension {ext!r}; expected one of .npz, .safetensors, .pth, .pt, .bin"
  )


@contextlib.contextmanager
def converting(path: str, what: str) -> Iterator[None]:
  """Reports a converter's failure on tensors of unexpected ranks or sizes as a CheckpointError.

  A converter reshapes and transposes what a file holds; a file of another
  model, or a damaged one, makes numpy raise IndexError/ValueError/TypeError
  far from the file. This names the file and the model it was read as.
  """
  try:
    yield
  except CheckpointError as e:
    if path in str(e):
      raise
    raise CheckpointError(f"checkpoint {path!r}: {e}") from None  # name the file
  except (IndexError, ValueError, TypeError, KeyError) as e:
    raise CheckpointError(
      f"checkpoint {path!r} holds tensors of unexpected shapes for a {what} ({type(e).__name__}: {e}); "
      f"is it a {what} checkpoint, and complete?"
    ) from e


def file_hash(path: str | os.PathLike, length: int = 16) -> str:
  """Short SHA-256 of a file's bytes: identifies the weights in caches/heads."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()[:length]


def merge_strict(
  loaded: Tree,
  expected: Tree,
  *,
  source: str,
  replaceable: tuple[str, ...] = (),
) -> Tree:
  """Checks a converted tree against the model's and returns it as numpy.

  Args:
    loaded: the tree converted from the checkpoint file.
    expected: the tree the model expects (arrays or `jax.ShapeDtypeStruct`s,
      e.g. from `jax.eval_shape(model.init, ...)`).
    source: the file name, for messages.
    replaceable: flat-key prefixes (e.g. `('head/',)`) that may differ in shape
      from the checkpoint: they are reset to zeros of the model's shape and a
      warning is logged. Used for a classification head of another size.

  Returns:
    A nested dict with the structure of `expected` holding float32 numpy arrays.

  Raises:
    CheckpointError: listing every missing, unexpected and mis-shaped key.
  """
  flat_loaded = flatten(loaded)
  flat_expected = flatten(expected)
  missing = sorted(set(flat_expected) - set(flat_loaded))
  unexpected = sorted(set(flat_loaded) - set(flat_expected))
  misshaped, replaced = [], []
  merged = {}
  for key, want in flat_expected.items():
    if key not in flat_loaded:
      continue
    have = np.asarray(flat_loaded[key])
    if tuple(have.shape) != tuple(want.shape):
      if any(key.startswith(p) for p in replaceable):
        replaced.append(f"{key}: {tuple(have.shape)} -> {tuple(want.shape)}")
        merged[key] = np.zeros(want.shape, np.float32)
        continue
      misshaped.append(f"{key}: checkpoint {tuple(have.shape)}, model {tuple(want.shape)}")
      continue
    merged[key] = have.astype(np.float32, copy=False)
  if missing or unexpected or misshaped:
    # One line (every key named, separated by '; '): an error is one line on the terminal.
    parts = [f"checkpoint {source!r} does not match the model (is it the checkpoint of the backbone named?)"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
      if items:
        parts.append(f"{title} ({len(items)}): {'; '.join(items)}")
    raise CheckpointError(" -- ".join(parts))
  if replaced:
    from absl import logging

    logging.warning("%s: replaced parameters of another shape: %s", source, "; ".join(replaced))
  return unflatten(merged)


def require(path, help_text: str) -> str:
  """`path` as a string; None (no checkpoint given) is a `CheckpointError` carrying `help_text`."""
  if path is None:
    raise CheckpointError(help_text)
  return os.fspath(path)


def file_id(path: str) -> str:
  """`<file name>:<hash of its bytes>`: what a head records of the weights it was trained on."""
  return f"{os.path.basename(path)}:{file_hash(path)}"
