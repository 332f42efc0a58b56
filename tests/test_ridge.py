"""The closed-form ridge probe: equal to least squares, usable as a probe head, CV over l2."""

import numpy as np
from absl.testing import absltest, parameterized

from h2t import probe, ridge


def _reference_solution(x, labels, num_classes, l2_reg):
  """Ridge as ordinary least squares on the system augmented with sqrt(l2) I."""
  mean, std = x.mean(0), x.std(0) + ridge.STD_EPS
  a = np.concatenate([(x - mean) / std, np.full((len(x), 1), ridge.BIAS_CONSTANT)], axis=1)
  y = 2.0 * np.eye(num_classes)[labels] - 1.0
  a_aug = np.concatenate([a, np.sqrt(l2_reg) * np.eye(a.shape[1])])
  y_aug = np.concatenate([y, np.zeros((a.shape[1], num_classes))])
  w, *_ = np.linalg.lstsq(a_aug, y_aug, rcond=None)
  return lambda x_new: (
    np.concatenate([(x_new - mean) / std, np.full((len(x_new), 1), ridge.BIAS_CONSTANT)], axis=1) @ w
  )


def _separable(n=60, dim=5, num_classes=3, seed=0):
  """Class means far apart relative to the noise: linearly separable."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % num_classes
  centres = rng.normal(size=(num_classes, dim)) * 5
  return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


class RidgeTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("primal_n_above_d", 80, 10, 3.0),
    ("dual_n_below_d", 20, 300, 3.0),
    ("dual_strong_penalty", 20, 300, 1024.0),
  )
  def test_equals_least_squares_on_augmented_system(self, n, dim, l2_reg):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, dim)) * rng.uniform(0.1, 10, size=dim) + rng.normal(size=dim)
    labels = rng.integers(0, 4, n)
    params = ridge.fit(x, labels, num_classes=4, l2_reg=l2_reg)
    self.assertEqual(params["w"].shape, (dim, 4))
    self.assertEqual(params["b"].shape, (4,))
    x_new = rng.normal(size=(7, dim)) * 3
    expected = _reference_solution(x, labels, 4, l2_reg)(x_new)
    got = np.asarray(probe.predict(params, x_new.astype(np.float32)))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())

  def test_penalty_takes_effect(self):
    x, labels = _separable()
    small = ridge.fit(x, labels, num_classes=3, l2_reg=1e-3)
    large = ridge.fit(x, labels, num_classes=3, l2_reg=1e5)
    self.assertLess(np.abs(large["w"]).sum(), 0.1 * np.abs(small["w"]).sum())

  def test_separates_a_separable_task(self):
    x, labels = _separable()
    x_test, labels_test = _separable(seed=0, n=30)
    params = ridge.fit(x, labels, num_classes=3, l2_reg=1.0)
    self.assertEqual((np.asarray(probe.predict(params, x)).argmax(-1) == labels).mean(), 1.0)
    self.assertEqual((np.asarray(probe.predict(params, x_test)).argmax(-1) == labels_test).mean(), 1.0)

  def test_constant_feature_gets_zero_weight(self):
    x, labels = _separable()
    x[:, 2] = 4.0  # std is the 1e-5 floor: a nonzero weight would blow up on new data
    params = ridge.fit(x, labels, num_classes=3, l2_reg=1.0)
    self.assertAlmostEqual(float(np.abs(params["w"][2]).max()), 0.0, places=6)

  def test_select_l2_reg_picks_the_middle_of_too_weak_and_too_strong(self):
    # 80 features, 80 training examples per fold: nearly unpenalised least
    # squares interpolates the noise (the double-descent peak); a huge penalty
    # leaves only the bias. Both validate worse than a moderate one.
    rng = np.random.default_rng(0)
    labels = np.arange(100) % 2
    x = rng.normal(size=(100, 80)) + 0.5 * (2 * labels - 1)[:, None] * rng.choice([-1, 1], size=80)
    grid = (1e-4, 1e2, 1e7)
    best, acc = ridge.select_l2_reg(x, labels, num_classes=2, l2_regs=grid)
    self.assertEqual(acc.shape, (3,))
    self.assertEqual(best, 1e2)
    self.assertGreater(acc[1], acc[0] + 0.1)
    self.assertGreater(acc[1], acc[2] + 0.1)

  def test_select_l2_reg_ties_go_to_the_larger_penalty(self):
    x, labels = _separable()
    best, acc = ridge.select_l2_reg(x, labels, num_classes=3, l2_regs=(0.1, 1.0, 10.0))
    np.testing.assert_array_equal(acc, [1.0, 1.0, 1.0])
    self.assertEqual(best, 10.0)

  def test_errors(self):
    x, labels = _separable()
    with self.assertRaisesRegex(ValueError, "outside"):
      ridge.fit(x, labels + 1, num_classes=3)
    with self.assertRaisesRegex(ValueError, "positive"):
      ridge.fit(x, labels, num_classes=3, l2_reg=0.0)
    with self.assertRaisesRegex(ValueError, "num_folds"):
      ridge.select_l2_reg(x, labels, num_classes=3, num_folds=1)


if __name__ == "__main__":
  absltest.main()
