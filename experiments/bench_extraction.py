r"""Extraction inside the protocol vs the backbone's own pace; bfloat16 vs float32 features.

Part 1, pace. EfficientNet-Lite0 (packaged weights) at 224 px, every tap
pooled to the target size, in the same process, alternating round by round:

  backbone:  what experiments/bench_backbones.py times as "extraction": one
             jitted forward pass that pools every tap, on a batch already on
             the device (random normal inputs), blocked on;
  protocol:  `h2t.features.extract_task_split` on the training images of
             digits (read, padded, resized and normalised on the device,
             features fetched to the host), as `h2t.evaluate` runs it.

The figure is protocol / backbone images/s per round (goal: >= 0.9).

Part 2, bfloat16. The same images extracted with dtype='float32' and
'bfloat16': per tap, the largest absolute difference, that difference over the
tap's largest magnitude, the relative L2 error, and the smallest cosine
between an image's unit-normalised tap vectors (what the probe sees after
`unit_vector` normalisation). With --probe, a Head2Toe head
(configs/vtab.py's learning config) is trained on the 1000 training images
extracted each way and its test accuracy compared.

  python experiments/bench_extraction.py [--images=256] [--rounds=5] [--parity_images=64] [--probe]
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from bench_common import Printer, load_config  # experiments/ is on sys.path

from h2t import backbones, data, features, head2toe
from h2t.data import base

FLAGS = flags.FLAGS
flags.DEFINE_integer("input_size", 224, "Backbone input size.")
flags.DEFINE_integer("batch_size", 64, "Images per forward pass (both paths).")
flags.DEFINE_integer("target_size", 1024, "Pooling target size per tap (configs/vtab.py's).")
flags.DEFINE_integer("images", 256, "Training images of digits extracted per protocol pass.")
flags.DEFINE_integer("rounds", 5, "Timed rounds (after a warm-up).")
flags.DEFINE_integer("parity_images", 64, "Images compared between float32 and bfloat16 (0: skip part 2).")
flags.DEFINE_bool(
  "probe", False, "Also train a head on float32 and bfloat16 features (1797 images extracted twice)."
)
flags.DEFINE_string("out", "", "Also write the printed figures to this file.")

SPLIT = "train800val200"


def pace(say, backbone, task) -> None:
  taps, bs, target = backbone.tap_names, FLAGS.batch_size, FLAGS.target_size

  @jax.jit
  def forward_and_pool(params, x):  # bench_backbones.py's "extraction"
    _, all_taps = backbone.apply(params, x)
    return {k: features.pool_tap(all_taps[k], target) for k in taps}

  x = jax.random.normal(jax.random.key(1), (bs, backbone.input_size, backbone.input_size, 3))

  def run_backbone():
    batches = -(-FLAGS.images // bs)
    start = time.perf_counter()
    for _ in range(batches):
      jax.block_until_ready(forward_and_pool(backbone.params, x))
    return batches * bs / (time.perf_counter() - start)

  def run_protocol():
    start = time.perf_counter()
    features.extract_task_split(backbone, task, SPLIT, taps=taps, target_size=target, batch_size=bs)
    return task.size(SPLIT) / (time.perf_counter() - start)

  run_backbone(), run_protocol()  # compile, warm up
  rates = {"backbone": [], "protocol": []}
  for _ in range(FLAGS.rounds):
    rates["backbone"].append(run_backbone())
    rates["protocol"].append(run_protocol())
  for name, r in rates.items():
    say(f"{name:8s}: images/s min {min(r):6.1f}, median {statistics.median(r):6.1f}, max {max(r):6.1f}")
  ratio = [p / b for p, b in zip(rates["protocol"], rates["backbone"], strict=True)]
  say(
    f"protocol / backbone images/s per round: min {min(ratio):.3f}, median {statistics.median(ratio):.3f}, "
    f"max {max(ratio):.3f} (goal >= 0.9)"
  )


def parity(say, backbone, images) -> None:
  taps, bs, target = backbone.tap_names, FLAGS.batch_size, FLAGS.target_size
  got, seconds = {}, {}
  for dtype in ("float32", "bfloat16", "float32", "bfloat16"):  # the second pass of each is timed
    start = time.perf_counter()
    got[dtype] = features.extract(backbone, images, taps=taps, target_size=target, batch_size=bs, dtype=dtype)
    seconds[dtype] = time.perf_counter() - start
  f32, bf16 = got["float32"], got["bfloat16"]
  rows = []
  for tap in taps:
    a, b = f32[tap], bf16[tap]
    diff = np.abs(a - b)
    ua = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    ub = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    rel_l2 = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))
    rows.append(
      (
        tap,
        float(diff.max()),
        float(diff.max() / max(np.abs(a).max(), 1e-12)),
        rel_l2,
        float((ua * ub).sum(1).min()),
      )
    )
  say(
    f"bfloat16 vs float32 on {len(images)} digits images, {len(taps)} taps: "
    f"float32 {len(images) / seconds['float32']:.1f} images/s, bfloat16 {len(images) / seconds['bfloat16']:.1f} images/s "
    f"on {jax.devices()[0].platform}"
  )
  say("tap                  max |diff|  max|diff|/max|f32|  rel. L2 error  min cosine (unit vectors)")
  for tap, mx, rel_max, rel_l2, cos in rows:
    say(f"{tap:20s} {mx:10.4f}  {rel_max:18.4f}  {rel_l2:13.4f}  {cos:.5f}")
  say(
    f"over all taps: max |diff| {max(r[1] for r in rows):.4f}, max |diff|/max|f32| {max(r[2] for r in rows):.4f}, "
    f"relative L2 error median {statistics.median(r[3] for r in rows):.4f} max {max(r[3] for r in rows):.4f}, "
    f"min cosine {min(r[4] for r in rows):.5f}"
  )


def probe(say, backbone, task) -> None:
  config = load_config()
  taps, bs, target = backbone.tap_names, FLAGS.batch_size, FLAGS.target_size
  accuracy = {}
  for dtype in ("float32", "bfloat16"):
    kw = dict(taps=taps, target_size=target, batch_size=bs, dtype=dtype)
    train, labels = features.extract_task_split(backbone, task, SPLIT, **kw)
    test, test_labels = features.extract_task_split(backbone, task, "test", **kw)
    for method, learning in (("head2toe", config.learning), ("linear", None)):
      if method == "linear":
        learning = load_config().learning
        learning.feature_selection.type = "none"
        train_m, test_m = {"pre_logits": train["pre_logits"]}, {"pre_logits": test["pre_logits"]}
      else:
        train_m, test_m = train, test
      head = head2toe.fit(train_m, labels, learning, seed=int(config.seed), num_classes=task.num_classes)
      accuracy[dtype, method] = float((head.predict(test_m).argmax(-1) == test_labels).mean())
  for method in ("head2toe", "linear"):
    say(
      f"{method} test accuracy (default learning config, no CV), {task.size('test')} test images: float32 "
      f"{accuracy['float32', method]:.4f}, bfloat16 {accuracy['bfloat16', method]:.4f}"
    )


def main(argv):
  del argv
  say = Printer()
  say(
    f"# python experiments/bench_extraction.py --input_size={FLAGS.input_size} --batch_size={FLAGS.batch_size} "
    f"--target_size={FLAGS.target_size} --images={FLAGS.images} --rounds={FLAGS.rounds} "
    f"--parity_images={FLAGS.parity_images}{' --probe' if FLAGS.probe else ''}"
  )
  dev = jax.devices()[0]
  say(
    f"# device {dev.platform} ({dev.device_kind}) x{jax.device_count()}; {os.cpu_count()} CPU cores; load average "
    f"{os.getloadavg()[0]:.1f} at the start; jax {jax.__version__}"
  )
  backbone = backbones.create("efficientnet_lite0", input_size=FLAGS.input_size)
  digits = data.get_task("digits")
  images, labels = digits.arrays(SPLIT, image_size=FLAGS.input_size)
  task = base.array_task("digits", 10, {SPLIT: (images[: FLAGS.images], labels[: FLAGS.images])})
  if FLAGS.rounds:
    pace(say, backbone, task)
  if FLAGS.parity_images:
    parity(say, backbone, images[: FLAGS.parity_images])
  if FLAGS.probe:
    probe(say, backbone, digits)
  if FLAGS.out:
    say.write(FLAGS.out)


if __name__ == "__main__":
  app.run(main)
