"""Linear probes on fixed features: the head, its loss and penalties, and the one trainer.

Every head h2t trains on fixed features goes through `train_heads`: a whole
training run is one `jax.lax.scan` under `jax.jit`, H heads at once: a step gathers
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
import optax

from h2t.optim import batch_indices, cosine_schedule, update_direction
from h2t.penalties import group_lasso, group_norms, penalty  # noqa: F401 -- part of the probe's API

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
  # Which penalties the program computes: (l1, l2, group). A term whose
  # coefficient is 0 for every head of a program contributes exactly 0 to
  # the loss and the gradient; leaving it out saves passes over the kernels.
  penalized: tuple[bool, bool, bool] = (True, True, True)
  # `num_classes` is a bucket (`class_bucket`) wider than the task's classes:
  # the padding columns are the ones whose bias is -inf (`padded_bias`). Their
  # logits are -inf (no probability, no gradient) and their kernel columns are
  # masked to 0 in the loss, so they stay 0 and every real column trains
  # exactly as without padding.
  padded_classes: bool = False
  feature_dtype: str = "float32"  # storage of the features a step gathers (learning.feature_dtype)

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


def spec_from_learning(learning, num_classes: int, program=(), pad_classes: bool = False) -> TrainSpec:
  """The static trainer settings of a `config.learning`.

  `program`: the learning configs of every head sharing the compiled program
  (default: this one alone); a penalty whose coefficient is 0 in all of them
  is left out of the program (`TrainSpec.penalized`). `pad_classes`: a linear
  head's width is `class_bucket(num_classes)` (`TrainSpec.padded_classes`);
  heads with a hidden layer keep their width.
  """
  hidden_units, hidden_trainable = parse_output_head_type(
    learning.get("output_head_type", "nohidden"), num_classes
  )
  padded = pad_classes and not hidden_units
  if padded:
    num_classes = class_bucket(num_classes)
  program = list(program) or [learning]
  keys = ("l1_regularizer", "l2_regularizer", "group_lrp_regularizer_coef")
  return TrainSpec(
    num_classes=num_classes,
    training_steps=int(learning.training_steps),
    batch_size=int(learning.train_batch_size),
    optimizer=learning.optimizer,
    use_cosine_decay=bool(learning.use_cosine_decay),
    grad_clip_value=float(learning.grad_clip_value),
    group_r=norm_order(learning.group_lrp_regularizer_r),
    group_p=norm_order(learning.group_lrp_regularizer_p),
    zero_init=bool(learning.output_head_zeroinit),
    hidden_units=hidden_units,
    hidden_trainable=hidden_trainable,
    penalized=tuple(any(float(lr[k]) != 0 for lr in program) for k in keys),
    padded_classes=padded,
    feature_dtype=str(learning.get("feature_dtype", "float32")),
  )


def hparams_from_learning(learning) -> HParams:
  """The traced hyperparameters of a `config.learning`."""
  return HParams(
    learning_rate=float(learning.learning_rate),
    l1=float(learning.l1_regularizer),
    l2=float(learning.l2_regularizer),
    group_coef=float(learning.group_lrp_regularizer_coef),
  )


def class_bucket(num_classes: int) -> int:
  """The output width a task's probes compile for: the next power of two, at least 8.

  Tasks whose class counts share a bucket (VTAB's 2..397 classes fall in 7)
  run the same compiled grid programs (issue #12: compile once per sweep).
  """
  return max(8, 1 << (int(num_classes) - 1).bit_length())


def padded_bias(num_classes: jax.Array | int, width: int) -> jax.Array:
  """`[width]` initial bias: 0 for the `num_classes` real classes, -inf for the padding (`TrainSpec.padded_classes`)."""
  return jnp.where(jnp.arange(width) < num_classes, 0.0, -jnp.inf).astype(jnp.float32)


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


@jax.custom_vjp
def features_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x [n, dim] @ w [dim, width]`, with the kernel's gradient `x^T @ g` computed `[dim, width]`, as `w` lies.

  Autodiff's own is `(g^T @ x)^T`: XLA's CPU backend computed `[width, dim]` and
  each optimiser pass read it transposed, which with stage 1's kernels side by
  side (`[dim, H, width]`, `train_heads`) made its Adam passes several times
  slower. The same products and sums (the weights are bit-identical on the CPU).
  """
  return x @ w


def _features_matmul_fwd(x, w):
  return x @ w, (x, w)


def _features_matmul_bwd(residuals, g):
  x, w = residuals
  return g @ w.T, jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())))


