"""VTAB-1k: the 19 tasks through TFDS, with task_adaptation's splits and labels.

`TASKS` maps each task name to its TFDS builder, label rule, class count,
group and split strings; `load(name)` turns one into a `h2t.data.base.Task`
that streams its splits through tf.data (h2t/data/pipeline.py).

Splits, per google-research/task_adaptation:
  train800        'train[:800]'
  val200          the first 200 of the task's validation source: the TFDS
                  validation split, or (tasks without one) the TFDS train split
                  cut at a percentage, n = percent * |train| // 100
  train800val200  train800 + val200: the 1000 VTAB-1k training images
  test            the task's test split
  train1000       'train[:1000]': the 1000 images the reference
                  (google-research/head2toe) cross-validates on in its
                  'valid' mode; h2t folds 'train800val200' instead (see
                  `h2t.data.base.fold_indices`), and offers this split to
                  reproduce the reference exactly.

The percentage cuts are written out as numbers below, computed from the TFDS
split sizes in `train_size`; `load` checks that the prepared data has those
sizes, so a task always reads exactly the examples VTAB-1k defines.

TensorFlow is imported only when a task is loaded or a label computed, so the
table can be read without it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

from h2t.data import base

GROUPS = ("natural", "specialized", "structured")
SPLIT_NAMES = ("train800", "val200", "train800val200", "train1000", "test")
# Builders that TFDS can only prepare from files the user downloads by hand.
MANUAL_BUILDERS = ("diabetic_retinopathy_detection", "resisc45")


@dataclasses.dataclass(frozen=True)
class Label:
  """How a task's class label is computed from one TFDS example.

  Attributes:
    features: the example features the rule reads, as '/'-separated paths
      ('label', 'objects/pixel_coords'); no other feature is decoded.
    fn: `fn(example) -> int scalar`; `example` holds those features by their
      top-level names (a sequence of dicts is a dict of [n, ...] tensors).
    class_feature: `(feature, num_classes)` of the TFDS ClassLabel the rule
      reads, checked against the prepared data; None for derived labels.
  """

  features: tuple[str, ...]
  fn: Callable[[Mapping[str, Any]], Any]
  class_feature: tuple[str, int] | None = None


def _feature_value(example: Mapping[str, Any], *, key: str) -> Any:
  return example[key]


def feature_label(key: str, num_classes: int) -> Label:
  """The label is a ClassLabel feature of the example, as is."""
  return Label((key,), functools.partial(_feature_value, key=key), (key, num_classes))


def _binned_value(example: Mapping[str, Any], *, key: str, num_values: int, num_classes: int) -> Any:
  # Integer form of task_adaptation's floor(value / (num_values / num_classes)): equal for all values.
  return example[key] * num_classes // num_values


def binned_label(key: str, num_values: int, num_classes: int) -> Label:
  """A ClassLabel of `num_values` values grouped into `num_classes` equal bins (dSprites)."""
  fn = functools.partial(_binned_value, key=key, num_values=num_values, num_classes=num_classes)
  return Label((key,), fn, (key, num_values))


def _bin_index(value: Any, thresholds: tuple[float, ...]) -> Any:
  """Index of the last threshold strictly below `value` (task_adaptation's distance bins)."""
  import tensorflow as tf

  value = tf.convert_to_tensor(value, tf.float32)
  below = tf.cast(tf.constant(thresholds, tf.float32) < value, tf.int32)
  return tf.reduce_sum(below) - 1


def clevr_count(example: Mapping[str, Any]) -> Any:
  """CLEVR scenes hold 3 to 10 objects: the label is the count minus 3, in 0..7."""
  import tensorflow as tf

  return tf.size(example["objects"]["size"]) - 3


# Depth (pixel_coords[:, 2]) bin edges of the closest object; roughly balanced classes.
CLEVR_DISTANCE_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)


def clevr_closest_distance(example: Mapping[str, Any]) -> Any:
  """Bin (0..5) of the depth of the CLEVR object closest to the camera."""
  import tensorflow as tf

  depth = tf.reduce_min(tf.convert_to_tensor(example["objects"]["pixel_coords"])[:, 2])
  return _bin_index(depth, CLEVR_DISTANCE_THRESHOLDS)


