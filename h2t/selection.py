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
