"""Structured offline tasks, rendered on the fly: counting and locating shapes.

VTAB's structured group asks what global pooling throws away (how many
objects, where, at what angle). Its datasets (CLEVR, dSprites, ...) need a
download, so two tasks in their spirit are drawn here, deterministically
from fixed seeds, at `IMAGE_SIZE` px:

* 'shapes_count' (CLEVR-count style): 3 to 10 non-overlapping shapes
  (circles, squares, triangles; random sizes and colours) on a noisy grey
  background; the label is the count minus 3 (8 classes).
* 'shapes_location' (dSprites-location style): one white shape (square,
  ellipse or triangle; random scale, angle and height) on black; the label
  is its centre's horizontal position in 16 equal bins.

Each has the VTAB-1k splits (`train800`, `val200`, `train800val200`) from
1000 training images and a separate test set of `TEST_SIZE` images drawn
from another seed.
"""

from __future__ import annotations

import math

import numpy as np

from h2t.data import base

IMAGE_SIZE = 64
TEST_SIZE = 2000
TRAIN_SEED, TEST_SEED = 1, 2
COUNT_RANGE = (3, 10)
LOCATION_BINS = 16
NAMES = ("shapes_count", "shapes_location")


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
  """Corners of a square or triangle of circumradius `r`, rotated by `angle` (radians)."""
  corners = 4 if kind == "square" else 3
  return [
    (
      cx + r * math.cos(angle + 2 * math.pi * k / corners),
      cy + r * math.sin(angle + 2 * math.pi * k / corners),
    )
    for k in range(corners)
  ]


def _draw(draw, kind: str, cx: float, cy: float, r: float, angle: float, fill, ratio: float = 1.0) -> None:
  if kind == "circle":
    draw.ellipse([cx - r, cy - r * ratio, cx + r, cy + r * ratio], fill=fill)
  else:
    draw.polygon(_polygon(kind, cx, cy, r, angle), fill=fill)


def _count_image(rng: np.random.Generator, count: int) -> np.ndarray:
  from PIL import Image, ImageDraw

  size = IMAGE_SIZE
  grey = int(rng.integers(90, 160))
  image = Image.new("RGB", (size, size), (grey, grey, grey))
  draw = ImageDraw.Draw(image)
  placed: list[tuple[float, float, float]] = []
  while len(placed) < count:
    r = float(rng.uniform(3.0, 6.0))
    cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
    # Rejection sampling keeps shapes apart (a gap of 2 px), so the count is visible.
    if any(math.hypot(cx - x, cy - y) < r + s + 2 for x, y, s in placed):
      continue
    placed.append((cx, cy, r))
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    kind = ("circle", "square", "triangle")[int(rng.integers(3))]
    _draw(draw, kind, cx, cy, r, float(rng.uniform(0, 2 * math.pi)), colour)
  pixels = np.asarray(image, np.float32) + rng.normal(0.0, 6.0, size=(size, size, 3))
  return np.clip(pixels, 0, 255).astype(np.float32)


def _location_image(rng: np.random.Generator, x_bin: int) -> np.ndarray:
  from PIL import Image, ImageDraw

  size = IMAGE_SIZE
  image = Image.new("RGB", (size, size), (0, 0, 0))
  r = float(rng.uniform(4.0, 9.0))
  # The centre spans [r, size - r]; its bin is of the full width, as dSprites bins x over the image.
  lo, hi = x_bin * size / LOCATION_BINS, (x_bin + 1) * size / LOCATION_BINS
  cx = float(rng.uniform(max(lo, r), min(hi, size - r))) if max(lo, r) < min(hi, size - r) else (lo + hi) / 2
  cy = float(rng.uniform(r, size - r))
  kind = ("circle", "square", "triangle")[int(rng.integers(3))]
  _draw(
    ImageDraw.Draw(image),
    kind,
    cx,
    cy,
    r,
    float(rng.uniform(0, 2 * math.pi)),
    (255, 255, 255),
    rng.uniform(0.5, 1),
  )
  return np.asarray(image, np.float32)


def render(name: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`n` images `[n, IMAGE_SIZE, IMAGE_SIZE, 3]` float32 in [0, 255] and labels `[n]` int32."""
  rng = np.random.default_rng(seed)
  if name == "shapes_count":
    labels = rng.integers(0, COUNT_RANGE[1] - COUNT_RANGE[0] + 1, size=n).astype(np.int32)
    images = [_count_image(rng, int(label) + COUNT_RANGE[0]) for label in labels]
  elif name == "shapes_location":
    labels = rng.integers(0, LOCATION_BINS, size=n).astype(np.int32)
    images = [_location_image(rng, int(label)) for label in labels]
  else:
    raise ValueError(f"unknown rendered task {name!r}; expected one of {', '.join(NAMES)}")
  return np.stack(images), labels


def num_classes(name: str) -> int:
  return COUNT_RANGE[1] - COUNT_RANGE[0] + 1 if name == "shapes_count" else LOCATION_BINS


def load(name: str) -> base.Task:
  """A rendered task with the VTAB-1k splits (1000 training images, `TEST_SIZE` test images)."""
  images, labels = render(name, 1000, TRAIN_SEED)
  test = render(name, TEST_SIZE, TEST_SEED)
  return base.array_task(name, num_classes(name), base.vtab1k_splits(images, labels, test))
