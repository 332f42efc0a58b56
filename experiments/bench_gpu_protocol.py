r"""The full protocol for one task on an accelerator: ResNet-50 at 224 px, VTAB-1k sizes.

ResNet-50 (h2t.models.resnet, random weights from `module.init`: no checkpoint
is needed, and the costs do not depend on the weights) on a task of random
images at the backbone's input size, VTAB-1k sized: 1000 training images
(train800val200) and 10,000 test images, 10 random labels. It runs the
protocol of `h2t.evaluate.run` step by step and times each step:

  1. extraction of the 1000 training images, every tap pooled to the target
     size (cold: compile included; then warm: a second pass);
  2. 5-fold CV of every grid point as one program (cold, then warm);
  3. the final fit of the best point on the 1000 images;
  4. the streamed test of the 10,000 images (images -> kept taps -> logits).

Images come from a pool of random images held in memory, so no decoding or
resizing is timed (experiments/bench_input_pipeline.py measures that part).
Accuracies are those of random labels: chance. The device it ran on is printed.

  python experiments/bench_gpu_protocol.py                 # on a GPU
  python experiments/bench_gpu_protocol.py --smoke         # tiny, on the CPU, ~1 minute
"""

from __future__ import annotations

import importlib.util
import os
import platform
import resource
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from bench_common import Printer, load_config  # noqa: F401 -- experiments/ is on sys.path

from h2t import backbones, evaluate, features, grid, head2toe
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
flags.DEFINE_integer("batch_size", 64, "Images per extraction forward pass.")
flags.DEFINE_string("sweep", None, "config.sweep of the grid (default: the sweep of configs/vtab.py).")
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


def device_peak() -> str:
  """The device's peak memory in use, where the backend reports it."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" not in stats:
    return "n/a (not reported by this backend)"
  return f"{stats['peak_bytes_in_use'] / 2**20:.0f} MiB"


def main(argv):
  del argv
  if FLAGS.smoke:
    for name, value in dict(
      input_size=32, train_size=100, test_size=256, target_size=256, training_steps=10, batch_size=32
    ).items():
      if not FLAGS[name].present:
        FLAGS[name].value = value
    if not FLAGS["sweep"].present:
      FLAGS.sweep = "learning.feature_selection.keep_fraction=0.05,0.1"
  say = Printer()
  dev = jax.devices()[0]
  say(
    f"# experiments/bench_gpu_protocol.py{' --smoke' if FLAGS.smoke else ''} on device: {dev.platform} "
    f"({dev.device_kind}) x{jax.device_count()}; host {platform.machine()} with {os.cpu_count()} CPU cores; "
    f"jax {jax.__version__}"
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
    f"{FLAGS.target_size}; random images: {FLAGS.train_size} train, {FLAGS.test_size} test; extraction batch "
    f"{FLAGS.batch_size}; grid of {len(points)} points x 5 folds, {FLAGS.training_steps} steps, batch "
    f"{config.learning.train_batch_size}"
  )
  timings: dict[str, float] = {}

  def extract():
    return features.extract_task_split(
      backbone,
      task,
      "train800val200",
      taps=backbone.tap_names,
      target_size=FLAGS.target_size,
      batch_size=FLAGS.batch_size,
    )

  for phase in ("extract_cold", "extract_warm"):
    start = time.perf_counter()
    feats, labels = extract()
    timings[phase] = time.perf_counter() - start
  prep = head2toe.prepare(feats)
  say(
    f"extraction of {FLAGS.train_size} training images -> D = {prep.dim} features: cold {timings['extract_cold']:.1f} s "
    f"(compile included), warm {timings['extract_warm']:.2f} s = {FLAGS.train_size / timings['extract_warm']:.0f} "
    "images/s"
  )

  cv = dict(seed=int(config.seed), num_classes=NUM_CLASSES)
  for phase in ("cv_cold", "cv_warm"):
    start = time.perf_counter()
    acc = head2toe.cross_validate(prep, labels, learnings, **cv)
    timings[phase] = time.perf_counter() - start
  best = int(np.argmax(acc.mean(1)))
  say(
    f"CV of {len(points)} points x 5 folds, one program: cold {timings['cv_cold']:.1f} s (compile included), "
    f"warm {timings['cv_warm']:.2f} s; best point {points[best][0]} (CV accuracy {acc[best].mean():.3f}, chance)"
  )

  meta = {"target_size": FLAGS.target_size, "pool_size": 0, "cls_token_pool": "normal"}
  start = time.perf_counter()
  head = head2toe.fit(
    feats, labels, learnings[best], seed=int(config.seed), num_classes=NUM_CLASSES, meta=meta
  )
  timings["fit"] = time.perf_counter() - start
  say(
    f"final fit on {FLAGS.train_size} images: {timings['fit']:.2f} s (compile included); {head.num_features} features kept from {len(head.kept)} taps"
  )

  start = time.perf_counter()
  test_acc = evaluate.stream_test(backbone, task, {"head2toe": head}, int(config.backbone.batch_size))[
    "head2toe"
  ]
  timings["test"] = time.perf_counter() - start
  say(
    f"streamed test of {FLAGS.test_size} images: {timings['test']:.1f} s (compile included) = "
    f"{FLAGS.test_size / timings['test']:.0f} images/s; accuracy {test_acc:.3f} (chance)"
  )
  total = timings["extract_cold"] + timings["cv_cold"] + timings["fit"] + timings["test"]
  say(
    f"protocol total (cold: extraction + CV + final fit + test): {total:.1f} s; peak host RSS "
    f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; peak device memory "
    f"{device_peak()}"
  )
  say(f"verdict: ran on {dev.platform} ({dev.device_kind}); protocol for one task in {total:.1f} s")
  if FLAGS.out:
    say.write(FLAGS.out)


if __name__ == "__main__":
  app.run(main)
