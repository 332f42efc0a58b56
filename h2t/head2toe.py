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
import functools
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from h2t import probe, selection

NORMALIZATIONS = ("unit_vector", "per_feature", "")
PER_FEATURE_EPS = 1e-5
SELECTION_TYPES = ("none",) + selection.CONNECTIVITY_SCORES + selection.DATA_SCORES


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
  hidden_units, hidden_trainable = probe.parse_output_head_type(
    learning.get("output_head_type", "nohidden"), num_classes
  )
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
    hidden_units=hidden_units,
    hidden_trainable=hidden_trainable,
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
    params: `{'w': [k, classes], 'b': [classes]}`; with a hidden layer
      (`output_head_type` random_N / trainable_N) also `{'hidden_w': [k, N],
      'hidden_b': [N]}` and `w` is `[N, classes]`.
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

  def predict_images(self, images, backbone=None) -> tuple[np.ndarray, np.ndarray]:
    """Classifies raw images: `(labels [n], probs [n, classes])`; see `h2t.predict.predict_images`."""
    from h2t import predict

    return predict.predict_images(self, images, backbone)

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


def _readable(fd: int) -> None:
  """mkstemp makes files 0600; results are ordinary files (0666 less the umask)."""
  umask = os.umask(0)
  os.umask(umask)
  os.fchmod(fd, 0o666 & ~umask)


def atomic_savez(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """`np.savez` to a temporary file in the same folder, then rename."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp.npz")
  try:
    _readable(fd)
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
  probe.parse_output_head_type(learning.get("output_head_type", "nohidden"), 1)


FINAL_FOLD = 1000  # key id of a fit on all training examples (CV folds are 0..4)


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
    return _unit_vector_per_tap(self.x, self.tap_of, len(self.taps))


@functools.partial(jax.jit, static_argnames=("num_taps",))
def _unit_vector_per_tap(x: jax.Array, tap_of: jax.Array, num_taps: int) -> jax.Array:
  # Jitted: eagerly this took 1.07 s on [1000, 42488], jitted 0.20 s.
  sq = jax.ops.segment_sum((x * x).T, tap_of, num_taps, indices_are_sorted=True).T
  norms = jnp.sqrt(sq)[:, tap_of]
  return jnp.where(norms > 0, x / jnp.where(norms > 0, norms, 1.0), 0.0)


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
  """`{tap: [n, d_tap]}` (in network order) -> `Prepared`."""
  taps = tuple(features)
  sizes = tuple(int(features[t].shape[1]) for t in taps)
  x = jnp.asarray(np.concatenate([np.asarray(features[t], np.float32) for t in taps], axis=1))
  tap_of = jnp.asarray(np.repeat(np.arange(len(taps)), sizes).astype(np.int32))
  return Prepared(taps, sizes, x, tap_of)


def program_key(learning: ml_collections.ConfigDict) -> str:
  """What must be equal for grid points to share one compiled program.

  Everything except the traced values: learning rate, L1/L2/group
  coefficients, keep fraction and offset.
  """
  traced = {"learning_rate", "l1_regularizer", "l2_regularizer", "group_lrp_regularizer_coef"}
  d = {k: v for k, v in learning.to_dict().items() if k not in traced}
  fs = dict(d.pop("feature_selection"))
  fs.pop("keep_fraction")
  fs.pop("keep_fraction_offset")
  overwrite = {k: v for k, v in fs.pop("learning_config_overwrite").items() if k not in traced}
  return json.dumps([d, fs, overwrite], sort_keys=True, default=str)


def _device_scores(kind: str, w: jax.Array, tap_of: jax.Array, num_taps: int) -> jax.Array:
  """Connectivity scores of `w [..., D, C]` -> `[..., D]` (see selection.connectivity_scores)."""
  if kind == "connectivity_l2":
    return (w**2).sum(-1)
  if kind == "connectivity_l1":
    return jnp.abs(w).sum(-1)
  if kind == "connectivity_linf":
    return jnp.abs(w).max(-1)
  norms = jnp.sqrt((w**2).sum(-1))
  flat = norms.reshape(-1, norms.shape[-1])
  counts = jax.ops.segment_sum(jnp.ones_like(tap_of, jnp.float32), tap_of, num_taps)
  means = jax.vmap(lambda r: jax.ops.segment_sum(r, tap_of, num_taps) / counts)(flat)
  return means[:, tap_of].reshape(norms.shape)


def _fold_keys(seed: int, fold_ids: Sequence[int]) -> jax.Array:
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(fold_ids))


class HeadSharding:
  """Spreads the grid's heads (grid points, or distinct stage-1 settings) over the local devices.

  With one device it does nothing. With several, a head axis is padded to a
  multiple of the device count (repeating its last head, whose copies are
  dropped afterwards) and placed with a `NamedSharding` along a 1-D mesh
  axis 'heads'; the features and fold indices are replicated. Under `jit`,
  XLA partitions the vmapped programs along that axis: each device trains
  its share of the heads, on the whole minibatch. A head's arithmetic does
  not depend on which device runs it.
  """

  def __init__(self, devices: Sequence[jax.Device] | None = None):
    self.devices = list(devices if devices is not None else jax.local_devices())
    self.mesh = jax.sharding.Mesh(np.asarray(self.devices), ("heads",)) if len(self.devices) > 1 else None

  @property
  def size(self) -> int:
    return len(self.devices)

  def padded(self, n: int) -> int:
    return -(-n // self.size) * self.size

  def pad(self, a, axis: int = 0):
    """Pads `a`'s head `axis` to `padded` by repeating its last entry."""
    a = jnp.asarray(a)
    n = a.shape[axis]
    extra = self.padded(n) - n
    if extra == 0:
      return a
    last = jax.lax.slice_in_dim(a, n - 1, n, axis=axis)
    return jnp.concatenate([a, jnp.repeat(last, extra, axis=axis)], axis=axis)

  def shard(self, a, axis: int = 0):
    """`a` padded along `axis` and split over the devices along it."""
    a = self.pad(a, axis)
    if self.mesh is None:
      return a
    spec = [None] * a.ndim
    spec[axis] = "heads"
    return jax.device_put(a, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec)))

  def replicate(self, a):
    if self.mesh is None:
      return a
    return jax.device_put(a, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))


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
  """Kept indices and masks `[F, P, K]` from scores `[F, P, D]`."""
  dim = prep.dim
  if any(float(lr.feature_selection.mean_interpolation_coef) > 0 for lr in learnings):
    scores = np.array(scores)
    for p, lr in enumerate(learnings):
      coef = float(lr.feature_selection.mean_interpolation_coef)
      for f in range(scores.shape[0]):
        scores[f, p] = selection.interpolate_to_tap_mean(scores[f, p], prep.sizes, coef)
  num_kept = np.asarray([int(dim * float(lr.feature_selection.keep_fraction)) for lr in learnings])
  offsets = np.asarray([int(lr.feature_selection.keep_fraction_offset) for lr in learnings])
  for lr, n_kept in zip(learnings, num_kept, strict=True):
    kf = float(lr.feature_selection.keep_fraction)
    if not 0 < kf <= 1 or n_kept < 1:
      raise ValueError(f"keep_fraction={kf} of {dim} features keeps none; expected a fraction in (0, 1]")
  select = jax.vmap(jax.vmap(probe.select_top, in_axes=(0, 0, 0, None)), in_axes=(0, None, None, None))
  return select(
    jnp.asarray(scores, jnp.float32), jnp.asarray(num_kept), jnp.asarray(offsets), int(num_kept.max())
  )


