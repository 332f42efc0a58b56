"""Head2Toe: select features from every tap with a group-lasso probe, then fit a head.

    head = h2t.head2toe.fit(features, labels, config.learning, seed=8)
    logits = head.predict(test_features)      # features: {tap: [n, d_tap]}

Stage 1 trains a linear head on all taps' features (normalised per tap) with
the ℓ2,1 penalty of `learning.feature_selection.learning_config_overwrite`;
the rows of its kernel score the features; the top `keep_fraction` are kept.
Stage 2 trains a fresh head on the kept features only, renormalised per tap,
with the base learning settings. `feature_selection.type = 'none'` skips
stage 1 (the Linear and regularisation baselines).

`run_grid` does this for many grid points and folds at once (`h2t.stages`
holds the compiled programs); `cross_validate` scores grid points on the
5 folds; `fit` is `run_grid` with one point and one fold of all data.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from h2t import config as config_lib
from h2t import grid, inputs, probe, selection, stages
from h2t import head as head_lib
from h2t.head import Head
from h2t.inputs import Prepared, SelectionSource, check_labels, prepare, training_subset
from h2t.sharding import HeadSharding

__all__ = [
  "Head",
  "Prepared",
  "SelectionSource",
  "check_labels",
  "cross_validate",
  "fit",
  "prepare",
  "run_grid",
  "training_subset",
]

FINAL_FOLD = 1000  # key id of a fit on all training examples (CV folds are 0..4)


def _fold_keys(seed: int, fold_ids: Sequence[int]) -> jax.Array:
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(fold_ids))


@dataclasses.dataclass
class GridRun:
  """Outputs of `run_grid` for `P` points on `F` folds.

  Attributes:
    kept_idx, kept_mask: `[F, P, K]` kept global feature indices (padded).
    params: `{'w': [F, P, K, C], 'b': [F, P, C]}` stage-2 heads (with a
      hidden layer, `hidden_w [F, P, K, N]` is the padded kernel).
    losses: `[F, P, steps]` stage-2 minibatch losses.
    accuracy: `[F, P]` accuracy on each fold's evaluation indices, or None.
  """

  kept_idx: np.ndarray
  kept_mask: np.ndarray
  params: dict[str, np.ndarray]
  losses: np.ndarray
  accuracy: np.ndarray | None


def _select(scores, learnings, prep: Prepared) -> tuple[jax.Array, jax.Array]:
  """Kept indices and masks `[F, P, K]` from scores `[F, P, D]` (`selection.select`)."""
  fss = [lr.feature_selection for lr in learnings]
  return selection.select(
    scores,
    [float(fs.keep_fraction) for fs in fss],
    [int(fs.keep_fraction_offset) for fs in fss],
    [float(fs.mean_interpolation_coef) for fs in fss],
    prep.sizes,
  )


def selection_keys(seed: int, fold_ids: Sequence[int]) -> jax.Array:
  """`[F]` keys of the stage-1 (selection) runs of `run_grid`'s folds."""
  return jax.vmap(lambda k: jax.random.fold_in(k, 0))(_fold_keys(seed, fold_ids))


def _at_precision(fn):
  """Runs `fn(prep, labels, learnings, ...)` with the probes' matmuls at `learning.precision`.

  'highest' (the default) is full float32: accelerators may otherwise run
  float32 matmuls at reduced precision (TF32 on NVIDIA GPUs, bfloat16 passes
  on TPUs), which made a batched grid differ from its points run alone. The
  CPU computes float32 in full either way.
  """

  @functools.wraps(fn)
  def wrapped(prep, labels, learnings, *args, **kwargs):
    precision = str(learnings[0].get("precision", "highest"))
    with jax.default_matmul_precision(None if precision == "default" else precision):
      return fn(prep, labels, learnings, *args, **kwargs)

  return wrapped


