"""What the probes read: device-resident features, a selection source, checked labels.

`prepare` lays a task's pooled features out for the compiled programs
(`Prepared`); `SelectionSource` holds another task's features to select on
(`fs_dataset`); `check_labels` and `training_subset` decide which labelled
examples a run trains on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from h2t import normalize


@dataclasses.dataclass(frozen=True)
class Prepared:
  """Features of one target size, laid out for the compiled programs.

  Attributes:
    taps: tap names in network order.
    sizes: each tap's width.
    x: `[n, D]` raw features on the device, taps concatenated.
    tap_of: `[D]` int32 tap id of each feature.
  """

  taps: tuple[str, ...]
  sizes: tuple[int, ...]
  x: jax.Array
  tap_of: jax.Array

  @property
  def dim(self) -> int:
    return int(sum(self.sizes))

  def unit_vector(self) -> jax.Array:
    """`x` with each tap's vector scaled to unit norm (stage-1 input)."""
    return normalize.unit_vector_jit(self.x, self.tap_of, len(self.taps))


@dataclasses.dataclass(frozen=True)
class SelectionSource:
  """Another task's training features to select on (the reference's `fs_dataset`).

  Stage 1 (or the data scores) reads these instead of the training task's;
  stage 2 trains on the training task's kept features. Both must come from
  the same backbone, taps and pooling.

  Attributes:
    prep: the other task's features.
    labels: `[n']` its labels.
    num_classes: its classes (the width of the selection head).
    name: its name, for messages.
  """

  prep: Prepared
  labels: np.ndarray
  num_classes: int
  name: str = "fs_dataset"

  @classmethod
  def from_features(
    cls, features: Mapping[str, np.ndarray], labels: np.ndarray, num_classes: int | None = None, name=""
  ) -> SelectionSource:
    labels = np.asarray(labels, np.int32)
    return cls(prepare(features), labels, int(num_classes or labels.max() + 1), name or "fs_dataset")

  def check_matches(self, prep: Prepared) -> None:
    if (self.prep.taps, self.prep.sizes) != (prep.taps, prep.sizes):
      raise ValueError(
        f"fs_dataset {self.name!r}: its features have taps/sizes {list(zip(self.prep.taps, self.prep.sizes))}, "
        f"the training task's {list(zip(prep.taps, prep.sizes))}; both must come from the same backbone "
        "and pooling settings"
      )


def prepare(features: Mapping[str, np.ndarray]) -> Prepared:
  """`{tap: [n, d_tap]}` (in network order) -> `Prepared`; non-finite features are an error."""
  taps = tuple(features)
  if not taps:
    raise ValueError("no features: expected {tap: [n, d_tap]} with at least one tap")
  rows = {t: np.shape(features[t]) for t in taps}
  bad_rank = [t for t, shape in rows.items() if len(shape) != 2]
  if bad_rank:
    raise ValueError(
      f"tap {bad_rank[0]!r} has shape {rows[bad_rank[0]]}; expected [n, d_tap] (pool it first)"
    )
  if len({shape[0] for shape in rows.values()}) > 1:
    raise ValueError(f"the taps hold different numbers of examples: { ({t: s[0] for t, s in rows.items()}) }")
  for t in taps:
    bad = ~np.isfinite(np.asarray(features[t]))
    if bad.any():
      rows = np.flatnonzero(bad.any(axis=1))
      raise ValueError(
        f"tap {t!r} holds {int(bad.sum())} non-finite feature value(s) (NaN or inf), in example(s) "
        f"{rows[:5].tolist()}{'...' if len(rows) > 5 else ''}; check the features before fitting"
      )
  sizes = tuple(int(features[t].shape[1]) for t in taps)
  x = jnp.asarray(np.concatenate([np.asarray(features[t], np.float32) for t in taps], axis=1))
  tap_of = jnp.asarray(np.repeat(np.arange(len(taps)), sizes).astype(np.int32))
  return Prepared(taps, sizes, x, tap_of)


def check_labels(labels, num_classes: int | None = None) -> np.ndarray:
  """`labels` as int32 `[n]` for `fit`: whole numbers in `[0, num_classes)` (any non-negative when None)."""
  from h2t.data import base as data_base

  limit = np.iinfo(np.int32).max if num_classes is None else int(num_classes)
  try:
    return data_base.check_labels(labels, limit, where="fit(labels)")
  except ValueError as e:
    if num_classes is not None:
      raise
    # No class count was given: do not show the stand-in bound.
    raise ValueError(str(e).split("; num_classes is")[0].replace(f"[0, {limit})", "[0, classes)")) from None


def training_subset(
  train_idx: np.ndarray, labels: np.ndarray, learning: ml_collections.ConfigDict, num_classes: int
) -> np.ndarray:
  """The examples of `train_idx` a run trains on: all, or `data_fraction`'s balanced k-shot subset.

  k = max(int(1000 * data_fraction / classes), 1) examples per class, the
  first k of each class in `train_idx` order (`base.balanced_subset_indices`).
  Unlike the reference, which drew the subset from the whole training split
  whatever the fold, a CV fold draws it from its own training examples.
  """
  from h2t.data import base as data_base

  fraction = float(learning.get("data_fraction", 1.0))
  train_idx = np.asarray(train_idx)
  return train_idx[data_base.balanced_subset_indices(np.asarray(labels)[train_idx], num_classes, fraction)]


def fit_inputs(
  features: Mapping[str, np.ndarray], labels, learning: ml_collections.ConfigDict, num_classes: int | None
) -> tuple[Prepared, np.ndarray, int]:
  """A fit's checked inputs: `(Prepared features, labels [n] int32, num_classes)`."""
  from h2t import config as config_lib

  config_lib.check_learning(learning)
  labels = check_labels(labels, num_classes)
  num_classes = int(num_classes or labels.max() + 1)
  prep = prepare(features)
  if prep.x.shape[0] != len(labels):
    raise ValueError(
      f"{prep.x.shape[0]} examples of features but {len(labels)} labels; expected one label each"
    )
  return prep, labels, num_classes
