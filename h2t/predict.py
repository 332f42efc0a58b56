"""Classify images with a saved head: `python -m h2t.predict --head=HEAD IMAGES_OR_DIRS...`.

    python -m h2t.predict --head=workdir/digits/head_head2toe.npz photo.png more_photos/
    python -m h2t.predict --head=head.npz --output=preds.csv --checkpoint=/path/to/vit.npz imgs/

A head file (`h2t.head2toe.Head.save`) holds the kept feature indices, the
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
import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from h2t import backbones, features
from h2t.head2toe import Head

BATCH_SIZE = 64  # config.backbone.batch_size's default: batches pad to it, as in the run.


def backbone_for(head: Head, checkpoint: str | None = None) -> backbones.Backbone:
  """Rebuilds the backbone a head was trained on, and checks it is the same network.

  Args:
    head: a loaded head.
    checkpoint: the backbone's weights file; None uses its packaged default.

  Raises:
    ValueError: the head's meta lacks the backbone, or the weights differ from
      those the head was trained on.
  """
  meta = _require_meta(head)
  backbone = backbones.create(meta["backbone"], checkpoint, input_size=int(meta["input_size"]))
  check_backbone(head, backbone)
  return backbone


# What a head must record to be used again (h2t.evaluate writes all of them).
REQUIRED_META = ("backbone", "checkpoint_id", "input_size", "target_size", "pool_size", "cls_token_pool")


def _require_meta(head: Head) -> dict:
  missing = [k for k in REQUIRED_META if k not in head.meta]
  if missing:
    raise ValueError(
      f"the head's meta lacks {', '.join(missing)}: it was not saved by a run (h2t.evaluate), "
      "so its backbone and pooling are unknown"
    )
  return head.meta


def check_backbone(head: Head, backbone: backbones.Backbone) -> None:
  """Raises ValueError unless `backbone` is the network (name, weights, input size) of `head`."""
  meta = _require_meta(head)
  wanted = (meta.get("backbone"), meta.get("checkpoint_id"), int(meta.get("input_size", 0)))
  got = (backbone.name, backbone.checkpoint_id, backbone.input_size)
  if wanted != got:
    raise ValueError(
      f"the head was trained on backbone {wanted[0]!r} with checkpoint {wanted[1]!r} at {wanted[2]} px, "
      f"but the backbone is {got[0]!r} with checkpoint {got[1]!r} at {got[2]} px; "
      "pass the checkpoint file the head was trained with (--checkpoint=PATH)"
    )


def parameter_bytes(tree) -> int:
  """Bytes of all arrays in a parameter tree (what storing the network costs)."""
  import jax

  return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree)))


def _as_batch(images, size: int) -> np.ndarray:
  """A list of images of any sizes, or an array, -> one `[n, h, w, c]` array."""
  if isinstance(images, np.ndarray):
    return images
  images = [np.asarray(im) for im in images]
  if not images:
    return np.zeros((0, size, size, 3), np.uint8)
  if len({im.shape for im in images}) == 1:
    return np.stack(images)
  # Mixed sizes: resize each alone to the input size, exactly as the backbone would.
  import jax
  import jax.numpy as jnp

  out = []
  for im in images:
    x = jnp.asarray(im, jnp.float32)
    x = x[..., None] if x.ndim == 2 else x
    x = jnp.broadcast_to(x, x.shape[:2] + (3,)) if x.shape[-1] == 1 else x
    out.append(np.asarray(jax.image.resize(x, (size, size, 3), method="linear", antialias=False)))
  return np.stack(out)


def predict_images(
  head: Head,
  images,
  backbone: backbones.Backbone | None = None,
  *,
  batch_size: int = BATCH_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
  """Classifies images with a trained head.

  Args:
    head: a trained `Head` (its meta names the backbone and pooling).
    images: `[n, h, w, 3]` (or grey `[n, h, w]`) pixels in [0, 255], any
      numeric dtype, or a list of such images of any sizes. They are resized
      bilinearly to the backbone's input size, as in training.
    backbone: the head's backbone; None builds it from the head's meta (pass
      one when calling repeatedly: building takes a second or two).
    batch_size: images per forward pass.

  Returns:
    `(labels [n] int32, probs [n, num_classes] float32)`: the most probable
    class and the softmax probabilities.
  """
  if backbone is None:
    backbone = backbone_for(head)
  else:
    check_backbone(head, backbone)
  meta = head.meta
  x = _as_batch(images, backbone.input_size)
  num_classes = int(head.params["b"].shape[-1])
  if len(x) == 0:
    return np.zeros((0,), np.int32), np.zeros((0, num_classes), np.float32)
  feats = features.extract(
    backbone,
    x,
    taps=list(head.taps),
    target_size=int(meta["target_size"]),
    batch_size=batch_size,
    cls_token_pool=meta["cls_token_pool"],
    pool_size=int(meta["pool_size"]),
  )
  logits = head.predict(feats).astype(np.float64)
  logits -= logits.max(axis=1, keepdims=True)
  probs = np.exp(logits)
  probs /= probs.sum(axis=1, keepdims=True)
  return logits.argmax(axis=1).astype(np.int32), probs.astype(np.float32)


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
    raise app.UsageError("--head is required: python -m h2t.predict --head=HEAD IMAGES_OR_DIRS...")
  if len(argv) < 2:
    raise app.UsageError(
      "name at least one image file or folder: python -m h2t.predict --head=HEAD IMAGES..."
    )
  try:
    head = Head.load(FLAGS.head)
    paths = image_paths(argv[1:])
    backbone = backbone_for(head, FLAGS.checkpoint)
    labels, probs = predict_files(head, paths, backbone)
  except (OSError, ValueError) as e:
    sys.exit(f"error: {e}")
  names = head.meta.get("class_names")
  header = ["path", "label", "probability"] + (["class_name"] if names else [])
  rows = [
    [p, int(y), f"{float(pr[y]):.6f}"] + ([names[y]] if names else [])
    for p, y, pr in zip(paths, labels, probs, strict=True)
  ]
  if FLAGS.output:
    tmp = FLAGS.output + ".tmp"
    with open(tmp, "w", newline="") as f:
      csv.writer(f).writerows([header] + rows)
    os.replace(tmp, FLAGS.output)
    head_bytes, backbone_bytes = os.path.getsize(FLAGS.head), parameter_bytes(backbone.params)
    print(
      f"{len(rows)} predictions: {FLAGS.output}. The head file is {head_bytes / 1e3:.0f} kB, "
      f"{100 * head_bytes / backbone_bytes:.2f}% of the backbone's {backbone_bytes / 1e6:.1f} MB of parameters."
    )
  else:
    csv.writer(sys.stdout, lineterminator="\n").writerows([header] + rows)


if __name__ == "__main__":
  define_flags()
  app.run(main)
