"""One task end to end, as named phases: load, features, CV, fit chosen, test, write.

    results = h2t.evaluate.run(config, workdir)

Workdir layout:
  results.json            config, accuracies, kept features per tap, timings
  head_<method>.npz       each trained head (`h2t.head.Head.load`)
  cache/*.npz             pooled training features, reused by later runs
  log.txt                 the run's log
  events.out.tfevents.*   TensorBoard scalars (clu metric writers)

A run is a transaction on its workdir: it holds a lock, keeps its heads in
memory until the end, then removes any earlier results.json, writes the heads
and writes results.json last. A run killed at any point leaves either the
previous complete outputs or no results.json, never a mix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from h2t import backbones, cache, data, features, files, fitting, grid, head2toe, multihost, outputs, platform
from h2t import config as config_lib
from h2t import methods as methods_lib
from h2t.data import base
from h2t.head import Head
from h2t.methods import is_linear_tap, linear_taps  # noqa: F401 -- re-exported for callers
from h2t.outputs import summary_lines, write_scalars  # noqa: F401 -- summary_lines: re-exported
from h2t.streaming import stream_test

RESULTS = "results.json"


def validate(config: ml_collections.ConfigDict) -> None:
  """`h2t.config.validate`: every setting and grid point, before anything is loaded."""
  config_lib.validate(config)


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
  spec = str(backbone_config.get("additional_features_multi_target_sizes", ""))
  sizes = [int(v) for v in spec.split(",") if v.strip()]
  return features.sized_taps(taps, sizes) if sizes else tuple(taps)


@dataclasses.dataclass
class Context:
  """What the phases share: the grid, the networks, the task and the features."""

  config: ml_collections.ConfigDict
  workdir: str
  points: list[tuple[dict[str, Any], ml_collections.ConfigDict]]
  methods: list[methods_lib.Method]
  timings: dict[str, float] = dataclasses.field(default_factory=dict)
  backbones: dict[tuple, backbones.Backbone] = dataclasses.field(default_factory=dict)
  task: Any = None
  feats: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)  # feature_key -> taps
  sources: dict[tuple[str, str], head2toe.SelectionSource] = dataclasses.field(default_factory=dict)
  labels: np.ndarray | None = None
  extracted: int = 0
  cached_all: bool = True

  def backbone(self, cfg) -> backbones.Backbone:
    return self.backbones[grid.backbone_key(cfg)]

  def features(self, cfg) -> dict[str, np.ndarray]:
    return self.feats[_feature_key(cfg)]

  def source(self, cfg) -> head2toe.SelectionSource | None:
    return self.sources.get((_feature_key(cfg), cfg.learning.feature_selection.get("fs_dataset", "")))

  @contextlib.contextmanager
  def timed(self, name: str):
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


def _feature_key(cfg) -> str:
  return grid.feature_key(cfg, config_lib.FEATURE_FIELDS)


def _get_task(config, name: str):
  return data.get_task(
    name,
    data_dir=config.data_dir or None,
    fashion_mnist_dir=config.fashion_mnist_dir or None,
    share=multihost.share(),
  )


# Backbones of earlier runs in this process, most recent last. The jitted extraction takes its
# Backbone as a static argument (hashed by identity), so a sweep that loaded a fresh one per task
# recompiled extraction for every task (issue #12: compile once per sweep). A checkpoint file is
# keyed by its size and modification time too, so a file rewritten in place is read again.
_LOADED: dict[tuple, backbones.Backbone] = {}
_KEEP_LOADED = 2


def _create_backbone(name: str, checkpoint: str | None, input_size: int | None) -> backbones.Backbone:
  stamp = None
  if checkpoint:
    try:
      st = os.stat(checkpoint)
      stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
      pass  # backbones.create reports the missing file
  key = (name, checkpoint, input_size, stamp)
  backbone = _LOADED.pop(key, None) or backbones.create(name, checkpoint, input_size=input_size)
  _LOADED[key] = backbone
  while len(_LOADED) > _KEEP_LOADED:
    del _LOADED[next(iter(_LOADED))]
  return backbone


def load(ctx: Context) -> None:
  """Phase 1: one backbone per distinct (name, checkpoint, input size) of the grid, and the task."""
  with ctx.timed("load"):
    for _, cfg in ctx.points:
      key = grid.backbone_key(cfg)
      if key not in ctx.backbones:
        b = cfg.backbone
        ctx.backbones[key] = _create_backbone(b.name, b.checkpoint or None, int(b.input_size) or None)
    ctx.task = _get_task(ctx.config, ctx.config.dataset)
    if ctx.config.eval_mode == "test" and ctx.task.verify is not None:
      # An unreadable test image fails now, not after training; each process checks its own share.
      ctx.task.verify(
        "test", platform.resolve_batch_size(int(ctx.config.backbone.batch_size)), multihost.share()
      )
  first = ctx.backbone(ctx.points[0][1])
  logging.info(
    "backbone %s (%s) at %d px%s; task %s, %d classes; %d grid point(s)",
    first.name,
    first.checkpoint_id,
    first.input_size,
    f" (+{len(ctx.backbones) - 1} other network setting(s) in the grid)" if len(ctx.backbones) > 1 else "",
    ctx.task.name,
    ctx.task.num_classes,
    len(ctx.points),
  )


def extract(ctx: Context) -> None:
  """Phase 2: training features, one extraction (or cache read) per distinct feature setting."""
  cache_dir = ctx.config.cache_dir or os.path.join(ctx.workdir, "cache")
  if not ctx.config.cache_dir and multihost.is_writer():
    files.sweep_temporaries(cache_dir)  # the workdir's own cache: the lock makes every temp file stale
  with ctx.timed("extract_train"):
    for _, cfg in ctx.points:
      key = _feature_key(cfg)
      if key in ctx.feats:
        continue
      backbone = ctx.backbone(cfg)
      feats, labels, cached = cache.train_features(
        backbone, ctx.task, resolve_taps(backbone, cfg.backbone), cfg.backbone, cache_dir
      )
      if ctx.labels is not None and not np.array_equal(labels, ctx.labels):
        raise ValueError("the training labels differ between feature settings; the task's data changed")
      ctx.feats[key], ctx.labels = feats, labels
      ctx.cached_all &= cached
      ctx.extracted += 0 if cached else len(labels)
    if not any(m.selects for m in ctx.methods):
      return
    for _, cfg in ctx.points:  # fs_dataset: the other task's features, same taps and pooling
      fs_name = cfg.learning.feature_selection.get("fs_dataset", "")
      if not fs_name or (_feature_key(cfg), fs_name) in ctx.sources:
        continue
      fs_task, backbone = _get_task(ctx.config, fs_name), ctx.backbone(cfg)
      fs_feats, fs_labels, _ = cache.train_features(
        backbone, fs_task, resolve_taps(backbone, cfg.backbone), cfg.backbone, cache_dir
      )
      ctx.sources[(_feature_key(cfg), fs_name)] = head2toe.SelectionSource.from_features(
        fs_feats, fs_labels, fs_task.num_classes, name=fs_task.name
      )
      logging.info("head2toe selects its features on %s (%d training images)", fs_task.name, len(fs_labels))


def cross_validate(ctx: Context, results: dict[str, Any]) -> dict[str, int]:
  """Phase 3: 5-fold CV of every grid point of every searched method; returns each method's choice.

  With several processes the work is split by (batch, fold): unit k of the
  list `[(batch, fold) for batch in the plan for fold in 0..4]` runs on
  process k % P, which trains every distinct point of the batch on that fold
  (`cv_units`); the fold accuracies are then gathered (`multihost.gather_cells`),
  so every process makes the same choice.
  """
  chosen = {m.name: 0 for m in ctx.methods}
  if not (ctx.config.eval_mode == "valid" or len(ctx.points) > 1):
    return chosen
  searched = [m for m in ctx.methods if m.searched]
  batches = grid.plan(ctx.points, searched, config_lib.FEATURE_FIELDS)
  for line in grid.describe(batches, ctx.points):
    logging.info("plan: %s", line)
  owners = grid.cv_units(len(batches), multihost.count())
  me = multihost.index()
  acc = {m.name: np.zeros((len(ctx.points), base.NUM_FOLDS)) for m in searched}
  done = {m.name: np.zeros((len(ctx.points), base.NUM_FOLDS), bool) for m in searched}
  heads = np.zeros(multihost.count(), np.int64)  # (distinct point, fold) heads each process trains
  mine = []
  for b, batch in enumerate(batches):
    heads += len(batch.runs) * np.bincount(owners[b], minlength=len(heads))
    folds = [f for f in range(base.NUM_FOLDS) if owners[b][f] == me]
    if not folds:
      continue
    mine.append(f"{batch.method} folds {','.join(map(str, folds))}")
    method = methods_lib.METHODS[batch.method]
    first_cfg = ctx.points[batch.runs[0][0]][1]
    prep = head2toe.prepare(method.features(ctx.features(first_cfg)))
    learnings = [method.learning(ctx.points[run[0]][1].learning) for run in batch.runs]
    with ctx.timed(f"cv_{method.name}"):
      got = head2toe.cross_validate(
        prep,
        ctx.labels,
        learnings,
        seed=int(ctx.config.seed),
        num_classes=ctx.task.num_classes,
        select_from=ctx.source(first_cfg) if method.selects else None,
        folds=folds,
      )
    for run, row in zip(batch.runs, got, strict=True):
      acc[method.name][np.ix_(run, folds)] = row[folds]
      done[method.name][np.ix_(run, folds)] = True
  if multihost.count() > 1:
    logging.info(
      "cv: process %d of %d trained %d of %d heads (%s)",
      me,
      multihost.count(),
      heads[me],
      heads.sum(),
      "; ".join(mine) or "none",
    )
    with ctx.timed("cv_gather"):
      acc = {name: multihost.gather_cells(a, done[name]) for name, a in acc.items()}
  results["cv_heads_per_process"] = heads.tolist()
  for method in searched:
    # Fold accuracies are counts / 200 in float64, so equal counts tie exactly; the first point wins.
    entries = [
      {"point": overrides, "fold_accuracies": a.tolist(), "mean": float(a.mean())}
      for (overrides, _), a in zip(ctx.points, acc[method.name], strict=True)
    ]
    results["grid"][method.name] = entries
    best = chosen[method.name] = int(np.argmax([e["mean"] for e in entries]))
    logging.info("%s: best %s (%.4f)", method.name, entries[best]["point"], entries[best]["mean"])
    results["methods"][method.name] = {
      "chosen_point": entries[best]["point"],
      "valid_accuracy": entries[best]["mean"],
      "fold_accuracies": entries[best]["fold_accuracies"],
    }
  return chosen


def fit_chosen(ctx: Context, chosen: dict[str, int], results: dict[str, Any]) -> dict[str, Head]:
  """Phase 4: each method's chosen point trained on all 1000 training images (heads kept in memory)."""
  heads = {}
  for method in ctx.methods:
    overrides, cfg = ctx.points[chosen[method.name]]
    backbone = ctx.backbone(cfg)
    if method.fit == "finetune":
      with ctx.timed("finetune"):
        results["methods"][method.name] = fitting.run_finetune(backbone, ctx.task, cfg)
      continue
    meta = {
      "backbone": backbone.name,
      "checkpoint_id": backbone.checkpoint_id,
      "input_size": backbone.input_size,
      "task": ctx.task.name,
      "target_size": int(cfg.backbone.additional_features_target_size),
      "pool_size": int(cfg.backbone.additional_features_pool_size),
      "cls_token_pool": cfg.backbone.cls_token_pool,
      "dtype": cfg.backbone.get("dtype", "float32"),
      "grid_point": overrides,
      "class_names": list(getattr(ctx.task, "class_names", None) or []),
    }
    fit = fitting.FITS[method.fit]
    with ctx.timed(f"fit_{method.name}"):
      heads[method.name] = fit(
        method, ctx.features(cfg), ctx.labels, cfg, ctx.task.num_classes, meta, ctx.source(cfg)
      )
  return heads


