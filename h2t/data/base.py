"""The one kind of task every part of h2t sees.

A task has a fixed number of classes and named splits. The VTAB-1k splits are
'train800', 'val200', 'train800val200' (the 1000 training images: the first
800 are 'train800', the last 200 'val200') and 'test'. Cross-validation folds
are index ranges of 'train800val200' (see `fold_indices`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

TRAIN_SPLITS = ("train800", "val200", "train800val200")
NUM_FOLDS = 5

# (images [b, h, w, 3] pixels in [0, 255] (uint8 or float32), labels int32 [b])
Batch = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Share:
  """The batches of a split that one of `count` processes reads: batch i when i % count == index.

  Batches are cut from the split's start, `batch_size` examples each (the last
  may be smaller), so the shares of all processes tile the split and batch i
  holds the same examples whatever the number of processes.
  """

  index: int = 0
  count: int = 1

  def __post_init__(self):
    if not (self.count >= 1 and 0 <= self.index < self.count):
      raise ValueError(f"share {self.index} of {self.count}: expected 0 <= index < count")

  @property
  def whole(self) -> bool:
    return self.count == 1

  def owns(self, batch: int) -> bool:
    return batch % self.count == self.index

  def starts(self, size: int, batch_size: int) -> range:
    """First example of each batch of this share, for a split of `size` examples."""
    return range(self.index * batch_size, size, self.count * batch_size)

  def positions(self, size: int, batch_size: int) -> list[tuple[int, int]]:
    """`(first example, examples)` of each batch of this share, in order."""
    return [(s, min(batch_size, size - s)) for s in self.starts(size, batch_size)]

  def chunks(self, items: Sequence, batch_size: int) -> Iterator[Sequence]:
    """This share's batches of a list of examples (paths, entries), in order; no other is touched."""
    for start in self.starts(len(items), batch_size):
      yield items[start : start + batch_size]


WHOLE = Share()


@dataclasses.dataclass(frozen=True)
class Task:
  """A classification task with named splits, read batch by batch.

  Attributes:
    name: the task name, as in the config.
    num_classes: labels lie in [0, num_classes).
    split_sizes: split name -> number of examples.
    read: `read(split, batch_size, image_size) -> Iterator[Batch]`, in a fixed
      order, every batch `batch_size` examples but the last. Images come
      either at `image_size` or at the source's own fixed size (the backbone
      resizes on the device either way, bilinearly). With `reads_shares`,
      `read(split, batch_size, image_size, share)` yields only the batches of
      `share` (a `Share`) and reads or decodes no other example.
    verify: `verify(split, batch_size, share)` raises ValueError naming the
      first unreadable example of `share`'s batches of a split, cheaply (no
      resizing); sources that are checked when prepared have none.
    reads_shares: whether `read` takes a `share` (h2t's sources do). Without
      it, a process's share is read whole and the other batches dropped.
  """

  name: str
  num_classes: int
  split_sizes: Mapping[str, int]
  read: Callable[..., Iterator[Batch]]
  verify: Callable[[str, int, Share], None] | None = None
  reads_shares: bool = False

  def batches(self, split: str, batch_size: int, *, image_size: int, share: Share = WHOLE) -> Iterator[Batch]:
    """Yields `(images, labels)` batches of `split` in a fixed order: those of `share` only.

    Labels come out int32; a batch whose labels are not integers in
    `[0, num_classes)` raises ValueError (see `check_labels`). A batch of
    another size than the share's (`Share.positions`) raises ValueError.
    """
    self.check_split(split)
    if share.whole:
      batches = self.read(split, batch_size, image_size)
    elif self.reads_shares:
      batches = self.read(split, batch_size, image_size, share)
    else:
      batches = (b for i, b in enumerate(self.read(split, batch_size, image_size)) if share.owns(i))
    expected = None if share.whole else share.positions(self.size(split), batch_size)
    return self._checked(split, batches, expected)

  def _checked(self, split: str, batches: Iterator[Batch], expected) -> Iterator[Batch]:
    where = f"task {self.name!r}, split {split!r}"
    k = 0
    for images, labels in batches:
      if expected is not None and (k >= len(expected) or len(labels) != expected[k][1]):
        want = f"{expected[k][1]} examples" if k < len(expected) else "none"
        raise ValueError(
          f"{where}: batch {k} of this process's share has {len(labels)} examples, expected {want}"
        )
      k += 1
      yield images, check_labels(labels, self.num_classes, where=where)
    if expected is not None and k != len(expected):
      raise ValueError(f"{where}: this process's share ended after {k} of its {len(expected)} batches")

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

  def read(split: str, batch_size: int, image_size: int, share: Share = WHOLE) -> Iterator[Batch]:
    del image_size  # the backbone resizes on the device
    images, labels = splits[split]
    for start in share.starts(len(labels), batch_size):
      yield images[start : start + batch_size], labels[start : start + batch_size]

  return Task(name, num_classes, {k: len(v[1]) for k, v in splits.items()}, read, reads_shares=True)


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
