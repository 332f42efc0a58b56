"""VTAB-1k as most parameter-efficient fine-tuning code has it: prepared image folders and lists.

NOAH, V-PETL and the code that follows them read VTAB-1k from one folder per
task, written once from TFDS by NOAH's `get_vtab1k.py`:

    <root>/<folder>/train800.txt        "images/train800/000000.jpg 3" per line
    <root>/<folder>/val200.txt          (an image path relative to <root>/<folder>,
    <root>/<folder>/train800val200.txt   one space, an integer label)
    <root>/<folder>/test.txt
    <root>/<folder>/images/<split>/*.jpg

With `--config.data_dir=<root>`, a VTAB task whose folder holds these lists is
read from them instead of TFDS (`h2t.data.get_task`). `FOLDERS` maps h2t's
task names to the folder names (`cifar` is CIFAR-100, `clevr_dist` is
`clevr_distance`, ...). The labels are task_adaptation's, as h2t's TFDS
labels are.

The lists must be VTAB-1k's: 800, 200 and 1000 lines, and train800val200 the
images of train800 followed by those of val200, in order (the prepared folders
store each split's images as separate files, so the check compares file
contents). h2t's cross-validation folds are index ranges of train800val200
(`h2t.data.base.fold_indices`), so fold 4 is VTAB's own train800 -> val200
split, exactly as on the TFDS path. Every problem (a malformed line, a label
outside the task's classes, a repeated or missing image, lists that disagree)
is a ValueError naming the list file and line.

Images are decoded with Pillow to RGB (no EXIF rotation, as TFDS decodes) and
resized to the backbone's input size bilinearly with half-pixel centres and no
antialiasing, as `tf.image.resize` on the TFDS path (`resize_bilinear`). The
images are the TFDS ones re-encoded as JPEG (PIL's default quality), so
features and accuracies can differ slightly from a TFDS run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np
from absl import logging

from h2t.data import base, vtab

# h2t task name -> folder name of NOAH's prepared VTAB-1k.
FOLDERS = {
  "caltech101": "caltech101",
  "cifar100": "cifar",
  "dtd": "dtd",
  "oxford_flowers102": "oxford_flowers102",
  "oxford_iiit_pet": "oxford_iiit_pet",
  "svhn": "svhn",
  "sun397": "sun397",
  "patch_camelyon": "patch_camelyon",
  "eurosat": "eurosat",
  "resisc45": "resisc45",
  "diabetic_retinopathy": "diabetic_retinopathy",
  "clevr_count": "clevr_count",
  "clevr_distance": "clevr_dist",
  "dmlab": "dmlab",
  "kitti_distance": "kitti",
  "dsprites_location": "dsprites_loc",
  "dsprites_orientation": "dsprites_ori",
  "smallnorb_azimuth": "smallnorb_azi",
  "smallnorb_elevation": "smallnorb_ele",
}
LIST_FILES = {
  "train800": "train800.txt",
  "val200": "val200.txt",
  "train800val200": "train800val200.txt",
  "test": "test.txt",
}
LIST_SIZES = {"train800": 800, "val200": 200, "train800val200": 1000}
LINE_FORMAT = "'<image path relative to the task folder> <integer label>'"


@dataclasses.dataclass(frozen=True)
class Entry:
  """One line of a list: the image's absolute path, its label, where it was listed."""

  path: str
  label: int
  list_file: str
  line: int

  @property
  def where(self) -> str:
    return f"{self.list_file} line {self.line}"


@dataclasses.dataclass(frozen=True)
class PreparedVtabTask(base.Task):
  """A VTAB-1k `Task` read from a prepared folder.

  Attributes:
    folder: the task's folder (absolute), `<root>/<FOLDERS[name]>`.
  """

  folder: str = ""


def folder_of(name: str, data_dir: str) -> str:
  """The prepared folder of VTAB task `name` under `data_dir` (absolute, `~` expanded)."""
  if name not in FOLDERS:
    raise ValueError(f"unknown VTAB task {name!r}; expected one of {', '.join(FOLDERS)}")
  return os.path.join(os.path.abspath(os.path.expanduser(data_dir)), FOLDERS[name])


def hint(name: str, data_dir: str) -> str:
  """One sentence for a missing-data message: where a prepared folder of task `name` would be read."""
  return (
    f"A prepared VTAB-1k folder (NOAH's layout, README 'VTAB-1k data') is read instead when its lists "
    f"are in {folder_of(name, data_dir)}/ ({', '.join(LIST_FILES.values())})."
  )