features_matmul.defvjp(_features_matmul_fwd, _features_matmul_bwd)


def logits_fn(params: Params, x: jax.Array) -> jax.Array:
  """`x [n, dim]` -> logits `[n, classes]` (through the ReLU hidden layer when there is one)."""
  if "hidden_w" in params:
    x = jax.nn.relu(features_matmul(x, params["hidden_w"]) + params["hidden_b"])
    return x @ params["w"] + params["b"]
  return features_matmul(x, params["w"]) + params["b"]


def split_frozen(params: Params, spec: TrainSpec) -> tuple[Params, Params]:
  """`(trainable, frozen)`: a 'random_N' hidden layer is frozen (no gradient, no optimiser state)."""
  if spec.hidden_units and not spec.hidden_trainable:
    frozen = {k: params[k] for k in ("hidden_w", "hidden_b")}
    return {k: v for k, v in params.items() if k not in frozen}, frozen
  return dict(params), {}


def learning_rate_at(step: jax.Array, hp: HParams, spec: TrainSpec) -> jax.Array:
  """The learning rate of `step` (0-based) of a probe: constant or cosine-decayed to 0."""
  return cosine_schedule(step, hp.learning_rate, spec.training_steps, spec.use_cosine_decay)


def _direction(spec: TrainSpec) -> optax.GradientTransformation:
  return update_direction(spec.optimizer, spec.grad_clip_value)


