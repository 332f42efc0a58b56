"""One task end to end: extract, fit Head2Toe and the baselines, test, report.

    results = h2t.evaluate.run(config, workdir)

Workdir layout:
  results.json            config, accuracies, kept features per tap, timings
  head_<method>.npz       each trained head (`h2t.head2toe.Head.load`)
  cache/*.npz             pooled training features, reused by later runs
  log.txt                 the run's log
  events.out.tfevents.*   TensorBoard scalars (clu metric writers)
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from h2t import backbones, data, features, head2toe
from h2t.data import base

METHODS = ("head2toe", "linear")
EVAL_MODES = ("test", "valid")
LINEAR_TAP = "pre_logits"
CACHE_VERSION = 1


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any heavy work, on values h2t does not know."""
  if config.backbone.name not in backbones.NAMES:
    raise ValueError(
      f"unknown backbone {config.backbone.name!r} (config.backbone.name); "
      f"expected one of {', '.join(backbones.NAMES)}"
    )
  if config.dataset not in data.task_names():
    raise ValueError(
      f"unknown task {config.dataset!r} (config.dataset); expected one of {', '.join(data.task_names())}"
    )
  if config.eval_mode not in EVAL_MODES:
    raise ValueError(f"config.eval_mode={config.eval_mode!r}; expected one of {', '.join(EVAL_MODES)}")
  methods = tuple(config.methods)
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    raise ValueError(f"config.methods={methods!r}; expected a non-empty subset of {', '.join(METHODS)}")
  if config.backbone.cls_token_pool not in features.CLS_TOKEN_POOL_MODES:
    raise ValueError(
      f"config.backbone.cls_token_pool={config.backbone.cls_token_pool!r}; "
      f"expected one of {', '.join(features.CLS_TOKEN_POOL_MODES)}"
    )
  head2toe._check_learning(config.learning)  # noqa: SLF001 -- same package


