"""ResNet-50 v1.5 in the torchvision / timm layout, inference only.

v1.5 puts the stride of a downsampling unit on its 3x3 convolution (v1 put it
on the first 1x1). Paddings are torchvision's explicit ones (3 for the 7x7
stem, 1 for the 3x3 convolutions and the stem max-pool), not 'SAME': with
even input sizes 'SAME' pads only on the bottom/right and shifts every
feature map by a pixel against the PyTorch weights.

Submodules are named after the PyTorch state-dict keys (`layer2.0.conv1` is
`layer2/0/conv1`, `layer2.0.downsample.0` is `layer2/0/downsample/0`), so
converting a checkpoint is a key mapping (`h2t.checkpoints.torch_layouts`).

Taps, with the reference's names, in network order (S = input size):
  `after_root`: after the stem conv + BN + ReLU + max-pool, [n, S/4, S/4, 64];
  `block{i}_unit{k}_layer{l}` (i = 1..4, k = 1..units[i], l = 0, 1, 2): the
    activation right before each convolution of the bottleneck's main path --
    l = 0 the unit's input (the previous unit's output after its final ReLU;
    for block1_unit1 that is `after_root`), l = 1 after conv1 + BN + ReLU,
    l = 2 after conv2 + BN + ReLU;
  `pre_logits_pre_pooling`: the last unit's output, [n, S/32, S/32, 2048];
  `pre_logits`: its global average, [n, 2048];
  `logits`: [n, classes].
ResNet-50 (units 3, 4, 6, 3) has 52 taps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from h2t import checkpoints
from h2t.checkpoints import torch_layouts
from h2t.models import common

INPUT_SIZE = 224
BN_EPS = 1e-5
RESNET50_STAGE_SIZES = (3, 4, 6, 3)
# Bottleneck output channels are 4x its inner width.
EXPANSION = 4

DOWNLOAD_HELP = (
  "resnet50 has no packaged checkpoint; download an ImageNet-1k ResNet-50 state dict and pass "
  "--config.backbone.checkpoint=/path/to/file. Files that work: torchvision's "
  "resnet50-0676ba61.pth (IMAGENET1K_V1) or resnet50-11ad3fa6.pth (IMAGENET1K_V2) from "
  "download.pytorch.org/models/, or timm's model.safetensors / pytorch_model.bin from the "
  "Hugging Face Hub repositories timm/resnet50.a1_in1k, timm/resnet50.tv_in1k, ... "
  "(any file with torchvision's key names: conv1, bn1, layer1.0.conv1, ..., fc)."
)


def tap_names(stage_sizes: Sequence[int] = RESNET50_STAGE_SIZES) -> tuple[str, ...]:
  """Every tap of a ResNet with `stage_sizes` units per stage, in network order."""
  names = ["after_root"]
  for i, units in enumerate(stage_sizes, start=1):
    names += [f"block{i}_unit{k}_layer{j}" for k in range(1, units + 1) for j in range(3)]
  return tuple(names + ["pre_logits_pre_pooling", "pre_logits", "logits"])


def _conv(features: int, kernel: int, stride: int = 1, *, name: str) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    name=name,
  )


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 bottleneck with a projection shortcut if needed.

  Returns `(output [n, h', w', 4 * width], (layer0, layer1, layer2))`, the
  three pre-convolution activations being the reference's taps.
  """

  width: int
  stride: int
  project: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    layer0 = x
    y = nn.relu(common.FrozenBatchNorm(BN_EPS, name="bn1")(_conv(self.width, 1, name="conv1")(x)))
    layer1 = y
    y = nn.relu(
      common.FrozenBatchNorm(BN_EPS, name="bn2")(_conv(self.width, 3, self.stride, name="conv2")(y))
    )
    layer2 = y
    y = common.FrozenBatchNorm(BN_EPS, name="bn3")(_conv(self.width * EXPANSION, 1, name="conv3")(y))
    shortcut = x
    if self.project:
      shortcut = _Downsample(self.width * EXPANSION, self.stride, name="downsample")(x)
    return nn.relu(y + shortcut), (layer0, layer1, layer2)


class _Downsample(nn.Module):
  """The projection shortcut, named like torchvision's `downsample.0/.1`."""

  features: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return common.FrozenBatchNorm(BN_EPS, name="1")(_conv(self.features, 1, self.stride, name="0")(x))


