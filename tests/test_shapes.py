"""The rendered structured tasks: deterministic, labelled by what is drawn, VTAB-1k shaped."""

import numpy as np
from absl.testing import absltest, parameterized

from h2t import data
from h2t.data import shapes


def _foreground(image: np.ndarray, background: float) -> np.ndarray:
  """`[h, w]` bool: pixels that differ from the background by more than noise."""
  return np.abs(image - background).max(axis=-1) > 40


class ShapesTest(parameterized.TestCase):
  @parameterized.parameters(*shapes.NAMES)
  def test_deterministic_and_in_range(self, name):
    a_images, a_labels = shapes.render(name, 12, seed=3)
    b_images, b_labels = shapes.render(name, 12, seed=3)
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, b_labels)
    self.assertEqual(a_images.shape, (12, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3))
    self.assertEqual(a_images.dtype, np.float32)
    self.assertGreaterEqual(a_images.min(), 0.0)
    self.assertLessEqual(a_images.max(), 255.0)
    self.assertTrue(((a_labels >= 0) & (a_labels < shapes.num_classes(name))).all())
    other, _ = shapes.render(name, 12, seed=4)
    self.assertFalse(np.array_equal(a_images, other))

  def test_count_label_is_the_number_of_shapes(self):
    from scipy import ndimage

    images, labels = shapes.render("shapes_count", 24, seed=5)
    for image, label in zip(images, labels, strict=True):
      background = float(np.median(image))
      blob_of, n = ndimage.label(_foreground(image, background))
      # Blobs of a few pixels are noise at the edge of a shape whose colour is near the grey.
      blobs = int((np.bincount(blob_of.ravel(), minlength=n + 1)[1:] >= 6).sum())
      # A shape whose colour is close to the grey may vanish into the background; none is split or merged.
      self.assertLessEqual(blobs, label + shapes.COUNT_RANGE[0])
      self.assertGreaterEqual(blobs, label + shapes.COUNT_RANGE[0] - 2)

  def test_location_label_is_the_horizontal_bin(self):
    images, labels = shapes.render("shapes_location", 40, seed=6)
    width = shapes.IMAGE_SIZE / shapes.LOCATION_BINS
    for image, label in zip(images, labels, strict=True):
      columns = np.flatnonzero(image.max(axis=(0, 2)) > 0)
      centre = (columns.min() + columns.max() + 1) / 2
      self.assertLessEqual(abs(centre / width - (label + 0.5)), 1.0, (centre, label))

  @parameterized.parameters(*shapes.NAMES)
  def test_task_has_the_vtab1k_splits(self, name):
    self.assertIn(name, data.task_names())
    task = data.get_task(name)
    self.assertEqual(task.num_classes, shapes.num_classes(name))
    self.assertEqual(task.size("train800val200"), 1000)
    self.assertEqual(task.size("test"), shapes.TEST_SIZE)
    images, labels = task.arrays("train800", image_size=32)
    self.assertEqual(len(labels), 800)
    # Every class is drawn.
    self.assertEqual(len(np.unique(labels)), task.num_classes)


if __name__ == "__main__":
  absltest.main()
