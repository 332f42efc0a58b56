r"""Peak memory of the streamed test at 1,000 vs 10,000 test images.

`h2t.streaming.stream_test` classifies the test set batch by batch (images ->
taps -> pooled kept features -> logits), so its memory should not grow with
the number of test images. This trains one Head2Toe head on Fashion-MNIST's
1000 training images (EfficientNet-Lite0), saves it, and then, for each test
size, starts a fresh Python process that

  1. loads the backbone, the head and the first N images of Fashion-MNIST's
     test split (28x28 grey, 784 bytes each: the data itself is a few MiB);
  2. warms up: streams one batch (compiles the extractor);
  3. resets the kernel's peak-RSS mark (/proc/self/clear_refs), notes the
     current RSS, and starts tracemalloc (numpy reports its buffers to it);
  4. streams the N test images and reads the peak RSS (VmHWM) and
     tracemalloc's peak.

The growth of the peak over the RSS before streaming is what the test set
costs. Each size runs in its own process because a peak is a high-water mark.
The RSS is also sampled between batches (when the stream asks for the next
one), and its trend is fitted, to tell a leak (a steady slope) from the
allocator's ramp-up (a rise that levels off). `--malloc_mmap_threshold` runs
the children with a fixed glibc mmap threshold, to separate what h2t keeps
from what glibc keeps after XLA frees its large buffers.
Goal: the growth at 10,000 images within 10% of that at 1,000.

  python experiments/bench_stream_memory.py
  python experiments/bench_stream_memory.py --input_size=112 --repeats=3 \
      --malloc_mmap_threshold=131072 --out=experiments/results/bench_stream_memory_cpu.txt
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc

import jax
import ml_collections
import numpy as np
from absl import app, flags
from bench_common import Printer, load_config  # noqa: F401 -- experiments/ is on sys.path

from h2t import backbones, data, features, head2toe, streaming
from h2t.data import base

FLAGS = flags.FLAGS
flags.DEFINE_integer("input_size", 224, "Backbone input size (EfficientNet-Lite0's own is 224).")
flags.DEFINE_integer("target_size", 1024, "Pooling target size per tap.")
flags.DEFINE_integer("training_steps", 500, "Steps of each probe when training the head.")
flags.DEFINE_float("keep_fraction", 0.1, "Fraction of the features the head keeps.")
flags.DEFINE_integer("batch_size", 64, "Test images per forward pass.")
flags.DEFINE_list("sizes", ["1000", "10000"], "Test set sizes, the first is the baseline.")
flags.DEFINE_integer(
  "malloc_mmap_threshold",
  0,
  "If > 0, run the children with MALLOC_MMAP_THRESHOLD_=this (bytes): a fixed glibc mmap threshold, "
  "so freed large buffers go back to the OS instead of raising the threshold (0: glibc's default).",
)
flags.DEFINE_integer("repeats", 1, "Fresh processes per size; the median growth is compared.")
flags.DEFINE_string("out", "", "Also write the printed figures to this file.")
# Set by the parent for the child processes.
flags.DEFINE_string("child_head", "", "(internal) measure one size with the head in this file.")
flags.DEFINE_integer("child_size", 0, "(internal) test images of the child run.")

TARGET = 0.10
BACKBONE = "efficientnet_lite0"
TASK = "fashion_mnist"


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


def _stream_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.backbone = ml_collections.ConfigDict({"batch_size": FLAGS.batch_size})
  return config


def child(head_path: str, size: int) -> dict[str, float]:
  """Streams `size` test images through a fresh process; returns its memory figures."""
  backbone = backbones.create(BACKBONE, input_size=FLAGS.input_size)
  head = head2toe.Head.load(head_path)
  images, labels = data.get_task(TASK).arrays("test", image_size=FLAGS.input_size)
  if size > len(labels):
    raise ValueError(f"--sizes asks for {size} test images; {TASK} has {len(labels)}")
  images, labels = images[:size], labels[:size]
  config = _stream_config()
  warm = base.array_task("warmup", 10, {"test": (images[: FLAGS.batch_size], labels[: FLAGS.batch_size])})
  streaming.stream_test(backbone, warm, {"head2toe": head}, int(config.backbone.batch_size))
  task = base.array_task(f"{TASK}_test{size}", 10, {"test": (images, labels)})
  rss_between_batches: list[int] = []
  task = _sampling(task, rss_between_batches)
  gc.collect()
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
  rss_before = _status_kib("VmRSS")
  tracemalloc.start()
  start = time.perf_counter()
  accuracy = streaming.stream_test(backbone, task, {"head2toe": head}, int(config.backbone.batch_size))[
    "head2toe"
  ]
  seconds = time.perf_counter() - start
  _, traced_peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  rss = np.asarray(rss_between_batches[1:], np.float64) / 1024  # after each batch but the last
  seen = FLAGS.batch_size * np.arange(1, len(rss) + 1)
  slope = float(np.polyfit(seen, rss, 1)[0]) * 1000 if len(rss) > 1 else 0.0
  half = len(rss) // 2  # the second half: past the allocator's ramp-up
  slope_late = float(np.polyfit(seen[half:], rss[half:], 1)[0]) * 1000 if len(rss) - half > 1 else 0.0
  return {
    "size": size,
    "rss_before_mib": rss_before / 1024,
    "peak_mib": _status_kib("VmHWM") / 1024,
    "growth_mib": (_status_kib("VmHWM") - rss_before) / 1024,
    "tracemalloc_peak_mib": traced_peak / 2**20,
    "seconds": seconds,
    "accuracy": accuracy,
    "data_mib": images.nbytes / 2**20,
    "rss_between_batches_mib": [float(rss.min()), float(np.median(rss)), float(rss.max())]
    if len(rss)
    else [],
    "rss_slope_mib_per_1000": slope,
    "rss_slope_late_mib_per_1000": slope_late,
  }


def _sampling(task: base.Task, samples: list[int]) -> base.Task:
  """`task`, noting the RSS (KiB) each time the stream asks for the next batch."""

  def read(split: str, batch_size: int, image_size: int):
    for batch in task.read(split, batch_size, image_size):
      samples.append(_status_kib("VmRSS"))
      yield batch

  return base.Task(task.name, task.num_classes, task.split_sizes, read)


def train_head(path: str) -> tuple[head2toe.Head, int]:
  """Fits a head on the task's 1000 training images; returns it and the kept taps' width."""
  backbone = backbones.create(BACKBONE, input_size=FLAGS.input_size)
  task = data.get_task(TASK)
  feats, labels = features.extract_task_split(
    backbone, task, "train800val200", taps=backbone.tap_names, target_size=FLAGS.target_size
  )
  learning = _default_learning()
  learning.training_steps = FLAGS.training_steps
  learning.feature_selection.keep_fraction = FLAGS.keep_fraction
  meta = {"target_size": FLAGS.target_size, "pool_size": 0, "cls_token_pool": "normal"}
  head = head2toe.fit(feats, labels, learning, seed=8, num_classes=task.num_classes, meta=meta)
  head.save(path)
  kept_width = sum(feats[t].shape[1] for t in head.kept)
  return head, kept_width


def _default_learning() -> ml_collections.ConfigDict:
  """configs/vtab.py's `learning` (loaded from the file, which is not a package)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("vtab_config", os.path.join(repo, "configs", "vtab.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config().learning


