r"""The hyperparameter x fold grid as one program vs the same runs one after another.

On real features (EfficientNet-Lite0 on scikit-learn's digits, extracted once,
every tap pooled to the target size), it times

* grid: `head2toe.cross_validate` with every grid point at once: the points
  share one compiled program (stage 1, selection, stage 2, accuracy; each
  stage vmapped over the 5 folds and the points);
* one by one: `head2toe.cross_validate` with one grid point at a time (one
  run = one grid point's 5-fold CV as one program), for every point;
* one single-fold fit: `head2toe.run_grid` with one point on one fold (the
  reference's unit of work: one point, one fold).

Compile time is kept out of both sides: every program is warmed up once
(the grid program; one single-point program per keep fraction, since the
number of kept features is a shape) and then timed; the compile time
(cold call minus warm call) is printed on its own. The fold accuracies of the
two ways are compared point by point. Goal: the whole grid costs at most 3x
one run.

  python experiments/bench_grid.py
  python experiments/bench_grid.py --training_steps=100 --input_size=224 \
      --out=experiments/results/bench_grid_cpu.txt
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import app, flags
from bench_common import Printer, load_config  # noqa: F401 -- experiments/ is on sys.path

from h2t import backbones, data, features, grid, head2toe
from h2t.data import base

FLAGS = flags.FLAGS
flags.DEFINE_integer("input_size", 224, "Backbone input size (EfficientNet-Lite0's own is 224).")
flags.DEFINE_integer("target_size", 1024, "Pooling target size per tap.")
flags.DEFINE_integer("training_steps", 500, "Steps of each probe (stage 1 and stage 2).")
flags.DEFINE_list("keep_fractions", ["0.01", "0.05", "0.1", "0.2"], "Grid: feature_selection.keep_fraction.")
flags.DEFINE_list("coefs", ["1e-3", "1e-4", "1e-5"], "Grid: the selection run's group_lrp_regularizer_coef.")
flags.DEFINE_list("learning_rates", ["0.1", "0.01"], "Grid: learning.learning_rate.")
flags.DEFINE_integer("single_fold_repeats", 3, "Timed repeats of the single-fold fit (median is reported).")
flags.DEFINE_string("out", "", "Also write the printed figures to this file.")

TARGET_RATIO = 3.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sweep_string(keep_fractions: Sequence[str], coefs: Sequence[str], learning_rates: Sequence[str]) -> str:
  return (
    f"learning.feature_selection.keep_fraction={','.join(keep_fractions)};"
    "learning.feature_selection.learning_config_overwrite.group_lrp_regularizer_coef="
    f"{','.join(coefs)};"
    f"learning.learning_rate={','.join(learning_rates)}"
  )


def peak_rss_reset() -> bool:
  """Resets the kernel's peak-RSS mark of this process (Linux); False if it cannot."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss_mib() -> float:
  """VmHWM of this process in MiB (the peak since the last reset)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def timed(fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def main(argv):
  del argv
  say = Printer()
  say(
    f"# experiments/bench_grid.py on {platform.machine()}, {os.cpu_count()} CPU cores, "
    f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}) "
    f"x{jax.device_count()}; load average at start {os.getloadavg()[0]:.1f}"
  )
  config = load_config()
  config.learning.training_steps = FLAGS.training_steps
  config.sweep = sweep_string(FLAGS.keep_fractions, FLAGS.coefs, FLAGS.learning_rates)
  points = grid.points(config)
  learnings = [cfg.learning for _, cfg in points]
  if len({grid.program_key(lr) for lr in learnings}) != 1:
    raise app.UsageError("the grid points do not share one program; sweep only traced values")

  backbone = backbones.create("efficientnet_lite0", input_size=FLAGS.input_size)
  task = data.get_task("digits")
  start = time.perf_counter()
  feats, labels = features.extract_task_split(
    backbone, task, "train800val200", taps=backbone.tap_names, target_size=FLAGS.target_size
  )
  extract_s = time.perf_counter() - start
  prep = head2toe.prepare(feats)
  num_classes = task.num_classes
  say(
    f"# features: EfficientNet-Lite0 (packaged ImageNet weights) at {FLAGS.input_size} px on digits "
    f"train800val200 (1000 images, {num_classes} classes): {len(prep.taps)} taps pooled to target "
    f"{FLAGS.target_size} -> D = {prep.dim} features; extracted once in {extract_s:.1f}s (incl. compile)"
  )
  lr0 = learnings[0]
  say(
    f"# grid: {len(points)} points = keep_fraction {FLAGS.keep_fractions} x selection "
    f"group_lrp_regularizer_coef {FLAGS.coefs} x learning_rate {FLAGS.learning_rates}; "
    f"5 folds of 800/200; {lr0.training_steps} steps, batch {lr0.train_batch_size}, "
    f"{lr0.optimizer}, {lr0.feature_normalization}, selection {lr0.feature_selection.type}"
  )
  cv = dict(seed=int(config.seed), num_classes=num_classes)

  # The grid as one program: cold (trace + compile + run), then warm.
  grid_cold_s, _ = timed(lambda: head2toe.cross_validate(prep, labels, learnings, **cv))
  can_reset = peak_rss_reset()
  grid_s, grid_acc = timed(lambda: head2toe.cross_validate(prep, labels, learnings, **cv))
  grid_peak = peak_rss_mib() if can_reset else float("nan")

  # One by one: warm up one point per keep fraction (the compiled shapes), then time every point.
  cold: dict[float, tuple[int, float]] = {}
  for i, lr in enumerate(learnings):
    kf = float(lr.feature_selection.keep_fraction)
    if kf not in cold:
      cold[kf] = (i, timed(lambda lr=lr: head2toe.cross_validate(prep, labels, [lr], **cv))[0])
  peak_rss_reset()
  one_s = np.zeros(len(points))
  one_acc = np.zeros_like(grid_acc)
  for i, lr in enumerate(learnings):
    one_s[i], acc = timed(lambda lr=lr: head2toe.cross_validate(prep, labels, [lr], **cv))
    one_acc[i] = acc[0]
  one_peak = peak_rss_mib() if can_reset else float("nan")
  one_compile = {kf: c - one_s[i] for kf, (i, c) in cold.items()}

  # One point on one fold (fold 4: VTAB's own train800 -> val200), at the config's default values.
  default = {
    "learning.feature_selection.keep_fraction": 0.1,
    "learning.feature_selection.learning_config_overwrite.group_lrp_regularizer_coef": 1e-4,
    "learning.learning_rate": 0.1,
  }
  p_single = next((i for i, (o, _) in enumerate(points) if o == default), 0)
  fold = base.fold_indices(4, len(labels))

  def single_fold():
    return head2toe.run_grid(prep, labels, [learnings[p_single]], [fold], [4], **cv).accuracy

  single_cold_s, _ = timed(single_fold)
  single = [timed(single_fold) for _ in range(FLAGS.single_fold_repeats)]
  single_s = float(np.median([s for s, _ in single]))
  single_acc = float(single[0][1][0, 0])

  one_mean = one_s.mean()
  p_default_s = one_s[p_single]
  ratio = grid_s / one_mean
  say()
  say(
    f"grid, one program ({len(points)} points x 5 folds): {grid_s:8.2f} s warm; compile {grid_cold_s - grid_s:.1f} s"
  )
  say(
    f"one by one ({len(points)} single-point 5-fold programs): {one_s.sum():8.2f} s in all; one run "
    f"mean {one_mean:.2f} s (min {one_s.min():.2f}, max {one_s.max():.2f}); compile per keep fraction "
    + ", ".join(f"{kf}: {c:.1f} s" for kf, c in one_compile.items())
  )
  say(
    f"one single-fold fit (point {points[p_single][0]}, fold 4): {single_s:.2f} s warm "
    f"(median of {len(single)}); compile {single_cold_s - single_s:.1f} s"
  )
  say(
    f"peak RSS during the warm grid: {grid_peak:.0f} MiB; during the one-by-one pass: {one_peak:.0f} MiB "
    f"(features alone: {prep.x.size * 4 / 2**20:.0f} MiB)"
  )
  say(
    f"ratios: grid / one run (mean) = {ratio:.2f}x; grid / one run (default point) = "
    f"{grid_s / p_default_s:.2f}x; grid / one single-fold fit = {grid_s / single_s:.1f}x; "
    f"one by one / grid = {one_s.sum() / grid_s:.2f}x (speed-up of batching)"
  )

  # What the grid has to compute, in multiply-adds per training step, relative to one run: stage 1
  # trains one head per distinct selection setting on all D features, stage 2 one head per point on
  # its kept features, padded to the largest keep fraction.
  d = prep.dim
  sel_rows = {
    (
      float(lr.learning_rate),
      float(lr.feature_selection.learning_config_overwrite.group_lrp_regularizer_coef),
    )
    for lr in learnings
  }
  kept = np.array([int(d * float(lr.feature_selection.keep_fraction)) for lr in learnings])
  grid_work = len(sel_rows) * d + len(points) * kept.max()
  one_work = d + kept.mean()
  say(
    f"work model (per step, per fold): grid = {len(sel_rows)} stage-1 heads x D + {len(points)} stage-2 heads "
    f"x K_max ({kept.max()}) = {grid_work / one_work:.1f}x one run (D + mean K); without the padding to "
    f"K_max: {(len(sel_rows) * d + kept.sum()) / one_work:.1f}x"
  )

  diff = np.abs(grid_acc - one_acc)
  same = int((diff == 0).sum())
  say(
    f"accuracy check: grid vs one by one, {same}/{diff.size} (point, fold) accuracies identical, "
    f"max |difference| {diff.max():.4f}; single-fold fit {single_acc:.4f} vs grid's fold 4 "
    f"{grid_acc[p_single, 4]:.4f}"
  )
  best = int(np.argmax(grid_acc.mean(1)))
  say(f"best point: {points[best][0]} with mean CV accuracy {grid_acc[best].mean():.4f}")
  ok = ratio <= TARGET_RATIO
  say(
    f"verdict: {'PASS' if ok else 'FAIL'} -- the grid of {len(points)} points x 5 folds costs {ratio:.2f}x "
    f"one run (target <= {TARGET_RATIO:.0f}x); accuracies "
    f"{'equal' if same == diff.size else 'differ'}; load average at end {os.getloadavg()[0]:.1f}"
  )
  if FLAGS.out:
    say.write(FLAGS.out)


if __name__ == "__main__":
  app.run(main)
