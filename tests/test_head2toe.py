"""Normalisation, the group-lasso penalty, selection, and the two-stage fit."""

import math
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from h2t import head as head_lib
from h2t import head2toe, normalize, probe, selection
from tests import oracles, toy


def _toy_task(seed=0, n=200, informative=("b",)):
  """Three taps; only the taps in `informative` carry the label."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, n).astype(np.int32)
  feats = {}
  for tap, dim in (("a", 30), ("b", 20), ("c", 40)):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    if tap in informative:
      x[:, :3] += 4.0 * np.eye(3, dtype=np.float32)[labels]
    feats[tap] = x
  return feats, labels


def _learning(**overrides):
  return toy.learning(100, **overrides)


class NormalizeTest(absltest.TestCase):
  def test_unit_vector_rows_and_zero_rows(self):
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(np.asarray(normalize.unit_vector(x)), [[0.6, 0.8], [0.0, 0.0]])

  def test_unit_vector_is_per_tap(self):
    feats = {"a": np.array([[3.0, 4.0]]), "b": np.array([[0.0, 0.0, 2.0]])}
    x, stats = normalize.features_matrix(feats, ["a", "b"], "unit_vector")
    np.testing.assert_allclose(x, [[0.6, 0.8, 0, 0, 1]])
    self.assertIsNone(stats)

  def test_per_feature_uses_training_statistics(self):
    feats = {"a": np.array([[1.0], [3.0]])}
    x, stats = normalize.features_matrix(feats, ["a"], "per_feature")
    np.testing.assert_allclose(x[:, 0], [-1, 1], atol=1e-5)
    y, _ = normalize.features_matrix({"a": np.array([[2.0]])}, ["a"], "per_feature", stats)
    np.testing.assert_allclose(y, [[0.0]], atol=1e-6)

  def test_unknown_mode(self):
    with self.assertRaisesRegex(ValueError, "unit_vector"):
      normalize.features_matrix({"a": np.ones((1, 1))}, ["a"], "l2")


class PenaltyTest(parameterized.TestCase):
  W = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], np.float32)

  def test_l21_is_sum_of_row_norms(self):
    self.assertAlmostEqual(float(probe.group_lasso(jnp.asarray(self.W))), 5.0 + 0.0 + 1.0, places=5)

  def test_general_orders(self):
    # r = 1, p = 2: sqrt(7^2 + 0^2 + 1^2)
    self.assertAlmostEqual(
      float(probe.group_lasso(jnp.asarray(self.W), r=1.0, p=2.0)), math.sqrt(50), places=5
    )
    self.assertAlmostEqual(
      float(probe.group_lasso(jnp.asarray(self.W), r=math.inf, p=1.0)), 4.0 + 0 + 1, places=5
    )

  def test_groups_of_rows(self):
    groups = jnp.array([0, 0, 1])  # ||[3, 4, 0, 0]|| + ||[1, 0]||
    self.assertAlmostEqual(
      float(probe.group_lasso(jnp.asarray(self.W), groups=groups, num_groups=2)), 6.0, places=5
    )

  def test_penalty_applies_coefficients(self):
    hp = probe.HParams(learning_rate=0.1, l1=0.5, l2=0.25, group_coef=2.0)
    spec = probe.TrainSpec(num_classes=2)
    got = float(probe.penalty({"w": jnp.asarray(self.W)}, hp, spec))
    self.assertAlmostEqual(got, 0.5 * 8 + 0.25 * 26 + 2.0 * 6, places=4)

  def test_gradient_at_zero_row_is_finite(self):
    import jax

    g = jax.grad(lambda w: probe.group_lasso(w))(jnp.asarray(self.W))
    self.assertTrue(bool(jnp.isfinite(g).all()))
    np.testing.assert_allclose(g[1], [0, 0])


class SelectionTest(absltest.TestCase):
  def test_top_fraction_and_offset(self):
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.0])
    np.testing.assert_array_equal(oracles.top_fraction(scores, 0.3), [1, 3, 5])
    # Offset 1 drops exactly the best one (index 1) and takes the next three.
    np.testing.assert_array_equal(oracles.top_fraction(scores, 0.3, offset=1), [3, 5, 7])

  def test_keeps_none_is_an_error(self):
    with self.assertRaisesRegex(ValueError, "keeps none"):
      oracles.top_fraction(np.ones(5), 0.1)

  def test_indices_per_tap(self):
    out = selection.indices_per_tap(np.array([0, 4, 5, 9]), ["a", "b", "c"], [3, 3, 4])
    np.testing.assert_array_equal(out["a"], [0])
    np.testing.assert_array_equal(out["b"], [1, 2])
    np.testing.assert_array_equal(out["c"], [3])

  def test_connectivity_scores(self):
    w = np.array([[1.0, -2.0], [0.0, 3.0], [1.0, 1.0]])
    np.testing.assert_allclose(oracles.connectivity_scores("connectivity_l2", w, [3]), [5, 9, 2])
    np.testing.assert_allclose(oracles.connectivity_scores("connectivity_l1", w, [3]), [3, 3, 2])
    np.testing.assert_allclose(oracles.connectivity_scores("connectivity_linf", w, [3]), [2, 3, 1])
    layer = oracles.connectivity_scores("connectivity_l2layer", w, [2, 1])
    np.testing.assert_allclose(layer, [(math.sqrt(5) + 3) / 2] * 2 + [math.sqrt(2)])


class FitTest(absltest.TestCase):
  def test_selects_the_informative_tap_and_learns(self):
    feats, labels = _toy_task()
    head = head2toe.fit(feats, labels, _learning(**{"feature_selection.keep_fraction": 0.05}), seed=1)
    self.assertEqual(head.num_features, int(90 * 0.05))
    self.assertIn("b", head.kept)
    self.assertTrue(set(head.kept["b"]) <= {0, 1, 2}, head.kept)
    test_feats, test_labels = _toy_task(seed=5)
    acc = (head.predict(test_feats).argmax(-1) == test_labels).mean()
    self.assertGreater(acc, 0.9)

  def test_same_seed_same_head(self):
    feats, labels = _toy_task()
    a = head2toe.fit(feats, labels, _learning(), seed=3)
    b = head2toe.fit(feats, labels, _learning(), seed=3)
    self.assertEqual({t: v.tolist() for t, v in a.kept.items()}, {t: v.tolist() for t, v in b.kept.items()})
    np.testing.assert_array_equal(a.params["w"], b.params["w"])
    np.testing.assert_array_equal(a.predict(feats), b.predict(feats))

  def test_bfloat16_feature_storage_trains_the_same_head_closely(self):
    feats, labels = _toy_task()
    exact = head2toe.fit(feats, labels, _learning(), seed=2)
    half = head2toe.fit(feats, labels, _learning(feature_dtype="bfloat16"), seed=2)
    # bfloat16 keeps 8 bits of mantissa: the informative features still win the
    # selection, and the weights move by the rounding, not more.
    self.assertEqual(
      {t: v.tolist() for t, v in half.kept.items()}, {t: v.tolist() for t, v in exact.kept.items()}
    )
    self.assertFalse(np.array_equal(half.params["w"], exact.params["w"]))
    np.testing.assert_allclose(half.params["w"], exact.params["w"], atol=0.05)
    test_feats, test_labels = _toy_task(seed=5)
    self.assertGreater((half.predict(test_feats).argmax(-1) == test_labels).mean(), 0.9)

  def test_no_selection_keeps_everything(self):
    feats, labels = _toy_task()
    head = head2toe.fit(feats, labels, _learning(**{"feature_selection.type": "none"}), seed=0)
    self.assertEqual(head.num_features, 90)

  def test_save_load_round_trip(self):
    feats, labels = _toy_task()
    head = head2toe.fit(
      feats, labels, _learning(feature_normalization="per_feature"), seed=0, meta={"task": "toy"}
    )
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "head.npz")
      head.save(path)
      loaded = head2toe.Head.load(path)
      self.assertEqual(os.listdir(d), ["head.npz"])  # no temporary file left behind
    np.testing.assert_array_equal(loaded.predict(feats), head.predict(feats))
    self.assertEqual(loaded.meta["task"], "toy")

  def test_unknown_selection_type(self):
    feats, labels = _toy_task()
    with self.assertRaisesRegex(ValueError, "connectivity_l2"):
      head2toe.fit(feats, labels, _learning(**{"feature_selection.type": "magic"}), seed=0)


class GridTest(absltest.TestCase):
  """The whole grid x folds as one program equals each grid point run alone."""

  def _points(self):
    points = []
    for coef in (1e-3, 1e-5):
      for kf in (0.05, 0.2):
        for lr in (0.1, 0.01):
          learning = _learning(
            **{
              "feature_selection.keep_fraction": kf,
              "feature_selection.learning_config_overwrite.group_lrp_regularizer_coef": coef,
              "learning_rate": lr,
              "training_steps": 40,
            }
          )
          points.append(learning)
    return points

  def test_batched_grid_equals_points_alone(self):
    feats, labels = _toy_task(n=100, informative=("a", "b"))
    prep = head2toe.prepare(feats)
    folds = [(np.arange(0, 80), np.arange(80, 100)), (np.arange(20, 100), np.arange(0, 20))]
    points = self._points()
    together = head2toe.run_grid(prep, labels, points, folds, [0, 1], seed=4, num_classes=3)
    for p, learning in enumerate(points):
      alone = head2toe.run_grid(prep, labels, [learning], folds, [0, 1], seed=4, num_classes=3)
      k = int(alone.kept_mask[0, 0].sum())
      if jax.default_backend() == "cpu":  # the CPU's float32 arithmetic is the same batched or not
        np.testing.assert_array_equal(together.kept_idx[:, p, :k], alone.kept_idx[:, 0, :k])
        np.testing.assert_array_equal(together.accuracy[:, p], alone.accuracy[:, 0])
        np.testing.assert_allclose(together.params["w"][:, p, :k], alone.params["w"][:, 0, :k], atol=1e-5)
        continue
      # Accelerators reduce in other orders when batched: near-ties may swap a kept feature and
      # flip one validation example (1/20 of a fold), never more.
      for f in range(2):
        shared = np.intersect1d(together.kept_idx[f, p, :k], alone.kept_idx[f, 0, :k])
        self.assertGreaterEqual(len(shared), 0.95 * k)
      np.testing.assert_allclose(together.accuracy[:, p], alone.accuracy[:, 0], atol=1 / 20 + 1e-9)

  def test_a_share_of_the_folds_gives_their_accuracies(self):
    # What a process of a multi-process run computes (h2t.grid.cv_units): some folds, every point.
    feats, labels = _toy_task(n=100, informative=("a", "b"))
    prep = head2toe.prepare(feats)
    points = self._points()[::2]
    whole = head2toe.cross_validate(prep, labels, points, seed=4, num_classes=3)
    self.assertFalse(np.isnan(whole).any())
    for share in ([0, 2, 4], [3, 1]):
      part = head2toe.cross_validate(prep, labels, points, seed=4, num_classes=3, folds=share)
      np.testing.assert_array_equal(part[:, share], whole[:, share])
      self.assertTrue(np.isnan(np.delete(part, share, axis=1)).all())
    with self.assertRaisesRegex(ValueError, "must lie in"):
      head2toe.cross_validate(prep, labels, points, seed=4, num_classes=3, folds=[5])

  def test_grid_fit_equals_head_api(self):
    feats, labels = _toy_task(n=100)
    learning = _learning(training_steps=40)
    head = head2toe.fit(feats, labels, learning, seed=2)
    prep = head2toe.prepare(feats)
    run = head2toe.run_grid(
      prep, labels, [learning], [(np.arange(100), None)], [head2toe.FINAL_FOLD], seed=2, num_classes=3
    )
    again = head_lib.from_grid_run(prep, run, 0, 0, learning)
    np.testing.assert_array_equal(head.predict(feats), again.predict(feats))

  def test_cross_validate_shapes_and_range(self):
    feats, labels = _toy_task(n=100)
    acc = head2toe.cross_validate(head2toe.prepare(feats), labels, self._points()[:3], seed=0, num_classes=3)
    self.assertEqual(acc.shape, (3, 5))
    self.assertTrue(((acc >= 0) & (acc <= 1)).all())

  def test_head_predict_matches_grid_evaluation(self):
    # The streamed/head path (host normalisation) and the in-program path agree.
    feats, labels = _toy_task(n=100)
    learning = _learning(training_steps=40)
    prep = head2toe.prepare(feats)
    folds = [(np.arange(0, 80), np.arange(80, 100))]
    run = head2toe.run_grid(prep, labels, [learning], folds, [0], seed=1, num_classes=3)
    head = head_lib.from_grid_run(prep, run, 0, 0, learning)
    sub = {t: v[80:] for t, v in feats.items()}
    acc = (head.predict(sub).argmax(-1) == labels[80:]).mean()
    self.assertAlmostEqual(acc, float(run.accuracy[0, 0]), places=6)


if __name__ == "__main__":
  absltest.main()
