"""Named backbones: name -> model, parameters, input size, value range, taps.

    backbone = h2t.backbones.create('efficientnet_lite0')
    x = backbone.preprocess(images_uint8)          # [n, S, S, 3] float32
    logits, taps = backbone.apply(backbone.params, x)

A backbone is frozen: `apply` is a pure function of `(params, x)`, so `jax.jit`
keeps only the taps a caller uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from h2t.models import common, efficientnet, resnet, vit

# name -> loader(checkpoint_path_or_None, input_size_or_None) -> LoadedModel.
_LOADERS: dict[str, Callable[..., common.LoadedModel]] = {
  "efficientnet_lite0": efficientnet.load,
  "resnet50": resnet.load,
  "vit_b16": vit.load,
}

NAMES = tuple(_LOADERS)


# eq=False: hashed by identity, so a Backbone can be a static argument of jax.jit.
@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
  """A frozen pretrained network with named intermediate outputs (taps).

  Attributes:
    name: registry name, e.g. 'efficientnet_lite0'.
    module: the Flax module.
    params: its parameters.
    input_size: square input resolution the network runs at.
    normalization: mapping from [0, 255] pixels to network inputs.
    tap_names: every tap the network produces, in network order.
    checkpoint_id: identifies the weights ("file:sha256-prefix").
  """

  name: str
  module: Any
  params: Any
  input_size: int
  normalization: common.Normalization
  tap_names: tuple[str, ...]
  checkpoint_id: str

  def preprocess(self, images: jax.Array) -> jax.Array:
    """Resizes and normalises images for the network.

    Args:
      images: `[n, h, w, 3]` (or `[n, h, w]` / `[n, h, w, 1]` grey) pixels in
        [0, 255], any numeric dtype.

    Returns:
      `[n, input_size, input_size, 3]` float32: bilinearly resized (half-pixel
      centres, no antialiasing, as `tf.image.resize`) and normalised.
    """
    x = jnp.asarray(images, jnp.float32)
    if x.ndim == 3:
      x = x[..., None]
    if x.shape[-1] == 1:
      x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
    n, h, w, c = x.shape
    s = self.input_size
    if (h, w) != (s, s):
      x = jax.image.resize(x, (n, s, s, c), method="linear", antialias=False)
    mean = jnp.asarray(self.normalization.mean, jnp.float32)
    std = jnp.asarray(self.normalization.std, jnp.float32)
    return (x - mean) / std

  def apply(self, params: Any, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs the network: `x [n, S, S, 3]` -> `(logits [n, classes], taps)`."""
    return self.module.apply({"params": params}, x)


def create(name: str, checkpoint: str | None = None, *, input_size: int | None = None) -> Backbone:
  """Builds a named backbone with its pretrained weights.

  Args:
    name: one of `NAMES`.
    checkpoint: path of a checkpoint file; None takes the backbone's default
      (the packaged weights for 'efficientnet_lite0'; the others have none and
      say where to download one).
    input_size: run at this resolution instead of the checkpoint's own.

  Returns:
    The backbone, with parameters on the default device.
  """
  if name not in _LOADERS:
    raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(NAMES)}")
  loaded = _LOADERS[name](checkpoint, input_size=input_size)
  params = jax.tree_util.tree_map(jnp.asarray, loaded.params)
  return Backbone(
    name=name,
    module=loaded.module,
    params=params,
    input_size=loaded.input_size,
    normalization=loaded.normalization,
    tap_names=loaded.tap_names,
    checkpoint_id=loaded.checkpoint_id,
  )
