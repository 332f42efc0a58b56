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

from h2t import backbones, data, features, grid, head2toe
from h2t.data import base

# head2toe: selection from every tap. linear: `pre_logits` alone, same trainer.
# all_features: every tap, no selection, with the configured L1/L2/group
# penalties (the paper's regularisation baselines). ridge: closed-form ridge
# regression on every tap (big_vision's few-shot probe). finetune: the whole
# backbone and a linear head on `pre_logits`, trained end to end.
METHODS = ("head2toe", "linear", "all_features", "ridge", "finetune")
# Methods whose hyperparameters the CV grid searches (ridge picks its own
# regularisation; fine-tuning is far too costly to repeat per grid point).
GRID_METHODS = ("head2toe", "linear", "all_features")
EVAL_MODES = ("test", "valid")
LINEAR_TAP = "pre_logits"
CACHE_VERSION = 1


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any heavy work, on values h2t does not know."""
  try:
    backbones.check_name(config.backbone.name)
  except ValueError as e:
    raise ValueError(f"config.backbone.name: {e}") from None
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
  if "finetune" in methods and backbones.COMPOSITE_SEP in config.backbone.name:
    raise ValueError(
      f"method 'finetune' fine-tunes one backbone; config.backbone.name={config.backbone.name!r} "
      "names several: drop 'finetune' from config.methods or use a single backbone"
    )
  sizes = _multi_target_sizes(config.backbone)
  if any(s <= 0 for s in sizes):
    raise ValueError(
      f"config.backbone.additional_features_multi_target_sizes="
      f"{config.backbone.additional_features_multi_target_sizes!r}; expected positive integers, comma-separated"
    )
  fs_dataset = config.learning.feature_selection.get("fs_dataset", "")
  if fs_dataset and fs_dataset not in data.task_names():
    raise ValueError(
      f"unknown task {fs_dataset!r} (config.learning.feature_selection.fs_dataset); "
      f"expected '' (select on the task itself) or one of {', '.join(data.task_names())}"
    )
  fraction = float(config.learning.get("data_fraction", 1.0))
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"config.learning.data_fraction={fraction}; expected a fraction in (0, 1]")


def _multi_target_sizes(backbone_config: ml_collections.ConfigDict) -> list[int]:
  spec = str(backbone_config.get("additional_features_multi_target_sizes", "")).strip()
  try:
    return [int(v) for v in spec.split(",") if v.strip()]
  except ValueError:
    raise ValueError(
      f"config.backbone.additional_features_multi_target_sizes={spec!r}; "
      "expected integers, comma-separated (e.g. '1024,8192')"
    ) from None


def is_linear_tap(name: str) -> bool:
  """Whether a tap name is a backbone's `pre_logits` ('pre_logits', 'resnet50/pre_logits@1024', ...)."""
  return features.split_tap(name)[0].rpartition("/")[2] == LINEAR_TAP


def linear_taps(names: Sequence[str]) -> list[str]:
  """The Linear baseline's taps: each backbone's `pre_logits`, once (the first size)."""
  out, owners = [], set()
  for name in names:
    owner = features.split_tap(name)[0].rpartition("/")[0]
    if is_linear_tap(name) and owner not in owners:
      owners.add(owner)
      out.append(name)
  return out


