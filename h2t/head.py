"""A trained head: kept features, normalisation, weights, and what it needs to be used again.

    head = h2t.head.Head.load("workdir/digits/head_head2toe.npz")
    logits = head.predict(features)              # {tap: [n, d_tap]} -> [n, classes]
    labels, probs = head.predict_images(images)  # [n, h, w, 3] pixels in [0, 255]

A head file is one `.npz`: `kept/<tap>` int indices, `params/<name>` weights,
`stats/mean|var` for 'per_feature', and `header`, a JSON string with the
normalisation, the tap order and the metadata (`HeadMeta`). Files are read
with `allow_pickle=False` and checked before use; a file that is not a head
raises `HeadFileError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from h2t import files, normalize, probe

BATCH_SIZE = 64  # config.backbone.batch_size's default: batches pad to it, as in the run.


class HeadFileError(ValueError):
  """A head file that cannot be read or does not hold a consistent head."""


# HeadMeta.extra key of a method that picks its own settings by its own CV (ridge, head2toe_plus):
# {'chosen': {setting: value}, 'cv_accuracy': float}.
OWN_CV = "own_cv"


@dataclasses.dataclass
class HeadMeta:
  """What a head records about how it was made (written by `h2t.evaluate`).

  Attributes:
    backbone, checkpoint_id, input_size: the network the features came from.
    target_size, pool_size, cls_token_pool: the pooling of its taps.
    dtype: the backbone's forward-pass dtype ('float32' or 'bfloat16').
    task, num_classes, class_names: the task it classifies.
    grid_point: the chosen grid point's overrides.
    final_train_loss: the last minibatch loss (None for closed-form heads).
    extra: any other facts (e.g. ridge's `ridge_l2_reg`).
  """

  backbone: str = ""
  checkpoint_id: str = ""
  input_size: int = 0
  target_size: int = 0
  pool_size: int = 0
  cls_token_pool: str = "normal"
  dtype: str = "float32"
  task: str = ""
  num_classes: int = 0
  class_names: list[str] = dataclasses.field(default_factory=list)
  grid_point: dict[str, Any] = dataclasses.field(default_factory=dict)
  final_train_loss: float | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None) -> HeadMeta:
    """From a header's JSON dict; keys this version does not know go to `extra`."""
    d = dict(d or {})
    known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    extra = dict(d.pop("extra", {}) or {})
    extra.update({k: d.pop(k) for k in list(d) if k not in known})
    return cls(**d, extra=extra)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    extra = d.pop("extra")
    d.update(extra)
    return d

  # Mapping-style access, as heads of earlier versions stored a plain dict.
  def __getitem__(self, key: str) -> Any:
    d = self.to_dict()
    return d[key]

  def __setitem__(self, key: str, value: Any) -> None:
    if key in {f.name for f in dataclasses.fields(self)} - {"extra"}:
      setattr(self, key, value)
    else:
      self.extra[key] = value

  def __contains__(self, key: str) -> bool:
    return key in self.to_dict()

  def get(self, key: str, default: Any = None) -> Any:
    return self.to_dict().get(key, default)


@dataclasses.dataclass
class Head:
  """A trained Head2Toe (or linear, or ridge) head.

  Attributes:
    kept: `{tap: int indices into that tap's pooled features}`, in tap order;
      taps with no kept feature are absent.
    params: `{'w': [k, classes], 'b': [classes]}`; with a hidden layer
      (`output_head_type` random_N / trainable_N) also `{'hidden_w': [k, N],
      'hidden_b': [N]}` and `w` is `[N, classes]`.
    normalization: 'unit_vector', 'per_feature' or ''.
    stats: per-feature `{'mean': [k], 'var': [k]}` for 'per_feature', else None.
    meta: how the head was made (`HeadMeta`; a dict is converted).
  """

  kept: dict[str, np.ndarray]
  params: dict[str, np.ndarray]
  normalization: str
  stats: dict[str, np.ndarray] | None = None
  meta: HeadMeta = dataclasses.field(default_factory=HeadMeta)

  def __post_init__(self):
    if not isinstance(self.meta, HeadMeta):
      self.meta = HeadMeta.from_dict(self.meta)

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
    x, _ = normalize.features_matrix(gathered, self.taps, self.normalization, self.stats)
    return x

  def predict(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
    """Logits `[n, classes]`."""
    return np.asarray(probe.predict(self.params, self.transform(features)))

  def predict_images(self, images, backbone=None) -> tuple[np.ndarray, np.ndarray]:
    """Classifies raw images: `(labels [n], probs [n, classes])`; see `predict_images`."""
    return predict_images(self, images, backbone)

  def save(self, path: str) -> None:
    """Writes the head as one `.npz` file, atomically."""
    arrays = {f"kept/{t}": v for t, v in self.kept.items()}
    arrays.update({f"params/{k}": np.asarray(v) for k, v in self.params.items()})
    if self.stats is not None:
      arrays.update({f"stats/{k}": np.asarray(v) for k, v in self.stats.items()})
    header = {"normalization": self.normalization, "taps": list(self.taps), "meta": self.meta.to_dict()}
    arrays["header"] = np.array(json.dumps(files.strict_json(header)))
    files.atomic_savez(path, arrays)

  @classmethod
  def load(cls, path: str) -> Head:
    """Reads a head file; anything but a consistent head raises `HeadFileError` naming `path`."""
    try:
      with np.load(path, allow_pickle=False) as z:
        names = set(z.files)
        if "header" not in names:
          raise HeadFileError(f"{path} has no 'header' entry: it is not a head written by h2t")
        header = json.loads(str(z["header"]))
        kept = {t: np.asarray(z[f"kept/{t}"]) for t in header["taps"]}
        params = {k.split("/", 1)[1]: np.asarray(z[k]) for k in names if k.startswith("params/")}
        stats = {k.split("/", 1)[1]: np.asarray(z[k]) for k in names if k.startswith("stats/")} or None
        head = cls(kept, params, header["normalization"], stats, HeadMeta.from_dict(header.get("meta")))
    except HeadFileError:
      raise
    except FileNotFoundError:
      raise
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError, TypeError) as e:
      raise HeadFileError(
        f"{path} is not a readable head file ({type(e).__name__}: {e}); pass a head_<method>.npz "
        "written by an h2t run"
      ) from None
    head.check(path)
    return head

  def check(self, path: str = "the head") -> None:
    """Raises `HeadFileError` unless shapes, indices and normalisation agree."""
    first = probe.first_kernel_name(self.params) if self.params else None
    problems = []
    if first is None or "b" not in self.params:
      problems.append("it has no kernel 'w' and bias 'b'")
    elif self.params[first].ndim != 2 or self.params[first].shape[0] != self.num_features:
      problems.append(
        f"its kernel {first} has shape {self.params[first].shape}, but it keeps {self.num_features} features"
      )
    elif self.params["w"].shape[-1] != self.params["b"].shape[-1]:
      problems.append(f"kernel w {self.params['w'].shape} and bias b {self.params['b'].shape} disagree")
    if self.normalization not in normalize.NORMALIZATIONS:
      problems.append(f"unknown normalisation {self.normalization!r}")
    for t, idx in self.kept.items():
      if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or (idx.size and idx.min() < 0):
        problems.append(f"kept/{t} is not a list of non-negative integer indices")
    for k, v in self.params.items():
      if not np.issubdtype(v.dtype, np.floating) or not np.isfinite(v).all():
        problems.append(f"params/{k} is not finite floating point")
    if problems:
      raise HeadFileError(f"{path} is not a consistent head: {'; '.join(problems)}")


# What a head must record to be used again (h2t.evaluate writes all of them).
REQUIRED_META = ("backbone", "checkpoint_id", "input_size", "target_size", "pool_size", "cls_token_pool")


def _require_meta(head: Head) -> HeadMeta:
  meta = head.meta if isinstance(head.meta, HeadMeta) else HeadMeta.from_dict(head.meta)
  missing = [k for k in ("backbone", "checkpoint_id", "input_size") if not getattr(meta, k)]
  if missing:
    raise ValueError(
      f"the head's meta lacks {', '.join(missing)}, so its backbone and pooling are unknown: it was not "
      "saved by a run (h2t.evaluate)"
    )
  return meta


def backbone_for(head: Head, checkpoint: str | None = None):
  """Rebuilds the backbone a head was trained on (`checkpoint`: its weights file, None: packaged)."""
  from h2t import backbones
  from h2t.checkpoints import CheckpointError

  meta = _require_meta(head)
  try:
    backbone = backbones.create(meta.backbone, checkpoint, input_size=int(meta.input_size))
  except CheckpointError:
    if checkpoint is not None:
      raise
    raise ValueError(
      f"the head was trained on backbone {meta.backbone!r}, which has no packaged weights: pass the "
      f"weights file it was trained with ({meta.checkpoint_id}) as --checkpoint=PATH"
    ) from None
  check_backbone(head, backbone)
  return backbone


def check_backbone(head: Head, backbone) -> None:
  """Raises ValueError unless `backbone` is the network (name, weights, input size) of `head`."""
  meta = _require_meta(head)
  wanted = (meta.backbone, meta.checkpoint_id, int(meta.input_size))
  got = (backbone.name, backbone.checkpoint_id, backbone.input_size)
  if wanted != got:
    raise ValueError(
      f"the head was trained on backbone {wanted[0]!r} with checkpoint {wanted[1]!r} at {wanted[2]} px, "
      f"but the backbone is {got[0]!r} with checkpoint {got[1]!r} at {got[2]} px; "
      "pass the checkpoint file the head was trained with (--checkpoint=PATH)"
    )


def parameter_bytes(tree) -> int:
  """Bytes of all arrays in a parameter tree (what storing the network costs)."""
  import jax

  return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree)))


