r"""The full protocol for one task on an accelerator: ResNet-50 at 224 px, VTAB-1k sizes.

ResNet-50 (h2t.models.resnet, random weights from `module.init`: no checkpoint
is needed, and the costs do not depend on the weights) on a task of random
images at the backbone's input size, VTAB-1k sized: 1000 training images
(train800val200) and 10,000 test images, 10 random labels. It runs the
protocol of `h2t.evaluate.run` step by step and times each step:

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
  python experiments/bench_gpu_protocol.py --smoke         # tiny, on the CPU, a few minutes
"""

from __future__ import annotations

import importlib.util
import os
import platform as host_platform
import resource
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from bench_common import Printer, load_config  # noqa: F401 -- experiments/ is on sys.path

from h2t import backbones, features, grid, head2toe, platform, streaming
from h2t.data import base
from h2t.models import common, resnet

FLAGS = flags.FLAGS
flags.DEFINE_bool(
  "smoke", False, "Tiny sizes (32 px, 100 train, 256 test, 10 steps, 2 points): checks it runs."
)
flags.DEFINE_integer("input_size", 224, "ResNet-50 input size.")
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


def resnet50_random(input_size: int) -> backbones.Backbone:
  """ResNet-50 with `module.init` weights, as an h2t backbone."""
  module = resnet.ResNet()
  params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, input_size, input_size, 3)))["params"]
  return backbones.Backbone(
    name="resnet50",
    module=module,
    params=params,
    input_size=input_size,
    normalization=common.IMAGENET,
    tap_names=resnet.tap_names(),
    checkpoint_id="random-init:0",
  )


def learning_config(steps: int, sweep: str | None) -> ml_collections.ConfigDict:
  """configs/vtab.py's config with the given steps and sweep."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("vtab_config", os.path.join(repo, "configs", "vtab.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.learning.training_steps = steps
  if sweep is not None:
    config.sweep = sweep
  return config


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
    if not FLAGS["sweep"].present:
      FLAGS.sweep = "learning.feature_selection.keep_fraction=0.05,0.1"
  for dtype in FLAGS.dtypes:
    features.check_dtype(dtype)
  FLAGS.batch_size = platform.resolve_batch_size(FLAGS.batch_size)
  cache = platform.enable_compilation_cache(FLAGS.compilation_cache_dir)
  say = Printer()
  dev = jax.devices()[0]
  say(
    f"# experiments/bench_gpu_protocol.py{' --smoke' if FLAGS.smoke else ''} on device: {dev.platform} "
    f"({dev.device_kind}) x{jax.device_count()}; host {host_platform.machine()} with {os.cpu_count()} CPU cores; "
    f"jax {jax.__version__}; compilation cache {cache or 'off'}"
  )
  if dev.platform == "cpu" and not FLAGS.smoke:
    say("# warning: no accelerator found; the full sizes will take hours on a CPU (use --smoke)")
  config = learning_config(FLAGS.training_steps, FLAGS.sweep)
  config.backbone.batch_size = FLAGS.batch_size
  points = grid.points(config)
  learnings = [cfg.learning for _, cfg in points]
  backbone = resnet50_random(FLAGS.input_size)
  task = random_task(FLAGS.input_size, FLAGS.train_size, FLAGS.test_size)
  say(
    f"# ResNet-50 (random weights) at {FLAGS.input_size} px, {len(backbone.tap_names)} taps pooled to target "
    f"{FLAGS.target_size}; random uint8 images: {FLAGS.train_size} train, {FLAGS.test_size} test; extraction batch "
    f"{FLAGS.batch_size}; grid of {len(points)} points x 5 folds, {FLAGS.training_steps} steps, batch "
    f"{config.learning.train_batch_size}"
  )
  phase = Phases(say)
  pace = {}
  for dtype in FLAGS.dtypes:
    pace[dtype] = phase(
      f"pace_{dtype}",
      backbone_pace(backbone, dtype, FLAGS.pace_batches),
      lambda r, s: f"backbone alone (device-resident batch): {r:.0f} images/s",
    )

  def extract(dtype: str, stats: features.ExtractionStats):
    def run():
      return features.extract_task_split(
        backbone,
        task,
        "train800val200",
        taps=backbone.tap_names,
        target_size=FLAGS.target_size,
        batch_size=FLAGS.batch_size,
        dtype=dtype,
        stats=stats,
      )

    return run

  def moved(stats: features.ExtractionStats, dtype: str):
    def detail(result, seconds):
      rate = FLAGS.train_size / seconds
      return (
        f"{rate:.0f} images/s = {rate / pace[dtype]:.2f} x the backbone's pace; to device "
        f"{mib(stats.bytes_to_device)}, from device {mib(stats.bytes_from_device)} (pooled features, the least: "
        f"{mib(stats.feature_bytes)}); waited {stats.input_wait_seconds:.2f} s for input, "
        f"{stats.device_wait_seconds:.2f} s for features"
      )

    return detail

  extracted = {}
  for dtype in FLAGS.dtypes:
    for kind in ("cold", "warm"):
      stats = features.ExtractionStats()
      extracted[dtype] = phase(f"extract_{dtype}_{kind}", extract(dtype, stats), moved(stats, dtype))
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

  meta = {"target_size": FLAGS.target_size, "pool_size": 0, "cls_token_pool": "normal"}
  head = phase(
    "fit",
    lambda: head2toe.fit(
      feats, labels, learnings[best], seed=int(config.seed), num_classes=NUM_CLASSES, meta=meta
    ),
    lambda h, s: f"{h.num_features} features kept from {len(h.kept)} taps",
  )
  phase(
    "test",
    lambda: streaming.stream_test(backbone, task, {"head2toe": head}, int(config.backbone.batch_size))[
      "head2toe"
    ],
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
  say(f"verdict: ran on {dev.platform} ({dev.device_kind}); protocol for one task in {total:.1f} s")
  if FLAGS.out:
    say.write(FLAGS.out)


if __name__ == "__main__":
  app.run(main)
