"""Offline tasks: data that ships with packages, so h2t runs with no internet.

* 'digits': scikit-learn's 1797 handwritten digits (8x8 grey, 10 classes).
  The first 1000 of a fixed seeded permutation are the VTAB-1k training set
  (800 + 200); the other 797 are the test set.
* 'fashion_mnist': Fashion-MNIST (28x28 grey, 10 classes), from TFDS when it
  is prepared, else from the IDX files of Debian's `dataset-fashion-mnist`.
  VTAB-1k protocol on its train split (train800 = train[:800], val200 =
  train[54000:54200], i.e. at 90% as VTAB does for tasks without a validation
  split); test on its 10,000-image test split.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np

from h2t.data import base

DIGITS_SEED = 0
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def load_digits() -> base.Task:
  """scikit-learn's digits as a VTAB-1k task (1000 train, 797 test)."""
  from sklearn import datasets

  digits = datasets.load_digits()
  # Pixel values are 0..16; scale to the 0..255 range every backbone expects.
  images = (digits.images * (255.0 / 16.0)).astype(np.float32)
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(DIGITS_SEED).permutation(len(labels))
  images, labels = images[order], labels[order]
  splits = base.vtab1k_splits(images[:1000], labels[:1000], (images[1000:], labels[1000:]))
  return base.array_task("digits", 10, splits)


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally gzipped) as a numpy array.

  Raises:
    ValueError: the file is damaged, truncated, or not an unsigned-byte IDX
      file; the message names it.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise ValueError(f"{path}: cannot read it ({type(e).__name__}: {e}); is the download complete?") from e
  if len(data) < 4:
    raise ValueError(f"{path}: {len(data)} bytes, too short for an IDX header; truncated?")
  zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype_code != 0x08:
    raise ValueError(f"{path}: not an unsigned-byte IDX file")
  if len(data) < 4 + 4 * ndim:
    raise ValueError(f"{path}: the file ends inside its header of {ndim} dimensions; truncated?")
  shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != math.prod(shape):
    raise ValueError(f"{path}: expected {math.prod(shape)} values, found {array.size}; truncated?")
  return array.reshape(shape)


def _fashion_from_tfds(data_dir: str | None):
  import tensorflow_datasets as tfds

  builder = tfds.builder("fashion_mnist", data_dir=data_dir)
  if not builder.is_prepared():
    return None
  out = {}
  for split in ("train", "test"):
    ds = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    out[split] = (ds["image"][..., 0], ds["label"].astype(np.int32))
  return out


def _fashion_from_idx(directory: str):
  paths = {s: [os.path.join(directory, f) for f in files] for s, files in _FASHION_FILES.items()}
  if not all(os.path.exists(p) for ps in paths.values() for p in ps):
    return None
  return {s: (read_idx(img), read_idx(lab).astype(np.int32)) for s, (img, lab) in paths.items()}


def load_fashion_mnist(*, data_dir: str | None = None, idx_dir: str | None = None) -> base.Task:
  """Fashion-MNIST as a VTAB-1k task, from TFDS or from IDX files."""
  idx_dir = idx_dir or FASHION_MNIST_DIR
  arrays = _fashion_from_tfds(data_dir) or _fashion_from_idx(idx_dir)
  if arrays is None:
    raise FileNotFoundError(
      "fashion_mnist: no data found. Either prepare it with TFDS "
      '(python -c "import tensorflow_datasets as tfds; '
      "tfds.builder('fashion_mnist').download_and_prepare()\", needs internet), "
      f"or install the IDX files into {idx_dir!r} (apt-get install dataset-fashion-mnist) "
      "and/or point config.fashion_mnist_dir at a folder holding "
      f"{', '.join(f for fs in _FASHION_FILES.values() for f in fs)}."
    )
  train_images, train_labels = arrays["train"]
  n = len(train_labels)
  idx = np.concatenate([np.arange(800), np.arange(int(0.9 * n), int(0.9 * n) + 200)])
  splits = base.vtab1k_splits(train_images[idx], train_labels[idx], arrays["test"])
  return base.array_task("fashion_mnist", 10, splits)


NAMES = ("digits", "fashion_mnist")
