"""The one kind of task every part of h2t sees.

A task has a fixed number of classes and named splits. The VTAB-1k splits are
'train800', 'val200', 'train800val200' (the 1000 training images: the first
800 are 'train800', the last 200 'val200') and 'test'. Cross-validation folds
are index ranges of 'train800val200' (see `fold_indices`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import numpy as np

TRAIN_SPLITS = ("train800", "val200", "train800val200")
NUM_FOLDS = 5

# (images [b, h, w, 3] pixels in [0, 255] (uint8 or float32), labels int32 [b])
Batch = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Task:
  """A classification task with named splits, read batch by batch.

  Attributes:
    name: the task name, as in the config.
    num_classes: labels lie in [0, num_classes).
    split_sizes: split name -> number of examples.
    read: `read(split, batch_size, image_size) -> Iterator[Batch]`, in a fixed
      order; the last batch may be smaller. Images come either at
      `image_size` or at the source's own fixed size (the backbone resizes on
      the device either way, bilinearly).
  """

  name: str
  num_classes: int
  split_sizes: Mapping[str, int]
  read: Callable[[str, int, int], Iterator[Batch]]
  # `verify(split)` raises ValueError naming the first unreadable example of a
  # split, cheaply (no resizing); sources that are checked when prepared have none.
  verify: Callable[[str], None] | None = None

  def batches(self, split: str, batch_size: int, *, image_size: int) -> Iterator[Batch]:
    """Yields `(images, labels)` batches of `split` in a fixed order.

    Labels come out int32; a batch whose labels are not integers in
    `[0, num_classes)` raises ValueError (see `check_labels`).
    """
    self.check_split(split)
    return self._checked(split, self.read(split, batch_size, image_size))

  def _checked(self, split: str, batches: Iterator[Batch]) -> Iterator[Batch]:
    for images, labels in batches:
      yield images, check_labels(labels, self.num_classes, where=f"task {self.name!r}, split {split!r}")

  def size(self, split: str) -> int:
    self.check_split(split)
    return self.split_sizes[split]

  def check_split(self, split: str) -> None:
    if split not in self.split_sizes:
      raise ValueError(
        f"task {self.name!r} has no split {split!r}; expected one of {', '.join(self.split_sizes)}"
      )

  def arrays(self, split: str, *, image_size: int, batch_size: int = 256) -> Batch:
    """The whole split in memory: `(images [n, h, w, 3], labels [n])`."""
    images, labels = zip(*self.batches(split, batch_size, image_size=image_size))
    return np.concatenate(images), np.concatenate(labels)


def check_labels(labels, num_classes: int, *, where: str) -> np.ndarray:
  """Labels as int32 `[n]`, refusing any that is not an integer in `[0, num_classes)`.

  Integer and boolean arrays pass; a float array passes only when every value
  is a whole number (`3.0`), since casting `2.7` to int would silently make it
  class 2. Anything else (fractions, NaN, strings, objects, another rank) is a
  ValueError naming `where`, the first offending label and its index.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"{where}: labels must be a 1-D array of class indices, got shape {labels.shape}")
  if labels.dtype.kind == "f":
    whole = np.isfinite(labels) & (labels == np.round(labels))
    if not whole.all():
      i = int(np.flatnonzero(~whole)[0])
      raise ValueError(
        f"{where}: label {labels[i].item()!r} at index {i} is not a whole number; labels are class indices "
        f"in [0, {num_classes}) (cast deliberately, e.g. np.rint(labels).astype(int), if that is meant)"
      )
  elif labels.dtype.kind not in "biu":
    raise ValueError(
      f"{where}: labels have dtype {labels.dtype}; expected integer class indices in [0, {num_classes})"
    )
  outside = (labels < 0) | (labels >= num_classes)
  if outside.any():
    i = int(np.flatnonzero(outside)[0])
    raise ValueError(
      f"{where}: label {labels[i].item()!r} at index {i} is outside [0, {num_classes}) "
      f"({int(outside.sum())} of {len(labels)} labels are); num_classes is {num_classes}"
    )
  return labels.astype(np.int32)