@_at_precision
def run_grid(
  prep: Prepared,
  labels: np.ndarray,
  learnings: Sequence[ml_collections.ConfigDict],
  folds: Sequence[tuple[np.ndarray, np.ndarray | None]],
  fold_ids: Sequence[int],
  *,
  seed: int,
  num_classes: int,
  select_from: SelectionSource | None = None,
  select_train_idx: np.ndarray | None = None,
) -> GridRun:
  """Stage 1, selection and stage 2 for many grid points and folds at once.

  All `learnings` must share `program_key`; they may differ in learning rate,
  penalty coefficients, keep fraction and offset. Each stage is one jitted
  program vmapped over folds and grid points; the points that share a
  stage-1 configuration share its run. With several local devices the heads
  are split over them (`HeadSharding`); the results do not change.

  Args:
    prep: the features.
    labels: `[n]`.
    learnings: one `config.learning` per grid point.
    folds: `(train_idx [m], eval_idx [v] or None)` per fold; every fold has
      the same m (and v).
    fold_ids: the key id of each fold (`FINAL_FOLD` for a fit on all data).
    seed: base seed.
    num_classes: classes.
    select_from: select on these features instead (`fs_dataset`).
    select_train_idx: `[F, m']` its training indices per fold.

  With `learning.class_buckets`, linear heads train at the width
  `probe.class_bucket(num_classes)` (padding masked out: the unpadded numbers
  up to float rounding), so tasks whose class counts share a bucket reuse the
  compiled programs.
  """
  for learning in learnings:
    config_lib.check_learning(learning)
  if len({grid.program_key(lr) for lr in learnings}) != 1:
    raise ValueError("run_grid: the grid points do not share one program; group them with program_key")
  base = learnings[0]
  pad_classes = bool(base.get("class_buckets", False))
  fs = base.feature_selection
  mode = base.feature_normalization
  y = jnp.asarray(labels, jnp.int32)
  train_idx = jnp.asarray(np.stack([f[0] for f in folds]), jnp.int32)
  keys_select = selection_keys(seed, fold_ids)
  keys_head = jax.vmap(lambda k: jax.random.fold_in(k, 1))(_fold_keys(seed, fold_ids))
  num_folds, num_points, dim = len(folds), len(learnings), prep.dim
  heads = HeadSharding()
  # What stage 1 (or the data scores) reads: this task's folds, or fs_dataset's.
  if select_from is None:
    sprep, s_labels, s_train_idx, s_classes = prep, np.asarray(labels), train_idx, num_classes
  else:
    select_from.check_matches(prep)
    sprep, s_labels, s_classes = select_from.prep, select_from.labels, select_from.num_classes
    s_train_idx = jnp.asarray(select_train_idx, jnp.int32)

  if fs.type == "none":
    kept_idx = jnp.broadcast_to(jnp.arange(dim, dtype=jnp.int32), (num_folds, num_points, dim))
    kept_mask = jnp.ones((num_folds, num_points, dim), jnp.float32)
  elif fs.type in selection.DATA_SCORES:
    # Scored from the fold's raw (unnormalised) training features, as the
    # reference scores its embeddings before normalisation; no stage 1.
    scores = selection.data_scores_per_fold(
      fs.type,
      np.asarray(sprep.x),
      np.asarray(s_labels),
      np.asarray(s_train_idx),
      fold_ids,
      seed=seed,
      repeats=int(fs.average_over_k),
    )
    kept_idx, kept_mask = _select(
      np.broadcast_to(scores[:, None], (num_folds, num_points, dim)), learnings, prep
    )
  else:
    scores = stages.stage1_scores(
      sprep,
      s_labels,
      learnings,
      s_train_idx,
      keys_select,
      num_classes=s_classes,
      repeats=range(int(fs.average_over_k)),
      heads=heads,
      pad_classes=pad_classes,
    )
    kept_idx, kept_mask = _select(scores, learnings, prep)

  hp2 = probe.HParams(
    *[
      heads.shard(jnp.asarray(col, jnp.float32))
      for col in zip(*[tuple(probe.hparams_from_learning(lr)) for lr in learnings], strict=True)
    ]
  )
  x = heads.replicate(prep.x)
  kept_idx_h, kept_mask_h = heads.shard(kept_idx, axis=1), heads.shard(kept_mask, axis=1)
  spec = probe.spec_from_learning(base, num_classes, program=learnings, pad_classes=pad_classes)
  params, losses = stages.train_kept_features_folds(
    x,
    y,
    train_idx,
    kept_idx_h,
    kept_mask_h,
    prep.tap_of,
    hp2,
    keys_head,
    jnp.int32(num_classes) if spec.padded_classes else None,
    spec=spec,
    num_taps=len(prep.taps),
    mode=mode,
  )
  accuracy = None
  if folds[0][1] is not None:
    eval_idx = jnp.asarray(np.stack([f[1] for f in folds]), jnp.int32)
    acc_fn = jax.vmap(
      functools.partial(stages.kept_accuracy, num_taps=len(prep.taps), mode=mode),
      in_axes=(None, None, 0, 0, 0, 0, None, 0),
    )
    correct = np.asarray(acc_fn(x, y, train_idx, eval_idx, kept_idx_h, kept_mask_h, prep.tap_of, params))
    accuracy = correct[:, :num_points].astype(np.float64) / eval_idx.shape[1]
  # The class bucket's padding columns (bias -inf, kernel 0) dropped on the host (no program per class count).
  width = num_classes if spec.padded_classes else None
  run = GridRun(
    kept_idx=np.asarray(kept_idx),
    kept_mask=np.asarray(kept_mask),
    params={k: np.asarray(v)[:, :num_points, ..., :width] for k, v in params.items()},
    losses=np.asarray(losses)[:, :num_points],
    accuracy=accuracy,
  )
  _check_finite(run, learnings)
  return run


def _check_finite(run: GridRun, learnings: Sequence[ml_collections.ConfigDict]) -> None:
  """Non-finite training (a NaN loss or weights) is an error naming the grid point's settings."""
  bad = ~np.isfinite(run.losses).all(axis=2)
  for v in run.params.values():
    bad |= ~np.isfinite(v.reshape(v.shape[0], v.shape[1], -1)).all(axis=2)
  if bad.any():
    point = int(np.argwhere(bad)[0][1])
    lr = learnings[point]
    raise FloatingPointError(
      f"training diverged (non-finite loss or weights) with learning_rate={lr.learning_rate}, "
      f"training_steps={lr.training_steps}, optimizer={lr.optimizer}, "
      f"group_lrp_regularizer_coef={lr.group_lrp_regularizer_coef}, "
      f"keep_fraction={lr.feature_selection.keep_fraction}; lower the learning rate or check the features"
    )


