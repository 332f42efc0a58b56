r"""The full protocol for one task on an accelerator: ResNet-50 or ViT-B/16 at 224 px, VTAB-1k sizes.

ResNet-50 (h2t.models.resnet) or ViT-B/16 (h2t.models.vit, `--backbone=vit_b16`),
random weights from `module.init` (no checkpoint is needed, and the costs do not
depend on the weights), with the taps and input normalisation h2t.backbones
gives them, on a task of random images at the backbone's input size, VTAB-1k
sized: 1000 training images (train800val200) and 10,000 test images, 10 random
labels. It runs the protocol of `h2t.evaluate.run` step by step and times each step:

  0. the backbone's own pace: one jitted forward pass pooling every tap, on a
     batch already on the device (experiments/bench_backbones.py's figure),
     in float32 and bfloat16;
  1. extraction of the 1000 training images with `features.extract_task_split`
     (reading thread, batches in flight, one [b, D] array per batch), every
     tap pooled to the target size, in float32 then bfloat16 (`--dtypes`),
     each cold (compile included) then warm; the warm pass over the
     backbone's pace is the figure to watch (it was 1,383 / 12,650 img/s on
     an H200 before the pipelined extraction);
  2. 5-fold CV of every grid point as one program (cold, then warm);
  3. the final fit of the best point on the 1000 images;
  4. the streamed test of the 10,000 images (images -> kept taps -> logits).

`--paper` runs the paper's grid instead (configs/vtab.py:paper, 96 points: the
ℓ2,1 coefficient {1e-3, 1e-5} x target sizes {1024, 16384, 40000} x keep
fractions {0.01, 0.05, 0.1, 0.2} x learning rates {0.1, 0.01} x {500, 5000}
steps) as h2t.evaluate runs it, in the first of `--dtypes`, everything cold:
the backbone's pace; one extraction of the training images per target size
(a phase each); the 5-fold CV of the 96 points (`h2t.evaluate.cross_validate`:
one program per target size and step count); the final fit of the chosen point
(`h2t.evaluate.fit_chosen`); the streamed test at the chosen point's target
size; then the protocol's total (the issue's bar on an accelerator: <= 3
minutes for ResNet-50, 1000 train, 10k test). `--smoke --paper` keeps the 96
points at tiny sizes: target sizes {64, 256, 1024}, {5, 50} steps.

Every phase prints its time, the share of it spent tracing and compiling
(`h2t.platform.CompileMonitor`), the bytes moved between host and device
against the least the work needs (the pooled features; extraction phases),
and the device's peak memory so far (where `memory_stats()` reports it).
bfloat16's features are compared with float32's (largest difference over the
tap's largest magnitude). `--compilation_cache_dir` turns on the persistent
cache (run the script twice to see the second run's compile share fall).

Images come from a pool of random images held in memory, so no decoding or
resizing is timed (experiments/bench_input_pipeline.py measures that part).
Accuracies are those of random labels: chance. The device it ran on is printed.

  python experiments/bench_gpu_protocol.py --compilation_cache_dir=/tmp/jax_cache  # on a GPU / TPU
  python experiments/bench_gpu_protocol.py --paper --compilation_cache_dir=/tmp/jax_cache  # paper grid, ResNet-50
  python experiments/bench_gpu_protocol.py --paper --backbone=vit_b16 \
      --compilation_cache_dir=/tmp/jax_cache                            # paper grid, ViT-B/16
  python experiments/bench_gpu_protocol.py --smoke         # tiny, on the CPU, a few minutes
  python experiments/bench_gpu_protocol.py --smoke --paper [--backbone=vit_b16]  # 96 points, tiny, CPU
"""

from __future__ import annotations

import os
import platform as host_platform
import resource
import time
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from absl import app, flags
from bench_common import Printer, load_config, random_backbone  # experiments/ is on sys.path

from h2t import backbones, evaluate, features, grid, head2toe, platform, streaming
from h2t import config as config_lib
from h2t import methods as methods_lib
from h2t.data import base