def has_lists(name: str, data_dir: str | None) -> bool:
  """Whether `data_dir` holds a prepared folder (any of its list files) for task `name`."""
  if not data_dir or name not in FOLDERS:
    return False
  folder = folder_of(name, data_dir)
  return any(os.path.isfile(os.path.join(folder, f)) for f in LIST_FILES.values())


def parse_list(list_file: str, folder: str, num_classes: int) -> list[Entry]:
  """The entries of one list file, checked line by line.

  Blank lines are skipped. A line is an image path relative to `folder`, one
  or more spaces or tabs, and an integer label in [0, num_classes) (the path
  is everything before the last run of whitespace, so it may hold spaces).

  Raises:
    ValueError: naming the file and line of a malformed line, a label out of
      range, or a path listed twice.
  """
  entries: list[Entry] = []
  seen: dict[str, int] = {}
  try:
    with open(list_file, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of line 1
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"cannot read {list_file}: {e}") from None
  for number, text in enumerate(lines, start=1):
    if not text.strip():
      continue
    fields = text.strip().rsplit(maxsplit=1)
    if len(fields) != 2 or not re.fullmatch(r"-?[0-9]+", fields[1]):
      raise ValueError(f"{list_file} line {number}: {text!r} is not of the form {LINE_FORMAT}")
    relative, label = fields[0], int(fields[1])
    if not 0 <= label < num_classes:
      raise ValueError(
        f"{list_file} line {number}: label {label} is outside [0, {num_classes}), the task's "
        f"{num_classes} classes; is this the folder of another task?"
      )
    if relative in seen:
      raise ValueError(f"{list_file} line {number}: {relative!r} is listed twice (line {seen[relative]})")
    seen[relative] = number
    entries.append(Entry(os.path.join(folder, relative), label, list_file, number))
  return entries


def _check_files_exist(entries: Sequence[Entry], folder: str) -> None:
  missing = [e for e in entries if not os.path.isfile(e.path)]
  if missing:
    first = missing[0]
    raise ValueError(
      f"{first.where}: image {os.path.relpath(first.path, folder)!r} not found ({first.path}); "
      f"{len(missing)} of the {len(entries)} images it lists are missing. Unpack the prepared "
      f"VTAB-1k folder completely."
    )


def _same_file_content(a: str, b: str) -> bool:
  if a == b:
    return True
  if os.path.getsize(a) != os.path.getsize(b):
    return False
  with open(a, "rb") as fa, open(b, "rb") as fb:
    return fa.read() == fb.read()