def selection_keys(seed: int, fold_ids: Sequence[int]) -> jax.Array:
  """`[F]` keys of the stage-1 (selection) runs of `run_grid`'s folds."""
  return jax.vmap(lambda k: jax.random.fold_in(k, 0))(_fold_keys(seed, fold_ids))


def connectivity_scores(
  prep: Prepared,
  labels: np.ndarray,
  learnings: Sequence[ml_collections.ConfigDict],
  train_idx: jax.Array,
  keys: jax.Array,
  *,
  num_classes: int,
  repeats: Sequence[int] = (0,),
  heads: HeadSharding | None = None,
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
  """
  heads = heads or HeadSharding()
  fs = learnings[0].feature_selection
  mode = learnings[0].feature_normalization
  sel = [selection_learning(lr) for lr in learnings]
  hp_rows = [tuple(hparams(s_)) for s_ in sel]
  unique = list(dict.fromkeys(hp_rows))
  row_of = np.asarray([unique.index(r) for r in hp_rows])
  hp1 = probe.HParams(*[heads.shard(jnp.asarray(col, jnp.float32)) for col in zip(*unique, strict=True)])
  groups, num_groups = None, 0
  if sel[0].group_lrp_is_embedding:
    # Groups are whole taps. Unlike the reference, the coefficient applies here too.
    groups, num_groups = prep.tap_of, len(prep.taps)
  x1 = heads.replicate(prep.unit_vector() if mode == "unit_vector" else prep.x)
  stage1 = jax.vmap(
    functools.partial(
      probe.train_all_features,
      spec=train_spec(sel[0], num_classes),
      groups=groups,
      num_groups=num_groups,
      per_feature=mode == "per_feature",
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
    scores = scores + _device_scores(fs.type, w, prep.tap_of, len(prep.taps))
  return (scores / len(repeats))[:, row_of]  # [F, P, D]; padding heads dropped


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
  """
  for learning in learnings:
    _check_learning(learning)
  if len({program_key(lr) for lr in learnings}) != 1:
    raise ValueError("run_grid: the grid points do not share one program; group them with program_key")
  base = learnings[0]
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
    x_np, y_np = np.asarray(sprep.x), np.asarray(s_labels)
    k = int(fs.average_over_k)
    scores = np.stack(
      [
        np.mean(
          [
            selection.data_scores(fs.type, x_np[tr], y_np[tr], seed=seed * 1000 + fid * 10 + r)
            for r in range(k)
          ],
          0,
        )
        for tr, fid in zip(np.asarray(s_train_idx), fold_ids, strict=True)
      ]
    )
    scores = np.broadcast_to(scores[:, None], (num_folds, num_points, dim))
    kept_idx, kept_mask = _select(scores, learnings, prep)
  else:
    scores = connectivity_scores(
      sprep,
      s_labels,
      learnings,
      s_train_idx,
      keys_select,
      num_classes=s_classes,
      repeats=range(int(fs.average_over_k)),
      heads=heads,
    )
    kept_idx, kept_mask = _select(scores, learnings, prep)

  hp2 = probe.HParams(
    *[
      heads.shard(jnp.asarray(col, jnp.float32))
      for col in zip(*[tuple(hparams(lr)) for lr in learnings], strict=True)
    ]
  )
  x = heads.replicate(prep.x)
  kept_idx_h, kept_mask_h = heads.shard(kept_idx, axis=1), heads.shard(kept_mask, axis=1)
  params, losses = probe.train_kept_features_folds(
    x,
    y,
    train_idx,
    kept_idx_h,
    kept_mask_h,
    prep.tap_of,
    hp2,
    keys_head,
    spec=train_spec(base, num_classes),
    num_taps=len(prep.taps),
    mode=mode,
  )
  accuracy = None
  if folds[0][1] is not None:
    eval_idx = jnp.asarray(np.stack([f[1] for f in folds]), jnp.int32)
    acc_fn = jax.vmap(
      functools.partial(probe.kept_accuracy, num_taps=len(prep.taps), mode=mode),
      in_axes=(None, None, 0, 0, 0, 0, None, 0),
    )
    correct = np.asarray(acc_fn(x, y, train_idx, eval_idx, kept_idx_h, kept_mask_h, prep.tap_of, params))
    accuracy = correct[:, :num_points].astype(np.float64) / eval_idx.shape[1]
  return GridRun(
    kept_idx=np.asarray(kept_idx),
    kept_mask=np.asarray(kept_mask),
    params={k: np.asarray(v)[:, :num_points] for k, v in params.items()},
    losses=np.asarray(losses)[:, :num_points],
    accuracy=accuracy,
  )


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


def cross_validate(
  prep: Prepared,
  labels: np.ndarray,
  learnings: Sequence[ml_collections.ConfigDict],
  *,
  seed: int,
  num_classes: int,
  num_folds: int = 5,
  select_from: SelectionSource | None = None,
) -> np.ndarray:
  """Validation accuracy `[P, num_folds]` of each grid point on the reference's folds.

  Points are grouped by `program_key`; each group is one `run_grid` call
  (with `data_fraction`, folds whose subsets differ in size run apart).
  `select_from` (`fs_dataset`) selects on another task's same folds.
  """
  from h2t.data import base as data_base

  folds = [data_base.fold_indices(f, len(labels), num_folds) for f in range(num_folds)]
  s_train = None
  if select_from is not None:
    s_train = [data_base.fold_indices(f, len(select_from.labels), num_folds)[0] for f in range(num_folds)]
  acc = np.zeros((len(learnings), num_folds))
  groups: dict[str, list[int]] = {}
  for i, lr in enumerate(learnings):
    groups.setdefault(program_key(lr), []).append(i)
  for members in groups.values():
    subsets = [(training_subset(tr, labels, learnings[members[0]], num_classes), ev) for tr, ev in folds]
    by_size: dict[int, list[int]] = {}
    for f, (tr, _) in enumerate(subsets):
      by_size.setdefault(len(tr), []).append(f)
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
      acc[np.ix_(members, fold_ids)] = run.accuracy.T
  return acc


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
  _check_learning(learning)
  labels = np.asarray(labels, np.int32)
  num_classes = int(num_classes or labels.max() + 1)
  prep = prepare(features)
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
  return head_from_run(prep, run, 0, 0, learning, meta=meta, train_idx=train)


def head_from_run(
  prep: Prepared,
  run: GridRun,
  fold: int,
  point: int,
  learning: ml_collections.ConfigDict,
  *,
  meta: Mapping[str, Any] | None = None,
  train_idx: np.ndarray | None = None,
) -> Head:
  """The `Head` of one (fold, point) of a `run_grid` fitted on all training data.

  `train_idx`: the examples the run trained on (default all), for the
  'per_feature' statistics.
  """
  mask = run.kept_mask[fold, point] > 0
  global_idx = run.kept_idx[fold, point][mask]
  kept = {t: v for t, v in selection.indices_per_tap(global_idx, prep.taps, prep.sizes).items() if len(v)}
  first = probe.first_kernel_name(run.params)
  params = {k: v[fold, point][mask] if k == first else v[fold, point] for k, v in run.params.items()}
  stats = None
  if learning.feature_normalization == "per_feature":
    x = np.asarray(prep.x)[:, global_idx]
    if train_idx is not None:
      x = x[np.asarray(train_idx)]
    stats = {"mean": x.mean(axis=0), "var": x.var(axis=0)}
  meta = dict(meta or {})
  meta.update(num_classes=int(params["b"].shape[0]), final_train_loss=float(run.losses[fold, point, -1]))
  return Head(kept, params, learning.feature_normalization, stats, meta)