KITTI_VEHICLE_TYPES = 3  # KITTI object types 0, 1, 2 are Car, Van, Truck.
KITTI_NO_VEHICLE_DEPTH = 1000.0  # Stands in for "no vehicle": lands in the last bin.
KITTI_DISTANCE_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)


def kitti_closest_vehicle_distance(example: Mapping[str, Any]) -> Any:
  """0: closest vehicle nearer than 8 m, 1: 8-20 m, 2: farther, 3: no vehicle."""
  import tensorflow as tf

  objects = example["objects"]
  depth = tf.convert_to_tensor(objects["location"], tf.float32)[:, 2]
  vehicle_depth = tf.boolean_mask(depth, tf.convert_to_tensor(objects["type"]) < KITTI_VEHICLE_TYPES)
  nearest = tf.reduce_min(tf.concat([vehicle_depth, [KITTI_NO_VEHICLE_DEPTH]], axis=0))
  return _bin_index(nearest, KITTI_DISTANCE_THRESHOLDS)


CLASS_LABEL = "label"


@dataclasses.dataclass(frozen=True)
class VtabTask:
  """One VTAB-1k task.

  Attributes:
    builder: TFDS builder name, with its config ('eurosat/rgb').
    versions: TFDS version patterns, preferred first; `load` reads the first
      one prepared in the data_dir.
    num_classes: labels lie in [0, num_classes).
    group: 'natural', 'specialized' or 'structured'.
    val200: TFDS split string of VTAB's 200 validation images.
    test: TFDS split string of the test set.
    label: the label rule.
    train_size: number of examples of the TFDS 'train' split that the
      percentage cuts in `val200`/`test` were computed from (None: no cut).
    binary_image: stored pixels are 0/1 and are scaled to 0/255.
  """

  builder: str
  versions: tuple[str, ...]
  num_classes: int
  group: str
  val200: str
  test: str
  label: Label
  train_size: int | None = None
  binary_image: bool = False

  @property
  def splits(self) -> dict[str, str]:
    """Split name -> TFDS split string."""
    return {
      "train800": "train[:800]",
      "val200": self.val200,
      "train800val200": f"train[:800]+{self.val200}",
      "train1000": "train[:1000]",
      "test": self.test,
    }


def _label(num_classes: int) -> Label:
  return feature_label(CLASS_LABEL, num_classes)


_CLEVR_COUNT = Label(("objects/size",), clevr_count)
_CLEVR_DISTANCE = Label(("objects/pixel_coords",), clevr_closest_distance)
_KITTI_DISTANCE = Label(("objects/type", "objects/location"), kitti_closest_vehicle_distance)
_SMALLNORB_AZIMUTH = feature_label("label_azimuth", 18)
_SMALLNORB_ELEVATION = feature_label("label_elevation", 9)

_DSPRITES_X = binned_label("label_x_position", 32, 16)
_DSPRITES_ORIENTATION = binned_label("label_orientation", 40, 16)

