"""The grid's compiled programs: many heads per program, on device-resident features.

A fold is a set of training indices into the features `x [n, D]`. Every head
of a fold sees the same minibatches (same key), so a step gathers its
minibatch once and all the fold's heads use it. Hyperparameters are traced
`[H]` vectors, so one compiled program serves a whole grid. Initial kernels
are drawn row by row (`row_glorot`), so a head's start does not depend
on how many heads share the program or on the padding of its kept set.

Stage 1 (`train_all_features`) trains heads on every feature and returns
their first kernels (the rows score the features); stage 2
(`train_kept_features_folds`) trains fresh heads on each head's kept
features; `kept_accuracy` counts their correct predictions. All training
goes through `probe.train_heads`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from h2t import config as config_lib
from h2t import normalize, probe, selection
from h2t.inputs import Prepared
from h2t.optim import batch_indices
from h2t.probe import (
  OUTPUT_LAYER_KEY,
  HParams,
  Params,
  TrainSpec,
  assemble,
  first_kernel_name,
  logits_fn,
  output_layer,
  train_heads,
)
from h2t.sharding import HeadSharding


def row_glorot(
  key: jax.Array, rows: int, num_classes: int, fan_in: jax.Array | int, fan_out: jax.Array | int | None = None
) -> jax.Array:
  """Glorot-uniform `[rows, num_classes]` (the layer's width), row `i` drawn from `fold_in(key, i)`.

  Drawing per row makes the first `k` rows independent of `rows`, so a
  padded head starts exactly as an unpadded one. With `fan_out` (the real
  classes of a class bucket) the limit is the real layer's and columns from
  `fan_out` on are 0; JAX's (partitionable) threefry draws element `j` of a
  row independently of the row's length, so the real columns are the
  unpadded layer's, bit for bit.
  """
  if fan_out is None:
    limit = jnp.sqrt(6.0 / (fan_in + num_classes))
  else:
    # `6.0 / int32` divides in float32; for integers below 2^24 that equals
    # Python's double division rounded to float32 (no double-rounding case).
    limit = jnp.sqrt(6.0 / (fan_in + fan_out))
  u = jax.vmap(
    lambda i: jax.random.uniform(jax.random.fold_in(key, i), (num_classes,), minval=-1.0, maxval=1.0)
  )(jnp.arange(rows))
  if fan_out is not None:
    u = jnp.where(jnp.arange(num_classes) < fan_out, u, 0.0)
  return u * limit


def _fold_batches(key: jax.Array, train_idx: jax.Array, spec: TrainSpec) -> jax.Array:
  """`[steps, batch]` indices into the features for one fold."""
  local = batch_indices(key, train_idx.shape[0], spec.training_steps, spec.batch_size)
  return train_idx[local]


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
  classes: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Stage 1 for a grid: `H` heads on all features of one fold.

  Args:
    x: `[n, D]` features, already normalised per tap (or raw, with
      `per_feature`: then standardised with the fold's training statistics).
    y: `[n]` labels.
    train_idx: `[m]` the fold's training indices.
    hp: hyperparameters with leaves `[H]`.
    key: the fold's key (same for every head).
    classes: with `spec.padded_classes`, the task's classes (traced; the
      width is their bucket).

  Returns:
    `(w [H, D, width], losses [H, steps])`: the first kernel of each head
    (width = classes, or the hidden units), whose rows score the features.
  """
  num_heads = jnp.shape(hp.learning_rate)[0]
  k_init, k_data = jax.random.split(key)
  dim, width = x.shape[1], spec.first_width
  fan_out, b0 = _first_layer_bias(spec, classes)
  w0 = jnp.zeros((dim, width)) if spec.zero_init else row_glorot(k_init, dim, width, dim, fan_out)
  one = assemble(w0, b0, output_layer(jax.random.fold_in(k_init, OUTPUT_LAYER_KEY), spec))
  params = jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v, (num_heads,) + v.shape), one)
  batches = _fold_batches(k_data, train_idx, spec)
  # `x` may be stored in bfloat16 (`TrainSpec.feature_dtype`): rows are gathered
  # in it and cast to float32 before any arithmetic (a no-op for float32).
  if per_feature:
    xt = x[train_idx].astype(jnp.float32)
    mean, var = xt.mean(axis=0), xt.var(axis=0)

    def x_fn(b):
      return normalize.standardize(x[b].astype(jnp.float32), mean, var)
  else:

    def x_fn(b):
      return x[b].astype(jnp.float32)

  params, losses = train_heads(params, hp, batches, x_fn, y, spec, groups, num_groups, kernel_head_axis=1)
  return params[first_kernel_name(params)], losses