def cross_validate(
  prep: Prepared,
  labels: np.ndarray,
  learnings: Sequence[ml_collections.ConfigDict],
  *,
  seed: int,
  num_classes: int,
  num_folds: int = 5,
  select_from: SelectionSource | None = None,
  folds: Sequence[int] | None = None,
) -> np.ndarray:
  """Validation accuracy `[P, num_folds]` of each grid point on the reference's folds.

  Points are grouped by `grid.program_key`; each group is one `run_grid` call
  (with `data_fraction`, folds whose subsets differ in size run apart).
  `select_from` (`fs_dataset`) selects on another task's same folds.
  `folds`: run only these folds (a process's share, `h2t.grid.cv_units`);
  the others' columns are NaN. A fold's accuracies do not depend on which
  other folds run with it (each fold has its own key, and the folds are a
  batch axis of the programs).
  """
  acc = np.full((len(learnings), num_folds), np.nan)
  for members, fold_ids, _, run in fold_runs(
    prep,
    labels,
    learnings,
    seed=seed,
    num_classes=num_classes,
    num_folds=num_folds,
    select_from=select_from,
    folds=folds,
  ):
    acc[np.ix_(members, fold_ids)] = run.accuracy.T
  return acc


def fold_runs(
  prep: Prepared,
  labels: np.ndarray,
  learnings: Sequence[ml_collections.ConfigDict],
  *,
  seed: int,
  num_classes: int,
  num_folds: int = 5,
  select_from: SelectionSource | None = None,
  folds: Sequence[int] | None = None,
) -> Iterator[tuple[list[int], list[int], list[tuple[np.ndarray, np.ndarray]], GridRun]]:
  """`run_grid` over the reference's folds in as few calls as the programs allow (see `cross_validate`).

  Yields:
    `(members, fold_ids, splits, run)`: the grid points (indices into
    `learnings`) and folds of one call, each fold's `(train_idx, valid_idx)`
    (`data_fraction` applied to train_idx), and the call's `GridRun`
    (`[F, P]` in the order of `fold_ids` and `members`).
  """
  from h2t.data import base as data_base

  run_folds = range(num_folds) if folds is None else sorted(set(folds))
  if any(not 0 <= f < num_folds for f in run_folds):
    raise ValueError(f"folds {list(run_folds)} must lie in [0, {num_folds})")
  splits = [data_base.fold_indices(f, len(labels), num_folds) for f in range(num_folds)]
  s_train = None
  if select_from is not None:
    s_train = [data_base.fold_indices(f, len(select_from.labels), num_folds)[0] for f in range(num_folds)]
  for members in grid.group_by(learnings, grid.program_key).values():
    subsets = [(training_subset(tr, labels, learnings[members[0]], num_classes), ev) for tr, ev in splits]
    by_size: dict[int, list[int]] = {}
    for f in run_folds:
      by_size.setdefault(len(subsets[f][0]), []).append(f)
    for fold_ids in by_size.values():
      run = run_grid(
        prep,
        labels,
        [learnings[i] for i in members],
        [subsets[f] for f in fold_ids],
        fold_ids,
        seed=seed,
        num_classes=num_classes,
        select_from=select_from,
        select_train_idx=None if s_train is None else np.stack([s_train[f] for f in fold_ids]),
      )
      yield list(members), fold_ids, [subsets[f] for f in fold_ids], run


def fit(
  features: Mapping[str, np.ndarray],
  labels: np.ndarray,
  learning: ml_collections.ConfigDict,
  *,
  seed: int,
  num_classes: int | None = None,
  meta: Mapping[str, Any] | None = None,
  select_from: SelectionSource | None = None,
) -> Head:
  """Trains a Head2Toe head (or, with selection type 'none', a plain linear head).

  Args:
    features: `{tap: [n, d_tap]}` pooled training features, in network order.
    labels: `[n]` int labels.
    learning: `config.learning` (see configs/vtab.py).
    seed: makes the run reproducible: same inputs and seed, same head.
    num_classes: defaults to `max(labels) + 1`.
    meta: stored with the head.
    select_from: select the features on another task's training set
      (`feature_selection.fs_dataset`); the head trains on `features`.

  Returns:
    The trained `Head`.
  """
  prep, labels, num_classes = inputs.fit_inputs(features, labels, learning, num_classes)
  train = training_subset(np.arange(len(labels)), labels, learning, num_classes)
  run = run_grid(
    prep,
    labels,
    [learning],
    [(train, None)],
    [FINAL_FOLD],
    seed=seed,
    num_classes=num_classes,
    select_from=select_from,
    select_train_idx=None if select_from is None else np.arange(len(select_from.labels))[None],
  )
  return head_lib.from_grid_run(prep, run, 0, 0, learning, meta=meta, train_idx=train)