def _header(ctx: Context) -> dict[str, Any]:
  config, first = ctx.config, ctx.points[0][1]
  backbone = ctx.backbone(first)
  tap_sizes = {t: int(v.shape[1]) for t, v in ctx.features(first).items()}
  logging.info(
    "%d training images, %d features over %d taps", len(ctx.labels), sum(tap_sizes.values()), len(tap_sizes)
  )
  results = {
    "config": config.to_dict(),
    "task": ctx.task.name,
    "num_classes": ctx.task.num_classes,
    "eval_mode": config.eval_mode,
    "backbone": {
      "name": backbone.name,
      "checkpoint_id": backbone.checkpoint_id,
      "input_size": backbone.input_size,
    },
    "taps": list(tap_sizes),
    "tap_sizes": tap_sizes,
    "num_features": sum(tap_sizes.values()),
    "train_features_cached": ctx.cached_all,
    "num_grid_points": len(ctx.points),
    "data_fraction": float(config.learning.get("data_fraction", 1.0)),
    "fs_dataset": config.learning.feature_selection.get("fs_dataset", ""),
    "methods": {},
    "grid": {},
  }
  if ctx.extracted:
    results["extract_images_per_s"] = ctx.extracted / ctx.timings["extract_train"]
  return results


def training_taps(ctx, chosen: dict[str, int], names) -> dict[str, tuple[str, ...]]:
  """`{method: the taps its chosen point's training features were extracted with}`: the test pass
  (`stream_test`) extracts them too, so it runs the program the training extraction compiled."""
  cfgs = {name: ctx.points[chosen[name]][1] for name in names}
  return {name: resolve_taps(ctx.backbone(cfg), cfg.backbone) for name, cfg in cfgs.items()}