def _first_layer_bias(spec: TrainSpec, classes: jax.Array | None) -> tuple[jax.Array | None, jax.Array]:
  """`(fan_out for row_glorot, initial bias [width])`: zeros, or -inf past `classes` in a class bucket."""
  if not spec.padded_classes:
    return None, jnp.zeros((spec.first_width,))
  if spec.hidden_units:
    raise ValueError(
      "class buckets are for linear heads (the hidden layer's output layer is drawn at its width)"
    )
  return classes, probe.padded_bias(classes, spec.num_classes)


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
    # Kept indices are sorted, so each tap's features are one contiguous run.
    xk = normalize.unit_vector(xk, tap_of[safe], num_taps)
  elif mode == "per_feature":
    mean, var = stats
    xk = normalize.standardize(xk, mean[safe], var[safe]) * mask
  return xk


def train_kept_features(
  x: jax.Array, y: jax.Array, tap_of: jax.Array, hp: HParams, fold, spec, num_taps, mode, classes=None
):
  """Stage 2 for a grid: `H` fresh heads, each on its own kept features.

  Args:
    x: `[n, D]` raw (unnormalised) features.
    y: `[n]` labels.
    tap_of: `[D]` tap id of each feature.
    hp: hyperparameters with leaves `[H]`.
    fold: `(train_idx [m], kept_idx [H, K], kept_mask [H, K], key)`: the
      fold's training indices, each head's kept features (`selection.select_top`)
      and the fold's key.
    spec, num_taps, mode: the trainer's settings, the tap count, the normalisation.
    classes: with `spec.padded_classes`, the task's classes (traced).

  Returns:
    `(params {'w': [H, K, classes], 'b': [H, classes]}, losses [H, steps])`;
    padded rows of `w` are zero. With a hidden layer the padded kernel is
    `hidden_w [H, K, hidden]` and `w` is `[H, hidden, classes]`.
  """
  train_idx, kept_idx, kept_mask, key = fold
  k_init, k_data = jax.random.split(key)
  num_kept = kept_mask.sum(axis=1)
  num_heads, max_kept = kept_idx.shape
  width = spec.first_width
  fan_out, b0 = _first_layer_bias(spec, classes)
  if spec.zero_init:
    w = jnp.zeros((num_heads, max_kept, width))
  else:
    w = jax.vmap(lambda k: row_glorot(k_init, max_kept, width, k, fan_out))(num_kept)
  rest = output_layer(jax.random.fold_in(k_init, OUTPUT_LAYER_KEY), spec)
  rest = jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v, (num_heads,) + v.shape), rest)
  params = assemble(w * kept_mask[:, :, None], jnp.broadcast_to(b0, (num_heads, width)), rest)
  xt = x[train_idx]
  stats = (xt.mean(axis=0), xt.var(axis=0)) if mode == "per_feature" else None
  # Each head's kept, renormalised features of the fold's training set,
  # [H, m, K], built once: a step then reads contiguous rows instead of
  # gathering scattered columns (measured ~20x faster on the CPU).
  xh = jax.vmap(transform_kept, in_axes=(None, 0, 0, None, None, None, None))(
    xt, kept_idx, kept_mask, tap_of, num_taps, mode, stats
  ).astype(spec.feature_dtype)
  local = batch_indices(k_data, train_idx.shape[0], spec.training_steps, spec.batch_size)

  def x_fn(b):
    # Each head's rows, gathered with the head as a batch dimension of the
    # gather: `xh[:, b, :]` gathered [B, H, K] and then transposed it to
    # [H, B, K], an extra pass over the minibatch every step.
    rows = jax.vmap(lambda xk, bk: xk[bk])(xh, jnp.broadcast_to(b, (num_heads,) + b.shape))
    return rows.astype(jnp.float32)

  params, losses = train_heads(params, hp, local, x_fn, y[train_idx], spec, None, 0)
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
  classes: jax.Array | None = None,
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

  one = functools.partial(
    train_kept_features, x, y, tap_of, hp, spec=spec, num_taps=num_taps, mode=mode, classes=classes
  )
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


