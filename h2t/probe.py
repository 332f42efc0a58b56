"""Linear probes on fixed features: the head, its penalties, and the trainer.

The whole training run is one `jax.lax.scan` under `jax.jit`: a step gathers
its minibatch from the device-resident features, computes the softmax
cross-entropy plus the penalty, and applies an optax update. Hyperparameters
that do not change shapes (`HParams`) are traced values, so one compiled
program serves every learning rate and penalty coefficient, and `jax.vmap`
can batch them.

Differences from the reference trainer (Keras), all deliberate:
* minibatches are drawn from a fresh permutation of the training set every
  epoch and are always full (the reference's cached path batched the set once
  in a fixed order, with a short last batch, and repeated it);
* the group norm has a zero gradient at an all-zero group instead of NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

OPTIMIZERS = ("adam", "sgd")
Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """Settings that shape the compiled program (static under `jit`).

  Attributes:
    num_classes: output width.
    training_steps: optimisation steps.
    batch_size: examples per step.
    optimizer: 'adam' or 'sgd' (momentum 0.9), as the reference.
    use_cosine_decay: cosine decay of the learning rate to 0 over the steps.
    grad_clip_value: clip each gradient entry to [-v, v] when v > 0.
    group_r: inner norm order of the group penalty (float or math.inf).
    group_p: outer norm order of the group penalty.
    zero_init: start the kernel at zeros instead of Glorot-uniform.
  """

  num_classes: int
  training_steps: int = 500
  batch_size: int = 128
  optimizer: str = "adam"
  use_cosine_decay: bool = True
  grad_clip_value: float = -1.0
  group_r: float = 2.0
  group_p: float = 1.0
  zero_init: bool = False

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer={self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    for name in ("group_r", "group_p"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name}={getattr(self, name)!r}; expected a positive number or 'inf'")
    if self.training_steps < 1 or self.batch_size < 1:
      raise ValueError("training_steps and batch_size must be positive")


class HParams(NamedTuple):
  """Traced hyperparameters (scalars, or batched along a leading axis under vmap)."""

  learning_rate: jax.Array | float
  l1: jax.Array | float = 0.0
  l2: jax.Array | float = 0.0
  group_coef: jax.Array | float = 0.0


def norm_order(value: float | str) -> float:
  """The reference's norm orders: a positive number or 'inf'."""
  if isinstance(value, str):
    if value == "inf":
      return math.inf
    raise ValueError(f"norm order {value!r}; expected a positive number or 'inf'")
  return float(value)


def init_head(key: jax.Array, dim: int, spec: TrainSpec) -> Params:
  """A linear head: kernel `w [dim, classes]` (Glorot-uniform, as Keras), bias `b [classes]`."""
  if spec.zero_init:
    w = jnp.zeros((dim, spec.num_classes), jnp.float32)
  else:
    w = jax.nn.initializers.glorot_uniform()(key, (dim, spec.num_classes), jnp.float32)
  return {"w": w, "b": jnp.zeros((spec.num_classes,), jnp.float32)}


def logits_fn(params: Params, x: jax.Array) -> jax.Array:
  """`x [n, dim]` -> logits `[n, classes]`."""
  return x @ params["w"] + params["b"]


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


def penalty(params: Params, hp: HParams, spec: TrainSpec, groups=None, num_groups: int = 0) -> jax.Array:
  """All kernel penalties: Keras-style L1 + L2 and the coefficient-weighted group norm."""
  w = params["w"]
  out = hp.l1 * jnp.abs(w).sum() + hp.l2 * (w**2).sum()
  return out + hp.group_coef * group_lasso(w, spec.group_r, spec.group_p, groups, num_groups)


def batch_indices(key: jax.Array, n: int, steps: int, batch_size: int) -> jax.Array:
  """`[steps, batch_size]` example indices: epochs of fresh permutations, concatenated."""
  epochs = -(-steps * batch_size // n)
  perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, epochs))
  return perms.reshape(-1)[: steps * batch_size].reshape(steps, batch_size)


def learning_rate_at(step: jax.Array, hp: HParams, spec: TrainSpec) -> jax.Array:
  """The learning rate of `step` (0-based): constant or cosine-decayed to 0."""
  if not spec.use_cosine_decay:
    return jnp.asarray(hp.learning_rate, jnp.float32)
  frac = jnp.minimum(step, spec.training_steps) / spec.training_steps
  return hp.learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


def _direction(spec: TrainSpec) -> optax.GradientTransformation:
  """The optimiser's update direction, before the learning rate is applied."""
  parts = []
  if spec.grad_clip_value > 0:
    parts.append(optax.clip(spec.grad_clip_value))
  if spec.optimizer == "adam":
    parts.append(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-7))  # Keras' epsilon
  else:
    parts.append(optax.trace(decay=0.9))
  return optax.chain(*parts)


@functools.partial(jax.jit, static_argnames=("spec", "num_groups"))
def train(
  x: jax.Array,
  y: jax.Array,
  hp: HParams,
  key: jax.Array,
  *,
  spec: TrainSpec,
  groups: jax.Array | None = None,
  num_groups: int = 0,
) -> tuple[Params, jax.Array]:
  """Trains a linear head on fixed features.

  Args:
    x: `[n, dim]` features.
    y: `[n]` int labels in [0, spec.num_classes).
    hp: learning rate and penalty coefficients.
    key: PRNG key (initialisation and minibatch order).
    spec: static settings.
    groups: `[dim]` group id per feature for a grouped penalty, or None.
    num_groups: number of groups.

  Returns:
    `(params, losses [training_steps])`: the trained head and each step's
    minibatch loss (cross-entropy + penalty).
  """
  k_init, k_data = jax.random.split(key)
  params = init_head(k_init, x.shape[1], spec)
  idx = batch_indices(k_data, x.shape[0], spec.training_steps, spec.batch_size)
  tx = _direction(spec)

  def loss_fn(p, xb, yb):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, xb), yb).mean()
    return ce + penalty(p, hp, spec, groups, num_groups)

  def step(carry, inputs):
    p, opt_state = carry
    i, b = inputs
    loss, grads = jax.value_and_grad(loss_fn)(p, x[b], y[b])
    updates, opt_state = tx.update(grads, opt_state, p)
    lr = learning_rate_at(i, hp, spec)
    p = jax.tree_util.tree_map(lambda v, u: v - lr * u, p, updates)
    return (p, opt_state), loss

  (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), (jnp.arange(spec.training_steps), idx))
  return params, losses


@jax.jit
def predict(params: Params, x: jax.Array) -> jax.Array:
  """Logits `[n, classes]` of a trained head."""
  return logits_fn(params, x)


def accuracy(params: Params, x: np.ndarray, y: np.ndarray) -> float:
  """Fraction of `x [n, dim]` classified as `y [n]`."""
  return float((np.asarray(predict(params, x)).argmax(-1) == np.asarray(y)).mean())