def fold_indices(fold: int, n: int = 1000, num_folds: int = NUM_FOLDS) -> tuple[np.ndarray, np.ndarray]:
  """Train and validation indices of one cross-validation fold.

  As in the reference, fold `i` validates on examples `[200 i, 200 (i + 1))` of
  the 1000 training images and trains on the other 800. h2t folds the 1000
  images of 'train800val200' (read in order: train800, then val200), so the
  last fold is VTAB's own train800 -> val200 split. The reference folds the
  TFDS split 'train[:1000]' instead (VTAB tasks also offer it, as split
  'train1000'); see h2t/data/vtab.py.

  Returns:
    `(train_idx [n - n // num_folds], valid_idx [n // num_folds])`, int32.
  """
  if not 0 <= fold < num_folds:
    raise ValueError(f"fold {fold} is outside [0, {num_folds})")
  size = n // num_folds
  valid = np.arange(fold * size, (fold + 1) * size, dtype=np.int32)
  train = np.concatenate([np.arange(0, fold * size), np.arange((fold + 1) * size, n)]).astype(np.int32)
  return train, valid


def array_task(name: str, num_classes: int, splits: Mapping[str, Batch]) -> Task:
  """A task whose splits are in-memory arrays `{split: (images, labels)}`.

  Raises:
    ValueError: a split whose label count differs from its image count, or
      a label that is not an integer in `[0, num_classes)` (`check_labels`).
  """
  if not (isinstance(num_classes, (int, np.integer)) and num_classes >= 1):
    raise ValueError(f"task {name!r}: num_classes must be a positive integer, got {num_classes!r}")
  checked = {}
  for split, (images, labels) in splits.items():
    if len(images) != len(labels):
      raise ValueError(f"{name}/{split}: {len(images)} images but {len(labels)} labels")
    checked[split] = (images, check_labels(labels, num_classes, where=f"task {name!r}, split {split!r}"))
  splits = checked

  def read(split: str, batch_size: int, image_size: int) -> Iterator[Batch]:
    del image_size  # the backbone resizes on the device
    images, labels = splits[split]
    for start in range(0, len(labels), batch_size):
      yield images[start : start + batch_size], labels[start : start + batch_size]

  return Task(name, num_classes, {k: len(v[1]) for k, v in splits.items()}, read)


def vtab1k_splits(images: np.ndarray, labels: np.ndarray, test: Batch) -> dict[str, Batch]:
  """VTAB-1k splits from 1000 ordered training examples and a test set."""
  if len(labels) != 1000:
    raise ValueError(f"VTAB-1k needs exactly 1000 training examples, got {len(labels)}")
  return {
    "train800": (images[:800], labels[:800]),
    "val200": (images[800:], labels[800:]),
    "train800val200": (images, labels),
    "test": test,
  }


def balanced_subset_indices(labels: np.ndarray, num_classes: int, fraction: float) -> np.ndarray:
  """The reference's `data_fraction`: a balanced k-shot subset, deterministic.

  k = max(int(1000 * fraction / num_classes), 1). Walking `labels` in order,
  an example is kept while its class has fewer than k kept examples, so each
  class keeps its first k examples (all of them if it has fewer). A fraction
  of 1 keeps everything, as the reference subsets only when it is not 1.

  Args:
    labels: int [n], in [0, num_classes), in the split's order.
    num_classes: number of classes of the task.
    fraction: in (0, 1].

  Returns:
    int32 [m] increasing indices into `labels`.
  """
  labels = np.asarray(labels)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"data fraction {fraction} is outside (0, 1]")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes})")
  if fraction == 1.0:
    return np.arange(len(labels), dtype=np.int32)
  k = max(int(1000 * fraction / num_classes), 1)
  # rank[i]: how many earlier examples share example i's class.
  same_class = labels[:, None] == np.arange(num_classes)[None, :]
  rank = np.cumsum(same_class, axis=0)[np.arange(len(labels)), labels] - 1
  return np.flatnonzero(rank < k).astype(np.int32)