FLAGS = flags.FLAGS
flags.DEFINE_bool(
  "smoke",
  False,
  "Tiny sizes (32 px, 100 train, 256 test, 10 steps, 2 points; with --paper the 96 points at target sizes "
  "64,256,1024 and 5,50 steps): checks it runs.",
)
flags.DEFINE_enum("backbone", "resnet50", ["resnet50", "vit_b16"], "The backbone, with random weights.")
flags.DEFINE_bool(
  "paper",
  False,
  "The paper's grid (configs/vtab.py:paper, 96 points over 3 target sizes) as h2t.evaluate runs it, in the "
  "first of --dtypes; --target_size, --training_steps and --sweep do not apply.",
)
flags.DEFINE_list("paper_target_sizes", None, "--paper: these target sizes instead of the paper's.")
flags.DEFINE_list("paper_training_steps", None, "--paper: these step counts instead of the paper's.")
flags.DEFINE_integer("input_size", 224, "The backbone's input size (a multiple of 16 for ViT-B/16).")
flags.DEFINE_integer("train_size", 1000, "Training images (a multiple of 5: the folds).")
flags.DEFINE_integer("test_size", 10000, "Test images.")
flags.DEFINE_integer("target_size", 1024, "Pooling target size per tap (configs/vtab.py's default).")
flags.DEFINE_integer("training_steps", 500, "Steps of each probe.")
flags.DEFINE_integer("batch_size", 0, "Images per extraction forward pass (0: the platform's, 256 per GPU).")
flags.DEFINE_string("sweep", None, "config.sweep of the grid (default: the sweep of configs/vtab.py).")
flags.DEFINE_list(
  "dtypes", ["float32", "bfloat16"], "Backbone compute dtypes to extract with (the first is used after)."
)
flags.DEFINE_integer("pace_batches", 10, "Batches timed for the backbone's own pace.")
flags.DEFINE_string("compilation_cache_dir", "", "Persistent compilation cache folder ('' = off).")
flags.DEFINE_string("out", "", "Also write the printed figures to this file.")

NUM_CLASSES = 10
POOL_IMAGES = 512  # distinct random images; batches cycle through them
TARGET_SIZE = "backbone.additional_features_target_size"
TRAINING_STEPS = "learning.training_steps"
SMOKE_PAPER = {TARGET_SIZE: ["64", "256", "1024"], TRAINING_STEPS: ["5", "50"]}
LABELS = {"resnet50": "ResNet-50", "vit_b16": "ViT-B/16"}


