"""Head2Toe: select features from every tap with a group-lasso probe, then fit a head.

    head = h2t.head2toe.fit(features, labels, config.learning, seed=8)
    logits = head.predict(test_features)      # features: {tap: [n, d_tap]}

Stage 1 trains a linear head on all taps' features (normalised per tap) with
the ℓ2,1 penalty of `learning.feature_selection.learning_config_overwrite`;
the rows of its kernel score the features; the top `keep_fraction` are kept.
Stage 2 trains a fresh head on the kept features only, renormalised per tap,
with the base learning settings. `feature_selection.type = 'none'` skips
stage 1 (the Linear and regularisation baselines).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from h2t import probe, selection

NORMALIZATIONS = ("unit_vector", "per_feature", "")
PER_FEATURE_EPS = 1e-5
SELECTION_TYPES = ("none",) + selection.CONNECTIVITY_SCORES


def unit_vector(x: np.ndarray) -> np.ndarray:
  """Divides each row of `x [n, d]` by its L2 norm; all-zero rows stay zero."""
  x = np.asarray(x, np.float32)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return np.where(norms > 0, x / np.where(norms > 0, norms, 1), 0).astype(np.float32)


def normalize(
  features: Mapping[str, np.ndarray],
  taps: Sequence[str],
  mode: str,
  stats: Mapping[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
  """Concatenates taps into one matrix, normalised as the reference does.

  Args:
    features: `{tap: [n, d_tap]}`.
    taps: the taps to use, in order.
    mode: 'unit_vector' (each tap's vector scaled to unit L2 norm),
      'per_feature' (each feature standardised, eps 1e-5), or '' (none).
    stats: per-feature mean/var from the training set, for 'per_feature' on
      new data. The reference recomputed them on each evaluated set; reusing
      the training statistics makes a head usable on a single image.

  Returns:
    `(x [n, sum d_tap] float32, stats)`; stats is None except for 'per_feature'.
  """
  if mode not in NORMALIZATIONS:
    raise ValueError(f"feature_normalization={mode!r}; expected one of {NORMALIZATIONS}")
  parts = [np.asarray(features[t], np.float32) for t in taps]
  if mode == "unit_vector":
    parts = [unit_vector(p) for p in parts]
  x = np.concatenate(parts, axis=1)
  if mode != "per_feature":
    return x, None
  if stats is None:
    stats = {"mean": x.mean(axis=0), "var": x.var(axis=0)}
  x = (x - stats["mean"]) / np.sqrt(stats["var"] + PER_FEATURE_EPS)
  return x.astype(np.float32), dict(stats)


def train_spec(learning: ml_collections.ConfigDict, num_classes: int) -> probe.TrainSpec:
  """The static trainer settings of a `config.learning`."""
  return probe.TrainSpec(
    num_classes=num_classes,
    training_steps=int(learning.training_steps),
    batch_size=int(learning.train_batch_size),
    optimizer=learning.optimizer,
    use_cosine_decay=bool(learning.use_cosine_decay),
    grad_clip_value=float(learning.grad_clip_value),
    group_r=probe.norm_order(learning.group_lrp_regularizer_r),
    group_p=probe.norm_order(learning.group_lrp_regularizer_p),
    zero_init=bool(learning.output_head_zeroinit),
  )


def hparams(learning: ml_collections.ConfigDict) -> probe.HParams:
  return probe.HParams(
    learning_rate=float(learning.learning_rate),
    l1=float(learning.l1_regularizer),
    l2=float(learning.l2_regularizer),
    group_coef=float(learning.group_lrp_regularizer_coef),
  )


def selection_learning(learning: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The learning config of the stage-1 (selection) run: base + overwrite."""
  fs = learning.feature_selection
  sel = ml_collections.ConfigDict(learning.to_dict())
  if fs.is_overwrite:
    for k, v in fs.learning_config_overwrite.items():
      if k not in sel:
        raise ValueError(f"learning_config_overwrite.{k}: learning has no option {k!r}")
      sel[k] = v
  return sel


@dataclasses.dataclass
class Head:
  """A trained Head2Toe (or linear) head: kept features + normalisation + weights.

  Attributes:
    kept: `{tap: int indices into that tap's pooled features}`, in tap order;
      taps with no kept feature are absent.
    params: `{'w': [k, classes], 'b': [classes]}`.
    normalization: 'unit_vector', 'per_feature' or ''.
    stats: per-feature mean/var for 'per_feature', else None.
    meta: JSON-able facts needed to reuse the head (backbone name and
      checkpoint id, target size, pooling, classes, ...).
  """

  kept: dict[str, np.ndarray]
  params: dict[str, np.ndarray]
  normalization: str
  stats: dict[str, np.ndarray] | None = None
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def taps(self) -> tuple[str, ...]:
    return tuple(self.kept)

  @property
  def num_features(self) -> int:
    return sum(len(v) for v in self.kept.values())

  def transform(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
    """`{tap: [n, d_tap]}` pooled features -> `[n, num_features]` head inputs."""
    missing = [t for t in self.taps if t not in features]
    if missing:
      raise KeyError(f"features lack the taps {missing} this head was trained on")
    gathered = {t: np.asarray(features[t])[:, idx] for t, idx in self.kept.items()}
    x, _ = normalize(gathered, self.taps, self.normalization, self.stats)
    return x

  def predict(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
    """Logits `[n, classes]`."""
    return np.asarray(probe.predict(self.params, self.transform(features)))

  def save(self, path: str) -> None:
    """Writes the head as one `.npz` file, atomically."""
    arrays = {f"kept/{t}": v for t, v in self.kept.items()}
    arrays.update({f"params/{k}": np.asarray(v) for k, v in self.params.items()})
    if self.stats is not None:
      arrays.update({f"stats/{k}": np.asarray(v) for k, v in self.stats.items()})
    header = {"normalization": self.normalization, "taps": list(self.taps), "meta": self.meta}
    arrays["header"] = np.array(json.dumps(header))
    atomic_savez(path, arrays)

  @classmethod
  def load(cls, path: str) -> Head:
    with np.load(path, allow_pickle=False) as z:
      header = json.loads(str(z["header"]))
      kept = {t: z[f"kept/{t}"] for t in header["taps"]}
      params = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("params/")}
      stats = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("stats/")} or None
    return cls(kept, params, header["normalization"], stats, header["meta"])


def atomic_savez(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """`np.savez` to a temporary file in the same folder, then rename."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp.npz")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _check_learning(learning: ml_collections.ConfigDict) -> None:
  fs = learning.feature_selection
  if fs.type not in SELECTION_TYPES:
    raise ValueError(f"feature_selection.type={fs.type!r}; expected one of {', '.join(SELECTION_TYPES)}")
  if learning.feature_normalization not in NORMALIZATIONS:
    raise ValueError(
      f"feature_normalization={learning.feature_normalization!r}; expected one of {NORMALIZATIONS}"
    )
  if fs.average_over_k < 1:
    raise ValueError(f"feature_selection.average_over_k={fs.average_over_k}; expected >= 1")


def feature_scores(
  features: Mapping[str, np.ndarray],
  labels: np.ndarray,
  learning: ml_collections.ConfigDict,
  *,
  key: jax.Array,
  num_classes: int,
) -> np.ndarray:
  """Stage 1: scores of all features, `[sum d_tap]`, in `features`' tap order.

  Trains `average_over_k` group-lasso heads (different keys) and averages
  their connectivity scores.
  """
  taps = list(features)
  sizes = [features[t].shape[1] for t in taps]
  sel = selection_learning(learning)
  x, _ = normalize(features, taps, sel.feature_normalization)
  groups, num_groups = None, 0
  if sel.group_lrp_is_embedding:
    # Groups are whole taps. Unlike the reference, the coefficient applies here too.
    groups, num_groups = np.repeat(np.arange(len(taps)), sizes).astype(np.int32), len(taps)
  spec, hp = train_spec(sel, num_classes), hparams(sel)
  kind = learning.feature_selection.type
  scores = np.zeros(x.shape[1], np.float64)
  k = int(learning.feature_selection.average_over_k)
  for i in range(k):
    params, _ = probe.train(
      x, labels, hp, jax.random.fold_in(key, i), spec=spec, groups=groups, num_groups=num_groups
    )
    scores += selection.connectivity_scores(kind, np.asarray(params["w"]), sizes)
  return scores / k


def fit(
  features: Mapping[str, np.ndarray],
  labels: np.ndarray,
  learning: ml_collections.ConfigDict,
  *,
  seed: int,
  num_classes: int | None = None,
  meta: Mapping[str, Any] | None = None,
) -> Head:
  """Trains a Head2Toe head (or, with selection type 'none', a plain linear head).

  Args:
    features: `{tap: [n, d_tap]}` pooled training features, in network order.
    labels: `[n]` int labels.
    learning: `config.learning` (see configs/vtab.py).
    seed: makes the run reproducible: same inputs and seed, same head.
    num_classes: defaults to `max(labels) + 1`.
    meta: stored with the head.

  Returns:
    The trained `Head`.
  """
  _check_learning(learning)
  labels = np.asarray(labels, np.int32)
  num_classes = int(num_classes or labels.max() + 1)
  taps = list(features)
  sizes = [features[t].shape[1] for t in taps]
  key_select, key_head = jax.random.split(jax.random.key(seed))
  fs = learning.feature_selection
  meta = dict(meta or {})
  if fs.type == "none":
    kept = {t: np.arange(s, dtype=np.int32) for t, s in zip(taps, sizes, strict=True)}
  else:
    scores = feature_scores(features, labels, learning, key=key_select, num_classes=num_classes)
    idx = selection.top_fraction(
      scores,
      float(fs.keep_fraction),
      offset=int(fs.keep_fraction_offset),
      tap_sizes=sizes,
      mean_interpolation_coef=float(fs.mean_interpolation_coef),
    )
    kept = {t: v for t, v in selection.indices_per_tap(idx, taps, sizes).items() if len(v)}
    meta["tap_mean_scores"] = {
      t: float(s.mean()) for t, s in zip(taps, selection.split_by_tap(scores, sizes))
    }
  gathered = {t: np.asarray(features[t])[:, idx] for t, idx in kept.items()}
  x, stats = normalize(gathered, list(kept), learning.feature_normalization)
  params, losses = probe.train(x, labels, hparams(learning), key_head, spec=train_spec(learning, num_classes))
  meta.update(num_classes=num_classes, final_train_loss=float(losses[-1]))
  params = {k: np.asarray(v) for k, v in params.items()}
  return Head(kept, params, learning.feature_normalization, stats, meta)
