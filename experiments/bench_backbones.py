r"""Throughput of the backbones: plain forward pass vs extraction of every tap.

For each backbone, at its input size and a fixed batch, it times

* forward: `jit(apply)` returning the logits only (XLA drops the taps);
* extraction: `jit(apply)` returning every tap pooled to the target size with
  `h2t.features.pool_tap` (what Head2Toe's feature extraction computes);

and prints images/s of each and their time ratio (goal: extraction <= 1.15x
the forward pass). Weights are random unless real checkpoints are given:

  python experiments/bench_backbones.py
  python experiments/bench_backbones.py --backbones=vit_b16 \
      --checkpoint=vit_b16=/path/to/ViT-B_16.npz
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from bench_common import random_backbone  # experiments/ is on sys.path

from h2t import features
from h2t.models import common, resnet, vit

FLAGS = flags.FLAGS
flags.DEFINE_list("backbones", ["resnet50", "vit_b16"], "Backbones to time.")
flags.DEFINE_multi_string("checkpoint", [], "NAME=PATH: real weights for backbone NAME (default: random).")
flags.DEFINE_integer("batch_size", 32, "Images per batch.")
flags.DEFINE_integer("batches", 3, "Timed batches per measurement, after one warm-up batch.")
flags.DEFINE_integer("target_size", 8192, "Pooling target size per tap.")

# name -> (loader for a real checkpoint, input size of the random-weight model)
_BACKBONES: dict[str, tuple[Callable[..., common.LoadedModel], int]] = {
  "resnet50": (resnet.load, resnet.INPUT_SIZE),
  "vit_b16": (vit.load, 224),
}


def _model(name: str, checkpoint: str | None):
  """`(module, params, input_size)`: from `checkpoint`, or random weights."""
  loader, size = _BACKBONES[name]
  if checkpoint:
    loaded = loader(checkpoint)
    return loaded.module, jax.tree_util.tree_map(jnp.asarray, loaded.params), loaded.input_size
  backbone = random_backbone(name, size)
  return backbone.module, backbone.params, size


def _images_per_second(fns: dict[str, Callable], params, x: jax.Array, batches: int) -> dict[str, float]:
  """Images/s of each `fn(params, x)`; the calls alternate, so load from other
  processes on the machine affects every function alike."""
  for fn in fns.values():
    jax.block_until_ready(fn(params, x))  # compile and warm up
  seconds = dict.fromkeys(fns, 0.0)
  for _ in range(batches):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(params, x))
      seconds[name] += time.perf_counter() - start
  return {name: batches * x.shape[0] / s for name, s in seconds.items()}


def bench(name: str, checkpoint: str | None, *, batch_size: int, batches: int, target_size: int) -> str:
  """Times one backbone; returns its result line."""
  module, params, size = _model(name, checkpoint)

  @jax.jit
  def forward(params, x):
    return module.apply({"params": params}, x)[0]

  @jax.jit
  def extract(params, x):
    _, taps = module.apply({"params": params}, x)
    return {k: features.pool_tap(t, target_size, cls_token_pool="normal") for k, t in taps.items()}

  x = jax.random.normal(jax.random.key(1), (batch_size, size, size, 3), jnp.float32)
  pooled = jax.eval_shape(extract, params, x)
  dims = sum(v.shape[-1] for v in pooled.values())
  rates = _images_per_second({"forward": forward, "extract": extract}, params, x, batches)
  fwd, ext = rates["forward"], rates["extract"]
  weights = checkpoint or "random weights"
  return (
    f"{name:9s} {size}px batch {batch_size} ({weights}): forward {fwd:7.2f} img/s | "
    f"extraction of {len(pooled)} taps -> {dims} features (target {target_size}) {ext:7.2f} img/s | "
    f"extraction/forward time {fwd / ext:.3f}x"
  )


def main(argv):
  del argv
  checkpoints = dict(c.split("=", 1) for c in FLAGS.checkpoint)
  unknown = sorted(set(FLAGS.backbones) - set(_BACKBONES))
  if unknown:
    raise app.UsageError(f"unknown backbones {unknown}; expected some of {sorted(_BACKBONES)}")
  print(
    f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, numpy {np.__version__}"
  )
  for name in FLAGS.backbones:
    line = bench(
      name,
      checkpoints.get(name),
      batch_size=FLAGS.batch_size,
      batches=FLAGS.batches,
      target_size=FLAGS.target_size,
    )
    print(line, flush=True)


if __name__ == "__main__":
  app.run(main)
