r"""The persistent compilation cache: a second process reuses the first one's programs.

Each run starts fresh Python processes (a new process has an empty in-memory
jit cache, as every task of a sweep does) that do the same work:

  1. extraction: EfficientNet-Lite0 (packaged weights) on one batch of digits
     images, every tap pooled (`h2t.features.extract`);
  2. probe: `h2t.head2toe.fit` (stage 1, selection, stage 2) on those
     features, a few steps;

and time the first call of each (compile + run) and a second call (run only).
The compile time is what `h2t.platform.CompileMonitor` counts (tracing,
lowering, XLA compilation or reading the program from the cache). Processes:

  cold:  cache on, cache folder empty (compiles and writes every program);
  warm:  cache on, the same folder (reads every program);
  off:   no cache (the control: what every process paid before).

The figure is warm/cold compile time (goal: at most 0.5), with the cache hits
and the files in the cache folder before and after each process.

  python experiments/bench_compile_cache.py [--input_size=224] [--batch_size=64] [--repeats=2]
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import bench_common  # experiments/ is on sys.path
from absl import app, flags
from bench_common import Printer

FLAGS = flags.FLAGS
flags.DEFINE_integer("input_size", 224, "Backbone input size.")
flags.DEFINE_integer("batch_size", 64, "Images in the extracted batch.")
flags.DEFINE_integer("target_size", 1024, "Pooling target size per tap.")
flags.DEFINE_integer("training_steps", 20, "Steps of the probe (compile time does not depend on it).")
flags.DEFINE_integer("repeats", 2, "Cold/warm/off rounds (each in fresh processes and a fresh folder).")
flags.DEFINE_string("out", "", "Also write the printed figures to this file.")
flags.DEFINE_string("child", "", "Internal: run one process's work with this cache folder ('-': none).")

WORK = ("extract", "probe")


def child(cache_dir: str) -> dict:
  """One process's work; returns its timings and counts."""
  import jax
  import numpy as np

  from h2t import backbones, data, features, head2toe, platform
  from tests import toy

  if cache_dir != "-":
    platform.enable_compilation_cache(cache_dir)
  files_before = len(os.listdir(cache_dir)) if cache_dir != "-" else 0
  backbone = backbones.create("efficientnet_lite0", input_size=FLAGS.input_size)
  images, labels = data.get_task("digits").arrays("train800val200", image_size=FLAGS.input_size)
  images, labels = images[: FLAGS.batch_size], labels[: FLAGS.batch_size]
  learning = toy.learning(steps=FLAGS.training_steps)
  out: dict = {"device": jax.devices()[0].platform}

  def extract():
    return features.extract(
      backbone, images, taps=backbone.tap_names, target_size=FLAGS.target_size, batch_size=FLAGS.batch_size
    )

  feats = None
  for name in WORK:
    calls = []
    for _ in range(2):
      with platform.CompileMonitor() as compiled:
        start = time.perf_counter()
        if name == "extract":
          feats = extract()
        else:
          head2toe.fit(feats, labels, learning, seed=0, num_classes=10)
        calls.append((time.perf_counter() - start, compiled))
    (first, compiled), (second, _) = calls
    out[name] = {
      "first_s": first,
      "second_s": second,
      "compile_s": compiled.seconds,
      "programs": compiled.backend_compiles,
      "cache_hits": compiled.cache_hits,
      "cache_misses": compiled.cache_misses,
    }
  out["features"] = int(sum(np.shape(v)[1] for v in feats.values()))
  out["files_before"] = files_before
  out["files_after"] = len(os.listdir(cache_dir)) if cache_dir != "-" else 0
  return out


def run_child(cache_dir: str) -> dict:
  flags_ = [f"--{k}={FLAGS[k].value}" for k in ("input_size", "batch_size", "target_size", "training_steps")]
  return bench_common.run_child(__file__, [f"--child={cache_dir}", *flags_])


def main(argv):
  del argv
  if FLAGS.child:
    print(json.dumps(child(FLAGS.child)), flush=True)
    return
  say = Printer()
  say(
    f"# python experiments/bench_compile_cache.py --input_size={FLAGS.input_size} --batch_size={FLAGS.batch_size} "
    f"--target_size={FLAGS.target_size} --training_steps={FLAGS.training_steps} --repeats={FLAGS.repeats}"
  )
  say(f"# {os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.1f} at the start")
  ratios = []
  for r in range(FLAGS.repeats):
    with tempfile.TemporaryDirectory() as tmp:
      runs = {"cold": run_child(tmp), "warm": run_child(tmp), "off": run_child("-")}
    if r == 0:
      say(f"# device {runs['cold']['device']}; extraction of {runs['cold']['features']} features per image")
    for kind, res in runs.items():
      cells = " | ".join(
        f"{w}: first call {res[w]['first_s']:.2f}s (second {res[w]['second_s']:.2f}s), compile "
        f"{res[w]['compile_s']:.2f}s, {res[w]['programs']} programs, {res[w]['cache_hits']} hits / "
        f"{res[w]['cache_misses']} misses"
        for w in WORK
      )
      say(f"round {r + 1} {kind:4s}: {cells} | cache files {res['files_before']} -> {res['files_after']}")
    compile_s = {k: sum(v[w]["compile_s"] for w in WORK) for k, v in runs.items()}
    ratio = compile_s["warm"] / compile_s["cold"]
    ratios.append(ratio)
    say(
      f"round {r + 1}: compile time cold {compile_s['cold']:.2f}s, warm {compile_s['warm']:.2f}s, "
      f"no cache {compile_s['off']:.2f}s; warm/cold {ratio:.3f}"
    )
  say(
    f"result: warm/cold compile time min {min(ratios):.3f}, median {statistics.median(ratios):.3f} over "
    f"{len(ratios)} rounds (goal <= 0.5)"
  )
  if FLAGS.out:
    say.write(FLAGS.out)


if __name__ == "__main__":
  app.run(main)
