"""Feature scores from a trained head, and the kept-feature mask.

Features are the concatenation of the taps' pooled vectors, in tap order;
`tap_sizes` gives each tap's width. A global index `g` belongs to the tap
whose range `[offset, offset + size)` contains it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CONNECTIVITY_SCORES = ("connectivity_l1", "connectivity_l2", "connectivity_linf", "connectivity_l2layer")


def connectivity_scores(kind: str, w: np.ndarray, tap_sizes: Sequence[int]) -> np.ndarray:
  """Scores features by the weights leaving them in a trained head.

  Args:
    kind: 'connectivity_l2' (sum of squared row weights; the paper's),
      'connectivity_l1' (sum of |w|), 'connectivity_linf' (max |w|), or
      'connectivity_l2layer' (each feature gets the mean row L2 norm of its tap).
    w: `[dim, classes]` kernel of the head trained with the group penalty.
    tap_sizes: feature count of each tap, summing to `dim`.

  Returns:
    `[dim]` float scores; higher is more useful.
  """
  w = np.asarray(w, np.float64)
  if kind == "connectivity_l2":
    return (w**2).sum(axis=1)
  if kind == "connectivity_l1":
    return np.abs(w).sum(axis=1)
  if kind == "connectivity_linf":
    return np.abs(w).max(axis=1)
  if kind == "connectivity_l2layer":
    norms = np.sqrt((w**2).sum(axis=1))
    return np.concatenate([np.full(len(part), part.mean()) for part in split_by_tap(norms, tap_sizes)])
  raise ValueError(f"feature selection type {kind!r}; expected one of {', '.join(CONNECTIVITY_SCORES)}")


def split_by_tap(values: np.ndarray, tap_sizes: Sequence[int]) -> list[np.ndarray]:
  """Splits a `[dim]` array into one piece per tap."""
  return np.split(np.asarray(values), np.cumsum(tap_sizes)[:-1])


def interpolate_to_tap_mean(scores: np.ndarray, tap_sizes: Sequence[int], coef: float) -> np.ndarray:
  """`(1 - coef) * score + coef * mean score of its tap` (the reference's option)."""
  parts = [s * (1 - coef) + s.mean() * coef for s in split_by_tap(scores, tap_sizes)]
  return np.concatenate(parts)


def top_fraction(
  scores: np.ndarray,
  keep_fraction: float,
  *,
  offset: int = 0,
  tap_sizes: Sequence[int] | None = None,
  mean_interpolation_coef: float = 0.0,
) -> np.ndarray:
  """Global indices of the top `keep_fraction` of features.

  As the reference: `int(dim * keep_fraction)` features are kept after
  skipping the `offset` best ones; ties go to the lower index.

  Returns:
    Sorted int64 indices into the concatenated features.
  """
  if not 0 < keep_fraction <= 1:
    raise ValueError(f"keep_fraction={keep_fraction}; expected a fraction in (0, 1]")
  scores = np.asarray(scores, np.float64)
  if mean_interpolation_coef > 0:
    if tap_sizes is None:
      raise ValueError("mean_interpolation_coef needs tap_sizes")
    scores = interpolate_to_tap_mean(scores, tap_sizes, mean_interpolation_coef)
  n_kept = int(scores.size * keep_fraction)
  if n_kept < 1:
    raise ValueError(
      f"keep_fraction={keep_fraction} of {scores.size} features keeps none; raise keep_fraction"
    )
  order = np.argsort(-scores, kind="stable")
  return np.sort(order[offset : offset + n_kept])


def indices_per_tap(
  global_idx: np.ndarray, tap_names: Sequence[str], tap_sizes: Sequence[int]
) -> dict[str, np.ndarray]:
  """Splits global feature indices into `{tap: indices within that tap}`.

  Taps with no kept feature map to an empty array.
  """
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