class _Stage(nn.Module):
  """`units` bottlenecks named '0', '1', ...; the first one strides and projects."""

  units: int
  width: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array, jax.Array]]]:
    taps = []
    for k in range(self.units):
      first = k == 0
      x, unit_taps = Bottleneck(self.width, self.stride if first else 1, project=first, name=str(k))(x)
      taps.append(unit_taps)
    return x, taps


class ResNet(nn.Module):
  """ResNet v1.5: `x [n, S, S, 3]` -> `(logits [n, classes], taps)`.

  Attributes:
    stage_sizes: bottleneck units per stage; (3, 4, 6, 3) is ResNet-50.
    width: stem channels and the first stage's inner width (64 for ResNet-50);
      stage i has inner width `width * 2**i` and `4x` that many outputs.
    num_classes: size of the classifier `fc`.
  """

  stage_sizes: Sequence[int] = RESNET50_STAGE_SIZES
  width: int = 64
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    taps: dict[str, jax.Array] = {}
    x = nn.relu(common.FrozenBatchNorm(BN_EPS, name="bn1")(_conv(self.width, 7, 2, name="conv1")(x)))
    # Padding with -inf (flax's max_pool) equals torch's implicit padding.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    taps["after_root"] = x
    for i, units in enumerate(self.stage_sizes):
      stride = 1 if i == 0 else 2
      x, stage_taps = _Stage(units, self.width * 2**i, stride, name=f"layer{i + 1}")(x)
      for k, unit_taps in enumerate(stage_taps, start=1):
        for j, t in enumerate(unit_taps):
          taps[f"block{i + 1}_unit{k}_layer{j}"] = t
    taps["pre_logits_pre_pooling"] = x
    return common.classifier(x, taps, self.num_classes, name="fc")


def from_params(params: Mapping[str, Any]) -> ResNet:
  """The ResNet whose parameter shapes are those of `params` (a converted tree).

  Stage sizes are the number of units found under `layer1..4`, the width is
  the stem's output channels, the classes the size of `fc`. Missing entries
  fall back to ResNet-50's values, so that `merge_strict` can then name them.
  """
  stage_sizes = []
  for i in range(1, 5):
    stage = params.get(f"layer{i}", {})
    units = 0
    while str(units) in stage:
      units += 1
    stage_sizes.append(units or RESNET50_STAGE_SIZES[i - 1])
  width = _shape(params, ("conv1", "kernel"), -1, 64)
  num_classes = _shape(params, ("fc", "kernel"), -1, 1000)
  return ResNet(stage_sizes=tuple(stage_sizes), width=width, num_classes=num_classes)


def _shape(tree: Mapping[str, Any], path: Sequence[str], axis: int, default: int) -> int:
  node: Any = tree
  for p in path:
    if not isinstance(node, Mapping) or p not in node:
      return default
    node = node[p]
  return int(node.shape[axis])


def load(checkpoint: str | None, *, input_size: int | None = None) -> common.LoadedModel:
  """Builds a ResNet-50 (or any ResNet v1.5 with bottlenecks) from a state dict.

  Args:
    checkpoint: a torchvision / timm ResNet-50 state dict (`.pth`, `.pt`,
      `.bin` or `.safetensors`).
    input_size: square input resolution; default 224.

  Raises:
    CheckpointError: no file given (the message says where to get one), a
      damaged file, or one whose parameters do not fit (each named).
  """
  checkpoint = checkpoints.require(checkpoint, DOWNLOAD_HELP)
  tensors = checkpoints.read_tensors(checkpoint)
  with checkpoints.converting(checkpoint, "ResNet"):
    converted = torch_layouts.resnet_from_torch(tensors, source=checkpoint)
    module = from_params(converted)
  size = input_size or INPUT_SIZE
  expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
  params = checkpoints.merge_strict(converted, expected["params"], source=checkpoint)
  logging.info(
    "%s: ResNet stages %s, width %d, %d classes",
    checkpoint,
    module.stage_sizes,
    module.width,
    module.num_classes,
  )
  taps = tap_names(module.stage_sizes)
  return common.LoadedModel(module, params, size, common.IMAGENET, taps, checkpoints.file_id(checkpoint))
