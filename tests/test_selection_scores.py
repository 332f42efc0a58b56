"""Data-driven feature scores: random, variance, and the scikit-learn scores."""

import numpy as np
from absl.testing import absltest, parameterized

from h2t import selection
from tests import oracles


def _toy_task(seed=0, n=150, dim=12, informative=5):
  """Three classes; only feature `informative` carries the label, all others are noise."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, n).astype(np.int32)
  x = rng.normal(size=(n, dim)).astype(np.float32)
  x[:, informative] += 3.0 * labels
  return x, labels


class DataScoresTest(parameterized.TestCase):
  def test_names(self):
    self.assertEqual(len(selection.DATA_SCORES), 6)
    self.assertEmpty(set(selection.DATA_SCORES) & set(selection.CONNECTIVITY_SCORES))

  def test_random_is_reproducible_and_seeded(self):
    x, y = _toy_task()
    a = selection.data_scores("random", x, y, seed=3)
    np.testing.assert_array_equal(a, selection.data_scores("random", x, y, seed=3))
    self.assertFalse(np.allclose(a, selection.data_scores("random", x, y, seed=4)))
    self.assertEqual(a.shape, (x.shape[1],))
    self.assertEqual(a.dtype, np.float64)

  def test_variance_is_population_std_and_ranks_spread_first(self):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) * np.array([1, 1, 10, 1, 0.1, 1])
    scores = selection.data_scores("variance", x, np.zeros(200, np.int32), seed=0)
    np.testing.assert_allclose(scores, x.std(axis=0, ddof=0))
    self.assertEqual(scores.argmax(), 2)
    self.assertEqual(scores.argmin(), 4)
    np.testing.assert_array_equal(oracles.top_fraction(scores, 1 / 6), [2])

  @parameterized.parameters(
    "sklearn_chi2", "sklearn_f_classif", "sklearn_mutual_info_classif", "sklearn_trees"
  )
  def test_sklearn_scores_pick_the_informative_feature(self, kind):
    x, y = _toy_task(informative=5)
    scores = selection.data_scores(kind, x, y, seed=0)
    self.assertEqual(scores.shape, (x.shape[1],))
    self.assertEqual(scores.argmax(), 5)
    self.assertTrue(np.isfinite(scores).all())

  @parameterized.parameters("sklearn_mutual_info_classif", "sklearn_trees")
  def test_seeded_sklearn_scores_are_reproducible(self, kind):
    x, y = _toy_task()
    np.testing.assert_array_equal(
      selection.data_scores(kind, x, y, seed=1), selection.data_scores(kind, x, y, seed=1)
    )

  def test_f_classif_constant_feature_scores_zero_not_nan(self):
    x, y = _toy_task(informative=5)
    x[:, 0] = 7.0  # constant: f_classif gives 0/0
    scores = selection.data_scores("sklearn_f_classif", x, y, seed=0)
    self.assertEqual(scores[0], 0.0)
    self.assertNotIn(0, oracles.top_fraction(scores, 0.5))
    # A NaN would spread through its tap's mean (mean_interpolation_coef) and
    # sink the informative feature 5, which shares the tap with feature 0.
    kept = oracles.top_fraction(scores, 1 / x.shape[1], tap_sizes=[6, 6], mean_interpolation_coef=0.5)
    np.testing.assert_array_equal(kept, [5])

  def test_chi2_accepts_negative_features_by_shifting_them(self):
    x, y = _toy_task(informative=5)  # normal noise: negative values everywhere
    self.assertLess(x.min(), 0)
    shifted = selection.nonnegative_for_chi2(x)
    self.assertGreaterEqual(shifted.min(), 0)
    np.testing.assert_allclose(shifted.min(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(np.diff(shifted, axis=0), np.diff(x, axis=0), atol=1e-5)

  def test_chi2_leaves_nonnegative_features_as_scikit_learn_scores_them(self):
    from sklearn.feature_selection import chi2

    x, y = _toy_task()
    x = np.abs(x)
    np.testing.assert_allclose(selection.data_scores("sklearn_chi2", x, y, seed=0), chi2(x, y)[0], rtol=1e-6)

  def test_unknown_kind_lists_the_valid_ones(self):
    x, y = _toy_task()
    with self.assertRaisesRegex(ValueError, "sklearn_trees"):
      selection.data_scores("sklearn_lasso", x, y, seed=0)

  def test_shape_mismatch(self):
    with self.assertRaisesRegex(ValueError, r"labels \[n\]"):
      selection.data_scores("variance", np.ones((4, 2)), np.zeros(3), seed=0)


if __name__ == "__main__":
  absltest.main()
