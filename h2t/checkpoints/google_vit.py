"""Google ViT `.npz` checkpoints -> the tree of `h2t.models.vit.ViT`.

Two layouts exist, both flat `{'a/b/c': array}` archives:

* vision_transformer (`gs://vit_models/imagenet21k/ViT-B_16.npz`, the AugReg
  files under `gs://vit_models/augreg/`): written by the pre-Linen Flax API,
  whose submodule counter runs across the whole block, hence
  `encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
  MlpBlock_3}`; position embeddings in `Transformer/posembed_input/
  pos_embedding` cover the class token and the patches. This is h2t's own
  layout, so the mapping is the identity.
* big_vision: keys may sit under `params/`; Linen numbering
  (`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`); the
  blocks may be one scanned `Transformer/encoderblock` whose arrays carry a
  leading depth axis; `pos_embedding` sits at the top and covers the patches
  only, because big_vision adds it *before* prepending the class token.
  Giving the class token a zero position embedding is the same computation,
  so the converter prepends a zero row.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import jax
import numpy as np

from h2t import checkpoints

Tree = checkpoints.Tree

POSEMB = "Transformer/posembed_input/pos_embedding"
# big_vision (Linen) name -> vision_transformer (pre-Linen) name inside a block.
_LINEN_TO_PRE_LINEN = {
  "LayerNorm_0": "LayerNorm_0",
  "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
  "LayerNorm_1": "LayerNorm_2",
  "MlpBlock_0": "MlpBlock_3",
}


def convert(tensors: Mapping[str, np.ndarray], *, source: str = "npz") -> Tree:
  """Google ViT npz (vision_transformer or big_vision layout) -> h2t ViT tree.

  Args:
    tensors: the archive's arrays, `{'Transformer/encoder_norm/scale': ...}`.
    source: the file name, for messages.

  Returns:
    The nested parameter tree; keys the mapping does not know are kept under
    their own names so that the strict merge reports them.
  """
  if any(k.startswith("params/") for k in tensors):
    # big_vision training checkpoints also hold optimizer state beside params.
    tensors = {k[len("params/") :]: v for k, v in tensors.items() if k.startswith("params/")}
  if "embedding/kernel" not in tensors:
    first = ", ".join(sorted(tensors)[:8])
    raise checkpoints.CheckpointError(
      f"checkpoint {source!r} is not a Google ViT npz: it has no 'embedding/kernel' (its first keys: {first})"
    )
  flat = {}
  for key, value in tensors.items():
    value = np.asarray(value)
    if key == "pos_embedding":
      flat[POSEMB] = _with_cls_row(value)
    elif m := re.fullmatch(r"Transformer/encoderblock/([^/]+)/(.+)", key):
      module, rest = m.groups()
      for i, layer_value in enumerate(value):  # scanned: leading depth axis
        flat[f"Transformer/encoderblock_{i}/{_LINEN_TO_PRE_LINEN.get(module, module)}/{rest}"] = layer_value
    elif m := re.fullmatch(r"Transformer/encoderblock_(\d+)/([^/]+)/(.+)", key):
      block, module, rest = m.groups()
      flat[f"Transformer/encoderblock_{block}/{_LINEN_TO_PRE_LINEN.get(module, module)}/{rest}"] = value
    else:
      flat[key] = value
  return checkpoints.unflatten(flat)


def _with_cls_row(posemb: np.ndarray) -> np.ndarray:
  """big_vision's patch-only `[1, g*g, c]` -> `[1, 1 + g*g, c]` with a zero class row."""
  tokens = posemb.shape[1]
  if math.isqrt(tokens) ** 2 != tokens:
    return posemb  # already has the class row (older big_vision files)
  return np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)


def grid_size(posemb: np.ndarray) -> int:
  """Side of the patch grid of `posemb [1, 1 + g*g, c]`."""
  g = math.isqrt(posemb.shape[1] - 1)
  if g * g + 1 != posemb.shape[1]:
    raise checkpoints.CheckpointError(
      f"position embeddings of shape {posemb.shape} are not a class token plus a square grid"
    )
  return g


def resample_position_embeddings(posemb: np.ndarray, grid: int) -> np.ndarray:
  """Resizes the patch grid of `posemb [1, 1 + g*g, c]` to `[1, 1 + grid*grid, c]`.

  The class-token row is kept; the `g x g` grid is resized bilinearly
  (half-pixel centres, antialiased when shrinking: `jax.image.resize`), as
  timm does when a ViT runs at another resolution. The vision_transformer
  code zooms with corners aligned instead; the two differ by a fraction of a
  cell.
  """
  g = grid_size(posemb)
  if g == grid:
    return posemb
  c = posemb.shape[-1]
  cells = posemb[0, 1:].reshape(g, g, c).astype(np.float32)
  cells = np.asarray(jax.image.resize(cells, (grid, grid, c), method="linear"))
  return np.concatenate([posemb[:, :1], cells.reshape(1, grid * grid, c)], axis=1)