# The cuts inside 'train' are task_adaptation's percentages of `train_size`:
# val200 at 90% (caltech101, cifar100, svhn, clevr), 80% (oxford_iiit_pet,
# dsprites) or 60% (eurosat, resisc45); test from 80% (eurosat, resisc45) or
# 90% (dsprites). smallnorb validates on the first half of its test split.
# CLEVR's test split has no labels, so VTAB tests on its validation split.
# oxford_iiit_pet: task_adaptation pins 3.*.*, which TFDS 4.9 can no longer
# prepare; 4.0.0 (same image lists and example keys, so the same splits and
# order; a few corrupt JPEGs re-encoded) is read when no 3.x is prepared.
# fmt: off
TASKS: dict[str, VtabTask] = {
  # name:              VtabTask(builder, versions, num_classes, group, val200, test, label, train_size)
  "caltech101":           VtabTask("caltech101",                                  ("3.*.*",),          102, "natural",     "train[2754:2954]",     "test",           _label(102),           3060),
  "cifar100":             VtabTask("cifar100",                                    ("3.*.*",),          100, "natural",     "train[45000:45200]",   "test",           _label(100),           50000),
  "dtd":                  VtabTask("dtd",                                         ("3.*.*",),          47,  "natural",     "validation[:200]",     "test",           _label(47)),
  "oxford_flowers102":    VtabTask("oxford_flowers102",                           ("2.*.*",),          102, "natural",     "validation[:200]",     "test",           _label(102)),
  "oxford_iiit_pet":      VtabTask("oxford_iiit_pet",                             ("3.*.*", "4.*.*"),  37,  "natural",     "train[2944:3144]",     "test",           _label(37),            3680),
  "svhn":                 VtabTask("svhn_cropped",                                ("3.*.*",),          10,  "natural",     "train[65931:66131]",   "test",           _label(10),            73257),
  "sun397":               VtabTask("sun397/tfds",                                 ("4.*.*",),          397, "natural",     "validation[:200]",     "test",           _label(397)),
  "patch_camelyon":       VtabTask("patch_camelyon",                              ("2.*.*",),          2,   "specialized", "validation[:200]",     "test",           _label(2)),
  "eurosat":              VtabTask("eurosat/rgb",                                 ("2.*.*",),          10,  "specialized", "train[16200:16400]",   "train[21600:]",  _label(10),            27000),
  "resisc45":             VtabTask("resisc45",                                    ("3.*.*",),          45,  "specialized", "train[18900:19100]",   "train[25200:]",  _label(45),            31500),
  "diabetic_retinopathy": VtabTask("diabetic_retinopathy_detection/btgraham-300", ("3.*.*",),          5,   "specialized", "validation[:200]",     "test",           _label(5)),
  "clevr_count":          VtabTask("clevr",                                       ("3.*.*",),          8,   "structured",  "train[63000:63200]",   "validation",     _CLEVR_COUNT,          70000),
  "clevr_distance":       VtabTask("clevr",                                       ("3.*.*",),          6,   "structured",  "train[63000:63200]",   "validation",     _CLEVR_DISTANCE,       70000),
  "dmlab":                VtabTask("dmlab",                                       ("2.0.1",),          6,   "structured",  "validation[:200]",     "test",           _label(6)),
  "kitti_distance":       VtabTask("kitti",                                       ("3.1.0",),          4,   "structured",  "validation[:200]",     "test",           _KITTI_DISTANCE),
  "dsprites_location":    VtabTask("dsprites",                                    ("2.*.*",),          16,  "structured",  "train[589824:590024]", "train[663552:]", _DSPRITES_X,           737280, binary_image=True),
  "dsprites_orientation": VtabTask("dsprites",                                    ("2.*.*",),          16,  "structured",  "train[589824:590024]", "train[663552:]", _DSPRITES_ORIENTATION, 737280, binary_image=True),
  "smallnorb_azimuth":    VtabTask("smallnorb",                                   ("2.*.*",),          18,  "structured",  "test[:200]",           "test[50%:]",     _SMALLNORB_AZIMUTH),
  "smallnorb_elevation":  VtabTask("smallnorb",                                   ("2.*.*",),          9,   "structured",  "test[:200]",           "test[50%:]",     _SMALLNORB_ELEVATION),
}
# fmt: on


class NotPreparedError(FileNotFoundError):
  """The TFDS data of a VTAB task is not in the data_dir."""


def default_data_dir() -> str:
  """TFDS's default data directory ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def prepare_command(names: str | list[str], data_dir: str | None = None) -> str:
  """The shell command that prepares the given tasks' data."""
  names = [names] if isinstance(names, str) else list(names)
  command = f"python -m h2t.data.prepare --tasks={','.join(names)}"
  if data_dir:
    command += f" --data_dir={data_dir}"
  return command


def get_spec(name: str) -> VtabTask:
  """The table entry of a task; unknown names fail with the list of names."""
  if name not in TASKS:
    raise ValueError(f"unknown VTAB task {name!r}; expected one of {', '.join(TASKS)}")
  return TASKS[name]


