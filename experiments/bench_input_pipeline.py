"""Images per second of h2t's input pipeline (JPEG decode + bilinear resize) on this CPU.

    python experiments/bench_input_pipeline.py [--num_images=512] [--image_size=224]

VTAB data is not needed: the benchmark builds a small real TFDS dataset of
JPEG photos at 500x375 (random crops, flips and brightness changes of
scikit-learn's two sample photos, so each image differs and compresses like a
photo), then streams it through `h2t.data.pipeline.read`, the code every VTAB
task uses, exactly as `Task.batches` does. The first pass warms up; the
figure is the mean over the timed passes. Written to
experiments/results/bench_input_pipeline.txt.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import app, flags

from h2t.data import pipeline, vtab

_NUM_IMAGES = flags.DEFINE_integer("num_images", 512, "JPEG images in the benchmark dataset.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Output side length (the backbone's input size).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per batch.")
_PASSES = flags.DEFINE_integer("passes", 3, "Timed passes over the dataset (after one warm-up pass).")
_OUT = flags.DEFINE_string(
  "out",
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_input_pipeline.txt"),
  "Where the result is written.",
)

HEIGHT, WIDTH = 375, 500  # A typical photo size in VTAB's natural tasks (and ImageNet).


def photo_crops(n: int, seed: int = 0) -> np.ndarray:
  """`n` distinct uint8 [375, 500, 3] photos cut from scikit-learn's sample images."""
  from sklearn.datasets import load_sample_images

  sources = load_sample_images().images  # two 427x640 photos
  rng = np.random.default_rng(seed)
  out = np.empty((n, HEIGHT, WIDTH, 3), np.uint8)
  for i in range(n):
    src = sources[i % len(sources)]
    y = rng.integers(0, src.shape[0] - HEIGHT + 1)
    x = rng.integers(0, src.shape[1] - WIDTH + 1)
    crop = src[y : y + HEIGHT, x : x + WIDTH].astype(np.float32)
    if rng.random() < 0.5:
      crop = crop[:, ::-1]
    out[i] = np.clip(crop * rng.uniform(0.7, 1.3), 0, 255).astype(np.uint8)
  return out


class H2tBenchJpegs(tfds.core.GeneratorBasedBuilder):
  """JPEG photos at 500x375 with a 10-class label, stored as TFDS stores VTAB."""

  VERSION = tfds.core.Version("1.0.0")
  # Nothing to download. (Left to TFDS, finding the checksums file of a class inside a
  # package needs the importlib_resources backport, which h2t does not install.)
  url_infos = None
  num_images = 512

  def _info(self):
    features = tfds.features.FeaturesDict(
      {
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=10),
      }
    )
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, image in enumerate(photo_crops(self.num_images)):
      yield i, {"image": image, "label": i % 10}


def main(argv):
  del argv
  pipeline.hide_gpus_from_tensorflow()
  H2tBenchJpegs.num_images = _NUM_IMAGES.value
  builder = H2tBenchJpegs(data_dir=tempfile.mkdtemp())
  builder.download_and_prepare()
  num_bytes = builder.info.splits["train"].num_bytes
  label = vtab.feature_label("label", 10)

  def one_pass() -> tuple[int, float]:
    start, n = time.perf_counter(), 0
    for images, labels in pipeline.read(
      builder,
      "train",
      batch_size=_BATCH_SIZE.value,
      image_size=_IMAGE_SIZE.value,
      label=label,
      num_classes=10,
      name="bench",
    ):
      assert images.shape[1:] == (_IMAGE_SIZE.value, _IMAGE_SIZE.value, 3)
      n += len(labels)
    return n, time.perf_counter() - start

  one_pass()  # warm-up: tracing, thread pools, file cache
  rates = []
  for _ in range(_PASSES.value):
    n, seconds = one_pass()
    rates.append(n / seconds)
  lines = [
    "h2t input pipeline: TFDS JPEG decode + bilinear resize + batching, to numpy, on the CPU",
    f"images: {_NUM_IMAGES.value} photos at {WIDTH}x{HEIGHT} px, mean JPEG size "
    f"{num_bytes / _NUM_IMAGES.value / 1024:.0f} KiB (record bytes)",
    f"output: {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value}x3 float32 in [0, 255], batches of {_BATCH_SIZE.value}",
    f"machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
    f"TensorFlow {tf.__version__}, TFDS {tfds.__version__}",
    f"passes: {', '.join(f'{r:.0f}' for r in rates)} images/s",
    f"result: {np.mean(rates):.0f} images/s (mean of {len(rates)} passes after a warm-up)",
  ]
  text = "\n".join(lines) + "\n"
  print(text, end="")
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    f.write(text)


if __name__ == "__main__":
  app.run(main)
