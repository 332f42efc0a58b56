"""Pooling a tap to a target size, as the reference does.

h2t.features runs it inside the jitted forward pass, so only pooled vectors
reach the host. The semantics are the reference's (`flatten_and_concat` in
google-research/head2toe), including its edge cases:

* 4-D taps `[n, h, w, c]`: if `c >= target_size`, global average pooling.
  Otherwise `per_side = int(sqrt(target_size // c))`, `pool = w // per_side`,
  average pooling with window = stride = pool (VALID), flattened in (h, w, c)
  order. If `pool` comes out 0 (the target asks for more cells than the map
  has) the reference falls back to global pooling, and so do we.
* 3-D taps `[n, t, c]` (token sequences): `cls_token_pool` 'only_cls' takes
  token 0; 'nopool_cls' keeps token 0 and pools the rest; 'normal' pools all.
  If `c >= target_size`, mean over tokens, else
  `pool = int(t / (target_size / c))`, 1-D average pooling with window =
  stride = pool (VALID), flattened in (t, c) order; pool 0 -> mean.
* 2-D taps `[n, d]`: as they are.
* `target_size = 0`: the fixed `pool_size` is used instead (0: global pooling).

A tap name may carry its own target size, `'<tap>@<size>'` (the reference's
`additional_features_multi_target_sizes`: every tap pooled at several sizes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

CLS_TOKEN_POOL_MODES = ("normal", "only_cls", "nopool_cls")
SIZE_SEP = "@"


def split_tap(name: str) -> tuple[str, int | None]:
  """`'block3_output@4096'` -> `('block3_output', 4096)`; a plain name -> `(name, None)`."""
  tap, sep, size = name.rpartition(SIZE_SEP)
  if not sep:
    return name, None
  if not size.isdigit() or not tap:
    raise ValueError(f"tap {name!r}: expected '<tap>@<target size>' with an integer size")
  return tap, int(size)


def sized_taps(taps: Sequence[str], target_sizes: Sequence[int]) -> tuple[str, ...]:
  """Every tap at every target size, size by size as the reference: `'<tap>@<size>'`."""
  return tuple(f"{t}{SIZE_SEP}{int(s)}" for s in target_sizes for t in taps)


def _avg_pool_2d(x: jax.Array, pool: int) -> jax.Array:
  """VALID average pooling with window = stride = pool.

  `lax.reduce_window` is ~15x faster on the CPU than the equivalent
  crop-reshape-mean (measured: 11 ms vs 160 ms on [32, 112, 112, 96]).
  """
  summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, pool, pool, 1), (1, pool, pool, 1), "VALID")
  return summed / (pool * pool)


def _avg_pool_1d(x: jax.Array, pool: int) -> jax.Array:
  summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, pool, 1), (1, pool, 1), "VALID")
  return summed / pool


def pool_size_for(shape: Sequence[int], target_size: int, pool_size: int = 0) -> int:
  """The reference's pool size for a tap of `shape` (0 means global pooling)."""
  if target_size <= 0:
    return pool_size
  if len(shape) == 4:
    _, _, w, c = shape
    if c >= target_size:
      return 0
    return w // int(math.sqrt(target_size // c))
  if len(shape) == 3:
    _, t, c = shape
    if c >= target_size:
      return 0
    return int(t / (target_size / c))
  return 0


def pool_tap(
  x: jax.Array,
  target_size: int,
  cls_token_pool: str = "normal",
  *,
  pool_size: int = 0,
) -> jax.Array:
  """Pools one tap to roughly `target_size` features.

  Args:
    x: `[n, h, w, c]`, `[n, t, c]` or `[n, d]` activations.
    target_size: features wanted per tap (the reference's
      `additional_features_target_size`); 0 uses `pool_size`.
    cls_token_pool: 'normal', 'only_cls' or 'nopool_cls' (3-D taps only).
    pool_size: fixed pool size used when `target_size` is 0; 0 means global.

  Returns:
    `[n, d]` pooled and flattened features.
  """
  if cls_token_pool not in CLS_TOKEN_POOL_MODES:
    raise ValueError(f"cls_token_pool={cls_token_pool!r}; expected one of {', '.join(CLS_TOKEN_POOL_MODES)}")
  if x.ndim == 2:
    return x
  if x.ndim == 4:
    pool = pool_size_for(x.shape, target_size, pool_size)
    if pool <= 0:
      return x.mean(axis=(1, 2))
    return _avg_pool_2d(x, pool).reshape(x.shape[0], -1)
  if x.ndim == 3:
    if cls_token_pool == "only_cls":
      return x[:, 0, :]
    cls = None
    if cls_token_pool == "nopool_cls":
      cls, x = x[:, 0, :], x[:, 1:, :]
    pool = pool_size_for(x.shape, target_size, pool_size)
    out = x.mean(axis=1) if pool <= 0 else _avg_pool_1d(x, pool).reshape(x.shape[0], -1)
    return out if cls is None else jnp.concatenate([cls, out], axis=1)
  raise ValueError(f"tap of shape {x.shape} is neither 2-D, 3-D nor 4-D")


def check_taps(backbone, taps: Sequence[str]) -> tuple[str, ...]:
  """Validates tap names against the backbone ('input' is the image itself; '<tap>@<size>' allowed)."""
  valid = set(backbone.tap_names) | {"input"}
  unknown = [t for t in taps if split_tap(t)[0] not in valid]
  if unknown:
    raise ValueError(
      f"backbone {backbone.name!r} has no tap {', '.join(map(repr, unknown))}; "
      f"its taps are: input, {', '.join(backbone.tap_names)}"
    )
  return tuple(taps)
