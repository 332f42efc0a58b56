"""The feature cache: pooled training features, keyed by everything that changes them.

    feats, labels, cached = h2t.cache.train_features(backbone, task, taps, config.backbone, cache_dir)

A file `<task>_<split>_<digest>.npz` holds `tap/<name>` arrays, `labels` and
a SHA-256 `checksum` of them. The digest covers the backbone's name,
checkpoint hash and input size, the task, the split, the taps and the pooling
settings. A damaged file (truncated, failing its checksum) is rebuilt. The
cache is an optimisation: a failed write is a warning and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from absl import logging

from h2t import files, multihost, platform

CACHE_VERSION = 1
TRAIN_SPLIT = "train800val200"


def cache_key(backbone, task_name: str, split: str, taps, bcfg, source: str = "") -> str:
  """`<task>_<split>_<digest>` of one extraction's settings.

  `source`: where the images came from when it is not the task's usual
  source (a prepared VTAB-1k folder instead of TFDS); '' keeps the key of
  earlier versions.
  """
  ident = {
    "version": CACHE_VERSION,
    "backbone": backbone.name,
    "checkpoint": backbone.checkpoint_id,
    "input_size": backbone.input_size,
    "task": task_name,
    "split": split,
    "taps": list(taps),
    "target_size": int(bcfg.additional_features_target_size),
    "pool_size": int(bcfg.additional_features_pool_size),
    "cls_token_pool": bcfg.cls_token_pool,
  }
  if source:
    ident["source"] = source
  if bcfg.get("dtype", "float32") != "float32":  # float32 keys stay those of earlier versions
    ident["dtype"] = bcfg.dtype
  # Sized taps ('tap@size') carry their sizes in `taps`.
  digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
  return f"{task_name}_{split}_{digest}"


def checksum(arrays: dict[str, np.ndarray]) -> str:
  h = hashlib.sha256()
  for k in sorted(arrays):
    h.update(k.encode())
    h.update(np.ascontiguousarray(arrays[k]).tobytes())
  return h.hexdigest()


def read(path: str) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
  """`({tap: [n, d]}, labels [n])` of a cache file; a missing or damaged file gives None."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files if k != "checksum"}
      stored = str(z["checksum"])
  except Exception as e:  # noqa: BLE001 -- any unreadable file is rebuilt.
    logging.warning("feature cache %s is unreadable (%s); rebuilding it", path, e)
    return None
  if checksum(arrays) != stored:
    logging.warning("feature cache %s fails its checksum; rebuilding it", path)
    return None
  labels = arrays.pop("labels")
  return {k.split("/", 1)[1]: v for k, v in arrays.items()}, labels


def write(path: str, feats: dict[str, np.ndarray], labels: np.ndarray) -> bool:
  """Writes a cache file atomically; a failure (full or read-only disk) is a warning. Returns success."""
  arrays = {f"tap/{k}": v for k, v in feats.items()}
  arrays["labels"] = labels
  arrays["checksum"] = np.array(checksum(arrays))
  try:
    files.atomic_savez(path, arrays)
  except OSError as e:
    logging.warning("could not write the feature cache %s (%s); going on without it", path, e)
    return False
  return True


def train_features(
  backbone, task, taps, bcfg, cache_dir: str
) -> tuple[dict[str, np.ndarray], np.ndarray, bool]:
  """Pooled features of the 1000 training images: `({tap: [n, d]}, labels [n], from_cache)`.

  With several processes each extracts its share of the images and all get the gathered features.
  """
  source = getattr(task, "folder", "")  # a prepared VTAB-1k folder, not TFDS
  key = cache_key(backbone, task.name, TRAIN_SPLIT, taps, bcfg, source=source)
  path = os.path.join(cache_dir, key + ".npz")
  # Several processes: process 0 alone reads and writes the cache and hands what it read to the others.
  cached = read(path) if multihost.is_writer() else None
  if multihost.writer_decides(cached is not None):
    logging.info("read training features from %s", path)
    feats, labels = multihost.from_writer(*(cached or (None, None)))
    return feats, labels, True
  feats, labels = extract_split(
    backbone,
    task,
    TRAIN_SPLIT,
    taps=taps,
    target_size=int(bcfg.additional_features_target_size),
    batch_size=platform.resolve_batch_size(int(bcfg.batch_size)),
    cls_token_pool=bcfg.cls_token_pool,
    dtype=bcfg.get("dtype", "float32"),
    pool_size=int(bcfg.additional_features_pool_size),
  )
  if multihost.is_writer() and (os.path.isdir(cache_dir) or _makedirs(cache_dir)):
    files.sweep_temporaries(cache_dir, older_than_s=3600)  # a shared cache: spare live writers
    write(path, feats, labels)
  return feats, labels, False


def _makedirs(path: str) -> bool:
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    logging.warning("could not create the feature cache folder %s (%s); going on without it", path, e)
    return False
  return True


def extract_split(backbone, task, split: str, **kwargs) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """`features.extract_task_split`, with the images split over the processes and the features gathered."""
  from h2t import features

  if multihost.count() == 1:
    return features.extract_task_split(backbone, task, split, **kwargs)
  from h2t import platform

  batch_size = platform.resolve_batch_size(int(kwargs.pop("batch_size")))
  mine = multihost.share()
  positions = mine.positions(task.size(split), batch_size)
  parts = list(
    features.extract_batches(
      backbone,
      task.batches(split, batch_size, image_size=backbone.input_size, share=mine),
      total=sum(rows for _, rows in positions),
      batch_size=batch_size,
      **kwargs,
    )
  )
  if not parts:
    raise ValueError(
      f"split {split!r} of task {task.name!r} has fewer batches of {batch_size} than the {multihost.count()} "
      "processes; lower config.backbone.batch_size"
    )
  taps = list(kwargs["taps"])  # network order (the jitted extractor's dicts come back sorted)
  feats = {k: np.concatenate([p[0][k] for p in parts]) for k in taps}
  labels = np.concatenate([p[1] for p in parts])
  logging.info(
    "process %d read and extracted %d of %d images of %s",
    multihost.index(),
    len(labels),
    task.size(split),
    split,
  )
  return multihost.gather_rows(feats, labels, positions, task.size(split))
