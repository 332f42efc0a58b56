"""VTAB-1k through TFDS: the table, splits, labels, folds, data_fraction, pipeline, errors.

No VTAB data is needed: the tasks run under `tfds.testing.mock_data` on
metadata written here with the split sizes of the TFDS versions VTAB pins, and
the pipeline's order and decoding are checked on a tiny TFDS dataset built
here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import absltest, parameterized
from tensorflow_datasets.testing import mocking

from h2t import data
from h2t.data import base, pipeline, prepare, vtab

# Split sizes of the TFDS versions VTAB-1k uses (the TFDS catalog).
TFDS_SPLIT_SIZES = {
  "caltech101": {"train": 3060, "test": 6084},
  "cifar100": {"train": 50000, "test": 10000},
  "dtd": {"train": 1880, "validation": 1880, "test": 1880},
  "oxford_flowers102": {"train": 1020, "validation": 1020, "test": 6149},
  "oxford_iiit_pet": {"train": 3680, "test": 3669},
  "svhn_cropped": {"train": 73257, "test": 26032, "extra": 531131},
  "sun397/tfds": {"train": 76128, "validation": 10875, "test": 21750},
  "patch_camelyon": {"train": 262144, "validation": 32768, "test": 32768},
  "eurosat/rgb": {"train": 27000},
  "resisc45": {"train": 31500},
  "diabetic_retinopathy_detection/btgraham-300": {
    "train": 35126,
    "validation": 10906,
    "test": 42670,
    "sample": 10,
  },
  "clevr": {"train": 70000, "validation": 15000, "test": 15000},
  "dmlab": {"train": 65550, "validation": 22628, "test": 22735},
  "kitti": {"train": 6347, "validation": 423, "test": 711},
  "dsprites": {"train": 737280},
  "smallnorb": {"train": 24300, "test": 24300},
}

# task_adaptation's rules, restated here independently of the table.
# Tasks whose val200 is cut from 'train' at a percentage of it.
VAL_PERCENT = {
  "caltech101": 90,
  "cifar100": 90,
  "oxford_iiit_pet": 80,
  "svhn": 90,
  "eurosat": 60,
  "resisc45": 60,
  "clevr_count": 90,
  "clevr_distance": 90,
  "dsprites_location": 80,
  "dsprites_orientation": 80,
}
# Tasks whose test set is the rest of 'train' after (train %, validation %).
TEST_AFTER_PERCENT = {
  "eurosat": (60, 20),
  "resisc45": (60, 20),
  "dsprites_location": (80, 10),
  "dsprites_orientation": (80, 10),
}
CLASSES = {
  "caltech101": 102,
  "cifar100": 100,
  "dtd": 47,
  "oxford_flowers102": 102,
  "oxford_iiit_pet": 37,
  "svhn": 10,
  "sun397": 397,
  "patch_camelyon": 2,
  "eurosat": 10,
  "resisc45": 45,
  "diabetic_retinopathy": 5,
  "clevr_count": 8,
  "clevr_distance": 6,
  "dmlab": 6,
  "kitti_distance": 4,
  "dsprites_location": 16,
  "dsprites_orientation": 16,
  "smallnorb_azimuth": 18,
  "smallnorb_elevation": 9,
}


def expected_splits(name: str) -> dict[str, str]:
  """The task's split strings by task_adaptation's rules."""
  spec = vtab.TASKS[name]
  n_train = TFDS_SPLIT_SIZES[spec.builder]["train"]
  if name in VAL_PERCENT:
    start = VAL_PERCENT[name] * n_train // 100
    val200 = f"train[{start}:{start + 200}]"
  elif spec.builder == "smallnorb":
    val200 = "test[:200]"
  else:
    val200 = "validation[:200]"
  if name in TEST_AFTER_PERCENT:
    train_pct, val_pct = TEST_AFTER_PERCENT[name]
    test = f"train[{train_pct * n_train // 100 + val_pct * n_train // 100}:]"
  elif spec.builder == "smallnorb":
    test = "test[50%:]"
  elif spec.builder == "clevr":
    test = "validation"
  else:
    test = "test"
  return {
    "train800": "train[:800]",
    "val200": val200,
    "train800val200": f"train[:800]+{val200}",
    "train1000": "train[:1000]",
    "test": test,
  }


def write_metadata(root: str, sizes_by_builder: dict[str, dict[str, int]]) -> None:
  """Writes TFDS metadata (features, split sizes) as a prepared dataset would have it."""
  for spec in vtab.TASKS.values():
    if spec.builder not in sizes_by_builder:
      continue
    builder = vtab.builder_candidates(spec, os.path.join(root, "unused"))[-1]
    config = [builder.builder_config.name] if builder.builder_config else []
    folder = os.path.join(root, builder.name, *config, str(builder.version))
    if os.path.exists(folder):
      continue
    template = tfds.core.ShardedFileTemplate(
      data_dir=folder, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}", dataset_name=builder.name
    )
    builder.info.set_splits(
      tfds.core.SplitDict(
        [
          tfds.core.SplitInfo(
            name=s, shard_lengths=[n], num_bytes=0, filename_template=template.replace(split=s)
          )
          for s, n in sizes_by_builder[spec.builder].items()
        ]
      )
    )
    os.makedirs(folder)
    builder.info.write_to_directory(folder)


@contextlib.contextmanager
def mocked_tfds(metadata_dir: str, num_examples: int):
  """Fake examples for every builder whose metadata is in `metadata_dir`.

  Variable-length features get length 10 (TFDS's random lengths break
  sequences of dicts, and a CLEVR scene has 3..10 objects).
  """
  init = functools.partialmethod(mocking.RandomFakeGenerator.__init__, constant_dynamic_shape=True)
  with mock.patch.object(mocking.RandomFakeGenerator, "__init__", init):
    with tfds.testing.mock_data(
      num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=metadata_dir
    ):
      yield


class H2tTinyGrey(tfds.core.GeneratorBasedBuilder):
  """Grey images of varied sizes whose pixels all equal an example id."""

  VERSION = tfds.core.Version("1.0.0")
  # Nothing to download. (Left to TFDS, finding the checksums file of a class inside a
  # package needs the importlib_resources backport, which h2t does not install.)
  url_infos = None

  def _info(self):
    features = tfds.features.FeaturesDict(
      {
        "image": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        "label": tfds.features.ClassLabel(num_classes=4),
      }
    )
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 40), "validation": self._generate_examples(200, 10)}

  def _generate_examples(self, first_id, n):
    for i in range(n):
      image = np.full((10 + i % 7, 13 + i % 5, 1), first_id + i, np.uint8)
      yield first_id + i, {"image": image, "label": i % 4}


def example_ids(images: np.ndarray) -> list[int]:
  # A constant image stays constant through grey -> RGB and bilinear resizing.
  return [int(round(float(v))) for v in images[:, 0, 0, 0]]


class TableTest(parameterized.TestCase):
  def test_the_19_tasks_in_their_groups(self):
    self.assertEqual(set(vtab.TASKS), set(CLASSES))
    groups = [spec.group for spec in vtab.TASKS.values()]
    self.assertEqual([groups.count(g) for g in vtab.GROUPS], [7, 4, 8])
    self.assertEqual({n: s.num_classes for n, s in vtab.TASKS.items()}, CLASSES)

  @parameterized.parameters(*CLASSES)
  def test_split_strings_follow_task_adaptation(self, name):
    self.assertEqual(vtab.TASKS[name].splits, expected_splits(name))

  @parameterized.parameters(*CLASSES)
  def test_train_size_is_the_one_the_cuts_come_from(self, name):
    spec = vtab.TASKS[name]
    cut = name in VAL_PERCENT or name in TEST_AFTER_PERCENT
    self.assertEqual(spec.train_size, TFDS_SPLIT_SIZES[spec.builder]["train"] if cut else None)

  def test_manual_builders_are_the_ones_tfds_cannot_download(self):
    manual = {
      spec.builder.split("/")[0]
      for spec in vtab.TASKS.values()
      if tfds.builder_cls(spec.builder.split("/")[0]).MANUAL_DOWNLOAD_INSTRUCTIONS
    }
    self.assertEqual(manual, set(vtab.MANUAL_BUILDERS))
    self.assertEqual(manual, set(prepare.MANUAL_FILES))


class LabelTest(parameterized.TestCase):
  def label(self, name, example):
    return int(vtab.TASKS[name].label.fn(example))

  @parameterized.parameters((3, 0), (4, 1), (10, 7))
  def test_clevr_count_is_objects_minus_3(self, objects, label):
    self.assertEqual(self.label("clevr_count", {"objects": {"size": np.zeros(objects, np.int64)}}), label)

  @parameterized.parameters(
    ([12.0, 9.2, 11.0], 3),  # closest at 9.2: in (9, 9.5]
    ([7.5], 0),
    ([8.0, 30.0], 0),  # a bin holds its upper edge
    ([8.01], 1),
    ([10.0], 4),
    ([10.5, 50.0], 5),
  )
  def test_clevr_distance_bins_the_closest_object(self, depths, label):
    coords = np.zeros((len(depths), 3), np.float32)
    coords[:, 2] = depths
    self.assertEqual(self.label("clevr_distance", {"objects": {"pixel_coords": coords}}), label)

  def test_clevr_distance_equals_task_adaptation_rule_on_a_grid(self):
    thresholds = np.array([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])
    for depth in np.linspace(0.05, 99.0, 400, dtype=np.float32):
      coords = np.array([[0.0, 0.0, 50.0], [0.0, 0.0, depth]], np.float32)
      reference = int(np.max(np.where(thresholds - depth < 0)[0]))
      self.assertEqual(self.label("clevr_distance", {"objects": {"pixel_coords": coords}}), reference)

  @parameterized.parameters(
    ([0, 3], [15.0, 2.0], 1),  # a pedestrian (3) nearer than the car does not count
    ([3, 5], [4.0, 6.0], 3),  # no Car/Van/Truck: the "no vehicle" class
    ([0], [7.9], 0),
    ([1], [8.0], 0),  # van at exactly 8 m
    ([2, 0], [25.0, 40.0], 2),
    ([], [], 3),
  )
  def test_kitti_closest_vehicle_distance(self, types, depths, label):
    location = np.zeros((len(depths), 3), np.float32)
    location[:, 2] = depths
    example = {"objects": {"type": np.array(types, np.int64), "location": location}}
    self.assertEqual(self.label("kitti_distance", example), label)

  @parameterized.parameters(
    ("dsprites_location", "label_x_position", 32), ("dsprites_orientation", "label_orientation", 40)
  )
  def test_dsprites_bins_equal_task_adaptation_float_rule(self, name, key, num_values):
    values = np.arange(num_values)
    labels = [self.label(name, {key: np.int64(v)}) for v in values]
    factor = np.float32(num_values / 16)
    reference = np.floor(values.astype(np.float32) / factor).astype(int)
    np.testing.assert_array_equal(labels, reference)
    self.assertEqual(sorted(set(labels)), list(range(16)))

  @parameterized.parameters(
    ("smallnorb_azimuth", "label_azimuth"), ("smallnorb_elevation", "label_elevation")
  )
  def test_smallnorb_reads_its_attribute(self, name, key):
    self.assertEqual(self.label(name, {key: np.int64(5), "label_category": np.int64(2)}), 5)
    self.assertEqual(vtab.TASKS[name].label.features, (key,))


class FoldsAndFractionTest(absltest.TestCase):
  def test_five_folds_partition_the_1000_images(self):
    valids = []
    for fold in range(base.NUM_FOLDS):
      train, valid = base.fold_indices(fold)
      self.assertLen(valid, 200)
      self.assertLen(train, 800)
      self.assertEmpty(np.intersect1d(train, valid))
      np.testing.assert_array_equal(np.sort(np.concatenate([train, valid])), np.arange(1000))
      valids.append(valid)
    np.testing.assert_array_equal(np.sort(np.concatenate(valids)), np.arange(1000))
    # The last fold is VTAB's own split: train800 -> val200.
    np.testing.assert_array_equal(base.fold_indices(4)[1], np.arange(800, 1000))

  def test_balanced_subset_keeps_first_k_per_class(self):
    rng = np.random.default_rng(0)
    labels = rng.choice(10, size=1000, p=[0.3, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.04, 0.01])
    idx = data.balanced_subset_indices(labels, 10, 0.1)  # k = 10
    counts = np.bincount(labels[idx], minlength=10)
    np.testing.assert_array_equal(counts, np.minimum(np.bincount(labels, minlength=10), 10))
    for c in range(10):
      np.testing.assert_array_equal(idx[labels[idx] == c], np.flatnonzero(labels == c)[:10])
    np.testing.assert_array_equal(idx, data.balanced_subset_indices(labels, 10, 0.1))
    self.assertTrue(np.all(np.diff(idx) > 0))

  def test_fraction_edge_cases(self):
    labels = np.arange(1000) % 100
    np.testing.assert_array_equal(data.balanced_subset_indices(labels, 100, 1.0), np.arange(1000))
    # k = max(int(1000 * 0.01 / 100), 1) = 1: one example per class.
    np.testing.assert_array_equal(data.balanced_subset_indices(labels, 100, 0.01), np.arange(100))
    self.assertLen(data.balanced_subset_indices(labels, 100, 0.5), 500)
    with self.assertRaisesRegex(ValueError, "outside"):
      data.balanced_subset_indices(labels, 100, 0.0)
    with self.assertRaisesRegex(ValueError, "outside"):
      data.balanced_subset_indices(labels, 50, 0.5)


class MockedTasksTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.metadata = tempfile.mkdtemp()
    write_metadata(cls.metadata, TFDS_SPLIT_SIZES)

  @parameterized.parameters(*CLASSES)
  def test_task_streams_every_split(self, name):
    spec = vtab.TASKS[name]
    requested = []
    with mocked_tfds(self.metadata, num_examples=4):
      mocked_as_dataset = tfds.core.DatasetBuilder.as_dataset

      def spy(builder, *args, split, **kwargs):
        requested.append(split)
        return mocked_as_dataset(builder, *args, split=split, **kwargs)

      with mock.patch.object(tfds.core.DatasetBuilder, "as_dataset", spy):
        task = data.get_task(name, data_dir="/nonexistent")
        self.assertEqual(task.num_classes, CLASSES[name])
        for split in vtab.SPLIT_NAMES:
          batches = list(task.batches(split, 3, image_size=24))
          self.assertEqual([len(b[1]) for b in batches], [3, 1])
          for images, labels in batches:
            self.assertEqual(images.shape[1:], (24, 24, 3))
            self.assertEqual(images.dtype, np.float32)
            self.assertEqual(labels.dtype, np.int32)
            self.assertGreaterEqual(images.min(), 0.0)
            self.assertLessEqual(images.max(), 255.0)
            self.assertTrue(np.all((labels >= 0) & (labels < CLASSES[name])))
    self.assertEqual(requested, [spec.splits[s] for s in vtab.SPLIT_NAMES])
    sizes = {"train800": 800, "val200": 200, "train800val200": 1000, "train1000": 1000}
    self.assertEqual({s: task.size(s) for s in sizes}, sizes)

  def test_test_split_sizes_come_from_the_percent_cuts(self):
    with mocked_tfds(self.metadata, num_examples=1):
      self.assertEqual(data.get_task("eurosat").size("test"), 5400)
      self.assertEqual(data.get_task("smallnorb_azimuth").size("test"), 12150)
      self.assertEqual(data.get_task("dsprites_location").size("test"), 73728)
      self.assertEqual(data.get_task("clevr_count").size("test"), 15000)

  def test_other_split_sizes_fail_naming_the_expected_size(self):
    other = tempfile.mkdtemp()
    write_metadata(other, {"caltech101": {"train": 3000, "test": 6084}})
    with mocked_tfds(other, num_examples=1):
      with self.assertRaisesRegex(ValueError, r"caltech101.*3000 training examples.*3060"):
        data.get_task("caltech101")


class NotPreparedTest(parameterized.TestCase):
  def test_unknown_task_lists_every_name(self):
    with self.assertRaises(ValueError) as e:
      data.get_task("imagenet")
    for name in list(CLASSES) + ["digits", "fashion_mnist"]:
      self.assertIn(name, str(e.exception))

  @parameterized.parameters("dtd", "clevr_distance", "oxford_iiit_pet")
  def test_missing_data_fails_with_the_prepare_command(self, name):
    empty = tempfile.mkdtemp()
    with self.assertRaises(FileNotFoundError) as e:
      data.get_task(name, data_dir=empty)
    message = str(e.exception)
    self.assertIn(repr(name), message)
    self.assertIn(empty, message)
    self.assertIn(f"python -m h2t.data.prepare --tasks={name} --data_dir={empty}", message)
    self.assertEqual(os.listdir(empty), [])  # nothing downloaded or created

  def test_manual_task_says_it_needs_a_manual_download(self):
    with self.assertRaisesRegex(FileNotFoundError, "manual download"):
      data.get_task("resisc45", data_dir=tempfile.mkdtemp())


class PrepareTest(absltest.TestCase):
  def test_parse_tasks(self):
    self.assertEqual(prepare.parse_tasks("all"), list(vtab.TASKS))
    self.assertEqual(prepare.parse_tasks("dtd, svhn"), ["dtd", "svhn"])
    with self.assertRaisesRegex(ValueError, "caltech101"):
      prepare.parse_tasks("dtd,caltech")

  def test_check_only_reports_missing_data_and_manual_files(self):
    root = tempfile.mkdtemp()
    lines = []
    ready = prepare.prepare(
      ["dtd", "clevr_count", "clevr_distance", "resisc45"],
      data_dir=root,
      manual_dir=None,
      download=False,
      out=lines.append,
    )
    self.assertFalse(ready)
    text = "\n".join(lines)
    self.assertIn("missing  dtd (dtd)", text)
    self.assertIn("missing  clevr_count, clevr_distance (clevr)", text)  # one builder, prepared once
    self.assertIn(
      os.path.join(root, "downloads", "manual", "NWPU-RESISC45", "airplane", "airplane_001.jpg"), text
    )
    self.assertEqual(os.listdir(root), [])

  def test_manual_files_found_once_in_place(self):
    manual = tempfile.mkdtemp()
    spec = vtab.TASKS["resisc45"]
    self.assertEqual(prepare.missing_manual_files(spec, manual), [os.path.join(manual, "NWPU-RESISC45")])
    os.makedirs(os.path.join(manual, "NWPU-RESISC45"))
    self.assertEqual(prepare.missing_manual_files(spec, manual), [])
    self.assertEqual(prepare.missing_manual_files(vtab.TASKS["dtd"], manual), [])

  def test_ready_data_is_reported_ready(self):
    metadata = tempfile.mkdtemp()
    write_metadata(metadata, {"dtd": TFDS_SPLIT_SIZES["dtd"]})
    lines = []
    with mocked_tfds(metadata, num_examples=1):
      self.assertTrue(
        prepare.prepare(["dtd"], data_dir=metadata, manual_dir=None, download=True, out=lines.append)
      )
    self.assertStartsWith(lines[0], "ready    dtd")


class PipelineTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.builder = H2tTinyGrey(data_dir=tempfile.mkdtemp())
    cls.builder.download_and_prepare()
    cls.label = vtab.feature_label("label", 4)

  def read(self, split, *, batch_size=4, image_size=16, num_classes=4):
    return list(
      pipeline.read(
        self.builder,
        split,
        batch_size=batch_size,
        image_size=image_size,
        label=self.label,
        num_classes=num_classes,
        name="tiny",
      )
    )

  def ids(self, split, **kwargs):
    return example_ids(np.concatenate([b[0] for b in self.read(split, **kwargs)]))

  def test_a_sum_of_splits_reads_them_one_after_the_other(self):
    # So positions [800, 1000) of 'train800val200' are val200, and folds are index ranges.
    whole = self.ids("train")
    self.assertEqual(self.ids("train[:20]"), whole[:20])
    self.assertEqual(self.ids("train[:20]+validation[:5]"), whole[:20] + self.ids("validation[:5]"))
    self.assertEqual(sorted(self.ids("validation[:5]") + self.ids("validation[5:]")), list(range(200, 210)))

  def test_grey_images_come_resized_rgb_in_fixed_batches(self):
    batches = self.read("train", batch_size=16, image_size=20)
    self.assertEqual([len(b[1]) for b in batches], [16, 16, 8])
    for images, labels in batches:
      self.assertEqual(images.shape[1:], (20, 20, 3))
      self.assertEqual(images.dtype, np.float32)
      np.testing.assert_array_equal(images[..., 0], images[..., 2])
      self.assertTrue(np.all((labels >= 0) & (labels < 4)))

  def test_a_share_decodes_only_its_own_batches(self):
    prepared = []  # one entry per example that reached decoding (the label is computed beside it)

    def count(label):
      prepared.append(int(label))
      return label

    label = vtab.Label(("label",), lambda ex: tf.py_function(count, [ex["label"]], tf.int64))
    for split in ("train", "train[:20]+validation[:5]"):
      whole = [example_ids(b[0]) for b in self.read(split, batch_size=6)]
      got = []
      for p in range(3):
        share = base.Share(p, 3)
        prepared.clear()
        mine = [
          example_ids(images)
          for images, _ in pipeline.read(
            self.builder, split, batch_size=6, image_size=16, label=label, num_classes=4, share=share
          )
        ]
        self.assertEqual(mine, whole[p::3])  # the share's batches, as one process cuts them
        self.assertLen(prepared, sum(map(len, mine)))  # nothing else was decoded
        got += sum(mine, [])
      self.assertEqual(sorted(got), sorted(sum(whole, [])))

  def test_reading_is_deterministic(self):
    first, second = self.read("train[5:35]"), self.read("train[5:35]")
    for (a, la), (b, lb) in zip(first, second, strict=True):
      np.testing.assert_array_equal(a, b)
      np.testing.assert_array_equal(la, lb)

  def test_label_outside_the_classes_fails_naming_the_task(self):
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, r"tiny: a label is outside \[0, 3\)"):
      self.read("train", num_classes=3)


class MainEndToEndTest(absltest.TestCase):
  def test_main_runs_on_a_mocked_vtab_task(self):
    # `python -m h2t.main` in a fresh process, with TFDS mocked inside that process.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    metadata = tempfile.mkdtemp()
    write_metadata(metadata, {"dtd": TFDS_SPLIT_SIZES["dtd"]})
    workdir = os.path.join(tempfile.mkdtemp(), "run")
    argv = [
      "h2t.main",
      "--config=configs/vtab.py",
      f"--workdir={workdir}",
      "--config.dataset=dtd",
      "--config.learning.training_steps=10",
      "--config.backbone.input_size=64",
    ]
    script = (
      "import runpy, sys\n"
      f"sys.path.insert(0, {os.path.join(repo, 'tests')!r})\n"
      "from test_vtab import mocked_tfds\n"
      f"with mocked_tfds({metadata!r}, num_examples=20):\n"
      f"  sys.argv = {argv!r}\n"
      "  runpy.run_module('h2t.main', run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": repo}
    run = subprocess.run(
      [sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    self.assertEqual(run.returncode, 0, run.stderr[-4000:])
    with open(os.path.join(workdir, "results.json")) as f:
      results = json.load(f)
    self.assertEqual(results["task"], "dtd")
    self.assertEqual(results["num_classes"], 47)
    for method in ("head2toe", "linear"):
      self.assertBetween(results["methods"][method]["test_accuracy"], 0.0, 1.0)
    self.assertIn("task dtd (47 classes)", run.stdout)


if __name__ == "__main__":
  absltest.main()
