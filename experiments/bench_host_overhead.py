r"""What the host side of extraction sustains: a near-free backbone fed by a real input pipeline.

The backbone's own cost is taken out: `CheapNet` returns as many taps and
features as EfficientNet-Lite0 (51 taps, 42,483 features at 224 px), each a
slice of the image, so images/s measures what remains: reading and
resizing the images, padding, host<->device transfers, dispatch, fetching
and splitting the features, the finiteness check. Two sources of the 1000
training images of digits:

  digits:     the task as h2t reads it (8x8 arrays; the resize to 224 px
              happens on the device, in `Backbone.preprocess`);
  digits224:  the same images resized to 224 px on the host by tf.data
              (`tf.image.resize`, bilinear, as h2t/data/pipeline.py does for
              every TFDS task), so 602 KB of float32 pixels per image cross
              to the device, as for a VTAB task.

Three extraction paths, in the same process, alternating round by round:

  sync:      the extraction loop as it was before the pipelined one (copied
             here as the baseline): one batch at a time, each tap sliced and
             copied to the host separately, finiteness checked on the host;
  pipelined: `h2t.features.extract_batches` as it is (reading thread,
             2 batches in flight, one [b, D] array per batch);
  one-by-one: `extract_batches` with prefetch=0, in_flight=1 (the new
             single-array fetch, without the overlap).

With --checks, it also times the device-side finiteness checks h2t could use
(this process's CPU time per batch, the cheap backbone on one batch of
digits): none, `isfinite(row sum)` (h2t's), `isfinite(features).all(axis=1)`,
and a per-tap `isfinite(tap).all(axis=1)`.

  python experiments/bench_host_overhead.py [--source=digits224] [--rounds=5] [--checks]
"""

from __future__ import annotations

import functools
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from bench_common import Printer  # experiments/ is on sys.path

from h2t import backbones, data, features
from h2t.data import base
from h2t.models import common

FLAGS = flags.FLAGS
flags.DEFINE_enum(
  "source", "digits", ["digits", "digits224"], "Where the images come from (see the docstring)."
)
flags.DEFINE_integer("image_size", 224, "Backbone input size.")
flags.DEFINE_integer("batch_size", 64, "Images per batch.")
flags.DEFINE_integer("taps", 51, "Taps of the cheap backbone (EfficientNet-Lite0 has 51).")
flags.DEFINE_integer(
  "tap_features", 833, "Features per tap (51 x 833 = Lite0's 42,488 at 224 px, target 1024)."
)
flags.DEFINE_integer("rounds", 5, "Timed rounds of each path (after one warm-up round each).")
flags.DEFINE_bool("checks", False, "Also time the device-side finiteness checks (see the docstring).")
flags.DEFINE_string("out", "", "Also write the printed figures to this file.")


class CheapNet(nn.Module):
  """`num_taps` taps at almost no cost: slices of the image, `[n, tap_features]` each."""

  num_taps: int
  tap_features: int

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (3,))
    flat = (x * scale).reshape(x.shape[0], -1)
    d = self.tap_features
    taps = {f"tap{k}": flat[:, k * d : (k + 1) * d] for k in range(self.num_taps)}
    return taps["tap0"], taps


def cheap_backbone(image_size: int, num_taps: int, tap_features: int) -> backbones.Backbone:
  if num_taps * tap_features > image_size * image_size * 3:
    raise ValueError(f"{num_taps} taps x {tap_features} features do not fit in a {image_size} px image")
  module = CheapNet(num_taps, tap_features)
  return backbones.Backbone(
    name="cheap",
    module=module,
    params=module.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))["params"],
    input_size=image_size,
    normalization=common.MINUS_ONE_ONE,
    tap_names=tuple(f"tap{k}" for k in range(num_taps)),
    checkpoint_id="cheap:0",
  )


def host_resized_task(task: base.Task, split: str, image_size: int) -> base.Task:
  """`task`'s `split`, resized to `image_size` on the host by tf.data (as h2t/data/pipeline.py)."""
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")
  images, labels = task.arrays(split, image_size=image_size)

  def read(split_name, batch_size, size):
    del split_name
    ds = tf.data.Dataset.from_tensor_slices((images[..., None], labels))
    ds = ds.map(
      lambda im, y: (tf.image.resize(tf.image.grayscale_to_rgb(im), [size, size], method="bilinear"), y),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
    )
    yield from ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()

  return base.Task(f"{task.name}@{image_size}px", task.num_classes, {split: len(labels)}, read)


@functools.partial(jax.jit, static_argnames=("backbone", "taps", "target_size"))
def _old_extract_batch(params, images, *, backbone, taps, target_size):
  """The old jitted extractor: a dict of pooled taps."""
  x = backbone.preprocess(images)
  _, all_taps = backbone.apply(params, x)
  return {t: features.pool_tap(all_taps[t], target_size).astype(jnp.float32) for t in taps}


def sync_extract_batches(backbone, batches, *, taps, target_size, batch_size):
  """The extraction loop before the pipelined one (h2t 3b413c5), progress log left out."""
  done = 0
  for images, labels in batches:
    b = len(labels)
    images = np.asarray(images)
    if b < batch_size:
      images = np.concatenate([images, np.zeros((batch_size - b,) + images.shape[1:], images.dtype)])
    feats = _old_extract_batch(backbone.params, images, backbone=backbone, taps=taps, target_size=target_size)
    feats = {k: np.asarray(v[:b]) for k, v in feats.items()}
    for k, v in feats.items():
      if not np.isfinite(v).all():
        raise FloatingPointError(f"tap {k!r}: non-finite features (images {done}..{done + b})")
    done += b
    yield feats, np.asarray(labels, np.int32)