@functools.partial(jax.jit, static_argnames=("kind", "classes", "num_taps"))
def _real_scores(w: jax.Array, tap_of: jax.Array, *, kind: str, classes: int, num_taps: int) -> jax.Array:
  """`selection.connectivity_scores` of the first `classes` columns of `w [..., D, width]` -> `[..., D]`.

  One program (slice, score) rather than three eager ones per class count: a
  sweep's later task with another class count compiles one small program. The
  numbers are the eager ones, bit for bit (on the CPU, every score kind).
  """
  return selection.connectivity_scores(kind, w[..., :classes], tap_of, num_taps)


def stage1_scores(
  prep: Prepared,
  labels: np.ndarray,
  learnings: Sequence[ml_collections.ConfigDict],
  train_idx: jax.Array,
  keys: jax.Array,
  *,
  num_classes: int,
  repeats: Sequence[int] = (0,),
  heads: HeadSharding | None = None,
  pad_classes: bool = False,
) -> jax.Array:
  """Stage 1 of the grid: connectivity scores `[F, P, D]` of every fold and point.

  One vmapped program trains a head on all features per fold and distinct
  selection setting (base learning + `learning_config_overwrite`); its first
  kernel's rows are scored by `feature_selection.type`. Repeat `r` draws its
  initialisation and minibatches from `fold_in(key, r)`; the scores are
  averaged over `repeats` (`average_over_k` runs 0..k-1).

  Args:
    prep: features to select on.
    labels: `[n]` their labels.
    learnings: one per grid point, sharing `program_key`.
    train_idx: `[F, m]` each fold's training indices.
    keys: `[F]` each fold's selection key (`selection_keys`).
    num_classes: classes of `labels`.
    repeats: the runs to average.
    heads: how heads are spread over devices (default: all local devices).
    pad_classes: train at the class bucket's width (`probe.class_bucket`);
      the padding columns are dropped before scoring.
  """
  heads = heads or HeadSharding()
  fs = learnings[0].feature_selection
  mode = learnings[0].feature_normalization
  sel = [config_lib.selection_learning(lr) for lr in learnings]
  hp_rows = [tuple(probe.hparams_from_learning(s_)) for s_ in sel]
  unique = list(dict.fromkeys(hp_rows))
  row_of = np.asarray([unique.index(r) for r in hp_rows])
  hp1 = probe.HParams(*[heads.shard(jnp.asarray(col, jnp.float32)) for col in zip(*unique, strict=True)])
  groups, num_groups = None, 0
  if sel[0].group_lrp_is_embedding:
    # Groups are whole taps. Unlike the reference, the coefficient applies here too.
    groups, num_groups = prep.tap_of, len(prep.taps)
  spec = probe.spec_from_learning(sel[0], num_classes, program=sel, pad_classes=pad_classes)
  x1 = heads.replicate((prep.unit_vector() if mode == "unit_vector" else prep.x).astype(spec.feature_dtype))
  stage1 = jax.vmap(
    functools.partial(
      train_all_features,
      spec=spec,
      groups=groups,
      num_groups=num_groups,
      per_feature=mode == "per_feature",
      classes=jnp.int32(num_classes) if spec.padded_classes else None,
    ),
    in_axes=(None, None, 0, None, 0),
  )
  scores = 0.0
  for r in repeats:
    w, _ = stage1(
      x1,
      jnp.asarray(labels, jnp.int32),
      jnp.asarray(train_idx, jnp.int32),
      hp1,
      jax.vmap(lambda kk, r=r: jax.random.fold_in(kk, r))(keys),
    )
    # The scores read the real columns only, as without padding.
    real = num_classes if spec.padded_classes else w.shape[-1]
    scores = scores + _real_scores(w, prep.tap_of, kind=fs.type, classes=real, num_taps=len(prep.taps))
  return (scores / len(repeats))[:, row_of]  # [F, P, D]; padding heads dropped
