"""Feature selection as it runs: scores, top-k with offsets, tap interpolation, indices per tap.

Features are the concatenation of the taps' pooled vectors, in tap order;
`tap_sizes` gives each tap's width and `tap_of [D]` each feature's tap id. A
global index `g` belongs to the tap whose range `[offset, offset + size)`
contains it. Connectivity scores and top-k run on the device, batched over
folds and grid points; the data scores (sklearn) run on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

CONNECTIVITY_SCORES = ("connectivity_l1", "connectivity_l2", "connectivity_linf", "connectivity_l2layer")


def connectivity_scores(kind: str, w: jax.Array, tap_of: jax.Array, num_taps: int) -> jax.Array:
  """Scores features by the weights leaving them in a trained head.

  Args:
    kind: 'connectivity_l2' (sum of squared row weights; the paper's),
      'connectivity_l1' (sum of |w|), 'connectivity_linf' (max |w|), or
      'connectivity_l2layer' (each feature gets the mean row L2 norm of its tap).
    w: `[..., D, width]` first kernels of heads trained with the group penalty.
    tap_of: `[D]` tap id of each feature.
    num_taps: number of taps.

  Returns:
    `[..., D]` scores; higher is more useful.
  """
  if kind == "connectivity_l2":
    return (w**2).sum(-1)
  if kind == "connectivity_l1":
    return jnp.abs(w).sum(-1)
  if kind == "connectivity_linf":
    return jnp.abs(w).max(-1)
  if kind != "connectivity_l2layer":
    raise ValueError(f"feature selection type {kind!r}; expected one of {', '.join(CONNECTIVITY_SCORES)}")
  norms = jnp.sqrt((w**2).sum(-1))
  flat = norms.reshape(-1, norms.shape[-1])
  counts = jax.ops.segment_sum(jnp.ones_like(tap_of, jnp.float32), tap_of, num_taps)
  means = jax.vmap(lambda r: jax.ops.segment_sum(r, tap_of, num_taps) / counts)(flat)
  return means[:, tap_of].reshape(norms.shape)


def interpolate_to_tap_mean(scores: np.ndarray, tap_sizes: Sequence[int], coef: float) -> np.ndarray:
  """`(1 - coef) * score + coef * mean score of its tap` (the reference's option); `[D]` -> `[D]`."""
  parts = np.split(np.asarray(scores), np.cumsum(tap_sizes)[:-1])
  return np.concatenate([s * (1 - coef) + s.mean() * coef for s in parts])


def num_kept(dim: int, keep_fraction: float, offset: int = 0) -> int:
  """`int(dim * keep_fraction)`, the reference's count, checked to keep at least one feature."""
  n = int(dim * float(keep_fraction))
  if not 0 < keep_fraction <= 1 or n < 1:
    raise ValueError(
      f"keep_fraction={keep_fraction} of {dim} features keeps none; expected a fraction in (0, 1] "
      f"keeping at least 1/{dim}"
    )
  if not 0 <= offset <= dim - n:
    raise ValueError(
      f"keep_fraction_offset={offset}: skipping that many of {dim} features leaves fewer than the "
      f"{n} to keep; expected 0 <= offset <= {dim - n}"
    )
  return n


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


def select(
  scores: jax.Array | np.ndarray,
  keep_fractions: Sequence[float],
  offsets: Sequence[int],
  interpolation: Sequence[float],
  tap_sizes: Sequence[int],
) -> tuple[jax.Array, jax.Array]:
  """Kept indices and masks `[F, P, K]` of every fold and grid point.

  Args:
    scores: `[F, P, D]` feature scores.
    keep_fractions, offsets, interpolation: per grid point, the
      `feature_selection` options `keep_fraction`, `keep_fraction_offset` and
      `mean_interpolation_coef`.
    tap_sizes: each tap's width (sums to D).

  Returns:
    `(idx, mask)`, padded to the largest keep count K (see `select_top`).
  """
  dim = int(sum(tap_sizes))
  if any(c > 0 for c in interpolation):
    scores = np.array(scores)
    for p, coef in enumerate(interpolation):
      if coef > 0:
        for f in range(scores.shape[0]):
          scores[f, p] = interpolate_to_tap_mean(scores[f, p], tap_sizes, coef)
  counts = np.asarray([num_kept(dim, kf, off) for kf, off in zip(keep_fractions, offsets, strict=True)])
  top = jax.vmap(jax.vmap(select_top, in_axes=(0, 0, 0, None)), in_axes=(0, None, None, None))
  return top(jnp.asarray(scores, jnp.float32), jnp.asarray(counts), jnp.asarray(offsets), int(counts.max()))


def indices_per_tap(
  global_idx: np.ndarray, tap_names: Sequence[str], tap_sizes: Sequence[int]
) -> dict[str, np.ndarray]:
  """Splits global feature indices into `{tap: int32 indices within that tap}` (empty arrays kept)."""
  global_idx = np.asarray(global_idx)
  out, start = {}, 0
  for name, size in zip(tap_names, tap_sizes, strict=True):
    inside = global_idx[(global_idx >= start) & (global_idx < start + size)]
    out[name] = (inside - start).astype(np.int32)
    start += size
  return out


# Scores computed from the features and labels alone, without a trained head.
DATA_SCORES = (
  "random",
  "variance",
  "sklearn_chi2",
  "sklearn_f_classif",
  "sklearn_mutual_info_classif",
  "sklearn_trees",
)
TREES_ESTIMATORS = 50  # The reference's ExtraTreesClassifier size.


def nonnegative_for_chi2(x: np.ndarray) -> np.ndarray:
  """Shifts each feature with a negative value so its minimum is 0.

  chi2 treats a feature as counts and refuses negative inputs (the reference
  passes its raw pooled features as they are, so it raises on any tap that
  can be negative: a residual output, logits, a ViT token). Features that are
  already non-negative (post-ReLU taps) are left untouched, so wherever the
  reference runs, the scores are the same.

  Args:
    x: `[n, dim]` features.

  Returns:
    `[n, dim]` float32 features, all >= 0.
  """
  x = np.asarray(x, np.float32)
  low = x.min(axis=0)
  return x - np.minimum(low, 0)[None, :]


def data_scores(kind: str, x: np.ndarray, labels: np.ndarray, *, seed: int) -> np.ndarray:
  """Scores features from the data, as the reference's non-connectivity types.

  Args:
    kind: one of `DATA_SCORES`:
      'random': i.i.d. standard normal scores drawn from `seed` (a baseline);
      'variance': each feature's standard deviation over the examples
        (population std, as `tf.math.reduce_std`);
      'sklearn_chi2', 'sklearn_f_classif', 'sklearn_mutual_info_classif':
        the `scores_` of that `sklearn.feature_selection` function (chi2 on
        `nonnegative_for_chi2(x)`; mutual information seeded by `seed`);
      'sklearn_trees': `feature_importances_` of an ExtraTreesClassifier with
        50 trees, seeded by `seed`.
    x: `[n, dim]` features. The reference scores the concatenated pooled
      features before any normalisation.
    labels: `[n]` int labels.
    seed: makes 'random', 'sklearn_mutual_info_classif' and 'sklearn_trees'
      reproducible (the reference left them unseeded); use a different seed per
      run when averaging over k runs.

  Returns:
    `[dim]` float64 scores; higher is more useful. NaN scores (f_classif or
    chi2 on a constant feature, 0/0) become 0, the lowest score a
    non-random kind gives: a constant feature carries no information, and
    NaN must not sort above real scores. An infinite F statistic (a feature
    constant within each class but not across them) becomes the largest
    float64, so it still ranks first.
  """
  x = np.asarray(x)
  labels = np.asarray(labels)
  if x.ndim != 2 or len(x) != len(labels):
    raise ValueError(f"expected features [n, dim] and labels [n], got {x.shape} and {labels.shape}")
  # Imported here: scikit-learn takes a second to import and only these scores need it.
  from sklearn import ensemble, feature_selection

  if kind == "random":
    scores = np.random.default_rng(seed).standard_normal(x.shape[1])
  elif kind == "variance":
    scores = x.std(axis=0, dtype=np.float64)
  elif kind == "sklearn_chi2":
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 on all-zero features; handled below.
      scores, _ = feature_selection.chi2(nonnegative_for_chi2(x), labels)
  elif kind == "sklearn_f_classif":
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 on constant features; handled below.
      scores, _ = feature_selection.f_classif(x, labels)
  elif kind == "sklearn_mutual_info_classif":
    scores = feature_selection.mutual_info_classif(x, labels, random_state=seed, n_jobs=-1)
  elif kind == "sklearn_trees":
    trees = ensemble.ExtraTreesClassifier(n_estimators=TREES_ESTIMATORS, random_state=seed, n_jobs=-1)
    scores = trees.fit(x, labels).feature_importances_
  else:
    raise ValueError(f"feature selection type {kind!r}; expected one of {', '.join(DATA_SCORES)}")
  return np.nan_to_num(np.asarray(scores, np.float64), nan=0.0)


def data_scores_per_fold(
  kind: str,
  x: np.ndarray,
  labels: np.ndarray,
  train_idx: np.ndarray,
  fold_ids: Sequence[int],
  *,
  seed: int,
  repeats: int = 1,
) -> np.ndarray:
  """`data_scores` of each fold's training examples, averaged over `repeats` seeds: `[F, D]`.

  Args:
    kind, x, labels: as `data_scores` (`x [n, D]` raw features).
    train_idx: `[F, m]` each fold's training indices.
    fold_ids: each fold's id; run `r` of fold `f` is seeded `seed * 1000 + f * 10 + r`.
    seed: the run's seed.
    repeats: `average_over_k`.
  """
  return np.stack(
    [
      np.mean(
        [data_scores(kind, x[tr], labels[tr], seed=seed * 1000 + fid * 10 + r) for r in range(repeats)], 0
      )
      for tr, fid in zip(train_idx, fold_ids, strict=True)
    ]
  )


TYPES = ("none",) + CONNECTIVITY_SCORES + DATA_SCORES
