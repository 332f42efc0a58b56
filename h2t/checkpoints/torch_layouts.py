"""PyTorch state dicts (torchvision, timm) -> h2t Flax parameter trees.

Pure key mappings plus the layout changes between the frameworks:
convolutions OIHW -> HWIO, linear layers `[out, in]` -> `[in, out]`, timm's
fused `qkv` projection split into Flax's per-head query/key/value kernels.
A key the mapping does not know is passed through under its own name, so
that `h2t.checkpoints.merge_strict` reports it as unexpected instead of it
vanishing silently.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from h2t import checkpoints

Tree = checkpoints.Tree

# The width of one attention head in every timm ViT-B/L/S/Ti: the state dict
# stores qkv fused as [3 * width, width], so the head count is not in it.
TIMM_VIT_HEAD_DIM = 64


def _require(tensors: Mapping[str, np.ndarray], key: str, what: str, source: str) -> None:
  if key not in tensors:
    first = ", ".join(sorted(tensors)[:8])
    raise checkpoints.CheckpointError(
      f"checkpoint {source!r} is not a {what}: it has no {key!r} (its first keys: {first})"
    )


def resnet_from_torch(tensors: Mapping[str, np.ndarray], *, source: str = "state dict") -> Tree:
  """torchvision / timm ResNet state dict -> the tree of `h2t.models.resnet.ResNet`.

  `layer2.0.downsample.1.running_var` -> `layer2/0/downsample/1/var`;
  4-D `weight`s (convolutions) go OIHW -> HWIO and become `kernel`; `fc.weight`
  `[classes, 2048]` becomes `fc/kernel [2048, classes]`; 1-D `weight`s are
  BatchNorm scales and keep their name. `num_batches_tracked` is dropped.
  """
  _require(tensors, "conv1.weight", "torchvision/timm ResNet state dict", source)
  flat = {}
  for key, value in tensors.items():
    *module, leaf = key.split(".")
    if leaf == "num_batches_tracked":
      continue
    value = np.asarray(value)
    if leaf == "weight" and value.ndim == 4:
      leaf, value = "kernel", value.transpose(2, 3, 1, 0)
    elif leaf == "weight" and value.ndim == 2:
      leaf, value = "kernel", value.T
    else:
      leaf = {"running_mean": "mean", "running_var": "var"}.get(leaf, leaf)
    flat["/".join(module + [leaf])] = value
  return checkpoints.unflatten(flat)


# timm ViT key (after `blocks.{i}.`) -> (Flax path under `encoderblock_{i}`, leaf kind).
_TIMM_BLOCK = {
  "norm1": "LayerNorm_0",
  "norm2": "LayerNorm_2",
  "mlp.fc1": "MlpBlock_3/Dense_0",
  "mlp.fc2": "MlpBlock_3/Dense_1",
}
_TIMM_TOP = {
  "norm": "Transformer/encoder_norm",
  "head": "head",
}


def _linear_or_norm(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  if leaf == "weight":
    return ("kernel", value.T) if value.ndim == 2 else ("scale", value)
  return leaf, value


def vit_from_timm(
  tensors: Mapping[str, np.ndarray], *, head_dim: int = TIMM_VIT_HEAD_DIM, source: str = "state dict"
) -> Tree:
  """timm `VisionTransformer` state dict -> the tree of `h2t.models.vit.ViT`.

  The target is the Google layout (`embedding`, `cls`,
  `Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/
  {LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3}`,
  `Transformer/encoder_norm`, `head`), so both families share one model.

  Args:
    tensors: the state dict, e.g. of `vit_base_patch16_224.augreg2_in21k_ft_in1k`.
    head_dim: width of one attention head, to split the fused `qkv` weight
      `[3 * width, width]` into `[width, heads, head_dim]` kernels.
    source: the file name, for messages.
  """
  _require(tensors, "patch_embed.proj.weight", "timm ViT state dict", source)
  width = tensors["patch_embed.proj.weight"].shape[0]
  if width % head_dim:
    raise checkpoints.CheckpointError(
      f"checkpoint {source!r}: ViT width {width} is not a multiple of the head width {head_dim}"
    )
  heads = width // head_dim
  flat = {}
  for key, value in tensors.items():
    value = np.asarray(value)
    if key == "cls_token":
      flat["cls"] = value
    elif key == "pos_embed":
      flat["Transformer/posembed_input/pos_embedding"] = value
    elif key.startswith("patch_embed.proj."):
      leaf = key.rsplit(".", 1)[1]
      flat[f"embedding/{'kernel' if leaf == 'weight' else leaf}"] = (
        value.transpose(2, 3, 1, 0) if leaf == "weight" else value
      )
    elif m := re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key):
      block, module, leaf = m.groups()
      prefix = f"Transformer/encoderblock_{block}"
      if module == "attn.qkv":
        mha = f"{prefix}/MultiHeadDotProductAttention_1"
        for name, part in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
          if leaf == "weight":  # [out, in] -> [in, heads, head_dim]
            flat[f"{mha}/{name}/kernel"] = part.T.reshape(width, heads, head_dim)
          else:
            flat[f"{mha}/{name}/bias"] = part.reshape(heads, head_dim)
      elif module == "attn.proj":
        mha = f"{prefix}/MultiHeadDotProductAttention_1/out"
        if leaf == "weight":  # [out, in] -> [heads, head_dim, out]
          flat[f"{mha}/kernel"] = value.T.reshape(heads, head_dim, width)
        else:
          flat[f"{mha}/bias"] = value
      elif module in _TIMM_BLOCK:
        name, value = _linear_or_norm(leaf, value)
        flat[f"{prefix}/{_TIMM_BLOCK[module]}/{name}"] = value
      else:
        flat[key] = value
    elif (parts := key.rsplit(".", 1)) and parts[0] in _TIMM_TOP and len(parts) == 2:
      name, value = _linear_or_norm(parts[1], value)
      flat[f"{_TIMM_TOP[parts[0]]}/{name}"] = value
    else:
      flat[key] = value
  return checkpoints.unflatten(flat)