def _as_batch(images, size: int) -> np.ndarray:
  """A list of images of any sizes, or an array, -> one `[n, h, w, c]` array."""
  if isinstance(images, np.ndarray):
    return images
  images = [np.asarray(im) for im in images]
  if not images:
    return np.zeros((0, size, size, 3), np.uint8)
  if len({im.shape for im in images}) == 1:
    return np.stack(images)
  # Mixed sizes: resize each alone to the input size, exactly as the backbone would.
  import jax
  import jax.numpy as jnp

  out = []
  for im in images:
    x = jnp.asarray(im, jnp.float32)
    x = x[..., None] if x.ndim == 2 else x
    x = jnp.broadcast_to(x, x.shape[:2] + (3,)) if x.shape[-1] == 1 else x
    out.append(np.asarray(jax.image.resize(x, (size, size, 3), method="linear", antialias=False)))
  return np.stack(out)


def predict_images(head: Head, images, backbone=None, *, batch_size: int = BATCH_SIZE):
  """Classifies images with a trained head.

  Args:
    head: a trained `Head` (its meta names the backbone and pooling).
    images: `[n, h, w, 3]` (or grey `[n, h, w]`) pixels in [0, 255], any
      numeric dtype, or a list of such images of any sizes. They are resized
      bilinearly to the backbone's input size, as in training.
    backbone: the head's backbone; None builds it from the head's meta (pass
      one when calling repeatedly: building takes a second or two).
    batch_size: images per forward pass.

  Returns:
    `(labels [n] int32, probs [n, num_classes] float32)`: the most probable
    class and the softmax probabilities.
  """
  from h2t import features

  if backbone is None:
    backbone = backbone_for(head)
  else:
    check_backbone(head, backbone)
  meta = head.meta
  x = _as_batch(images, backbone.input_size)
  num_classes = int(head.params["b"].shape[-1])
  if len(x) == 0:
    return np.zeros((0,), np.int32), np.zeros((0, num_classes), np.float32)
  feats = features.extract(
    backbone,
    x,
    taps=list(head.taps),
    target_size=int(meta.target_size),
    batch_size=batch_size,
    cls_token_pool=meta.cls_token_pool,
    pool_size=int(meta.pool_size),
    dtype=meta.dtype,
  )
  logits = head.predict(feats).astype(np.float64)
  logits -= logits.max(axis=1, keepdims=True)
  probs = np.exp(logits)
  probs /= probs.sum(axis=1, keepdims=True)
  return logits.argmax(axis=1).astype(np.int32), probs.astype(np.float32)


def from_grid_run(
  prep,
  run,
  fold: int,
  point: int,
  learning,
  *,
  meta: Mapping[str, Any] | None = None,
  train_idx: np.ndarray | None = None,
) -> Head:
  """The `Head` of one (fold, point) of `h2t.head2toe.run_grid`'s `GridRun` fitted on all training data.

  `prep`: the run's `h2t.inputs.Prepared` features.

  `train_idx`: the examples the run trained on (default all), for the
  'per_feature' statistics.
  """
  from h2t import selection

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
  meta = HeadMeta.from_dict(meta.to_dict() if isinstance(meta, HeadMeta) else meta)
  meta.num_classes = int(params["b"].shape[0])
  meta.final_train_loss = float(run.losses[fold, point, -1])
  return Head(kept, params, learning.feature_normalization, stats, meta)
