"""Classify images with a saved head: `python -m h2t.predict --head=HEAD IMAGES_OR_DIRS...`.

    python -m h2t.predict --head=workdir/digits/head_head2toe.npz photo.png more_photos/
    python -m h2t.predict --head=head.npz --output=preds.csv --checkpoint=/path/to/vit.npz imgs/

A head file (`h2t.head.Head.save`) holds the kept feature indices, the
weights, the normalisation and the backbone's name, checkpoint id, input size
and pooling settings. The backbone is rebuilt from those (`--checkpoint` gives
its weights file when the backbone has no packaged default) and must have the
checkpoint id the head was trained on. Files (.png, .jpg, .jpeg; folders are
searched recursively) are read as in folder tasks (`h2t.data.folder.load_image`).

Output: one CSV line per image, `path,label,probability[,class_name]`, the
label being the most probable class.

From Python, on arrays:

    labels, probs = h2t.predict.predict_images(head, images)   # images [n, h, w, 3]
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from h2t import backbones, files
from h2t.head import (  # noqa: F401 -- re-exported: h2t.predict.predict_images etc.
  BATCH_SIZE,
  Head,
  HeadFileError,
  backbone_for,
  check_backbone,
  parameter_bytes,
  predict_images,
)


def image_paths(inputs: Sequence[str]) -> list[str]:
  """Image files named by `inputs`: files as given, folders searched recursively (sorted)."""
  from h2t.data import folder

  paths = []
  for p in inputs:
    if os.path.isdir(p):
      for d, subdirs, files in os.walk(p):
        subdirs.sort()
        paths += [os.path.join(d, f) for f in sorted(files) if folder.is_image_file(f)]
    elif os.path.isfile(p):
      paths.append(p)
    else:
      raise FileNotFoundError(f"{p!r} is neither an image file nor a folder")
  if not paths:
    raise FileNotFoundError(f"no {'/'.join(folder.IMAGE_EXTENSIONS)} files in {', '.join(inputs)}")
  return paths


def predict_files(
  head: Head, paths: Sequence[str], backbone: backbones.Backbone, *, batch_size: int = BATCH_SIZE
) -> tuple[np.ndarray, np.ndarray]:
  """`predict_images` on image files, read a batch at a time (any number of files)."""
  from h2t.data import folder

  labels, probs = [], []
  for start in range(0, len(paths), batch_size):
    images = folder.load_images(paths[start : start + batch_size], backbone.input_size)
    y, p = predict_images(head, images, backbone, batch_size=batch_size)
    labels.append(y)
    probs.append(p)
  return np.concatenate(labels), np.concatenate(probs)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags, defined only when run as a program (importing defines none)."""
  flags.DEFINE_string("head", None, "A head file written by a run (WORKDIR/head_head2toe.npz).")
  flags.DEFINE_string("output", None, "Write the predictions to this CSV file instead of printing them.")
  flags.DEFINE_string(
    "checkpoint",
    None,
    "The backbone's weights file, as in --config.backbone.checkpoint (default: packaged weights).",
  )


def main(argv: Sequence[str]) -> None:
  if not FLAGS.head:
    sys.exit("error: --head is required: python -m h2t.predict --head=HEAD IMAGES_OR_DIRS...")
  if len(argv) < 2:
    sys.exit("error: name at least one image file or folder: python -m h2t.predict --head=HEAD IMAGES...")
  try:
    if FLAGS.output:
      _check_writable(FLAGS.output)
    head = Head.load(FLAGS.head)
    paths = image_paths(argv[1:])
    backbone = backbone_for(head, FLAGS.checkpoint)
    labels, probs = predict_files(head, paths, backbone)
  except (OSError, ValueError) as e:
    sys.exit(f"error: {e}")
  names = head.meta.class_names
  header = ["path", "label", "probability"] + (["class_name"] if names else [])
  rows = [
    [p, int(y), f"{float(pr[y]):.6f}"] + ([names[y]] if names else [])
    for p, y, pr in zip(paths, labels, probs, strict=True)
  ]
  if FLAGS.output:
    text = io.StringIO()
    csv.writer(text).writerows([header] + rows)
    try:
      files.atomic_write(FLAGS.output, lambda f: f.write(text.getvalue().encode()))
    except OSError as e:
      sys.exit(f"error: cannot write --output={FLAGS.output}: {e.strerror or e}")
    head_bytes, backbone_bytes = os.path.getsize(FLAGS.head), parameter_bytes(backbone.params)
    print(
      f"{len(rows)} predictions: {FLAGS.output}. The head file is {head_bytes / 1e3:.0f} kB, "
      f"{100 * head_bytes / backbone_bytes:.2f}% of the backbone's {backbone_bytes / 1e6:.1f} MB of parameters."
    )
  else:
    csv.writer(sys.stdout, lineterminator="\n").writerows([header] + rows)


def _check_writable(path: str) -> None:
  """Fails before any prediction if `--output` cannot be written."""
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise ValueError(f"--output={path} is a folder; name a CSV file")
  if not os.path.isdir(folder):
    raise ValueError(f"--output={path}: the folder {folder} does not exist; create it first")
  if not os.access(folder, os.W_OK):
    raise ValueError(f"--output={path}: the folder {folder} is not writable")


if __name__ == "__main__":
  define_flags()
  app.run(main)