def time_checks(say, backbone, images: np.ndarray, rounds: int) -> None:
  """CPU ms per batch of the extraction program with each finiteness check."""
  static = dict(
    backbone=backbone,
    taps=backbone.tap_names,
    target_size=0,
    cls_token_pool="normal",
    pool_size=0,
    dtype="float32",
  )
  checks = {
    "none": None,
    "isfinite(row sum) (h2t)": lambda f, taps: ~jnp.isfinite(f.sum(axis=1)),
    "isfinite(features).all(axis=1)": lambda f, taps: ~jnp.isfinite(f).all(axis=1),
    "per tap isfinite(tap).all(axis=1)": lambda f, taps: jnp.stack(
      [~jnp.isfinite(t).all(axis=1) for t in taps], 1
    ),
  }

  def program(check):
    @jax.jit
    def run(params, x):
      taps = list(features._pooled_taps(params, x, **static).values())  # noqa: SLF001
      feats = jnp.concatenate(taps, axis=1)
      return feats if check is None else (feats, check(feats, taps))

    return run

  programs = {name: program(check) for name, check in checks.items()}
  for fn in programs.values():
    jax.block_until_ready(fn(backbone.params, images))
  cpu = {name: [] for name in programs}
  for _ in range(rounds):
    for name, fn in programs.items():
      start = time.process_time()
      jax.block_until_ready(fn(backbone.params, images))
      cpu[name].append(1e3 * (time.process_time() - start))
  for name, c in cpu.items():
    say(
      f"check {name:34s}: CPU ms per batch of {len(images)} min {min(c):6.1f}, median {statistics.median(c):6.1f}"
    )


def main(argv):
  del argv
  say = Printer()
  say(
    f"# python experiments/bench_host_overhead.py --source={FLAGS.source} --image_size={FLAGS.image_size} "
    f"--batch_size={FLAGS.batch_size} --taps={FLAGS.taps} --tap_features={FLAGS.tap_features} --rounds={FLAGS.rounds}"
    f"{' --checks' if FLAGS.checks else ''}"
  )
  dev = jax.devices()[0]
  say(
    f"# device {dev.platform} ({dev.device_kind}); {os.cpu_count()} CPU cores; load average "
    f"{os.getloadavg()[0]:.1f} at the start; jax {jax.__version__}"
  )
  split = "train800val200"
  task = data.get_task("digits")
  if FLAGS.source == "digits224":
    task = host_resized_task(task, split, FLAGS.image_size)
  backbone = cheap_backbone(FLAGS.image_size, FLAGS.taps, FLAGS.tap_features)
  taps, bs, target = backbone.tap_names, FLAGS.batch_size, 0  # 2-D taps: no pooling
  n = task.size(split)

  def batches():
    return task.batches(split, bs, image_size=FLAGS.image_size)

  paths = {
    "sync": lambda: sync_extract_batches(backbone, batches(), taps=taps, target_size=target, batch_size=bs),
    "pipelined": lambda: features.extract_batches(
      backbone, batches(), taps=taps, target_size=target, batch_size=bs
    ),
    "one-by-one": lambda: features.extract_batches(
      backbone, batches(), taps=taps, target_size=target, batch_size=bs, prefetch=0, in_flight=1
    ),
  }
  first = {}
  for name, path in paths.items():  # warm-up: compile, and check that every path gives the same features
    parts = list(path())
    first[name] = {t: np.concatenate([p[0][t] for p in parts]) for t in taps}
    assert all(np.array_equal(first[name][t], first["sync"][t]) for t in taps), name
  dim = sum(v.shape[1] for v in first["sync"].values())
  say(
    f"# {n} images of {FLAGS.source}, batch {bs}, {len(taps)} cheap taps -> {dim} features ({dim * 4 * n / 2**20:.0f} MiB); features equal on every path"
  )
  rates = {name: [] for name in paths}
  cpu_ms = {name: [] for name in paths}
  for r in range(FLAGS.rounds):
    # The order rotates, so that no path always follows the same one.
    for name in list(paths)[r % len(paths) :] + list(paths)[: r % len(paths)]:
      start, cpu = time.perf_counter(), time.process_time()
      for _ in paths[name]():
        pass
      rates[name].append(n / (time.perf_counter() - start))
      cpu_ms[name].append(1e3 * (time.process_time() - cpu) / n)
  say("(images/s: wall clock, shared machine; CPU ms/image: this process's CPU time, all its threads)")
  for name, r in rates.items():
    c = cpu_ms[name]
    say(
      f"{name:10s}: images/s min {min(r):7.0f}, median {statistics.median(r):7.0f}, max {max(r):7.0f} | "
      f"CPU ms/image min {min(c):.3f}, median {statistics.median(c):.3f}"
    )
  ratio = [p / s for p, s in zip(rates["pipelined"], rates["sync"], strict=True)]
  cpu_ratio = [p / s for p, s in zip(cpu_ms["pipelined"], cpu_ms["sync"], strict=True)]
  say(
    f"pipelined / sync, per round: images/s min {min(ratio):.2f}, median {statistics.median(ratio):.2f}; "
    f"CPU time per image min {min(cpu_ratio):.2f}, median {statistics.median(cpu_ratio):.2f}"
  )
  if FLAGS.checks:
    images = next(iter(batches()))[0]
    time_checks(say, backbone, np.asarray(images), 4 * FLAGS.rounds)
  if FLAGS.out:
    say.write(FLAGS.out)


if __name__ == "__main__":
  app.run(main)
