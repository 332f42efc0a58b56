"""The kernel penalties of the probes: Keras-style L1 and L2, and the group lasso (ℓ2,1 and kin).

The group norm has a zero gradient at an all-zero group (the reference's
Keras code gives NaN there).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _safe_root(s: jax.Array, order: float) -> jax.Array:
  """`s ** (1 / order)` with a zero (not NaN) gradient where `s == 0`."""
  pos = s > 0
  return jnp.where(pos, jnp.where(pos, s, 1.0) ** (1.0 / order), 0.0)


def group_norms(w: jax.Array, r: float, groups: jax.Array | None = None, num_groups: int = 0) -> jax.Array:
  """The r-norm of each group of kernel rows.

  Args:
    w: `[dim, classes]` kernel; one row per input feature.
    r: inner norm order.
    groups: `[dim]` int group id of each row, or None: each row is a group.
    num_groups: number of groups when `groups` is given.

  Returns:
    `[dim]` row norms, or `[num_groups]` group norms.
  """
  a = jnp.abs(w)
  if math.isinf(r):
    rows = a.max(axis=1)
    return rows if groups is None else jax.ops.segment_max(rows, groups, num_groups)
  rows = (a**r).sum(axis=1)
  if groups is not None:
    rows = jax.ops.segment_sum(rows, groups, num_groups)
  return _safe_root(rows, r)


def group_lasso(w: jax.Array, r: float = 2.0, p: float = 1.0, groups=None, num_groups: int = 0) -> jax.Array:
  """Group penalty `|| (||w_g||_r)_g ||_p` (without the coefficient); ℓ2,1 by default."""
  norms = group_norms(w, r, groups, num_groups)
  if math.isinf(p):
    return norms.max()
  return _safe_root((norms**p).sum(), p)


def penalty(params, hp, spec, groups=None, num_groups: int = 0) -> jax.Array:
  """All kernel penalties: Keras-style L1 + L2 and the coefficient-weighted group norm.

  As the reference's Keras head, every trained kernel is penalised (with a
  hidden layer, both). Feature groups (`groups`) apply to the first kernel;
  the output kernel after a hidden layer is grouped by rows.
  """
  out = 0.0
  for name in ("hidden_w", "w"):
    if name not in params:
      continue
    w = params[name]
    first = "hidden_w" if "hidden_w" in params else "w"  # the kernel that reads the features
    g, ng = (groups, num_groups) if name == first else (None, 0)
    use_l1, use_l2, use_group = spec.penalized
    if use_l1:
      out = out + hp.l1 * jnp.abs(w).sum()
    if use_l2:
      out = out + hp.l2 * (w**2).sum()
    if use_group:
      out = out + hp.group_coef * group_lasso(w, spec.group_r, spec.group_p, g, ng)
  return out
