r"""The protocol for one task on cached features vs the reference's re-extraction per run.

h2t: `h2t.evaluate.run` on one task (eval_mode 'test', method head2toe):
extract the 1000 training images once (cold: compile included, cache
empty), 5-fold CV of every grid point as one program, the final fit on the
1000 images, then the streamed test. The protocol time is extraction + CV +
final fit, as the run's own timings report them.

The reference (google-research/head2toe, TF2 + TF-Hub) has no feature cache:
one `evaluate.py` process per grid point runs the 5 folds as episodes, and
each episode (`FinetuneFS.evaluate`) passes the images through the backbone
again:
  * `_calculate_scores` embeds the support set (800 images) -- embeddings
    that connectivity scoring then does not use --,
  * `_optimize_finetune` of the selection run embeds the support set again,
  * `_optimize_finetune` of the final head embeds the support set a third
    time and the query set (200 images, `cached_eval=True`) once,
so 3 x 800 + 200 = 2600 images per (grid point, fold), and the test run
(one episode on all 1000 training images) embeds 3 x 1000 = 3000 training
images. The test set is embedded once on both sides, so it is left out of
both. Measuring that directly would take hours on a CPU, so the reference's
time is modelled from two figures measured here, warm (compile excluded):
one extraction of the 1000 training images (-> seconds per image) and one
single-fold fit of one grid point with h2t's trainer (stage 1 + stage 2;
the reference trains with Keras, one step at a time, so this favours it):

  reference = images embedded x seconds/image + runs x seconds/fit,
  runs = grid points x 5 folds + 1 final fit.

A lower bound is printed too: one extraction of the 1000 images per run.
Goal: h2t's protocol at least 50x faster than the reference's.

  python experiments/bench_protocol.py
  python experiments/bench_protocol.py --training_steps=100 \
      --out=experiments/results/bench_protocol_cpu.txt
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from bench_common import Printer, load_config  # noqa: F401 -- experiments/ is on sys.path

from h2t import backbones, data, evaluate, features, grid, head2toe
from h2t.data import base

FLAGS = flags.FLAGS
flags.DEFINE_string("task", "digits", "Task (an offline one: digits or fashion_mnist).")
flags.DEFINE_integer("input_size", 224, "Backbone input size (EfficientNet-Lite0's own is 224).")
flags.DEFINE_integer("target_size", 1024, "Pooling target size per tap.")
flags.DEFINE_integer("training_steps", 500, "Steps of each probe (stage 1 and stage 2).")
flags.DEFINE_string("sweep", None, "config.sweep of the grid (default: the sweep of configs/vtab.py).")
flags.DEFINE_integer("fit_repeats", 3, "Timed repeats of the single-fold fit (median is reported).")
flags.DEFINE_string("out", "", "Also write the printed figures to this file.")

TARGET_SPEEDUP = 50.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPPORT, QUERY, TRAIN = 800, 200, 1000
# Backbone passes per episode in the reference (see the module docstring).
SUPPORT_EMBEDDINGS_PER_EPISODE = 3


def median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  say = Printer()
  say(
    f"# experiments/bench_protocol.py on {platform.machine()}, {os.cpu_count()} CPU cores, "
    f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}) "
    f"x{jax.device_count()}; load average at start {os.getloadavg()[0]:.1f}"
  )
  config = load_config()
  config.dataset = FLAGS.task
  config.eval_mode = "test"
  config.methods = ("head2toe",)
  config.backbone.input_size = FLAGS.input_size
  config.backbone.additional_features_target_size = FLAGS.target_size
  config.learning.training_steps = FLAGS.training_steps
  if FLAGS.sweep is not None:
    config.sweep = FLAGS.sweep
  num_points = len(grid.points(config))
  say(
    f"# task {FLAGS.task}, EfficientNet-Lite0 (packaged ImageNet weights) at {FLAGS.input_size} px, all taps "
    f"pooled to target {FLAGS.target_size}; grid of {num_points} points ({config.sweep}); 5 folds of "
    f"800/200; {FLAGS.training_steps} steps per probe, batch {config.learning.train_batch_size}"
  )

  task = data.get_task(FLAGS.task)
  # h2t: the whole protocol, cold (empty cache, nothing compiled).
  workdir = tempfile.mkdtemp(prefix="bench_protocol_")
  try:
    results = evaluate.run(config, workdir)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  t = results["timings_s"]
  h2t_s = t["extract_train"] + t["cv_head2toe"] + t["fit_head2toe"]
  say()
  say(
    f"h2t protocol (cold: compile included): extraction of {TRAIN} images {t['extract_train']:.1f} s + "
    f"CV of {num_points} points x 5 folds {t['cv_head2toe']:.1f} s + final fit {t['fit_head2toe']:.1f} s "
    f"= {h2t_s:.1f} s  (not counted: backbone load {t['load']:.1f} s, streamed test of "
    f"{task.size('test')} test images {t['test']:.1f} s; test accuracy "
    f"{results['methods']['head2toe']['test_accuracy']:.4f}, CV accuracy "
    f"{results['methods']['head2toe']['valid_accuracy']:.4f})"
  )

  # The reference's unit costs, measured warm in this process.
  backbone = backbones.create("efficientnet_lite0", input_size=FLAGS.input_size)
  taps = evaluate.resolve_taps(backbone, config.backbone)

  def extract():
    return features.extract_task_split(
      backbone,
      task,
      "train800val200",
      taps=taps,
      target_size=FLAGS.target_size,
      batch_size=int(config.backbone.batch_size),
    )

  feats, labels = extract()  # compile
  extract_s = median_seconds(lambda: extract()[1], 1)
  per_image = extract_s / TRAIN
  prep = head2toe.prepare(feats)
  _, point = grid.points(config)[0]
  fold = base.fold_indices(4, len(labels))

  def fit_one():
    return head2toe.run_grid(
      prep,
      labels,
      [point.learning],
      [fold],
      [4],
      seed=int(config.seed),
      num_classes=task.num_classes,
    ).accuracy

  fit_one()  # compile
  fit_s = median_seconds(fit_one, FLAGS.fit_repeats)
  say(
    f"unit costs (warm): extraction of {TRAIN} images {extract_s:.1f} s ({1000 * per_image:.1f} ms/image, "
    f"{1 / per_image:.1f} images/s); one single-fold fit (stage 1 + stage 2, 800 images) {fit_s:.2f} s"
  )

  runs = num_points * base.NUM_FOLDS + 1
  images_ref = num_points * base.NUM_FOLDS * (SUPPORT_EMBEDDINGS_PER_EPISODE * SUPPORT + QUERY)
  images_ref += SUPPORT_EMBEDDINGS_PER_EPISODE * TRAIN
  images_low = runs * TRAIN
  ref_s = images_ref * per_image + runs * fit_s
  low_s = images_low * per_image + runs * fit_s
  say(
    f"reference model: {num_points} points x 5 folds = {num_points * base.NUM_FOLDS} episodes x "
    f"({SUPPORT_EMBEDDINGS_PER_EPISODE} x {SUPPORT} support + {QUERY} query images) + final episode "
    f"{SUPPORT_EMBEDDINGS_PER_EPISODE} x {TRAIN} = {images_ref} images through the backbone "
    f"({images_ref * per_image:.0f} s) + {runs} fits ({runs * fit_s:.0f} s) = {ref_s:.0f} s "
    f"({ref_s / 3600:.2f} h)"
  )
  say(
    f"lower bound: one extraction of {TRAIN} images per run, {runs} runs = {images_low} images "
    f"({images_low * per_image:.0f} s) + {runs} fits ({runs * fit_s:.0f} s) = {low_s:.0f} s"
  )
  speedup = ref_s / h2t_s
  say(
    f"h2t protocol vs reference: {speedup:.1f}x faster (lower-bound model: {low_s / h2t_s:.1f}x); "
    f"h2t time split: extraction {100 * t['extract_train'] / h2t_s:.0f}%, CV "
    f"{100 * t['cv_head2toe'] / h2t_s:.0f}%, final fit {100 * t['fit_head2toe'] / h2t_s:.0f}%"
  )
  ok = speedup >= TARGET_SPEEDUP
  say(
    f"verdict: {'PASS' if ok else 'FAIL'} -- cached features make the protocol {speedup:.1f}x faster than "
    f"the reference's re-extraction per run (target >= {TARGET_SPEEDUP:.0f}x); load average at end "
    f"{os.getloadavg()[0]:.1f}"
  )
  if FLAGS.out:
    say.write(FLAGS.out)


if __name__ == "__main__":
  app.run(main)
