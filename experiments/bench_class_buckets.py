r"""Compile once per sweep: a second task with another class count reuses the first one's programs.

A sweep runs its tasks one after another in one process (`experiments/vtab_sweep.py`), on one
backbone, so extraction programs are shared; the probes' programs depend on the class count. Each
round starts a fresh Python process (empty in-memory jit cache, no persistent cache) that runs the
protocol (`h2t.evaluate.run`, offline default config at a small input size) on three folder tasks
made of scikit-learn's digits images, back to back, each 1000 training and 200 test images (VTAB-1k
tasks share their example and feature counts too):

  1. digits 0..9 (10 classes; compiles everything);
  2. digits 0..8 (9 classes: the same class bucket, 16, as task 1);
  3. digits 0..6 (7 classes: another bucket, 8).

and records each task's wall time, compile time (`h2t.platform.CompileMonitor`: tracing, lowering,
XLA) and programs built, with `learning.class_buckets` on and off. The issue's bound: a second task
of a sweep spends at most 10% of its time compiling.

  python experiments/bench_class_buckets.py [--input_size=32] [--training_steps=30] [--repeats=2] [--programs]

`--programs` lists, for every task after the first, the functions it compiled (programs, seconds).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import bench_common  # experiments/ is on sys.path
from absl import app, flags
from bench_common import Printer, load_config

FLAGS = flags.FLAGS
flags.DEFINE_integer("input_size", 32, "Backbone input size.")
flags.DEFINE_integer("target_size", 64, "Pooling target size per tap.")
flags.DEFINE_integer("training_steps", 30, "Probe training steps.")
flags.DEFINE_integer("repeats", 2, "Rounds (each: one fresh process per setting).")
flags.DEFINE_bool("programs", False, "Also list what each task after the first compiled, by function.")
flags.DEFINE_string("out", "", "Also write the printed figures to this file.")
flags.DEFINE_string("child", "", "Internal: 'on' or 'off', run both tasks in this process.")

TASK_CLASSES = (10, 9, 7)


def write_folder_task(root: str, num_classes: int) -> str:
  """Digits images of classes 0..num_classes-1 as PNG files: root/train/<c>/ (1000) and root/test/<c>/ (200)."""
  import numpy as np
  from PIL import Image
  from sklearn.datasets import load_digits

  digits = load_digits()
  keep = np.flatnonzero(digits.target < num_classes)
  for i, idx in enumerate(keep[:1200]):
    split = "train" if i < 1000 else "test"
    folder = os.path.join(root, split, f"class_{digits.target[idx]}")
    os.makedirs(folder, exist_ok=True)
    pixels = (digits.images[idx] * (255 / 16)).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(os.path.join(folder, f"{idx:04d}.png"))
  return root


def child(buckets: str) -> dict:
  import jax

  from h2t import evaluate, platform

  out: dict = {"device": jax.devices()[0].platform, "tasks": []}
  with tempfile.TemporaryDirectory() as tmp:
    tasks = ["folder:" + write_folder_task(os.path.join(tmp, f"digits{c}"), c) for c in TASK_CLASSES]
    for n, task in enumerate(tasks):
      config = load_config()
      config.dataset = task
      config.backbone.input_size = FLAGS.input_size
      config.backbone.additional_features_target_size = FLAGS.target_size
      config.learning.training_steps = FLAGS.training_steps
      config.learning.class_buckets = buckets == "on"
      with platform.CompileMonitor() as compiled:
        start = time.perf_counter()
        results = evaluate.run(config, os.path.join(tmp, f"run{n}"))
        seconds = time.perf_counter() - start
      out["tasks"].append(
        {
          "task": task.split("/")[-1],
          "classes": results["num_classes"],
          "seconds": seconds,
          "compile_s": compiled.seconds,
          "programs": compiled.backend_compiles,
          "by_function": compiled.by_function,
          "test_accuracy": {m: r["test_accuracy"] for m, r in results["methods"].items()},
        }
      )
  return out


def run_child(buckets: str) -> dict:
  flags_ = [f"--{k}={FLAGS[k].value}" for k in ("input_size", "target_size", "training_steps")]
  return bench_common.run_child(__file__, [f"--child={buckets}", *flags_])


def main(argv):
  del argv
  if FLAGS.child:
    print(json.dumps(child(FLAGS.child)), flush=True)
    return
  say = Printer()
  say(
    f"# python experiments/bench_class_buckets.py --input_size={FLAGS.input_size} "
    f"--target_size={FLAGS.target_size} --training_steps={FLAGS.training_steps} --repeats={FLAGS.repeats}"
  )
  say(f"# {os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.1f} at the start")
  say("| round | class_buckets | task | classes | time | compile | share | programs | test accuracy |")
  say("|---|---|---|---|---|---|---|---|---|")
  for r in range(FLAGS.repeats):
    for buckets in ("on", "off"):
      res = run_child(buckets)
      for t in res["tasks"]:
        acc = ", ".join(f"{m} {a:.4f}" for m, a in t["test_accuracy"].items())
        say(
          f"| {r + 1} | {buckets} | {t['task']} | {t['classes']} | {t['seconds']:.1f} s | {t['compile_s']:.1f} s "
          f"| {t['compile_s'] / t['seconds']:.0%} | {t['programs']} | {acc} |"
        )
      if FLAGS.programs:
        for t in res["tasks"][1:]:
          top = sorted(t["by_function"].items(), key=lambda kv: -kv[1][1])
          say(f"#   {buckets} {t['task']}: " + ", ".join(f"{f} {n}x {s:.2f} s" for f, (n, s) in top))
  if FLAGS.out:
    say.write(FLAGS.out)


if __name__ == "__main__":
  app.run(main)
