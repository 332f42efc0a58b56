"""What every backbone module provides to `h2t.backbones`."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# Inputs scaled to [-1, 1]: the Google ViT / BiT checkpoints.
MINUS_ONE_ONE_MEAN = (127.5, 127.5, 127.5)
MINUS_ONE_ONE_STD = (127.5, 127.5, 127.5)


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics: `(x - mean) / sqrt(var + eps) * weight + bias`."""

  eps: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    weight = self.param("weight", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    scale = weight * jax.lax.rsqrt(var + self.eps)
    return x * scale + (bias - mean * scale)


@dataclasses.dataclass(frozen=True)
class Normalization:
  """Per-channel `(pixel - mean) / std`, with pixels in [0, 255]."""

  mean: tuple[float, float, float]
  std: tuple[float, float, float]


IMAGENET = Normalization(IMAGENET_MEAN, IMAGENET_STD)
MINUS_ONE_ONE = Normalization(MINUS_ONE_ONE_MEAN, MINUS_ONE_ONE_STD)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A model module with its parameters, as a checkpoint loader returns it.

  Attributes:
    module: Flax module; `module.apply({'params': params}, x)` with
      `x: [n, input_size, input_size, 3]` float32 returns `(logits, taps)`,
      `taps` a flat dict `{tap_name: activation}`.
    params: the parameter tree (numpy or jax arrays).
    input_size: square input resolution in pixels.
    normalization: how raw [0, 255] pixels are mapped to the model's inputs.
    tap_names: every tap, in network order.
    checkpoint_id: identifies the weights (file name + content hash), for
      caches and saved heads.
  """

  module: nn.Module
  params: Any
  input_size: int
  normalization: Normalization
  tap_names: tuple[str, ...]
  checkpoint_id: str


def classifier(x, taps: dict, num_classes: int, name: str):
  """The end of a convolutional backbone: global average pool (`pre_logits`), then a Dense (`logits`).

  Call inside a `@nn.compact` method; `name` names the Dense layer's parameters.
  Returns `(logits, taps)`.
  """
  taps["pre_logits"] = x = jnp.mean(x, axis=(1, 2))
  taps["logits"] = logits = nn.Dense(num_classes, name=name)(x)
  return logits, taps
