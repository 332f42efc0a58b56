"""Compile once per sweep (issue #12): tasks whose class counts share a bucket run the same
compiled grid programs, with the unpadded numbers; later runs reuse the loaded backbone."""

import numpy as np
from absl.testing import absltest

from h2t import evaluate, head2toe, probe, stages
from tests import toy

PROGRAMS = (stages.train_all_features, stages.train_kept_features_folds, stages.kept_accuracy)


def programs() -> int:
  return sum(f._cache_size() for f in PROGRAMS)


def task(num_classes: int, seed: int):
  """Toy features of `num_classes` classes (the label shifts feature `b[label]`)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, 200).astype(np.int32)
  labels[:num_classes] = np.arange(num_classes)  # every class present
  feats, _ = toy.two_taps(seed=seed, n=200, labels=labels % 3)
  feats["b"][:, 3 : 3 + num_classes] += 3.0 * np.eye(num_classes, dtype=np.float32)[labels]
  return feats, labels


def grid(feats, labels, num_classes: int, **values):
  learnings = [toy.learning(20, **{"feature_selection.keep_fraction": k, **values}) for k in (0.1, 0.3)]
  folds = [(np.arange(160), np.arange(160, 200)), (np.arange(40, 200), np.arange(40))]
  return head2toe.run_grid(
    head2toe.prepare(feats), labels, learnings, folds, [0, 1], seed=3, num_classes=num_classes
  )


class ClassBucketTest(absltest.TestCase):
  def test_bucket_widths(self):
    self.assertEqual(
      [probe.class_bucket(c) for c in (2, 7, 8, 9, 16, 17, 100, 397)], [8, 8, 8, 16, 16, 32, 128, 512]
    )

  def test_other_class_count_compiles_nothing_new(self):
    first = grid(*task(5, seed=0), 5)
    before = programs()
    second = grid(*task(7, seed=1), 7)
    self.assertEqual(programs(), before, "a task with 7 classes recompiled a grid program of a 5-class task")
    self.assertEqual(first.params["w"].shape[-1], 5)
    self.assertEqual(second.params["w"].shape[-1], 7)
    self.assertEqual(second.params["b"].shape[-1], 7)
    # Without buckets the 7-class task compiles its own programs (so the check above can fail).
    grid(*task(7, seed=1), 7, class_buckets=False)
    self.assertGreater(programs(), before)

  def test_numbers_are_the_unpadded_ones(self):
    for extra in ({}, {"l1_regularizer": 1e-3, "l2_regularizer": 1e-3}, {"output_head_zeroinit": True}):
      feats, labels = task(6, seed=2)
      padded = grid(feats, labels, 6, class_buckets=True, **extra)
      plain = grid(feats, labels, 6, class_buckets=False, **extra)
      np.testing.assert_array_equal(padded.kept_idx, plain.kept_idx)
      np.testing.assert_array_equal(padded.accuracy, plain.accuracy)
      for k, v in plain.params.items():
        self.assertEqual(padded.params[k].shape, v.shape)
        np.testing.assert_allclose(padded.params[k], v, rtol=1e-5, atol=1e-6, err_msg=f"{extra} {k}")
        self.assertTrue(np.isfinite(padded.params[k]).all())
      np.testing.assert_allclose(padded.losses, plain.losses, rtol=1e-5)

  def test_padding_stays_out_of_the_head(self):
    feats, labels = task(3, seed=4)
    head = head2toe.fit(feats, labels, toy.learning(20, l1_regularizer=1e-2), seed=0, num_classes=3)
    self.assertEqual(head.params["w"].shape[-1], 3)
    self.assertEqual(head.predict(feats).shape, (200, 3))
    self.assertTrue(np.isfinite(head.params["b"]).all())

  def test_hidden_layer_heads_keep_their_width(self):
    spec = probe.spec_from_learning(toy.learning(output_head_type="trainable_16"), 5, pad_classes=True)
    self.assertFalse(spec.padded_classes)
    self.assertEqual(spec.num_classes, 5)
    spec = probe.spec_from_learning(toy.learning(), 5, pad_classes=True)
    self.assertEqual((spec.padded_classes, spec.num_classes), (True, 8))


class SweepBackboneTest(absltest.TestCase):
  def test_later_runs_reuse_the_loaded_backbone(self):
    # The jitted extraction keys on the Backbone object: a new one per task recompiled it.
    first = evaluate._create_backbone("efficientnet_lite0", None, 32)
    self.assertIs(evaluate._create_backbone("efficientnet_lite0", None, 32), first)
    other = evaluate._create_backbone("efficientnet_lite0", None, 64)
    self.assertIsNot(other, first)
    self.assertEqual(other.input_size, 64)


if __name__ == "__main__":
  absltest.main()