def run(config: ml_collections.ConfigDict, workdir: str, *, writer=None) -> dict[str, Any]:
  """Runs the protocol on one task and writes the workdir.

  eval_mode 'valid': 5-fold CV accuracy of every grid point (`config.sweep`).
  eval_mode 'test': the same CV picks each method's grid point (best mean
  fold accuracy, the first on ties; skipped when the grid has one point),
  which is then trained on all 1000 images and tested on the test split.

  With several processes (`h2t.multihost`) every process runs this with the
  same config and gets the same results; process 0 alone writes them.

  Returns:
    The results dict written to `workdir/results.json`.
  """
  validate(config)
  ctx = Context(config, workdir, grid.points(config), methods_lib.selected(config.methods))
  writes = multihost.is_writer()  # several processes: process 0 alone touches the workdir
  with files.workdir_lock(workdir) if writes else contextlib.nullcontext():
    load(ctx)
    extract(ctx)
    results = _header(ctx)
    chosen = cross_validate(ctx, results)
    heads = fit_chosen(ctx, chosen, results) if config.eval_mode == "test" else {}
    if heads:  # fine-tuning alone streams its own test set
      taps = training_taps(ctx, chosen, heads)
      with ctx.timed("test"):
        test_acc = stream_test(ctx.backbones.values(), ctx.task, heads, int(config.backbone.batch_size), taps)
      results["test_images_per_s"] = ctx.task.size("test") / ctx.timings["test"]
      outputs.record_heads(ctx, chosen, heads, test_acc, results)
    results["timings_s"] = ctx.timings
    results["peak_rss_mib"] = outputs.peak_rss_mib()
    results["devices"] = [str(d) for d in jax.devices()]
    results["num_processes"] = jax.process_count()
    if writes:
      commit(workdir, heads, results)
  if writes and writer is not None:
    write_scalars(writer, results)
  return results


def commit(workdir: str, heads: dict[str, Head], results: dict[str, Any]) -> None:
  """Writes the outputs: an earlier results.json goes first, then the heads, then results.json."""
  path = os.path.join(workdir, RESULTS)
  if os.path.exists(path):
    os.unlink(path)
  for name, head in heads.items():
    head_path = os.path.join(workdir, f"head_{name}.npz")
    head.save(head_path)
    results["methods"][name]["head_bytes"] = os.path.getsize(head_path)
  files.atomic_write_json(path, results)
