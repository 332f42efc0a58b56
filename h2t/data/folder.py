"""Folders of images as tasks: `--config.dataset=folder:/path/to/root`.

Two layouts are recognised:

* Explicit split: `root/train/<class>/*` and `root/test/<class>/*`. The classes
  are the subfolders of `train/`; `test/` may lack some of them, but not add any.
* One folder: `root/<class>/*`. Each class is split on its own, deterministically:
  its files, sorted by name, are permuted with a fixed seed and the first
  `TEST_FRACTION` of them (at least one, when the class has two or more) go to
  the test split.

Images are the files ending in .png, .jpg or .jpeg (any case); other files are
ignored. Labels are the indices of the sorted class names.

All training images are used (a folder is not capped at VTAB-1k's 1000). They
are read in a fixed shuffled order, so that the contiguous cross-validation
folds of `h2t.data.base.fold_indices` mix the classes. As for the other tasks,
'train800val200' is the whole training set; 'train800' and 'val200' are its
first 80% and last 20%.

Files are decoded with Pillow (EXIF rotation applied; every mode becomes 8-bit
RGB with its contrast kept: 16-bit grey is scaled, not clipped, and
transparent pixels are composited on black; see `to_rgb`) and resized to the backbone's input size with Pillow's
bilinear filter, which antialiases when shrinking: user photos are often ten
times the input size, where unfiltered bilinear sampling would alias.
`h2t.predict` reads files through the same `load_image`, so a head sees new
images exactly as it saw its training images.

The task name is `folder_<basename>_<hash>`; the hash covers the class names and
each file's path, size and modification time. It is safe as a file name (it
names the feature cache) and changes whenever the data does, so a stale cache
is never read.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np

from h2t.data import base

PREFIX = "folder:"
NAME_PATTERN = "folder:PATH"  # How task lists show this family of names.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
TEST_FRACTION = 0.2
SPLIT_SEED = 0  # Fixes the per-class test split and the training order.
TRAIN800_FRACTION = 0.8  # 'train800' / 'val200' cut of the training images.


@dataclasses.dataclass(frozen=True)
class FolderTask(base.Task):
  """A `Task` read from image files.

  Attributes:
    root: the folder the task was read from (absolute).
    class_names: folder name of each label, `class_names[label]`.
    layout: 'train_test' (root/train, root/test) or 'single' (root/<class>).
  """

  root: str = ""
  class_names: tuple[str, ...] = ()
  layout: str = ""


def is_folder_name(name: object) -> bool:
  """Whether `name` is a folder task name, `'folder:PATH'` with a non-empty PATH."""
  return isinstance(name, str) and name.startswith(PREFIX) and bool(name[len(PREFIX) :].strip())


def root_of(name: str) -> str:
  """The absolute folder of a `'folder:PATH'` name (`~` expanded)."""
  if not is_folder_name(name):
    raise ValueError(f"{name!r} is not a folder task name; expected {NAME_PATTERN!r}")
  return os.path.abspath(os.path.expanduser(name[len(PREFIX) :].strip()))


def short_name(name: str) -> str:
  """A file-system-safe name of a folder task without its hash: `folder_<basename>`."""
  base_name = os.path.basename(root_of(name).rstrip(os.sep)) or "root"
  return "folder_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", base_name)


def to_rgb(im):
  """Any Pillow mode -> 8-bit RGB with its contrast kept.

  * 16-bit greyscale ('I;16', 'I;16B', ...; 'I' is read as 16-bit too, the
    range PNG stores): 0..65535 is scaled to 0..255 (v / 257, rounded), where
    Pillow's own conversion would clip everything above 255 to white.
  * 'F' (float): values are taken as 0..255 and clipped, as Pillow does.
  * Transparency (modes with alpha: 'LA', 'PA', 'RGBA', ...; palette or grey
    or RGB images with a tRNS transparent colour) is composited on black:
    a pixel becomes `colour * alpha / 255`, so whatever colour a transparent
    pixel hides in the file, it reads as black.
  * Everything else ('1', 'L', 'P', 'CMYK', 'YCbCr', 'LAB', ...) through
    Pillow's `convert('RGB')`.
  """
  from PIL import Image

  if im.mode == "I" or im.mode.startswith("I;16"):
    grey = np.clip(np.asarray(im).astype(np.float64), 0, 65535) / 257.0
    im = Image.fromarray(np.round(grey).astype(np.uint8))
  elif im.mode == "F":
    grey = np.clip(np.nan_to_num(np.asarray(im, np.float64)), 0, 255)
    im = Image.fromarray(np.round(grey).astype(np.uint8))
  if "A" in im.mode or "a" in im.mode or "transparency" in im.info:
    rgba = np.asarray(im.convert("RGBA"), np.uint32)
    rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8))
  return im.convert("RGB")


def load_image(path: str, image_size: int) -> np.ndarray:
  """Reads an image file as `[image_size, image_size, 3]` uint8 RGB.

  Decoding applies the EXIF orientation and converts any mode to RGB with
  its contrast kept (`to_rgb`: 16-bit scaled to 8-bit, transparency
  composited on black); the resize to a square (no crop) is Pillow's
  bilinear filter, antialiased when shrinking. This is the one way h2t reads
  image files, for training (folder tasks) and prediction (`h2t.predict`)
  alike.

  Raises:
    ValueError: the file is not a readable image (damaged, truncated, not an
      image, or too large to decode); the message names the file.
  """
  from PIL import Image, ImageOps

  try:
    with Image.open(path) as im:
      # JPEG only: decode directly at a reduced scale (>= the target size); much faster for photos.
      im.draft("RGB", (image_size, image_size))
      im = to_rgb(ImageOps.exif_transpose(im))
      if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
      return np.asarray(im, np.uint8)
  except Exception as e:  # noqa: BLE001 -- a file is untrusted input: whatever its decoder raises, one message.
    raise ValueError(
      f"cannot read image {path!r} ({type(e).__name__}: {e}); is it a complete PNG or JPEG file?"
    ) from e


def load_images(paths: Sequence[str], image_size: int) -> np.ndarray:
  """`load_image` of each path, decoded in parallel: `[n, image_size, image_size, 3]` uint8."""
  if not paths:
    return np.zeros((0, image_size, image_size, 3), np.uint8)
  # Pillow releases the GIL while decoding and resizing, so threads use every core.
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1)) as pool:
    return np.stack(list(pool.map(lambda p: load_image(p, image_size), paths)))


def is_image_file(path: str) -> bool:
  name = os.path.basename(path)
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def image_files(folder: str) -> list[str]:
  """The image files directly inside `folder`, sorted by name."""
  return sorted(
    os.path.join(folder, f)
    for f in os.listdir(folder)
    if is_image_file(f) and os.path.isfile(os.path.join(folder, f))
  )


def _class_folders(folder: str) -> list[str]:
  return sorted(
    d for d in os.listdir(folder) if not d.startswith(".") and os.path.isdir(os.path.join(folder, d))
  )


def _layout_help(root: str) -> str:
  return (
    f"expected either {root}/train/<class>/*.png|jpg and {root}/test/<class>/*, "
    f"or {root}/<class>/*.png|jpg (split {100 * (1 - TEST_FRACTION):.0f}/{100 * TEST_FRACTION:.0f} per class)"
  )


def _read_classes(folder: str, root: str) -> dict[str, list[str]]:
  """`{class name: sorted image paths}` of the class subfolders of `folder`."""
  classes = {c: image_files(os.path.join(folder, c)) for c in _class_folders(folder)}
  empty = [c for c, files in classes.items() if not files]
  if empty:
    raise ValueError(
      f"class folder(s) {', '.join(os.path.join(folder, c) for c in empty)} hold no "
      f"{'/'.join(IMAGE_EXTENSIONS)} files; {_layout_help(root)}"
    )
  return classes


def split_files(root: str) -> tuple[str, tuple[str, ...], dict[str, list[tuple[str, int]]]]:
  """Finds the layout, classes and files of an image folder.

  Returns:
    `(layout, class_names, {'train': [(path, label)], 'test': [(path, label)]})`;
    'train' in its fixed shuffled order, 'test' by class, then file name.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder {root!r} does not exist; {_layout_help(root)}")
  sub = set(_class_folders(root))
  rng = np.random.default_rng(SPLIT_SEED)
  if {"train", "test"} <= sub:
    layout = "train_test"
    train = _read_classes(os.path.join(root, "train"), root)
    test = _read_classes(os.path.join(root, "test"), root)
    extra = sorted(set(test) - set(train))
    if extra:
      raise ValueError(f"{root}/test has classes that {root}/train lacks: {', '.join(extra)}")
    names = tuple(sorted(train))
  else:
    layout = "single"
    classes = _read_classes(root, root)
    names = tuple(sorted(classes))
    train, test = {}, {}
    for c in names:
      files = classes[c]
      order = rng.permutation(len(files))
      n_test = int(round(TEST_FRACTION * len(files)))
      n_test = max(n_test, 1) if len(files) >= 2 else 0
      test[c] = sorted(files[i] for i in order[:n_test])
      train[c] = sorted(files[i] for i in order[n_test:])
  if len(names) < 2:
    raise ValueError(
      f"image folder {root!r} has {len(names)} class folder(s), need at least 2; {_layout_help(root)}"
    )
  label = {c: i for i, c in enumerate(names)}
  files = {
    split: [(p, label[c]) for c in names for p in by_class.get(c, [])]
    for split, by_class in (("train", train), ("test", test))
  }
  if not files["test"]:
    raise ValueError(f"image folder {root!r} has no test images; {_layout_help(root)}")
  if len(files["train"]) < base.NUM_FOLDS:
    raise ValueError(
      f"image folder {root!r} has {len(files['train'])} training images; "
      f"cross-validation needs at least {base.NUM_FOLDS}"
    )
  # Contiguous CV folds must each see every class: shuffle the training order once, reproducibly.
  files["train"] = [files["train"][i] for i in rng.permutation(len(files["train"]))]
  return layout, names, files


