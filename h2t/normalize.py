"""The per-tap feature normalisations, written once and used by every caller.

'unit_vector' scales each tap's vector of an example to unit L2 norm (an
all-zero vector stays zero); 'per_feature' standardises each feature with
training statistics; '' leaves features as they are. The probes, the heads,
the streamed test and fine-tuning all call these functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NORMALIZATIONS = ("unit_vector", "per_feature", "")
PER_FEATURE_EPS = 1e-5


def unit_vector(x: jax.Array, tap_of: jax.Array | None = None, num_taps: int = 1) -> jax.Array:
  """Each tap's part of each row of `x [n, d]` scaled to unit L2 norm.

  Args:
    x: `[n, d]` features.
    tap_of: `[d]` sorted int tap id of each column, or None: one tap.
    num_taps: number of taps when `tap_of` is given.

  Returns:
    `[n, d]`; parts whose norm is zero stay zero, with a finite gradient.
  """
  if tap_of is None:
    sq = (x * x).sum(axis=1, keepdims=True)
  else:
    sq = jax.ops.segment_sum((x * x).T, tap_of, num_taps, indices_are_sorted=True).T  # [n, taps]
  # The root is taken per tap, then spread over the tap's columns (this order
  # keeps the arithmetic of earlier versions bit for bit).
  pos = sq > 0
  norms = jnp.sqrt(jnp.where(pos, sq, 1.0))
  if tap_of is not None:
    pos, norms = pos[:, tap_of], norms[:, tap_of]
  return jnp.where(pos, x / norms, 0.0)


unit_vector_jit = jax.jit(unit_vector, static_argnames=("num_taps",))


def standardize(x: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
  """'per_feature': `(x - mean) / sqrt(var + 1e-5)`, the statistics of the training set."""
  return (x - mean) / jnp.sqrt(var + PER_FEATURE_EPS)


def check_mode(mode: str) -> None:
  if mode not in NORMALIZATIONS:
    raise ValueError(f"feature_normalization={mode!r}; expected one of {NORMALIZATIONS}")


def features_matrix(features, taps, mode: str, stats=None):
  """Concatenates `{tap: [n, d_tap]}` in `taps` order into one normalised `[n, D]` float32 matrix.

  Args:
    features: `{tap: [n, d_tap]}`.
    taps: the taps to use, in order.
    mode: one of `NORMALIZATIONS`.
    stats: `{'mean': [D], 'var': [D]}` training statistics for 'per_feature'
      (computed from `features` when None). The reference recomputed them on
      each evaluated set; reusing the training statistics makes a head usable
      on a single image.

  Returns:
    `(x [n, D] np.float32, stats)`; stats is None except for 'per_feature'.
  """
  import numpy as np

  check_mode(mode)
  parts = [np.asarray(features[t], np.float32) for t in taps]
  x = np.concatenate(parts, axis=1)
  if mode == "unit_vector":
    tap_of = np.repeat(np.arange(len(parts)), [p.shape[1] for p in parts]).astype(np.int32)
    return np.asarray(unit_vector_jit(x, tap_of, len(parts))), None
  if mode != "per_feature":
    return x, None
  if stats is None:
    stats = {"mean": x.mean(axis=0), "var": x.var(axis=0)}
  return np.asarray(standardize(x, stats["mean"], stats["var"]), np.float32), dict(stats)