def loss(
  params: Params, hp: HParams, xb: jax.Array, yb: jax.Array, spec: TrainSpec, groups=None, num_groups=0
):
  """Mean softmax cross-entropy of `xb [b, dim]` against `yb [b]` plus the kernel penalties."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, xb), yb).mean()
  return ce + penalty(params, hp, spec, groups, num_groups)


def train_heads(
  params: Params,
  hp: HParams,
  batches: jax.Array,
  x_fn,
  y: jax.Array,
  spec: TrainSpec,
  groups: jax.Array | None = None,
  num_groups: int = 0,
  kernel_head_axis: int = 0,
) -> tuple[Params, jax.Array]:
  """The trainer: `H` heads (leading axis of `params` and `hp`) on shared minibatches.

  Args:
    params: initial heads, leaves `[H, ...]`.
    hp: hyperparameters, leaves `[H]`.
    batches: `[steps, batch]` example indices, one row per step.
    x_fn: `batch indices -> [batch, dim]` features shared by every head, or
      `[H, batch, dim]` (each head its own features).
    y: labels indexed by `batches`.
    spec: static settings; a 'random_N' hidden layer stays frozen.
    groups, num_groups: feature groups of the first kernel's penalty.
    kernel_head_axis: where the heads sit in the first kernel while it trains:
      0 (`[H, dim, width]`) or 1 (`[dim, H, width]`, for heads that share
      their features). Either way `params` come in and go out as `[H, ...]`.

  Returns:
    `(params, losses [H, steps])`.
  """
  # Heads sharing a minibatch get their logits from one `[batch, dim] @
  # [dim, H * width]` matmul; with the heads leading, XLA relaid all H kernels
  # out to `[dim, H * width]` every step (2 * H * dim * width bytes, 11% of
  # stage 1's step at the paper's sizes, issue #12). `[dim, H, width]` is that
  # matrix as it lies, and `features_matmul` computes its gradient laid out so.
  # The optimiser is elementwise and the matmuls read the same matrices, so the
  # weights are the same (bit-identical on the CPU); the penalty's sums run in
  # another order (the reported loss may move a last bit).
  tx = _direction(spec)
  first = first_kernel_name(params)
  params = {**params, first: jnp.moveaxis(params[first], 0, kernel_head_axis)}
  params, frozen = split_frozen(params, spec)

  def head_axes(tree):
    """The heads' axis of each leaf: `kernel_head_axis` for the first kernel (and its moments), else 0."""
    key = jax.tree_util.DictKey(first)
    return jax.tree_util.tree_map_with_path(
      lambda path, _: kernel_head_axis if path[-1:] == (key,) else 0, tree
    )

  p_axes, fz_axes = head_axes(params), head_axes(frozen)
  opt_axes = head_axes(jax.eval_shape(tx.init, params))

  def head_loss(p, fz, h, xb, yb):
    if spec.padded_classes:
      # Padding columns out of the penalties' gradient (|w|'s is 1 at 0);
      # a real column is multiplied by 1, which leaves its bits alone.
      p = {**p, "w": p["w"] * jnp.isfinite(p["b"]).astype(p["w"].dtype)}
    return loss({**p, **fz}, h, xb, yb, spec, groups, num_groups)

  def step(carry, inputs):
    p, opt_state = carry
    i, b = inputs
    xb = x_fn(b)
    x_axis = 0 if xb.ndim == 3 else None
    value, grads = jax.vmap(
      jax.value_and_grad(head_loss), in_axes=(p_axes, fz_axes, 0, x_axis, None), out_axes=(0, p_axes)
    )(p, frozen, hp, xb, y[b])
    update = jax.vmap(tx.update, in_axes=(p_axes, opt_axes, p_axes), out_axes=(p_axes, opt_axes))
    updates, opt_state = update(grads, opt_state, p)
    lr = jax.vmap(lambda h: learning_rate_at(i, h, spec))(hp)

    def apply(axis, v, u):
      return v - jnp.expand_dims(lr, [d for d in range(v.ndim) if d != axis]) * u

    p = jax.tree_util.tree_map(apply, p_axes, p, updates)
    return (p, opt_state), value

  opt_state = jax.vmap(tx.init, in_axes=(p_axes,), out_axes=opt_axes)(params)
  steps = jnp.arange(spec.training_steps)
  (params, _), losses = jax.lax.scan(step, (params, opt_state), (steps, batches))
  params = {**params, **frozen}
  return {**params, first: jnp.moveaxis(params[first], kernel_head_axis, 0)}, losses.T


@functools.partial(jax.jit, static_argnames=("spec", "num_groups"))
def train(
  x: jax.Array, y: jax.Array, hp: HParams, key: jax.Array, *, spec: TrainSpec, groups=None, num_groups=0
):
  """One head on fixed features `x [n, dim]`, labels `y [n]`: `train_heads` with H = 1.

  The head starts from `init_head(split(key)[0])`; minibatches come from
  `split(key)[1]`; `groups [dim]` / `num_groups` group the penalty's rows.
  Returns `(params, losses [training_steps])`.
  """
  k_init, k_data = jax.random.split(key)
  params = jax.tree_util.tree_map(lambda v: v[None], init_head(k_init, x.shape[1], spec))
  hp1 = HParams(*[jnp.asarray(v, jnp.float32).reshape(1) for v in hp])
  batches = batch_indices(k_data, x.shape[0], spec.training_steps, spec.batch_size)
  params, losses = train_heads(params, hp1, batches, lambda b: x[b], y, spec, groups, num_groups)
  return jax.tree_util.tree_map(lambda v: v[0], params), losses[0]


@jax.jit
def predict(params: Params, x: jax.Array) -> jax.Array:
  """Logits `[n, classes]` of a trained head."""
  return logits_fn(params, x)
