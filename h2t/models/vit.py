"""ViT-B/16 in the Google layout (vision_transformer / big_vision), inference only.

Submodules carry the parameter names of the vision_transformer `.npz` files
(`embedding`, `cls`, `Transformer/posembed_input`, `Transformer/
encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3/Dense_0, MlpBlock_3/Dense_1}`, `Transformer/encoder_norm`,
optional `pre_logits`, `head`); big_vision and timm files are mapped onto
them by `h2t.checkpoints.google_vit` and `h2t.checkpoints.torch_layouts`.

Taps, with the reference's names, in network order (t = 1 + (S / patch)^2
tokens, class token first; D the width):
  `root_output_with_cls` [n, t, D]: patch embeddings with the class token
    prepended, before position embeddings;
  `position_embedded_input` [n, t, D]: after adding position embeddings;
  `encoder_{i}_pre_attn` [n, t, D]: block i's input (so `encoder_0_pre_attn`
    equals `position_embedded_input` and `encoder_{i}_pre_attn` equals
    `encoder_{i-1}_mlp_2`, as the reference's names imply);
  `encoder_{i}_attn` [n, t, D]: after self-attention and its residual;
  `encoder_{i}_mlp_1` [n, t, mlp_dim]: the MLP's hidden activation, after GELU;
  `encoder_{i}_mlp_2` [n, t, D]: block output, after the MLP and its residual;
  `encoded_sequence` [n, t, D]: after the final LayerNorm, all tokens;
  `cls_embedded` [n, D]: the class token of `encoded_sequence` -- the
    vision_transformer model's `x[:, 0]`, the step between the encoder and
    `pre_logits`;
  `pre_logits` [n, R]: `tanh(Dense(cls_embedded))` for checkpoints with a
    representation layer (the original ImageNet-21k files), else equal to
    `cls_embedded`.
ViT-B/16 (12 blocks) has 53 taps; the logits are returned beside them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from h2t import checkpoints
from h2t.checkpoints import google_vit, torch_layouts
from h2t.models import common

LN_EPS = 1e-6

DOWNLOAD_HELP = (
  "vit_b16 has no packaged checkpoint; download a ViT-B/16 and pass "
  "--config.backbone.checkpoint=/path/to/file. Files that work: the Google npz files "
  "(gs://vit_models/imagenet21k/ViT-B_16.npz, gs://vit_models/imagenet21k+imagenet2012/ViT-B_16.npz, "
  "the AugReg files gs://vit_models/augreg/B_16-*.npz, big_vision ViT-B/16 npz files with a class "
  "token), or timm's model.safetensors / pytorch_model.bin from the Hugging Face Hub repositories "
  "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k, timm/vit_base_patch16_224.augreg_in21k, ..."
)


IMAGENET21K_CLASSES = 21843
# Parameters (timm state-dict keys, Google npz key prefixes) of ViT families that compute something
# else than the class-token ViT here; found in a file, they stop the load with what the file is.
OTHER_FAMILIES = {
  "fc_norm.weight": "global average pooling with fc_norm (timm's MAE / BEiT-style ViTs)",
  "norm_pre.weight": "a LayerNorm before the encoder (timm's CLIP ViTs, *_clip_*)",
  "reg_token": "register tokens (timm's *_reg4_* ViTs)",
  "attn_pool.latent": "an attention-pooling head (timm's SigLIP / MAP-head ViTs)",
  "MAPHead_0/probe": "an attention-pooling head (big_vision's SigLIP / MAP-head ViTs)",
}
# Old timm files (timm < 0.9, e.g. jx_vit_base_patch16_224_in21k-e5005f0a.pth) keep the original
# ImageNet-21k representation layer that current timm drops; it is the npz's `pre_logits`.
TIMM_REPRESENTATION = ("pre_logits.fc.weight", "pre_logits.fc.bias")


def check_family(tensors: Mapping[str, Any], *, source: str) -> None:
  """Raises CheckpointError, saying what the file is, for a ViT family this model does not compute."""
  for marker, what in OTHER_FAMILIES.items():
    if marker in tensors or f"params/{marker}" in tensors:
      raise checkpoints.CheckpointError(
        f"{source} is a ViT with {what} (it has {marker!r}); h2t's ViT is the class-token ViT of "
        f"the reference. Use e.g. the Google ViT-B_16.npz or timm's "
        f"vit_base_patch16_224.augreg2_in21k_ft_in1k / .augreg_in21k / .orig_in21k."
      )


def identify(flat: Mapping[str, Any], *, google: bool, input_size: int) -> str:
  """Which known ViT checkpoint a converted parameter tree looks like, in words.

  Told apart by the representation layer (`pre_logits`: only the original
  ImageNet-21k files have it), the head's classes (21843: ImageNet-21k;
  1000: fine-tuned on ImageNet-1k; none) and whether that head is all zeros
  (the original ImageNet-21k head was zeroed before release).
  """
  classes = int(flat["head/kernel"].shape[-1]) if "head/kernel" in flat else 0
  representation = "pre_logits/kernel" in flat
  if representation and classes == IMAGENET21K_CLASSES:
    zero = " (its 21843-class head is all zeros, as released)" if not np.any(flat["head/kernel"]) else ""
    return (
      "the original ImageNet-21k ViT (vision_transformer's imagenet21k/ files, e.g. ViT-B_16.npz) with "
      f"its representation layer as pre_logits{zero}; timm's *.orig_in21k is the same encoder without it"
    )
  if representation:
    return "a ViT with a representation layer (pre_logits = tanh(Dense(cls_embedded)))"
  if classes == IMAGENET21K_CLASSES:
    return "an AugReg ImageNet-21k ViT (augreg/*-i21k-300ep-*.npz, timm's *.augreg_in21k); pre_logits = cls_embedded"
  if classes == 1000:
    return f"an ImageNet-1k fine-tuned ViT (the *_ft_in1k / imagenet2012 files) made at {input_size} px"
  if classes == 0:
    kind = "timm ViT without a head, e.g. *.orig_in21k" if not google else "ViT without a head"
    return f"a {kind}: pre_logits = cls_embedded (no representation layer)"
  return f"a ViT with a {classes}-class head"


def _check_name_matches(path: str, flat: Mapping[str, Any], grid: int, patch: int) -> None:
  """'ViT-B_16.npz' names both the ImageNet-21k original and its ImageNet-1k fine-tune: say which."""
  if os.path.basename(path) != "ViT-B_16.npz" or "pre_logits/kernel" in flat:
    return
  classes = int(flat["head/kernel"].shape[-1]) if "head/kernel" in flat else 0
  if classes == 1000:
    likely = "the ImageNet-1k fine-tuned file of the same name (imagenet21k+imagenet2012/)"
  elif classes == IMAGENET21K_CLASSES:
    likely = "an AugReg ImageNet-21k file (augreg/B_16-i21k-*.npz) under this name"
  else:
    likely = "another ViT under this name"
  logging.warning(
    "%s is not the original ImageNet-21k ViT-B_16.npz (imagenet21k/: a pre_logits layer and 21843 "
    "classes, the ViT-B/16 (i21k) of published VTAB-1k results): it has no pre_logits layer and %d "
    "classes at %d px, so it is probably %s.",
    path,
    classes,
    grid * patch,
    likely,
  )


def tap_names(depth: int = 12) -> tuple[str, ...]:
  """Every tap of a ViT with `depth` blocks, in network order."""
  names = ["root_output_with_cls", "position_embedded_input"]
  for i in range(depth):
    names += [f"encoder_{i}_pre_attn", f"encoder_{i}_attn", f"encoder_{i}_mlp_1", f"encoder_{i}_mlp_2"]
  return tuple(names + ["encoded_sequence", "cls_embedded", "pre_logits"])


class _AddPositionEmbs(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:])
    return x + pe


class _MlpBlock(nn.Module):
  mlp_dim: int
  gelu_approximate: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    hidden = nn.gelu(nn.Dense(self.mlp_dim, name="Dense_0")(x), approximate=self.gelu_approximate)
    return nn.Dense(x.shape[-1], name="Dense_1")(hidden), hidden


class EncoderBlock(nn.Module):
  """Pre-norm transformer block; returns `(output, {tap suffix: activation})`."""

  heads: int
  mlp_dim: int
  gelu_approximate: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    taps = {"pre_attn": x}
    y = nn.LayerNorm(epsilon=LN_EPS, name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="MultiHeadDotProductAttention_1")(y, y)
    x = taps["attn"] = x + y
    y = nn.LayerNorm(epsilon=LN_EPS, name="LayerNorm_2")(x)
    y, taps["mlp_1"] = _MlpBlock(self.mlp_dim, self.gelu_approximate, name="MlpBlock_3")(y)
    x = taps["mlp_2"] = x + y
    return x, taps


class _Encoder(nn.Module):
  depth: int
  heads: int
  mlp_dim: int
  gelu_approximate: bool

  @nn.compact
  def __call__(self, x: jax.Array, taps: dict[str, jax.Array]) -> jax.Array:
    x = taps["position_embedded_input"] = _AddPositionEmbs(name="posembed_input")(x)
    for i in range(self.depth):
      block = EncoderBlock(self.heads, self.mlp_dim, self.gelu_approximate, name=f"encoderblock_{i}")
      x, block_taps = block(x)
      taps.update({f"encoder_{i}_{k}": v for k, v in block_taps.items()})
    return nn.LayerNorm(epsilon=LN_EPS, name="encoder_norm")(x)


class ViT(nn.Module):
  """Vision Transformer with a class token: `x [n, S, S, 3]` -> `(logits, taps)`.

  The position-embedding grid is `S / patch` on a side, fixed at `init`.

  Attributes:
    patch: patch side in pixels.
    width: token width D.
    depth: number of encoder blocks.
    heads: attention heads (D must divide by it).
    mlp_dim: hidden width of the MLPs.
    num_classes: size of `head`; 0 for a checkpoint without a head (logits
      are then `[n, 0]`).
    representation_size: width of the `pre_logits` Dense + tanh layer; 0 for
      none.
    gelu_approximate: tanh-approximated GELU, as the Flax code that trained
      the Google checkpoints used (`flax.linen.gelu`'s default); timm trains
      with the exact GELU.
  """

  patch: int = 16
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  num_classes: int = 1000
  representation_size: int = 0
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    taps: dict[str, jax.Array] = {}
    p = self.patch
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="embedding")(x)
    n = x.shape[0]
    x = x.reshape(n, -1, self.width)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
    x = taps["root_output_with_cls"] = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.width)), x], axis=1)
    encoder = _Encoder(self.depth, self.heads, self.mlp_dim, self.gelu_approximate, name="Transformer")
    x = taps["encoded_sequence"] = encoder(x, taps)
    x = taps["cls_embedded"] = x[:, 0]
    if self.representation_size:
      x = jnp.tanh(nn.Dense(self.representation_size, name="pre_logits")(x))
    taps["pre_logits"] = x
    if self.num_classes:
      logits = nn.Dense(self.num_classes, name="head")(x)
    else:
      logits = jnp.zeros((n, 0), x.dtype)
    return logits, taps


def from_params(params: Any, *, gelu_approximate: bool) -> ViT:
  """The ViT whose parameter shapes are those of `params` (a converted tree).

  Patch size and width come from `embedding/kernel [p, p, 3, D]`, depth from
  the highest `encoderblock_{i}`, heads from the query kernel `[D, heads, d]`,
  the MLP width from `Dense_0`, classes from `head` (absent: 0) and the
  representation size from `pre_logits` (absent: 0).

  Raises:
    CheckpointError: if a parameter needed to size the model is missing.
  """
  flat = checkpoints.flatten(params)

  def dim(key: str, axis: int) -> int:
    if key not in flat:
      raise checkpoints.CheckpointError(f"ViT checkpoint has no {key!r}, needed to size the model")
    return int(flat[key].shape[axis])

  blocks = {int(m.group(1)) for k in flat if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}
  depth = max(blocks) + 1 if blocks else 0
  block = "Transformer/encoderblock_0"
  return ViT(
    patch=dim("embedding/kernel", 0),
    width=dim("embedding/kernel", -1),
    depth=depth,
    heads=dim(f"{block}/MultiHeadDotProductAttention_1/query/kernel", 1),
    mlp_dim=dim(f"{block}/MlpBlock_3/Dense_0/kernel", -1),
    num_classes=dim("head/kernel", -1) if "head/kernel" in flat else 0,
    representation_size=dim("pre_logits/kernel", -1) if "pre_logits/kernel" in flat else 0,
    gelu_approximate=gelu_approximate,
  )


def load(checkpoint: str | None, *, input_size: int | None = None) -> common.LoadedModel:
  """Builds a ViT (B/16 or any size with a class token) from a checkpoint file.

  Args:
    checkpoint: a Google ViT `.npz` (vision_transformer or big_vision layout)
      or a timm `VisionTransformer` state dict (`.safetensors`, `.pth`, `.bin`).
    input_size: square input resolution, a multiple of the patch size; default
      the checkpoint's own (patch x position-embedding grid). Another size
      resamples the position embeddings.

  Raises:
    CheckpointError: no checkpoint given, unreadable file, or a file that
      does not fit the model (every mismatched key named).
  """
  checkpoint = checkpoints.require(checkpoint, DOWNLOAD_HELP)
  tensors = dict(checkpoints.read_tensors(checkpoint))
  check_family(tensors, source=checkpoint)
  google = checkpoint.lower().endswith(".npz")
  with checkpoints.converting(checkpoint, "ViT"):
    if google:
      converted = google_vit.convert(tensors, source=checkpoint)
    else:
      # Both or neither: a lone half stays in the tensors, and the strict merge names it.
      has_representation = all(k in tensors for k in TIMM_REPRESENTATION)
      weight, bias = (
        (np.asarray(tensors.pop(k)) for k in TIMM_REPRESENTATION) if has_representation else (0, 0)
      )
      converted = torch_layouts.vit_from_timm(tensors, source=checkpoint)
      if has_representation:
        converted["pre_logits"] = {"kernel": weight.T, "bias": bias}
    module = from_params(converted, gelu_approximate=google)
    flat = checkpoints.flatten(converted)
    if google_vit.POSEMB not in flat:
      raise checkpoints.CheckpointError(f"checkpoint {checkpoint!r} has no position embeddings")
    grid = google_vit.grid_size(flat[google_vit.POSEMB])
    logging.info(
      "%s looks like %s", checkpoint, identify(flat, google=google, input_size=grid * module.patch)
    )
    _check_name_matches(checkpoint, flat, grid, module.patch)
    size = input_size or grid * module.patch
    if size % module.patch:
      raise checkpoints.CheckpointError(
        f"input_size {size} is not a multiple of the patch size {module.patch}"
      )
    flat[google_vit.POSEMB] = google_vit.resample_position_embeddings(
      flat[google_vit.POSEMB], size // module.patch
    )
  expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
  params = checkpoints.merge_strict(checkpoints.unflatten(flat), expected["params"], source=checkpoint)
  logging.info("%s: %s at %d px", checkpoint, module, size)
  return common.LoadedModel(
    module=module,
    params=params,
    input_size=size,
    # Google npz and timm's vit_base_patch16_224.* weights both take [-1, 1] inputs.
    normalization=common.MINUS_ONE_ONE,
    tap_names=tap_names(module.depth),
    checkpoint_id=checkpoints.file_id(checkpoint),
  )