def resolve_taps(backbone: backbones.Backbone, backbone_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The taps a run uses, in network order ('all' = every tap).

  With `additional_features_multi_target_sizes`, every tap at every size:
  `'<tap>@<size>'`, size by size (the reference's order).
  """
  spec = backbone_config.additional_features.strip()
  if spec == "all":
    taps = list(backbone.tap_names)
  else:
    wanted = [t.strip() for t in spec.split(",") if t.strip()]
    features.check_taps(backbone, wanted)
    # The reference always adds its output key (pre_logits) to the extra taps.
    wanted_set = set(wanted) | {t for t in backbone.tap_names if is_linear_tap(t)}
    taps = [t for t in backbone.tap_names if t in wanted_set]
  if backbone_config.include_input:
    taps = ["input"] + taps
  sizes = _multi_target_sizes(backbone_config)
  return features.sized_taps(taps, sizes) if sizes else tuple(taps)


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
  # Sized taps ('tap@size') carry their sizes in `taps`.
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


def train_features(backbone, task, taps, config, cache_dir) -> tuple[dict[str, np.ndarray], np.ndarray, bool]:
  """Pooled features of the 1000 training images, from the cache when valid."""
  bcfg = config.backbone
  path = os.path.join(cache_dir, _cache_key(backbone, task.name, "train800val200", taps, bcfg) + ".npz")
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


def _feature_key(cfg: ml_collections.ConfigDict) -> str:
  """The backbone settings that change the pooled features."""
  b = cfg.backbone
  keys = (
    "additional_features",
    "include_input",
    "additional_features_target_size",
    "additional_features_pool_size",
    "cls_token_pool",
    "additional_features_multi_target_sizes",
  )
  return json.dumps({k: b.get(k, "") for k in keys}, sort_keys=True)


def _method_learning(method: str, learning: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Every method but head2toe trains without selection."""
  if method == "head2toe":
    return learning
  plain = ml_collections.ConfigDict(learning.to_dict())
  plain.feature_selection.type = "none"
  return plain


def _method_features(method: str, feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  if method in ("linear", "finetune"):
    return {t: feats[t] for t in linear_taps(list(feats))}
  return feats


def fit_ridge(feats, labels, config, num_classes: int, meta) -> head2toe.Head:
  """Ridge regression on all taps (normalised as configured), its L2 picked by CV."""
  from h2t import ridge

  taps = list(feats)
  train = head2toe.training_subset(np.arange(len(labels)), labels, config.learning, num_classes)
  feats, labels = {t: v[train] for t, v in feats.items()}, np.asarray(labels)[train]
  x, stats = head2toe.normalize(feats, taps, config.learning.feature_normalization)
  l2_reg, _ = ridge.select_l2_reg(x, labels, num_classes=num_classes, seed=int(config.seed))
  params = ridge.fit(x, labels, num_classes=num_classes, l2_reg=l2_reg)
  kept = {t: np.arange(feats[t].shape[1], dtype=np.int32) for t in taps}
  meta = dict(meta, num_classes=num_classes, ridge_l2_reg=l2_reg, final_train_loss=float("nan"))
  return head2toe.Head(kept, params, config.learning.feature_normalization, stats, meta)


def _fs_dataset(cfg: ml_collections.ConfigDict) -> str:
  return cfg.learning.feature_selection.get("fs_dataset", "")


def cross_validate_grid(
  method: str, points, feats_by_key, labels, config, num_classes, sources=None
) -> list[dict[str, Any]]:
  """5-fold CV accuracy of every grid point for one method.

  Points that share features and a program run together (`run_grid`); for
  the linear baseline, points that differ only in selection options are run
  once. `sources[(feature key, fs_dataset)]`: the `fs_dataset` features
  head2toe selects on.
  """
  entries: list[dict[str, Any]] = []
  by_features: dict[tuple[str, str], list[int]] = {}
  for i, (_, cfg) in enumerate(points):
    key = (_feature_key(cfg), _fs_dataset(cfg)) if method == "head2toe" else ("", "")
    by_features.setdefault(key, []).append(i)
  acc = np.zeros((len(points), base.NUM_FOLDS))
  for members in by_features.values():
    feats = feats_by_key[_feature_key(points[members[0]][1])]
    prep = head2toe.prepare(_method_features(method, feats))
    learnings = [_method_learning(method, points[i][1].learning) for i in members]
    # Identical learning configs (e.g. linear under a keep-fraction sweep) run once.
    distinct = list(dict.fromkeys(json.dumps(lr.to_dict(), sort_keys=True, default=str) for lr in learnings))
    firsts = [
      next(lr for lr in learnings if json.dumps(lr.to_dict(), sort_keys=True, default=str) == d)
      for d in distinct
    ]
    logging.info(
      "%s: training %d grid point(s) x %d folds on %d features (one program per stage)...",
      method,
      len(firsts),
      base.NUM_FOLDS,
      prep.dim,
    )
    t0 = time.perf_counter()
    src = (sources or {}).get((_feature_key(points[members[0]][1]), _fs_dataset(points[members[0]][1])))
    got = head2toe.cross_validate(
      prep, labels, firsts, seed=int(config.seed), num_classes=num_classes, select_from=src
    )
    steps = int(firsts[0].training_steps) * len(firsts) * base.NUM_FOLDS
    logging.info(
      "%s: done in %.1fs (%.0f head-steps/s)",
      method,
      time.perf_counter() - t0,
      steps / (time.perf_counter() - t0),
    )
    for i, lr in zip(members, learnings, strict=True):
      acc[i] = got[distinct.index(json.dumps(lr.to_dict(), sort_keys=True, default=str))]
  for i, (overrides, _) in enumerate(points):
    # Fold accuracies are counts / 200 in float64, so equal counts tie exactly.
    entries.append({"point": overrides, "fold_accuracies": acc[i].tolist(), "mean": float(acc[i].mean())})
  return entries


def stream_test(backbone, task, heads: dict[str, head2toe.Head], config) -> dict[str, float]:
  """Test accuracy of each head, batch by batch: images -> taps -> kept features -> logits.

  Heads are grouped by their pooling settings (`head.meta`); each group reads
  the test set once, pools only the taps its heads kept, and no batch
  outlives its step, so memory does not grow with the test set.
  """
  groups: dict[tuple, dict[str, head2toe.Head]] = {}
  for name, head in heads.items():
    m = head.meta
    settings = (m["target_size"], m["pool_size"], m["cls_token_pool"])
    if all(is_linear_tap(t) for t in head.kept):  # 2-D taps: pooling settings do not matter
      settings = next(iter(groups), settings)
    groups.setdefault(settings, {})[name] = head
  correct = dict.fromkeys(heads, 0)
  n = 0
  batch_size = int(config.backbone.batch_size)
  for (target_size, pool_size, cls_pool), members in groups.items():
    taps = list(dict.fromkeys(t for h in members.values() for t in h.kept))
    n = 0
    for feats, labels in features.extract_batches(
      backbone,
      task.batches("test", batch_size, image_size=backbone.input_size),
      taps=taps,
      target_size=target_size,
      batch_size=batch_size,
      cls_token_pool=cls_pool,
      pool_size=pool_size,
      total=task.size("test"),
    ):
      for name, head in members.items():
        correct[name] += int((head.predict(feats).argmax(-1) == labels).sum())
      n += len(labels)
  return {name: c / n for name, c in correct.items()}


def _run_finetune(backbone, task, labels, cfg, config) -> dict[str, Any]:
  """Full fine-tuning baseline: backbone + head on `pre_logits`, then streamed test."""
  from h2t import finetune

  images, train_labels = task.arrays("train800val200", image_size=backbone.input_size)
  learning = _method_learning("finetune", cfg.learning)
  train = head2toe.training_subset(np.arange(len(train_labels)), train_labels, learning, task.num_classes)
  images, train_labels = images[train], train_labels[train]
  backbone_params, head_params, losses = finetune.fit(
    backbone, images, train_labels, learning, seed=int(config.seed), num_classes=task.num_classes
  )
  acc = finetune.evaluate(
    backbone,
    backbone_params,
    head_params,
    task,
    batch_size=int(config.backbone.batch_size),
    normalization=learning.feature_normalization,
  )
  n_backbone = sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(backbone_params))
  return {"test_accuracy": acc, "final_train_loss": float(losses[-1]), "trainable_parameters": n_backbone}


def _kept_per_tap(head: head2toe.Head, tap_sizes: dict[str, int]) -> dict[str, int]:
  return {t: len(head.kept.get(t, ())) for t in tap_sizes}


def atomic_write_json(path: str, obj: Any) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp.json")
  head2toe._readable(fd)  # noqa: SLF001 -- same package
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(config: ml_collections.ConfigDict, workdir: str, *, writer=None) -> dict[str, Any]:
  """Runs the protocol on one task and writes the workdir.

  eval_mode 'valid': 5-fold CV accuracy of every grid point (`config.sweep`).
  eval_mode 'test': the same CV picks each method's grid point (best mean
  fold accuracy, the first on ties; skipped when the grid has one point),
  which is then trained on all 1000 images and tested on the test split.

  Returns:
    The results dict written to `workdir/results.json`.
  """
  validate(config)
  points = grid.points(config)
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
  timings["load"] = time.perf_counter() - t0
  logging.info(
    "backbone %s (%s) at %d px; task %s, %d classes; %d grid point(s)",
    backbone.name,
    backbone.checkpoint_id,
    backbone.input_size,
    task.name,
    task.num_classes,
    len(points),
  )

  # Training features: one extraction per distinct pooling setting, cached.
  t0 = time.perf_counter()
  feats_by_key: dict[str, dict[str, np.ndarray]] = {}
  cached_all, labels, extracted = True, None, 0
  for _, cfg in points:
    key = _feature_key(cfg)
    if key in feats_by_key:
      continue
    taps = resolve_taps(backbone, cfg.backbone)
    feats, labels, cached = train_features(
      backbone, task, taps, cfg, config.cache_dir or os.path.join(workdir, "cache")
    )
    feats_by_key[key] = feats
    cached_all &= cached
    extracted += 0 if cached else len(labels)
  # fs_dataset: the other task's training features, same taps and pooling.
  sources: dict[tuple[str, str], head2toe.SelectionSource] = {}
  for _, cfg in points:
    key, fs_name = _feature_key(cfg), _fs_dataset(cfg)
    if not fs_name or (key, fs_name) in sources or "head2toe" not in config.methods:
      continue
    fs_task = data.get_task(
      fs_name, data_dir=config.data_dir or None, fashion_mnist_dir=config.fashion_mnist_dir or None
    )
    fs_feats, fs_labels, cached = train_features(
      backbone,
      fs_task,
      resolve_taps(backbone, cfg.backbone),
      cfg,
      config.cache_dir or os.path.join(workdir, "cache"),
    )
    sources[(key, fs_name)] = head2toe.SelectionSource.from_features(
      fs_feats, fs_labels, fs_task.num_classes, name=fs_task.name
    )
    logging.info("head2toe selects its features on %s (%d training images)", fs_task.name, len(fs_labels))
  timings["extract_train"] = time.perf_counter() - t0
  n_train = len(labels)
  first = feats_by_key[_feature_key(points[0][1])]
  tap_sizes = {t: int(v.shape[1]) for t, v in first.items()}
  logging.info(
    "%d training images, %d features over %d taps", n_train, sum(tap_sizes.values()), len(tap_sizes)
  )

  methods = tuple(config.methods)
  results: dict[str, Any] = {
    "config": config.to_dict(),
    "task": task.name,
    "num_classes": task.num_classes,
    "eval_mode": config.eval_mode,
    "backbone": {
      "name": backbone.name,
      "checkpoint_id": backbone.checkpoint_id,
      "input_size": backbone.input_size,
    },
    "taps": list(tap_sizes),
    "tap_sizes": tap_sizes,
    "num_features": sum(tap_sizes.values()),
    "train_features_cached": cached_all,
    "num_grid_points": len(points),
    "data_fraction": float(config.learning.get("data_fraction", 1.0)),
    "fs_dataset": _fs_dataset(config),
    "methods": {},
    "grid": {},
  }
  if extracted:
    results["extract_images_per_s"] = extracted / timings["extract_train"]

  do_cv = config.eval_mode == "valid" or len(points) > 1
  chosen: dict[str, int] = dict.fromkeys(methods, 0)
  if do_cv:
    for method in [m for m in methods if m in GRID_METHODS]:
      t0 = time.perf_counter()
      entries = cross_validate_grid(method, points, feats_by_key, labels, config, task.num_classes, sources)
      timings[f"cv_{method}"] = time.perf_counter() - t0
      results["grid"][method] = entries
      chosen[method] = int(np.argmax([e["mean"] for e in entries]))
      logging.info(
        "%s: CV over %d points x %d folds in %.1fs; best %s (%.4f)",
        method,
        len(points),
        base.NUM_FOLDS,
        timings[f"cv_{method}"],
        entries[chosen[method]]["point"],
        entries[chosen[method]]["mean"],
      )
      results["methods"][method] = {
        "chosen_point": entries[chosen[method]]["point"],
        "valid_accuracy": entries[chosen[method]]["mean"],
        "fold_accuracies": entries[chosen[method]]["fold_accuracies"],
      }

  if config.eval_mode == "test":
    heads = {}
    for method in methods:
      _, cfg = points[chosen[method]]
      feats = feats_by_key[_feature_key(cfg)]
      meta = {
        "backbone": backbone.name,
        "checkpoint_id": backbone.checkpoint_id,
        "input_size": backbone.input_size,
        "task": task.name,
        "target_size": int(cfg.backbone.additional_features_target_size),
        "pool_size": int(cfg.backbone.additional_features_pool_size),
        "cls_token_pool": cfg.backbone.cls_token_pool,
        "grid_point": points[chosen[method]][0],
        "class_names": list(getattr(task, "class_names", None) or []),
      }
      t0 = time.perf_counter()
      if method == "finetune":
        results["methods"][method] = _run_finetune(backbone, task, labels, cfg, config)
        timings["finetune"] = time.perf_counter() - t0
        continue
      if method == "ridge":
        heads[method] = fit_ridge(feats, labels, cfg, task.num_classes, meta)
        timings[f"fit_{method}"] = time.perf_counter() - t0
        heads[method].save(os.path.join(workdir, f"head_{method}.npz"))
        continue
      heads[method] = head2toe.fit(
        _method_features(method, feats),
        labels,
        _method_learning(method, cfg.learning),
        seed=int(config.seed),
        num_classes=task.num_classes,
        meta=meta,
        select_from=sources.get((_feature_key(cfg), _fs_dataset(cfg))) if method == "head2toe" else None,
      )
      timings[f"fit_{method}"] = time.perf_counter() - t0
      heads[method].save(os.path.join(workdir, f"head_{method}.npz"))
    t0 = time.perf_counter()
    test_acc = {}
    if heads:  # fine-tuning alone streams its own test set in _run_finetune
      test_acc = stream_test(backbone, task, heads, config)
      timings["test"] = time.perf_counter() - t0
      results["test_images_per_s"] = task.size("test") / timings["test"]
    for method, head in heads.items():
      sizes = {
        t: int(v.shape[1])
        for t, v in _method_features(method, feats_by_key[_feature_key(points[chosen[method]][1])]).items()
      }
      results["methods"].setdefault(method, {}).update(
        {
          "test_accuracy": test_acc[method],
          "chosen_point": points[chosen[method]][0] if method in GRID_METHODS else {},
          "num_kept": head.num_features,
          "kept_per_tap": _kept_per_tap(head, tap_sizes if method == "head2toe" else sizes),
          "head_file": f"head_{method}.npz",
          "head_bytes": os.path.getsize(os.path.join(workdir, f"head_{method}.npz")),
          "final_train_loss": head.meta["final_train_loss"],
        }
      )
      if method in GRID_METHODS:  # steps of both stages (head2toe) / wall time, compile included
        stages = 2 if method == "head2toe" else 1
        steps = int(points[chosen[method]][1].learning.training_steps) * stages
        results["methods"][method]["probe_steps_per_s"] = steps / timings[f"fit_{method}"]
      logging.info("%s: test accuracy %.4f with %d features", method, test_acc[method], head.num_features)
  results["timings_s"] = timings
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
    for method, entries in results["grid"].items():
      for i, e in enumerate(entries):
        writer.write_scalars(i, {f"{method}/cv_accuracy_by_grid_point": e["mean"]})
    writer.flush()
  return results


def summary_lines(results: dict[str, Any]) -> Sequence[str]:
  """A short human-readable summary of `results` (what `h2t.main` prints)."""
  lines = [
    f"task {results['task']} ({results['num_classes']} classes), backbone {results['backbone']['name']} "
    f"at {results['backbone']['input_size']} px: {results['num_features']} features from {len(results['taps'])} "
    f"taps; {results['num_grid_points']} grid point(s) x 5 folds"
  ]
  for method, r in results["methods"].items():
    parts = [f"  {method:9s}"]
    if "valid_accuracy" in r:
      parts.append(f"CV accuracy {100 * r['valid_accuracy']:6.2f}%")
    if "test_accuracy" in r:
      detail = (
        f"{r['num_kept']} features"
        if "num_kept" in r
        else f"{r.get('trainable_parameters', 0)} parameters trained"
      )
      parts.append(f"test accuracy {100 * r['test_accuracy']:6.2f}%  ({detail})")
    if r.get("chosen_point"):
      parts.append("chosen " + ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in r["chosen_point"].items()))
    lines.append("  ".join(parts))
  t = results["timings_s"]
  lines.append(
    "  time: "
    + ", ".join(f"{k} {v:.1f}s" for k, v in t.items())
    + f"; peak RSS {results['peak_rss_mib']:.0f} MiB"
  )
  return lines