def _content_key(entry: Entry) -> tuple[str, int]:
  with open(entry.path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest(), entry.label


def check_train800val200(
  train800: list[Entry], val200: list[Entry], trainval: list[Entry], share: base.Share = base.WHOLE
) -> None:
  """Fails unless `trainval` lists the images and labels of `train800`, then `val200`, in order.

  Paths may differ (the prepared folders store each split's images apart);
  two entries are the same image when they name the same file or files with
  identical bytes. With a `share` of several processes, this one compares
  pairs i with `share.owns(i)` only (each pair's files are read by one
  process); a mismatch found by any process stops the run.
  """
  expected = train800 + val200
  for i, (got, want) in enumerate(zip(trainval, expected, strict=True)):
    if not share.owns(i) or (got.label == want.label and _same_file_content(got.path, want.path)):
      continue
    same_set = sorted(map(_content_key, trainval)) == sorted(map(_content_key, expected))
    hint = (
      "it lists the same images in another order"
      if same_set
      else "the lists disagree: are they from the same preparation of VTAB-1k?"
    )
    raise ValueError(
      f"{got.where}: {os.path.basename(got.path)!r} (label {got.label}) is not the image of "
      f"{want.where}: {os.path.basename(want.path)!r} (label {want.label}). train800val200.txt must "
      f"list the images of train800.txt, then those of val200.txt, in their order, so that the last "
      f"cross-validation fold is VTAB's train800 -> val200 split; {hint}"
    )


def read_lists(
  name: str, data_dir: str, share: base.Share = base.WHOLE
) -> tuple[str, dict[str, list[Entry]]]:
  """Reads and checks the four lists of task `name` under `data_dir` (`share`: see `check_train800val200`).

  Returns:
    `(folder, {split: [Entry]})` for the splits of `LIST_FILES`.
  """
  spec = vtab.get_spec(name)
  folder = folder_of(name, data_dir)
  paths = {split: os.path.join(folder, f) for split, f in LIST_FILES.items()}
  absent = [f for split, f in LIST_FILES.items() if not os.path.isfile(paths[split])]
  if absent:
    raise ValueError(
      f"VTAB task {name!r}: the prepared folder {folder} lacks {', '.join(absent)}; it needs all of "
      f"{', '.join(LIST_FILES.values())}. Complete it, or remove its lists to read TFDS data from "
      f"data_dir instead."
    )
  splits = {split: parse_list(path, folder, spec.num_classes) for split, path in paths.items()}
  for split, size in LIST_SIZES.items():
    if len(splits[split]) != size:
      raise ValueError(
        f"{paths[split]} lists {len(splits[split])} images; VTAB-1k's {split} has exactly {size}"
      )
  if not splits["test"]:
    raise ValueError(f"{paths['test']} lists no images")
  for entries in splits.values():
    _check_files_exist(entries, folder)
  check_train800val200(splits["train800"], splits["val200"], splits["train800val200"], share)
  return folder, splits


def _axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices (low, high) and the high one's weight along one axis, half-pixel centres.

  In float32, as TensorFlow's kernel computes them, so the weights agree to the last bit or two.
  """
  scale = np.float32(in_size / out_size)
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  low = np.floor(src)
  frac = src - low
  low_i = np.clip(low, 0, in_size - 1).astype(np.int64)
  high_i = np.clip(np.ceil(src), 0, in_size - 1).astype(np.int64)
  return low_i, high_i, frac


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
  """`tf.image.resize(image, [size, size], 'bilinear')` in numpy.

  Half-pixel centres, no antialiasing, edge samples clamped: the resize of
  the TFDS path (h2t/data/pipeline.py), so a prepared folder's image is
  resized as its TFDS original is (equal to float32 rounding).

  Args:
    image: `[h, w, c]` pixels.
    size: output side length.

  Returns:
    `[size, size, c]` float32.
  """
  x = np.asarray(image, np.float32)
  h, w = x.shape[:2]
  if (h, w) == (size, size):
    return x
  y0, y1, fy = _axis_weights(h, size)
  x0, x1, fx = _axis_weights(w, size)
  # Along x within the two source rows first, then along y, as TensorFlow's kernel.
  top, bottom = x[y0], x[y1]
  top = top[:, x0] + (top[:, x1] - top[:, x0]) * fx[None, :, None]
  bottom = bottom[:, x0] + (bottom[:, x1] - bottom[:, x0]) * fx[None, :, None]
  return top + (bottom - top) * fy[:, None, None]


def load_image(entry: Entry, image_size: int) -> np.ndarray:
  """One listed image as `[image_size, image_size, 3]` float32 RGB in [0, 255]."""
  from PIL import Image

  try:
    with Image.open(entry.path) as im:
      rgb = np.asarray(im.convert("RGB"))
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"{entry.where}: cannot read image {entry.path}: {e}") from None
  return resize_bilinear(rgb, image_size)


def load_images(entries: Sequence[Entry], image_size: int) -> np.ndarray:
  """`load_image` of each entry, decoded in parallel: `[n, image_size, image_size, 3]` float32."""
  if not entries:
    return np.zeros((0, image_size, image_size, 3), np.float32)
  # Pillow and numpy release the GIL for the heavy parts, so threads use every core.
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(entries), os.cpu_count() or 1)) as pool:
    return np.stack(list(pool.map(lambda e: load_image(e, image_size), entries)))


def load(name: str, data_dir: str, share: base.Share = base.WHOLE) -> PreparedVtabTask:
  """VTAB-1k task `name` from its prepared folder under `data_dir` (see the module docstring).

  `share`: this process's share of the lists' check (`check_train800val200`);
  the task itself reads any share it is asked for.

  Returns:
    A `Task` with splits 'train800', 'val200', 'train800val200' and 'test',
    each read in list order as `(images [b, S, S, 3] float32 in [0, 255],
    labels [b] int32)`.

  Raises:
    ValueError: the folder's lists are incomplete or wrong; the message names
      the file and line.
  """
  spec = vtab.get_spec(name)
  folder, splits = read_lists(name, data_dir, share)
  logging.info(
    "VTAB task %s: reading the prepared folder %s (%s), not TFDS",
    name,
    folder,
    ", ".join(f"{k} {len(v)}" for k, v in splits.items()),
  )

  def read(split: str, batch_size: int, image_size: int, share=base.WHOLE) -> Iterator[base.Batch]:
    for chunk in share.chunks(splits[split], batch_size):  # other processes' files are never opened
      yield load_images(chunk, image_size), np.array([e.label for e in chunk], np.int32)

  return PreparedVtabTask(
    name=name,
    num_classes=spec.num_classes,
    split_sizes={k: len(v) for k, v in splits.items()},
    read=read,
    reads_shares=True,
    folder=folder,
  )