def resolve_taps(backbone: backbones.Backbone, backbone_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The taps a run uses, in network order ('all' = every tap)."""
  spec = backbone_config.additional_features.strip()
  if spec == "all":
    taps = list(backbone.tap_names)
  else:
    wanted = [t.strip() for t in spec.split(",") if t.strip()]
    features.check_taps(backbone, wanted)
    # The reference always adds its output key (pre_logits) to the extra taps.
    wanted_set = set(wanted) | {LINEAR_TAP}
    taps = [t for t in backbone.tap_names if t in wanted_set]
  if backbone_config.include_input:
    taps = ["input"] + taps
  return tuple(taps)


def _cache_key(backbone, task_name: str, split: str, taps, bcfg) -> str:
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
  digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
  return f"{task_name}_{split}_{digest}"


def _checksum(arrays: dict[str, np.ndarray]) -> str:
  h = hashlib.sha256()
  for k in sorted(arrays):
    h.update(k.encode())
    h.update(np.ascontiguousarray(arrays[k]).tobytes())
  return h.hexdigest()


def _read_cache(path: str) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
  """Reads a cache file; any damage (truncation, bad checksum) returns None."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files if k != "checksum"}
      stored = str(z["checksum"])
  except Exception as e:  # noqa: BLE001 -- any unreadable file is rebuilt.
    logging.warning("feature cache %s is unreadable (%s); rebuilding it", path, e)
    return None
  if _checksum(arrays) != stored:
    logging.warning("feature cache %s fails its checksum; rebuilding it", path)
    return None
  labels = arrays.pop("labels")
  return {k.split("/", 1)[1]: v for k, v in arrays.items()}, labels


def _write_cache(path: str, feats: dict[str, np.ndarray], labels: np.ndarray) -> None:
  arrays = {f"tap/{k}": v for k, v in feats.items()}
  arrays["labels"] = labels
  arrays["checksum"] = np.array(_checksum(arrays))
  head2toe.atomic_savez(path, arrays)


def train_features(backbone, task, taps, config, workdir) -> tuple[dict[str, np.ndarray], np.ndarray, bool]:
  """Pooled features of the 1000 training images, from the cache when valid."""
  bcfg = config.backbone
  path = os.path.join(
    workdir, "cache", _cache_key(backbone, task.name, "train800val200", taps, bcfg) + ".npz"
  )
  cached = _read_cache(path)
  if cached is not None:
    logging.info("read training features from %s", path)
    return cached[0], cached[1], True
  feats, labels = features.extract_task_split(
    backbone,
    task,
    "train800val200",
    taps=taps,
    target_size=int(bcfg.additional_features_target_size),
    batch_size=int(bcfg.batch_size),
    cls_token_pool=bcfg.cls_token_pool,
    pool_size=int(bcfg.additional_features_pool_size),
  )
  _write_cache(path, feats, labels)
  return feats, labels, False


def _fit(method: str, feats, labels, config, num_classes: int, meta) -> head2toe.Head:
  learning = config.learning
  if method == "linear":
    learning = ml_collections.ConfigDict(learning.to_dict())
    learning.feature_selection.type = "none"
    feats = {LINEAR_TAP: feats[LINEAR_TAP]}
  return head2toe.fit(feats, labels, learning, seed=int(config.seed), num_classes=num_classes, meta=meta)


def stream_test(backbone, task, heads: dict[str, head2toe.Head], config) -> dict[str, float]:
  """Test accuracy of each head, batch by batch: images -> taps -> kept features -> logits.

  Only the taps some head kept are pooled, and no batch outlives its step, so
  memory does not grow with the test set.
  """
  bcfg = config.backbone
  taps = [t for t in ("input",) + backbone.tap_names if any(t in h.kept for h in heads.values())]
  correct = dict.fromkeys(heads, 0)
  n = 0
  batch_size = int(bcfg.batch_size)
  for feats, labels in features.extract_batches(
    backbone,
    task.batches("test", batch_size, image_size=backbone.input_size),
    taps=taps,
    target_size=int(bcfg.additional_features_target_size),
    batch_size=batch_size,
    cls_token_pool=bcfg.cls_token_pool,
    pool_size=int(bcfg.additional_features_pool_size),
    total=task.size("test"),
  ):
    for name, head in heads.items():
      correct[name] += int((head.predict(feats).argmax(-1) == labels).sum())
    n += len(labels)
  return {name: c / n for name, c in correct.items()}


def _kept_per_tap(head: head2toe.Head, tap_sizes: dict[str, int]) -> dict[str, int]:
  return {t: len(head.kept.get(t, ())) for t in tap_sizes}


def atomic_write_json(path: str, obj: Any) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp.json")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(config: ml_collections.ConfigDict, workdir: str, *, writer=None) -> dict[str, Any]:
  """Runs the configured methods on one task and writes the workdir.

  Returns:
    The results dict written to `workdir/results.json`.
  """
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  timings: dict[str, float] = {}
  t0 = time.perf_counter()
  backbone = backbones.create(
    config.backbone.name,
    config.backbone.checkpoint or None,
    input_size=int(config.backbone.input_size) or None,
  )
  task = data.get_task(
    config.dataset, data_dir=config.data_dir or None, fashion_mnist_dir=config.fashion_mnist_dir or None
  )
  taps = resolve_taps(backbone, config.backbone)
  timings["load"] = time.perf_counter() - t0
  logging.info(
    "backbone %s (%s) at %d px, %d taps; task %s, %d classes",
    backbone.name,
    backbone.checkpoint_id,
    backbone.input_size,
    len(taps),
    task.name,
    task.num_classes,
  )

  t0 = time.perf_counter()
  feats, labels, from_cache = train_features(backbone, task, taps, config, workdir)
  timings["extract_train"] = time.perf_counter() - t0
  n_train = len(labels)
  tap_sizes = {t: int(feats[t].shape[1]) for t in taps}
  logging.info(
    "%d training images, %d features over %d taps%s",
    n_train,
    sum(tap_sizes.values()),
    len(taps),
    " (cached)" if from_cache else "",
  )
  meta = {
    "backbone": backbone.name,
    "checkpoint_id": backbone.checkpoint_id,
    "input_size": backbone.input_size,
    "task": task.name,
    "target_size": int(config.backbone.additional_features_target_size),
    "pool_size": int(config.backbone.additional_features_pool_size),
    "cls_token_pool": config.backbone.cls_token_pool,
  }
  methods = tuple(config.methods)
  results: dict[str, Any] = {
    "config": config.to_dict(),
    "task": task.name,
    "num_classes": task.num_classes,
    "backbone": {
      "name": backbone.name,
      "checkpoint_id": backbone.checkpoint_id,
      "input_size": backbone.input_size,
    },
    "taps": list(taps),
    "tap_sizes": tap_sizes,
    "num_features": sum(tap_sizes.values()),
    "train_features_cached": from_cache,
    "methods": {},
  }
  if not from_cache:
    results["extract_images_per_s"] = n_train / timings["extract_train"]

  if config.eval_mode == "valid":
    for method in methods:
      accs = []
      t0 = time.perf_counter()
      for fold in range(base.NUM_FOLDS):
        tr, va = base.fold_indices(fold, n_train)
        head = _fit(method, {t: f[tr] for t, f in feats.items()}, labels[tr], config, task.num_classes, meta)
        accs.append(
          float((head.predict({t: f[va] for t, f in feats.items()}).argmax(-1) == labels[va]).mean())
        )
      timings[f"fit_{method}"] = time.perf_counter() - t0
      results["methods"][method] = {"fold_accuracies": accs, "valid_accuracy": float(np.mean(accs))}
      logging.info("%s: mean fold accuracy %.4f (%s)", method, np.mean(accs), np.round(accs, 4).tolist())
  else:
    heads = {}
    for method in methods:
      t0 = time.perf_counter()
      heads[method] = _fit(method, feats, labels, config, task.num_classes, meta)
      timings[f"fit_{method}"] = time.perf_counter() - t0
      heads[method].save(os.path.join(workdir, f"head_{method}.npz"))
    t0 = time.perf_counter()
    test_acc = stream_test(backbone, task, heads, config)
    timings["test"] = time.perf_counter() - t0
    results["test_images_per_s"] = task.size("test") / timings["test"]
    for method, head in heads.items():
      results["methods"][method] = {
        "test_accuracy": test_acc[method],
        "num_kept": head.num_features,
        "kept_per_tap": _kept_per_tap(head, tap_sizes),
        "head_file": f"head_{method}.npz",
        "head_bytes": os.path.getsize(os.path.join(workdir, f"head_{method}.npz")),
        "final_train_loss": head.meta["final_train_loss"],
      }
      logging.info("%s: test accuracy %.4f with %d features", method, test_acc[method], head.num_features)
  steps = int(config.learning.training_steps)
  results["timings_s"] = timings
  results["probe_steps_per_s"] = {
    m: steps
    * (2 if m == "head2toe" else 1)
    * (base.NUM_FOLDS if config.eval_mode == "valid" else 1)
    / timings[f"fit_{m}"]
    for m in methods
  }
  results["peak_rss_mib"] = _peak_rss_mib()
  results["devices"] = [str(d) for d in jax.devices()]
  atomic_write_json(os.path.join(workdir, "results.json"), results)
  if writer is not None:
    scalars = {f"timing/{k}": v for k, v in timings.items()}
    for method, r in results["methods"].items():
      for k, v in r.items():
        if isinstance(v, float):
          scalars[f"{method}/{k}"] = v
    writer.write_scalars(0, scalars)
    writer.flush()
  return results


def summary_lines(results: dict[str, Any]) -> Sequence[str]:
  """A short human-readable summary of `results` (what `h2t.main` prints)."""
  lines = [
    f"task {results['task']} ({results['num_classes']} classes), backbone {results['backbone']['name']} "
    f"at {results['backbone']['input_size']} px: {results['num_features']} features from {len(results['taps'])} taps"
  ]
  for method, r in results["methods"].items():
    if "test_accuracy" in r:
      lines.append(
        f"  {method:9s} test accuracy {100 * r['test_accuracy']:6.2f}%  ({r['num_kept']} features)"
      )
    else:
      lines.append(f"  {method:9s} 5-fold valid accuracy {100 * r['valid_accuracy']:6.2f}%")
  t = results["timings_s"]
  lines.append(
    "  time: "
    + ", ".join(f"{k} {v:.1f}s" for k, v in t.items())
    + f"; peak RSS {results['peak_rss_mib']:.0f} MiB"
  )
  return lines