def builder_candidates(spec: VtabTask, data_dir: str | None = None) -> list[Any]:
  """TFDS builders for the task's version patterns that this TFDS can construct."""
  import tensorflow_datasets as tfds

  builders = []
  for version in spec.versions:
    try:
      builders.append(tfds.builder(f"{spec.builder}:{version}", data_dir=data_dir))
    except (AssertionError, ValueError, tfds.core.registered.DatasetNotFoundError):
      continue  # Neither code for this version in the installed TFDS nor prepared files of it.
  return builders


def find_prepared(spec: VtabTask, data_dir: str | None = None) -> Any | None:
  """The first prepared builder of the task's version patterns, or None."""
  for builder in builder_candidates(spec, data_dir):
    if builder.is_prepared():
      return builder
  return None


def _not_prepared_message(name: str, spec: VtabTask, data_dir: str | None, builders: list[Any]) -> str:
  root = data_dir or default_data_dir()
  looked = ", ".join(f"{spec.builder}:{v}" for v in spec.versions)
  where = f" (e.g. {builders[0].data_dir})" if builders else ""
  manual = ""
  if spec.builder.split("/")[0] in MANUAL_BUILDERS:
    manual = " It needs a manual download first; the command prints which files go where."
  return (
    f"VTAB task {name!r}: no prepared TFDS data for {looked} in data_dir {root!r}{where}. "
    f"Prepare it once (needs internet and disk space) with `{prepare_command(name, data_dir or root)}` "
    f"or point config.data_dir at the folder that holds it.{manual}"
  )


def load(name: str, *, data_dir: str | None = None) -> base.Task:
  """The VTAB-1k task `name`, reading its prepared TFDS data (never downloading).

  Args:
    name: a key of `TASKS`.
    data_dir: TFDS data directory (None: TFDS's default).

  Returns:
    A `Task` with splits 'train800', 'val200', 'train800val200', 'train1000'
    and 'test', each streamed in its TFDS order as `(images [b, S, S, 3]
    float32 in [0, 255], labels [b] int32)`.

  Raises:
    NotPreparedError: the data is not prepared; the message has the command.
    ValueError: the prepared data differs from what the table expects.
  """
  spec = get_spec(name)
  from h2t.data import pipeline

  pipeline.hide_gpus_from_tensorflow()
  builder = find_prepared(spec, data_dir)
  if builder is None:
    raise NotPreparedError(_not_prepared_message(name, spec, data_dir, builder_candidates(spec, data_dir)))
  sizes = check_prepared(name, spec, builder)
  splits = spec.splits

  def read(split: str, batch_size: int, image_size: int, share: base.Share = base.WHOLE):
    return pipeline.read(
      builder,
      splits[split],
      batch_size=batch_size,
      image_size=image_size,
      label=spec.label,
      num_classes=spec.num_classes,
      binary_image=spec.binary_image,
      name=name,
      share=share,
    )

  return base.Task(name, spec.num_classes, sizes, read, reads_shares=True)


def check_prepared(name: str, spec: VtabTask, builder: Any) -> dict[str, int]:
  """Fails unless the prepared data has the sizes and classes the table assumes.

  Returns:
    Split name -> number of examples.
  """
  from h2t.data import pipeline

  found = f"{name}: the prepared {builder.name}:{builder.version} in {builder.data_dir}"
  if spec.train_size is not None:
    n = int(builder.info.splits["train"].num_examples)
    if n != spec.train_size:
      raise ValueError(
        f"{found} has {n} training examples; the VTAB-1k splits {spec.splits} are computed for "
        f"{spec.train_size}. Prepare the version task_adaptation uses ({', '.join(spec.versions)})."
      )
  sizes = pipeline.split_sizes(builder, spec.splits)
  expected = {"train800": 800, "val200": 200, "train800val200": 1000, "train1000": 1000}
  short = {k: sizes[k] for k, v in expected.items() if sizes[k] != v}
  if short or sizes["test"] == 0:
    raise ValueError(f"{found} gives split sizes {sizes}; expected {expected} and a non-empty test split.")
  if spec.label.class_feature is not None:
    feature, classes = spec.label.class_feature
    if pipeline.class_count(builder, feature) != classes:
      raise ValueError(
        f"{found}: feature {feature!r} has {pipeline.class_count(builder, feature)} classes; "
        f"the table expects {classes}."
      )
  return sizes