def main(argv):
  del argv
  if FLAGS.child_head:
    print("RESULT " + json.dumps(child(FLAGS.child_head, FLAGS.child_size)), flush=True)
    return
  say = Printer()
  say(
    f"# experiments/bench_stream_memory.py on {platform.machine()}, {os.cpu_count()} CPU cores, "
    f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}; load average at start "
    f"{os.getloadavg()[0]:.1f}"
  )
  with tempfile.TemporaryDirectory(prefix="bench_stream_memory_") as tmp:
    head_path = os.path.join(tmp, "head.npz")
    head, kept_width = train_head(head_path)
    say(
      f"# head: {BACKBONE} at {FLAGS.input_size} px, all taps pooled to target {FLAGS.target_size}, trained on "
      f"{TASK}'s 1000 training images ({FLAGS.training_steps} steps, keep fraction {FLAGS.keep_fraction}): "
      f"{head.num_features} features kept from {len(head.kept)} taps ({kept_width} pooled features to compute "
      f"per image); test streamed in batches of {FLAGS.batch_size}; glibc malloc: "
      + (
        f"MALLOC_MMAP_THRESHOLD_={FLAGS.malloc_mmap_threshold} (fixed)"
        if FLAGS.malloc_mmap_threshold > 0
        else "default (dynamic mmap threshold)"
      )
    )
    rows = []
    for size in [int(s) for s in FLAGS.sizes for _ in range(FLAGS.repeats)]:
      cmd = [sys.executable, os.path.abspath(__file__), f"--child_head={head_path}", f"--child_size={size}"]
      cmd += [f"--input_size={FLAGS.input_size}", f"--batch_size={FLAGS.batch_size}"]
      env = dict(os.environ)
      if FLAGS.malloc_mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(FLAGS.malloc_mmap_threshold)
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
      lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
      if proc.returncode or not lines:
        raise RuntimeError(f"child for {size} images failed:\n{proc.stderr[-4000:]}")
      r = json.loads(lines[-1][len("RESULT ") :])
      rows.append(r)
      full = size * kept_width * 4 / 2**20
      say(
        f"{size:6d} test images: RSS before {r['rss_before_mib']:7.1f} MiB, peak {r['peak_mib']:7.1f} MiB, "
        f"growth {r['growth_mib']:6.1f} MiB; tracemalloc peak {r['tracemalloc_peak_mib']:6.2f} MiB; "
        f"{r['seconds']:.1f} s ({size / r['seconds']:.0f} images/s); accuracy {r['accuracy']:.4f} "
        f"(test images held: {r['data_mib']:.1f} MiB; a full feature matrix of the kept taps would be "
        f"{full:.0f} MiB); RSS between batches min/median/max "
        + "/".join(f"{v:.0f}" for v in r["rss_between_batches_mib"])
        + f" MiB, trend {r['rss_slope_mib_per_1000']:+.2f} MiB per 1000 images (second half "
        + f"{r['rss_slope_late_mib_per_1000']:+.2f})"
      )
  first, last = int(FLAGS.sizes[0]), int(FLAGS.sizes[-1])

  def median(size: int, key: str) -> float:
    return float(np.median([r[key] for r in rows if r["size"] == size]))

  growth = {n: median(n, "growth_mib") for n in (first, last)}
  traced = {n: median(n, "tracemalloc_peak_mib") for n in (first, last)}
  rel = (growth[last] - growth[first]) / max(growth[first], 1e-9)
  rel_traced = (traced[last] - traced[first]) / max(traced[first], 1e-9)
  peak = {n: median(n, "peak_mib") for n in (first, last)}
  say(
    f"peak RSS of the whole process (same setup, only the test size differs): {peak[last]:.1f} MiB at {last} vs "
    f"{peak[first]:.1f} MiB at {first}: {peak[last] - peak[first]:+.1f} MiB, "
    f"{100 * (peak[last] - peak[first]) / max(growth[first], 1e-9):+.1f}% of the streamed test's growth at {first}"
  )
  ok = rel <= TARGET
  say(
    f"verdict: {'PASS' if ok else 'FAIL'} -- peak RSS growth at {last} test images is {growth[last]:.1f} MiB "
    f"vs {growth[first]:.1f} MiB at {first} ({100 * rel:+.1f}%; target within {100 * TARGET:.0f}%; median of "
    f"{FLAGS.repeats} process(es) each); tracemalloc peak {100 * rel_traced:+.1f}%; RSS trend over the "
    f"{last}-image stream {median(last, 'rss_slope_mib_per_1000'):+.2f} MiB per 1000 images (second half "
    f"{median(last, 'rss_slope_late_mib_per_1000'):+.2f}); load average at "
    f"end {os.getloadavg()[0]:.1f}"
  )
  if FLAGS.out:
    say.write(FLAGS.out)


if __name__ == "__main__":
  app.run(main)
