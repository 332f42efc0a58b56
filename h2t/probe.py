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
    zero_init: start the first kernel at zeros instead of Glorot-uniform.
    hidden_units: 0 for a linear head (the reference's 'nohidden'); else a
      hidden ReLU layer of this width comes first ('random_N', 'trainable_N').
    hidden_trainable: whether the hidden layer is trained ('trainable_N') or
      stays at its random initialisation ('random_N').
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
  hidden_units: int = 0
  hidden_trainable: bool = True

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer={self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    for name in ("group_r", "group_p"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name}={getattr(self, name)!r}; expected a positive number or 'inf'")
    if self.training_steps < 1 or self.batch_size < 1:
      raise ValueError("training_steps and batch_size must be positive")
    if self.hidden_units < 0:
      raise ValueError(f"hidden_units={self.hidden_units}; expected >= 0")

  @property
  def first_width(self) -> int:
    """Width of the layer that reads the features (its kernel rows score them)."""
    return self.hidden_units or self.num_classes


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


OUTPUT_HEAD_TYPES = ("nohidden", "random_N", "trainable_N")
# Key id of the output layer after a hidden layer in the grid programs; row
# keys of the first kernel use ids 0..rows-1.
OUTPUT_LAYER_KEY = 2**31 - 1


def parse_output_head_type(value: str, num_classes: int) -> tuple[int, bool]:
  """The reference's `output_head_type` -> `(hidden_units, hidden_trainable)`.

  'nohidden' is a linear head; 'random_N' / 'trainable_N' put a hidden ReLU
  layer of N units (N = 0: as many as classes) before it, frozen at its
  random initialisation or trained.
  """
  if value == "nohidden":
    return 0, True
  kind, _, n = value.partition("_")
  if kind in ("random", "trainable") and n.isdigit():
    return int(n) or num_classes, kind == "trainable"
  raise ValueError(
    f"output_head_type={value!r}; expected 'nohidden', 'random_N' or 'trainable_N' with N an integer "
    "(e.g. random_100, trainable_1000)"
  )


def first_kernel_name(params: Params) -> str:
  """The kernel whose rows belong to the input features: 'hidden_w' or 'w'."""
  return "hidden_w" if "hidden_w" in params else "w"


def _glorot(key: jax.Array, fan_in: int, fan_out: int) -> jax.Array:
  return jax.nn.initializers.glorot_uniform()(key, (fan_in, fan_out), jnp.float32)


def output_layer(key: jax.Array, spec: TrainSpec) -> Params:
  """The layers after the first: `{'w': [hidden, classes], 'b'}` when there is a hidden layer, else {}."""
  if not spec.hidden_units:
    return {}
  return {
    "w": _glorot(key, spec.hidden_units, spec.num_classes),
    "b": jnp.zeros((spec.num_classes,), jnp.float32),
  }


def assemble(first_w: jax.Array, first_b: jax.Array, rest: Params) -> Params:
  """Head params from the first layer and `output_layer`'s (empty for a linear head)."""
  if not rest:
    return {"w": first_w, "b": first_b}
  return {"hidden_w": first_w, "hidden_b": first_b, **rest}


def init_head(key: jax.Array, dim: int, spec: TrainSpec) -> Params:
  """A head (Glorot-uniform kernels, zero biases, as Keras' Dense).

  Linear: `{'w': [dim, classes], 'b': [classes]}`. With a hidden layer of N
  units, also `{'hidden_w': [dim, N], 'hidden_b': [N]}` and `w` is `[N, classes]`.
  """
  width = spec.first_width
  if spec.hidden_units:
    key, k_out = jax.random.split(key)
  w = jnp.zeros((dim, width), jnp.float32) if spec.zero_init else _glorot(key, dim, width)
  rest = output_layer(k_out, spec) if spec.hidden_units else {}
  return assemble(w, jnp.zeros((width,), jnp.float32), rest)


def logits_fn(params: Params, x: jax.Array) -> jax.Array:
  """`x [n, dim]` -> logits `[n, classes]` (through the ReLU hidden layer when there is one)."""
  if "hidden_w" in params:
    x = jax.nn.relu(x @ params["hidden_w"] + params["hidden_b"])
  return x @ params["w"] + params["b"]


def split_frozen(params: Params, spec: TrainSpec) -> tuple[Params, Params]:
  """`(trainable, frozen)`: a 'random_N' hidden layer is frozen (no gradient, no optimiser state)."""
  if spec.hidden_units and not spec.hidden_trainable:
    frozen = {k: params[k] for k in ("hidden_w", "hidden_b")}
    return {k: v for k, v in params.items() if k not in frozen}, frozen
  return dict(params), {}


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
    g, ng = (groups, num_groups) if name == first_kernel_name(params) else (None, 0)
    out = out + hp.l1 * jnp.abs(w).sum() + hp.l2 * (w**2).sum()
    out = out + hp.group_coef * group_lasso(w, spec.group_r, spec.group_p, g, ng)
  return out


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


def update_direction(optimizer: str, grad_clip_value: float) -> optax.GradientTransformation:
  """The optimiser's update direction, before the learning rate is applied.

  'adam' (Keras' epsilon 1e-7) or 'sgd' (momentum 0.9), with entries clipped to
  [-v, v] first when `grad_clip_value` v > 0, as the reference's options.
  """
  parts = []
  if grad_clip_value > 0:
    parts.append(optax.clip(grad_clip_value))
  if optimizer == "adam":
    parts.append(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-7))
  else:
    parts.append(optax.trace(decay=0.9))
  return optax.chain(*parts)


def _direction(spec: TrainSpec) -> optax.GradientTransformation:
  return update_direction(spec.optimizer, spec.grad_clip_value)


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
  params, frozen = split_frozen(init_head(k_init, x.shape[1], spec), spec)
  idx = batch_indices(k_data, x.shape[0], spec.training_steps, spec.batch_size)
  tx = _direction(spec)

  def loss_fn(p, xb, yb):
    full = {**p, **frozen}
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_fn(full, xb), yb).mean()
    return ce + penalty(full, hp, spec, groups, num_groups)

  def step(carry, inputs):
    p, opt_state = carry
    i, b = inputs
    loss, grads = jax.value_and_grad(loss_fn)(p, x[b], y[b])
    updates, opt_state = tx.update(grads, opt_state, p)
    lr = learning_rate_at(i, hp, spec)
    p = jax.tree_util.tree_map(lambda v, u: v - lr * u, p, updates)
    return (p, opt_state), loss

  (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), (jnp.arange(spec.training_steps), idx))
  return {**params, **frozen}, losses