def _fingerprint(root: str, names: Sequence[str], files: dict[str, list[tuple[str, int]]]) -> str:
  h = hashlib.sha256()
  h.update("\n".join(names).encode())
  for split in ("train", "test"):
    for path, label in files[split]:
      st = os.stat(path)
      h.update(f"{split}\t{os.path.relpath(path, root)}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:10]


def load(name: str) -> FolderTask:
  """The task of a `'folder:PATH'` name (see the module docstring for the layouts)."""
  root = root_of(name)
  layout, names, files = split_files(root)
  train, test = files["train"], files["test"]
  n_train800 = int(round(TRAIN800_FRACTION * len(train)))
  splits = {
    "train800": train[:n_train800],
    "val200": train[n_train800:],
    "train800val200": train,
    "test": test,
  }

  def read(split: str, batch_size: int, image_size: int, share=base.WHOLE) -> Iterator[base.Batch]:
    for chunk in share.chunks(splits[split], batch_size):  # other processes' files are never opened
      images = load_images([p for p, _ in chunk], image_size)
      yield images, np.array([y for _, y in chunk], np.int32)

  def verify(split: str, batch_size: int, share=base.WHOLE) -> None:
    # Decoded at a small draft size (JPEG) with no resize: a damaged test image is found before
    # training starts, not after it. Each process checks the files it will read.
    for chunk in share.chunks(splits[split], batch_size):
      for path, _ in chunk:
        load_image(path, 8)

  return FolderTask(
    name=f"{short_name(name)}_{_fingerprint(root, names, files)}",
    verify=verify,
    num_classes=len(names),
    split_sizes={k: len(v) for k, v in splits.items()},
    read=read,
    reads_shares=True,
    root=root,
    class_names=names,
    layout=layout,
  )
