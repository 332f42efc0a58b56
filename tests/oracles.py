"""Plain-numpy formulas of the selection and normalisation, the oracles the device code is tested against.

h2t runs these computations on the device (`h2t.selection`, `h2t.normalize`,
`h2t.stages`); the tests compare with these direct transcriptions of the
reference's definitions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from h2t import selection


def unit_vector(x: np.ndarray) -> np.ndarray:
  """Divides each row of `x [n, d]` by its L2 norm; all-zero rows stay zero."""
  x = np.asarray(x, np.float32)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return np.where(norms > 0, x / np.where(norms > 0, norms, 1), 0).astype(np.float32)


def normalize(features: Mapping[str, np.ndarray], taps: Sequence[str], mode: str, stats=None):
  """`(x [n, D], stats)`: taps concatenated, each unit-normalised, or standardised per feature."""
  parts = [np.asarray(features[t], np.float32) for t in taps]
  if mode == "unit_vector":
    parts = [unit_vector(p) for p in parts]
  x = np.concatenate(parts, axis=1)
  if mode != "per_feature":
    return x, None
  if stats is None:
    stats = {"mean": x.mean(axis=0), "var": x.var(axis=0)}
  return ((x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5)).astype(np.float32), stats


def split_by_tap(values: np.ndarray, tap_sizes: Sequence[int]) -> list[np.ndarray]:
  return np.split(np.asarray(values), np.cumsum(tap_sizes)[:-1])


def connectivity_scores(kind: str, w: np.ndarray, tap_sizes: Sequence[int]) -> np.ndarray:
  """The reference's connectivity scores of a kernel `w [D, C]`: `[D]`."""
  w = np.asarray(w, np.float64)
  if kind == "connectivity_l2":
    return (w**2).sum(axis=1)
  if kind == "connectivity_l1":
    return np.abs(w).sum(axis=1)
  if kind == "connectivity_linf":
    return np.abs(w).max(axis=1)
  if kind == "connectivity_l2layer":
    norms = np.sqrt((w**2).sum(axis=1))
    return np.concatenate([np.full(len(p), p.mean()) for p in split_by_tap(norms, tap_sizes)])
  raise ValueError(kind)


def top_fraction(scores, keep_fraction, *, offset=0, tap_sizes=None, mean_interpolation_coef=0.0):
  """Sorted global indices of the `int(D * keep_fraction)` best scores after skipping `offset`."""
  scores = np.asarray(scores, np.float64)
  if mean_interpolation_coef > 0:
    scores = selection.interpolate_to_tap_mean(scores, tap_sizes, mean_interpolation_coef)
  n_kept = selection.num_kept(scores.size, keep_fraction, offset)
  order = np.argsort(-scores, kind="stable")
  return np.sort(order[offset : offset + n_kept])