@jax.jit
def predict(params: Params, x: jax.Array) -> jax.Array:
  """Logits `[n, classes]` of a trained head."""
  return logits_fn(params, x)


def accuracy(params: Params, x: np.ndarray, y: np.ndarray) -> float:
  """Fraction of `x [n, dim]` classified as `y [n]`."""
  return float((np.asarray(predict(params, x)).argmax(-1) == np.asarray(y)).mean())


# ---------------------------------------------------------------------------
# The grid: many heads in one program.
#
# A fold is a set of training indices into the cached features `x [n, D]`.
# Every head of a fold sees the same minibatches (same key), so a step gathers
# its minibatch once and all the fold's heads use it. Hyperparameters are
# traced `[H]` vectors, so one compiled program serves a whole grid. The
# initial kernel is drawn row by row (`row_glorot`), so a head's start does
# not depend on how many heads share the program.


def row_glorot(key: jax.Array, rows: int, num_classes: int, fan_in: jax.Array | int) -> jax.Array:
  """Glorot-uniform `[rows, num_classes]` (the layer's width), row `i` drawn from `fold_in(key, i)`.

  Drawing per row makes the first `k` rows independent of `rows`, so a
  padded head starts exactly as an unpadded one.
  """
  limit = jnp.sqrt(6.0 / (fan_in + num_classes))
  u = jax.vmap(
    lambda i: jax.random.uniform(jax.random.fold_in(key, i), (num_classes,), minval=-1.0, maxval=1.0)
  )(jnp.arange(rows))
  return u * limit


def _fold_batches(key: jax.Array, train_idx: jax.Array, spec: TrainSpec) -> jax.Array:
  """`[steps, batch]` indices into the features for one fold."""
  local = batch_indices(key, train_idx.shape[0], spec.training_steps, spec.batch_size)
  return train_idx[local]


def _train_heads(params, hp, batches, x_fn, y, spec, groups, num_groups):
  """Trains `H` heads (leading axis of params / hp) on shared minibatches."""
  tx = _direction(spec)
  params, frozen = split_frozen(params, spec)

  def loss_fn(p, fz, h, xb, yb):
    full = {**p, **fz}
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_fn(full, xb), yb).mean()
    return ce + penalty(full, h, spec, groups, num_groups)

  def step(carry, inputs):
    p, opt_state = carry
    i, b = inputs
    xb = x_fn(b)  # [H, batch, k] or [batch, D] shared by every head
    x_axis = 0 if xb.ndim == 3 else None
    loss, grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(0, 0, 0, x_axis, None))(
      p, frozen, hp, xb, y[b]
    )
    updates, opt_state = jax.vmap(tx.update)(grads, opt_state, p)
    lr = jax.vmap(lambda h: learning_rate_at(i, h, spec))(hp)
    p = jax.tree_util.tree_map(lambda v, u: v - lr.reshape((-1,) + (1,) * (v.ndim - 1)) * u, p, updates)
    return (p, opt_state), loss

  opt_state = jax.vmap(tx.init)(params)
  steps = jnp.arange(spec.training_steps)
  (params, _), losses = jax.lax.scan(step, (params, opt_state), (steps, batches))
  return {**params, **frozen}, losses.T