def random_task(size: int, train_size: int, test_size: int, seed: int = 0) -> base.Task:
  """A VTAB-1k-shaped task of random uint8 images `[size, size, 3]` and random labels."""
  rng = np.random.default_rng(seed)
  pool = rng.integers(0, 256, (POOL_IMAGES, size, size, 3), dtype=np.uint8)
  labels = {
    "train800val200": rng.integers(0, NUM_CLASSES, train_size).astype(np.int32),
    "test": rng.integers(0, NUM_CLASSES, test_size).astype(np.int32),
  }
  offset = {"train800val200": 0, "test": POOL_IMAGES // 2}

  def read(split: str, batch_size: int, image_size: int) -> Iterator[base.Batch]:
    del image_size  # the pool is at the backbone's size already
    y = labels[split]
    for start in range(0, len(y), batch_size):
      idx = (offset[split] + np.arange(start, min(start + batch_size, len(y)))) % POOL_IMAGES
      yield pool[idx], y[start : start + batch_size]

  return base.Task("random_vtab1k", NUM_CLASSES, {k: len(v) for k, v in labels.items()}, read)


def paper_sweep(config: ml_collections.ConfigDict, replace: dict[str, list[str]]) -> str:
  """`config.sweep` (the paper's) with the values of the paths in `replace` replaced, in the same order."""
  items = grid.parse_sweep(config.sweep, config)
  return ";".join(f"{path}={','.join(replace.get(path) or map(str, values))}" for path, values in items)


def device_memory() -> str:
  """The device's memory in use now and its peak so far, where the backend reports them."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" not in stats:
    return "device memory n/a (not reported by this backend)"
  return (
    f"device memory in use {stats.get('bytes_in_use', 0) / 2**20:.0f} MiB, "
    f"peak so far {stats['peak_bytes_in_use'] / 2**20:.0f} MiB"
  )


def mib(n: float) -> str:
  return f"{n / 2**20:.1f} MiB"


class Phases:
  """Runs named phases, timing each and counting its compilation; prints one line per phase."""

  def __init__(self, say: Printer):
    self.say, self.seconds = say, {}

  def __call__(self, name: str, fn, detail=lambda result, seconds: ""):
    with platform.CompileMonitor() as compiled:
      start = time.perf_counter()
      result = fn()
      seconds = time.perf_counter() - start
    self.seconds[name] = seconds
    share = compiled.seconds / seconds if seconds else 0.0
    extra = detail(result, seconds)
    self.say(
      f"{name:22s} {seconds:8.2f} s | compile {compiled.seconds:6.2f} s ({share:4.0%}), {compiled.backend_compiles} "
      f"programs, {compiled.cache_hits} from the cache | {extra}{'; ' if extra else ''}{device_memory()}"
    )
    return result


def backbone_pace(backbone: backbones.Backbone, dtype: str, batches: int):
  """A function timing `batches` forward passes pooling every tap on a device-resident batch -> images/s."""
  static = dict(
    backbone=backbone,
    taps=backbone.tap_names,
    target_size=FLAGS.target_size,
    cls_token_pool="normal",
    pool_size=0,
    dtype=dtype,
  )
  fn = jax.jit(lambda params, images: features._pooled_taps(params, images, **static))  # noqa: SLF001
  size = backbone.input_size
  images = jax.device_put(
    np.random.default_rng(0).integers(0, 256, (FLAGS.batch_size, size, size, 3), np.uint8)
  )

  def run():
    jax.block_until_ready(fn(backbone.params, images))  # compile (first call) and warm up
    start = time.perf_counter()
    for _ in range(batches):
      out = fn(backbone.params, images)
    jax.block_until_ready(out)
    return batches * FLAGS.batch_size / (time.perf_counter() - start)

  return run


def extraction(backbone, task, dtype: str, target_size: int, stats: features.ExtractionStats, **pooling):
  """A function extracting the training split's pooled features, every tap at `target_size`."""

  def run():
    return features.extract_task_split(
      backbone,
      task,
      "train800val200",
      taps=backbone.tap_names,
      target_size=target_size,
      batch_size=FLAGS.batch_size,
      dtype=dtype,
      stats=stats,
      **pooling,
    )

  return run


def moved(stats: features.ExtractionStats, pace: float):
  """An extraction phase's detail: its pace against the backbone's, the bytes moved, the waits."""

  def detail(result, seconds):
    rate = FLAGS.train_size / seconds
    return (
      f"{rate:.0f} images/s = {rate / pace:.2f} x the backbone's pace; to device "
      f"{mib(stats.bytes_to_device)}, from device {mib(stats.bytes_from_device)} (pooled features, the least: "
      f"{mib(stats.feature_bytes)}); waited {stats.input_wait_seconds:.2f} s for input, "
      f"{stats.device_wait_seconds:.2f} s for features"
    )

  return detail


def header(say: Printer, dev, cache: str | None) -> None:
  flags_used = "".join(f" --{f}" for f in ("smoke", "paper") if FLAGS[f].value)
  say(
    f"# experiments/bench_gpu_protocol.py{flags_used} --backbone={FLAGS.backbone} on device: {dev.platform} "
    f"({dev.device_kind}) x{jax.device_count()}; host {host_platform.machine()} with {os.cpu_count()} CPU cores; "
    f"jax {jax.__version__}; compilation cache {cache or 'off'}"
  )
  if dev.platform == "cpu" and not FLAGS.smoke:
    say("# warning: no accelerator found; the full sizes will take hours on a CPU (use --smoke)")


def single_target(say: Printer, phase: Phases, backbone: backbones.Backbone, task: base.Task) -> float:
  """Phases 0-4 at one target size (`--target_size`), every dtype cold and warm; returns the protocol's total."""
  config = load_config()
  config.learning.training_steps = FLAGS.training_steps
  if FLAGS.sweep is not None:
    config.sweep = FLAGS.sweep
  config.backbone.batch_size = FLAGS.batch_size
  points = grid.points(config)
  learnings = [cfg.learning for _, cfg in points]
  say(
    f"# {LABELS[backbone.name]} (random weights) at {FLAGS.input_size} px, {len(backbone.tap_names)} taps pooled "
    f"to target {FLAGS.target_size}; random uint8 images: {FLAGS.train_size} train, {FLAGS.test_size} test; "
    f"extraction batch {FLAGS.batch_size}; grid of {len(points)} points x 5 folds, {FLAGS.training_steps} steps, "
    f"batch {config.learning.train_batch_size}"
  )
  pace = {}
  for dtype in FLAGS.dtypes:
    pace[dtype] = phase(
      f"pace_{dtype}",
      backbone_pace(backbone, dtype, FLAGS.pace_batches),
      lambda r, s: f"backbone alone (device-resident batch): {r:.0f} images/s",
    )
  extracted = {}
  for dtype in FLAGS.dtypes:
    for kind in ("cold", "warm"):
      stats = features.ExtractionStats()
      extracted[dtype] = phase(
        f"extract_{dtype}_{kind}",
        extraction(backbone, task, dtype, FLAGS.target_size, stats),
        moved(stats, pace[dtype]),
      )
  feats, labels = extracted[FLAGS.dtypes[0]]
  for dtype in FLAGS.dtypes[1:]:
    worst = max(
      float(np.abs(extracted[dtype][0][t] - feats[t]).max() / max(np.abs(feats[t]).max(), 1e-12))
      for t in feats
    )
    say(
      f"# {dtype} vs {FLAGS.dtypes[0]} features: largest |difference| / the tap's largest |value|: {worst:.4f}"
    )
  prep = head2toe.prepare(feats)
  say(f"# {FLAGS.train_size} training images -> D = {prep.dim} features ({mib(prep.x.nbytes)} on the device)")

  cv = dict(seed=int(config.seed), num_classes=NUM_CLASSES)
  for kind in ("cold", "warm"):
    acc = phase(f"cv_{kind}", lambda: head2toe.cross_validate(prep, labels, learnings, **cv))
  best = int(np.argmax(acc.mean(1)))
  say(f"# best point {points[best][0]} (CV accuracy {acc[best].mean():.3f}, chance)")

  # The network's identity too: stream_test runs each head on the backbone its meta names.
  meta = {
    "backbone": backbone.name,
    "checkpoint_id": backbone.checkpoint_id,
    "input_size": backbone.input_size,
    "dtype": FLAGS.dtypes[0],
    "target_size": FLAGS.target_size,
    "pool_size": 0,
    "cls_token_pool": "normal",
  }
  head = phase(
    "fit",
    lambda: head2toe.fit(
      feats, labels, learnings[best], seed=int(config.seed), num_classes=NUM_CLASSES, meta=meta
    ),
    lambda h, s: f"{h.num_features} features kept from {len(h.kept)} taps",
  )
  phase(
    "test",
    lambda: streaming.stream_test(
      backbone, task, {"head2toe": head}, int(config.backbone.batch_size), {"head2toe": backbone.tap_names}
    )["head2toe"],
    lambda a, s: f"{FLAGS.test_size / s:.0f} images/s, accuracy {a:.3f} (chance)",
  )
  t = phase.seconds
  first = FLAGS.dtypes[0]
  total = t[f"extract_{first}_cold"] + t["cv_cold"] + t["fit"] + t["test"]
  say(
    f"protocol total (cold, {first}: extraction + CV + final fit + test): {total:.1f} s; peak host RSS "
    f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; {device_memory()}"
  )
  for dtype in FLAGS.dtypes:
    rate = FLAGS.train_size / t[f"extract_{dtype}_warm"]
    say(
      f"verdict {dtype}: extraction {rate:.0f} images/s warm vs the backbone's {pace[dtype]:.0f} images/s "
      f"({rate / pace[dtype]:.2f}x; goal >= 0.9 on an accelerator)"
    )
  return total


def paper_grid(say: Printer, phase: Phases, backbone: backbones.Backbone, task: base.Task) -> float:
  """The paper's grid as `h2t.evaluate.run` runs it, every phase cold; returns the protocol's total.

  The script's extraction phase runs once per target size (`h2t.evaluate.extract` would run the same
  extraction through the feature cache, one timing for all sizes); the CV and the final fit are
  `h2t.evaluate`'s own phases on a `Context` holding those features.
  """
  dtype = FLAGS.dtypes[0]
  config = load_config("paper")
  replace = dict(SMOKE_PAPER) if FLAGS.smoke else {}
  replace.update({TARGET_SIZE: FLAGS.paper_target_sizes} if FLAGS.paper_target_sizes else {})
  replace.update({TRAINING_STEPS: FLAGS.paper_training_steps} if FLAGS.paper_training_steps else {})
  config.sweep = paper_sweep(config, replace)
  b = config.backbone
  b.name, b.checkpoint, b.input_size, b.batch_size, b.dtype = (
    backbone.name,
    "",
    FLAGS.input_size,
    FLAGS.batch_size,
    dtype,
  )
  config.methods = ("head2toe",)
  config.eval_mode = "test"
  evaluate.validate(config)
  ctx = evaluate.Context(config, "", grid.points(config), methods_lib.selected(config.methods))
  ctx.backbones[grid.backbone_key(ctx.points[0][1])] = backbone
  ctx.task = task
  batches = grid.plan(ctx.points, [m for m in ctx.methods if m.searched], config_lib.FEATURE_FIELDS)
  say(
    f"# paper grid: {config.sweep}; {len(ctx.points)} points x 5 folds in {len(batches)} CV programs; "
    f"{LABELS[backbone.name]} (random weights) at {FLAGS.input_size} px, {len(backbone.tap_names)} taps, "
    f"{dtype}; random uint8 images: {FLAGS.train_size} train, {FLAGS.test_size} test; extraction batch "
    f"{FLAGS.batch_size}; probe batch {config.learning.train_batch_size}"
  )
  pace = phase(
    f"pace_{dtype}",
    backbone_pace(backbone, dtype, FLAGS.pace_batches),
    lambda r, s: f"backbone alone (device-resident batch): {r:.0f} images/s",
  )
  by_size = grid.group_by(ctx.points, lambda p: int(p[1].backbone.additional_features_target_size))
  for size, members in by_size.items():
    cfg = ctx.points[members[0]][1]
    stats = features.ExtractionStats()
    pooling = dict(
      cls_token_pool=cfg.backbone.cls_token_pool, pool_size=int(cfg.backbone.additional_features_pool_size)
    )
    feats, ctx.labels = phase(
      f"extract_{size}", extraction(backbone, task, dtype, size, stats, **pooling), moved(stats, pace)
    )
    for i in members:
      ctx.feats[grid.feature_key(ctx.points[i][1], config_lib.FEATURE_FIELDS)] = feats
    dim = sum(v.shape[1] for v in feats.values())
    say(f"# target size {size}: D = {dim} features ({mib(4 * dim * len(ctx.labels))} as float32)")

  results = {"grid": {}, "methods": {}}

  def cv_detail(chosen, seconds):
    best = results["methods"]["head2toe"]
    return (
      f"{len(ctx.points)} points x 5 folds = {5 * len(ctx.points) / seconds:.1f} probe pairs/s; best "
      f"{best['chosen_point']} (CV accuracy {best['valid_accuracy']:.3f}, chance)"
    )

  chosen = phase("cv", lambda: evaluate.cross_validate(ctx, results), cv_detail)
  heads = phase(
    "fit",
    lambda: evaluate.fit_chosen(ctx, chosen, results),
    lambda h, s: f"{h['head2toe'].num_features} features kept from {len(h['head2toe'].kept)} taps",
  )
  cfg = ctx.points[chosen["head2toe"]][1]
  taps = evaluate.training_taps(ctx, chosen, heads)
  phase(
    f"test_{int(cfg.backbone.additional_features_target_size)}",
    lambda: streaming.stream_test(ctx.backbones.values(), task, heads, FLAGS.batch_size, taps)["head2toe"],
    lambda a, s: f"{FLAGS.test_size / s:.0f} images/s, accuracy {a:.3f} (chance)",
  )
  total = sum(s for name, s in phase.seconds.items() if not name.startswith("pace_"))
  say(
    f"protocol total (cold, {dtype}: {len(by_size)} extractions + CV of {len(ctx.points)} points + final fit + "
    f"test): {total:.1f} s (bar on an accelerator, ResNet-50, 1000 train, 10k test: <= 180 s); peak host RSS "
    f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; {device_memory()}"
  )
  return total


def main(argv):
  del argv
  if FLAGS.smoke:
    for name, value in dict(
      input_size=32,
      train_size=100,
      test_size=256,
      target_size=256,
      training_steps=10,
      batch_size=32,
      pace_batches=2,
    ).items():
      if not FLAGS[name].present:
        FLAGS[name].value = value
    if not FLAGS["sweep"].present and not FLAGS.paper:
      FLAGS.sweep = "learning.feature_selection.keep_fraction=0.05,0.1"
  if FLAGS.paper and FLAGS["sweep"].present:
    raise app.UsageError("--paper searches the paper's grid; --sweep does not apply")
  for dtype in FLAGS.dtypes:
    features.check_dtype(dtype)
  FLAGS.batch_size = platform.resolve_batch_size(FLAGS.batch_size)
  cache = platform.enable_compilation_cache(FLAGS.compilation_cache_dir)
  say = Printer()
  dev = jax.devices()[0]
  header(say, dev, cache)
  backbone = random_backbone(FLAGS.backbone, FLAGS.input_size)
  task = random_task(FLAGS.input_size, FLAGS.train_size, FLAGS.test_size)
  run = paper_grid if FLAGS.paper else single_target
  total = run(say, Phases(say), backbone, task)
  say(
    f"verdict: ran on {dev.platform} ({dev.device_kind}); protocol for one task"
    f"{' (the paper grid)' if FLAGS.paper else ''} in {total:.1f} s"
  )
  if FLAGS.out:
    say.write(FLAGS.out)


if __name__ == "__main__":
  app.run(main)
