"""tf.data input pipeline for TFDS image tasks: decode, grey -> RGB, resize, batch.

TensorFlow only feeds data here, on the CPU: `hide_gpus_from_tensorflow` keeps
it off the accelerators that JAX uses. Examples are read in the split's own
order (no file shuffling, one file at a time), so index `i` of a stream is
example `i` of the TFDS split string, which is what folds and `data_fraction`
subsets are defined on. Only the features a label needs are decoded, images
are decoded in parallel, and nothing is cached: a split streams through in
batches whatever its size. A process of a run over several hosts decodes only
its own batches (`share`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from h2t.data import base

IMAGE_KEY = "image"


def hide_gpus_from_tensorflow() -> None:
  """Keeps TensorFlow on the CPU so that JAX has the accelerators to itself."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    # TensorFlow was initialised before us; fine as long as it sees no GPU.
    if tf.config.get_visible_devices("GPU"):
      logging.warning("TensorFlow already initialised its GPUs; it may hold accelerator memory.")


def partial_decoding(label: Any) -> tfds.decode.PartialDecoding:
  """Decodes only the image (later, in parallel) and the label's features."""
  spec: dict[str, Any] = {IMAGE_KEY: True}
  for path in label.features:
    node = spec
    *parents, leaf = path.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = True
  # The image stays encoded here: it is decoded in the parallel map below.
  return tfds.decode.PartialDecoding(spec, decoders={IMAGE_KEY: tfds.decode.SkipDecoding()})


def dataset(
  builder: tfds.core.DatasetBuilder,
  split: str,
  *,
  batch_size: int,
  image_size: int,
  label: Any,
  num_classes: int,
  binary_image: bool = False,
  name: str = "",
  share: base.Share = base.WHOLE,
) -> tf.data.Dataset:
  """Batches of `split` in its own order: `(images [b, S, S, 3] float32, labels [b] int32)`.

  Images are resized bilinearly to `S = image_size` (as task_adaptation's
  preprocess) with pixel values kept in [0, 255]; the backbone maps them to its
  own range. The last batch may be smaller.

  Args:
    builder: a prepared TFDS builder.
    split: a TFDS split string ('train[:800]+validation[:200]').
    batch_size: examples per batch.
    image_size: output side length in pixels.
    label: the task's label rule.
    num_classes: labels outside [0, num_classes) raise, naming the task.
    binary_image: the stored pixels are 0/1 (dSprites): scale them to 0/255.
    name: the task name, for error messages.
    share: only the batches of this share (`h2t.data.base.Share`): the other
      examples are dropped before their images are decoded (TFRecord files
      have no index, so their records are still read past, as TFDS's own
      `skip` does), and the kept ones batch into exactly the share's batches.
  """
  image_feature = builder.info.features[IMAGE_KEY]
  grey = image_feature.shape[-1] == 1
  ds = builder.as_dataset(
    split=split,
    shuffle_files=False,
    decoders=partial_decoding(label),
    # One file at a time keeps the split's order; no autocache keeps memory flat.
    read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False),
  )

  def prepare(example):
    image = image_feature.decode_example(example[IMAGE_KEY])
    if binary_image:
      # dSprites stores 0/1 pixels; the reference multiplies them by 255.
      image = tf.minimum(image, 1) * 255
    if grey:
      image = tf.image.grayscale_to_rgb(image)
    # Bilinear without antialiasing, as task_adaptation; convex weights keep [0, 255].
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    y = tf.cast(label.fn(example), tf.int32)
    message = (
      f"{name}: a label is outside [0, {num_classes}); is the TFDS data the version the VTAB table expects?"
    )
    with tf.control_dependencies(
      [
        tf.debugging.assert_non_negative(y, message=message),
        tf.debugging.assert_less(y, num_classes, message=message),
      ]
    ):
      y = tf.identity(y)
    return image, y

  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  if not share.whole:
    count, index = share.count, share.index

    def owned(i, example):
      del example
      return (i // batch_size) % count == index

    ds = ds.enumerate().filter(owned).map(lambda i, example: example)
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def read(builder: tfds.core.DatasetBuilder, split: str, **kwargs) -> Iterator[base.Batch]:
  """Streams `dataset(builder, split, **kwargs)` as numpy batches `(images [b, S, S, 3] float32, labels [b] int32)`."""
  yield from dataset(builder, split, **kwargs).as_numpy_iterator()


def split_sizes(builder: tfds.core.DatasetBuilder, splits: Mapping[str, str]) -> dict[str, int]:
  """Number of examples of each TFDS split string, from the prepared data's metadata."""
  return {name: int(builder.info.splits[spec].num_examples) for name, spec in splits.items()}


def class_count(builder: tfds.core.DatasetBuilder, feature: str) -> int:
  """`num_classes` of a ClassLabel feature ('label', or a '/'-path inside a sequence)."""
  node = builder.info.features
  for name in feature.split("/"):
    node = node[name]
  return int(node.num_classes)