@functools.partial(jax.jit, static_argnames=("spec", "num_groups", "per_feature"))
def train_all_features(
  x: jax.Array,
  y: jax.Array,
  train_idx: jax.Array,
  hp: HParams,
  key: jax.Array,
  *,
  spec: TrainSpec,
  groups: jax.Array | None = None,
  num_groups: int = 0,
  per_feature: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Stage 1 for a grid: `H` heads on all features of one fold.

  Args:
    x: `[n, D]` features, already normalised per tap (or raw, with
      `per_feature`: then standardised with the fold's training statistics).
    y: `[n]` labels.
    train_idx: `[m]` the fold's training indices.
    hp: hyperparameters with leaves `[H]`.
    key: the fold's key (same for every head).

  Returns:
    `(w [H, D, width], losses [H, steps])`: the first kernel of each head
    (width = classes, or the hidden units), whose rows score the features.
  """
  num_heads = jnp.shape(hp.learning_rate)[0]
  k_init, k_data = jax.random.split(key)
  dim, width = x.shape[1], spec.first_width
  w0 = jnp.zeros((dim, width)) if spec.zero_init else row_glorot(k_init, dim, width, dim)
  one = assemble(w0, jnp.zeros((width,)), output_layer(jax.random.fold_in(k_init, OUTPUT_LAYER_KEY), spec))
  params = jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v, (num_heads,) + v.shape), one)
  batches = _fold_batches(k_data, train_idx, spec)
  if per_feature:
    xt = x[train_idx]
    mean, scale = xt.mean(axis=0), jax.lax.rsqrt(xt.var(axis=0) + 1e-5)

    def x_fn(b):
      return (x[b] - mean) * scale
  else:

    def x_fn(b):
      return x[b]

  params, losses = _train_heads(params, hp, batches, x_fn, y, spec, groups, num_groups)
  return params[first_kernel_name(params)], losses


def select_top(
  scores: jax.Array, num_kept: jax.Array, offset: jax.Array, max_kept: int
) -> tuple[jax.Array, jax.Array]:
  """Kept feature indices of one head, padded to `max_kept`.

  The `num_kept` best features after skipping the `offset` best, as the
  reference; ties go to the lower index. Returned in increasing index order
  (so tap by tap, network order), padding (index D, mask 0) last.

  Returns:
    `(idx [max_kept] int32, mask [max_kept] float32)`.
  """
  dim = scores.shape[0]
  order = jnp.argsort(-scores, stable=True)
  pos = jnp.arange(max_kept)
  valid = pos < num_kept
  idx = jnp.where(valid, order[jnp.minimum(pos + offset, dim - 1)], dim)
  idx = jnp.sort(idx)
  return idx.astype(jnp.int32), (idx < dim).astype(jnp.float32)


def transform_kept(
  xb: jax.Array, idx: jax.Array, mask: jax.Array, tap_of: jax.Array, num_taps: int, mode: str, stats=None
) -> jax.Array:
  """Kept features of `xb [b, D]` for one head, renormalised: `[b, K]`.

  'unit_vector' rescales each tap's kept features to unit L2 norm (zero stays
  zero), as the reference does after selection; 'per_feature' standardises
  with the training statistics `stats = (mean [D], var [D])`.
  """
  safe = jnp.minimum(idx, xb.shape[1] - 1)
  xk = xb[:, safe] * mask
  if mode == "unit_vector":
    taps = tap_of[safe]
    # Kept indices are sorted, so each tap's features are one contiguous run.
    sq = jax.ops.segment_sum((xk * xk).T, taps, num_taps, indices_are_sorted=True).T  # [b, T]
    norms = jnp.sqrt(sq)[:, taps]
    xk = jnp.where(norms > 0, xk / jnp.where(norms > 0, norms, 1.0), 0.0)
  elif mode == "per_feature":
    mean, var = stats
    xk = (xk - mean[safe]) / jnp.sqrt(var[safe] + 1e-5) * mask
  return xk


@functools.partial(jax.jit, static_argnames=("spec", "num_taps", "mode"))
def train_kept_features(
  x: jax.Array,
  y: jax.Array,
  train_idx: jax.Array,
  kept_idx: jax.Array,
  kept_mask: jax.Array,
  tap_of: jax.Array,
  hp: HParams,
  key: jax.Array,
  *,
  spec: TrainSpec,
  num_taps: int,
  mode: str,
) -> tuple[Params, jax.Array]:
  """Stage 2 for a grid: `H` fresh heads, each on its own kept features.

  Args:
    x: `[n, D]` raw (unnormalised) features.
    y: `[n]` labels.
    train_idx: `[m]` the fold's training indices.
    kept_idx, kept_mask: `[H, K]` from `select_top`.
    tap_of: `[D]` tap id of each feature.
    hp: hyperparameters with leaves `[H]`.
    key: the fold's key.

  Returns:
    `(params {'w': [H, K, classes], 'b': [H, classes]}, losses [H, steps])`;
    padded rows of `w` are zero. With a hidden layer the padded kernel is
    `hidden_w [H, K, hidden]` and `w` is `[H, hidden, classes]`.
  """
  k_init, k_data = jax.random.split(key)
  num_kept = kept_mask.sum(axis=1)
  num_heads, max_kept = kept_idx.shape
  width = spec.first_width
  if spec.zero_init:
    w = jnp.zeros((num_heads, max_kept, width))
  else:
    w = jax.vmap(lambda k: row_glorot(k_init, max_kept, width, k))(num_kept)
  rest = output_layer(jax.random.fold_in(k_init, OUTPUT_LAYER_KEY), spec)
  rest = jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v, (num_heads,) + v.shape), rest)
  params = assemble(w * kept_mask[:, :, None], jnp.zeros((num_heads, width)), rest)
  xt = x[train_idx]
  stats = (xt.mean(axis=0), xt.var(axis=0)) if mode == "per_feature" else None
  # Each head's kept, renormalised features of the fold's training set,
  # [H, m, K], built once: a step then reads contiguous rows instead of
  # gathering scattered columns (measured ~20x faster on the CPU).
  xh = jax.vmap(transform_kept, in_axes=(None, 0, 0, None, None, None, None))(
    xt, kept_idx, kept_mask, tap_of, num_taps, mode, stats
  )
  local = batch_indices(k_data, train_idx.shape[0], spec.training_steps, spec.batch_size)
  params, losses = _train_heads(params, hp, local, lambda b: xh[:, b, :], y[train_idx], spec, None, 0)
  return params, losses


@functools.partial(jax.jit, static_argnames=("spec", "num_taps", "mode"))
def train_kept_features_folds(
  x: jax.Array,
  y: jax.Array,
  train_idx: jax.Array,
  kept_idx: jax.Array,
  kept_mask: jax.Array,
  tap_of: jax.Array,
  hp: HParams,
  keys: jax.Array,
  *,
  spec: TrainSpec,
  num_taps: int,
  mode: str,
) -> tuple[Params, jax.Array]:
  """`train_kept_features` for every fold (leading axis F of the fold arguments).

  Folds run one after another inside the one program (`lax.map`), so the
  `[H, m, K]` kept-feature array exists for one fold at a time: vmapping the
  folds held `[F, H, m, K]` (3.3 GB for 24 points x 5 folds on digits) and was
  no faster on the CPU (experiments/results/bench_grid_cpu.txt).
  """

  def one(args):
    tr, ki, km, key = args
    return train_kept_features(x, y, tr, ki, km, tap_of, hp, key, spec=spec, num_taps=num_taps, mode=mode)

  return jax.lax.map(one, (train_idx, kept_idx, kept_mask, keys))


@functools.partial(jax.jit, static_argnames=("num_taps", "mode"))
def kept_accuracy(
  x: jax.Array,
  y: jax.Array,
  train_idx: jax.Array,
  eval_idx: jax.Array,
  kept_idx: jax.Array,
  kept_mask: jax.Array,
  tap_of: jax.Array,
  params: Params,
  *,
  num_taps: int,
  mode: str,
) -> jax.Array:
  """Correct predictions `[H]` (int32) of stage-2 heads on `eval_idx`.

  Counts, not fractions: float32 means of equal counts can differ in the last
  bit, which would break the grid's first-on-ties choice.
  """
  stats = None
  if mode == "per_feature":
    xt = x[train_idx]
    stats = (xt.mean(axis=0), xt.var(axis=0))
  xe = x[eval_idx]

  def one(idx, mask, p):
    logits = logits_fn(p, transform_kept(xe, idx, mask, tap_of, num_taps, mode, stats))
    return (logits.argmax(-1) == y[eval_idx]).sum()

  return jax.vmap(one)(kept_idx, kept_mask, params)
