"""Each reference option, set through `config.learning`, has the effect its name promises."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import configs.vtab as vtab_config
from h2t import evaluate, features, head2toe, probe, selection, stages
from tests import oracles, toy

FOLDS = [(np.arange(0, 160), np.arange(160, 200)), (np.arange(40, 200), np.arange(0, 40))]


def _grid(learnings, seed=0):
  feats, labels = toy.two_taps()
  return head2toe.run_grid(
    head2toe.prepare(feats), labels, learnings, FOLDS, [0, 1], seed=seed, num_classes=3
  )


def _kept(run, point, fold=0):
  mask = run.kept_mask[fold, point] > 0
  return run.kept_idx[fold, point][mask]


class SelectionOptionsTest(parameterized.TestCase):
  def test_keep_fraction_offset_drops_exactly_the_top_k(self):
    # 50 features: 7, 5 and 2 kept; the three points share one stage-1 run.
    run = _grid(
      [
        toy.learning(**{"feature_selection.keep_fraction": 0.14}),
        toy.learning(**{"feature_selection.keep_fraction": 0.1, "feature_selection.keep_fraction_offset": 2}),
        toy.learning(**{"feature_selection.keep_fraction": 0.04}),
      ]
    )
    for fold in range(2):
      top7, offset, top2 = (set(_kept(run, p, fold).tolist()) for p in range(3))
      self.assertLen(offset, 5)
      self.assertEqual(offset, top7 - top2)

  def test_average_over_k_averages_k_scorings(self):
    feats, labels = toy.two_taps()
    prep = head2toe.prepare(feats)
    learning = toy.learning(**{"feature_selection.keep_fraction": 0.1, "feature_selection.average_over_k": 3})
    train = np.stack([f[0] for f in FOLDS])
    keys = head2toe.selection_keys(0, [0, 1])
    one = [
      np.asarray(stages.stage1_scores(prep, labels, [learning], train, keys, num_classes=3, repeats=[r]))
      for r in range(3)
    ]
    self.assertFalse(np.allclose(one[0], one[1]))  # the runs differ (own init and minibatches)
    avg = np.asarray(
      stages.stage1_scores(prep, labels, [learning], train, keys, num_classes=3, repeats=range(3))
    )
    np.testing.assert_allclose(avg, np.mean(one, axis=0), rtol=1e-5)
    run = _grid([learning])
    for fold in range(2):
      want = np.sort(np.argsort(-avg[fold, 0], kind="stable")[:5])
      np.testing.assert_array_equal(_kept(run, 0, fold), want)

  def test_mean_interpolation_coef_one_ranks_by_tap_mean(self):
    coef1 = _grid(
      [
        toy.learning(
          **{"feature_selection.keep_fraction": 0.2, "feature_selection.mean_interpolation_coef": 1.0}
        )
      ]
    )
    # Every feature scores its tap's mean: ties go to the lowest indices of the better tap 'b'.
    np.testing.assert_array_equal(_kept(coef1, 0), 30 + np.arange(10))
    plain = _grid([toy.learning(**{"feature_selection.keep_fraction": 0.2})])
    self.assertFalse(np.array_equal(_kept(plain, 0), 30 + np.arange(10)))

  def test_l2layer_keeps_whole_taps_in_order(self):
    run = _grid(
      [
        toy.learning(
          **{"feature_selection.keep_fraction": 0.2, "feature_selection.type": "connectivity_l2layer"}
        )
      ]
    )
    np.testing.assert_array_equal(_kept(run, 0), 30 + np.arange(10))

  @parameterized.parameters("connectivity_l2", "connectivity_l1", "connectivity_linf")
  def test_connectivity_types_find_the_signal(self, kind):
    run = _grid([toy.learning(**{"feature_selection.keep_fraction": 0.06, "feature_selection.type": kind})])
    # 3 of 50 kept; by chance 3 informative ones would come 1 time in 19,600.
    self.assertGreaterEqual(len(set(_kept(run, 0).tolist()) & {30, 31, 32}), 2)

  @parameterized.parameters("connectivity_l2", "connectivity_l1", "connectivity_linf", "connectivity_l2layer")
  def test_device_scores_equal_the_reference_formulas(self, kind):
    w = np.random.default_rng(1).normal(size=(9, 4)).astype(np.float32)
    sizes = [4, 5]
    tap_of = jnp.asarray(np.repeat([0, 1], sizes))
    got = selection.connectivity_scores(kind, jnp.asarray(w)[None], tap_of, 2)[0]
    np.testing.assert_allclose(got, oracles.connectivity_scores(kind, w, sizes), rtol=1e-5)

  @parameterized.parameters(
    "variance", "sklearn_chi2", "sklearn_f_classif", "sklearn_mutual_info_classif", "sklearn_trees"
  )
  def test_data_scores_find_the_signal(self, kind):
    run = _grid([toy.learning(**{"feature_selection.keep_fraction": 0.06, "feature_selection.type": kind})])
    np.testing.assert_array_equal(_kept(run, 0), [30, 31, 32])

  def test_random_scores_depend_on_the_seed(self):
    learning = toy.learning(**{"feature_selection.keep_fraction": 0.2, "feature_selection.type": "random"})
    self.assertFalse(np.array_equal(_kept(_grid([learning], seed=0), 0), _kept(_grid([learning], seed=1), 0)))
    np.testing.assert_array_equal(_kept(_grid([learning], seed=0), 0), _kept(_grid([learning], seed=0), 0))

  def test_group_lrp_is_embedding_penalises_whole_taps_with_its_coefficient(self):
    feats, labels = toy.two_taps()
    prep = head2toe.prepare(feats)
    train, keys = np.stack([f[0] for f in FOLDS]), head2toe.selection_keys(0, [0, 1])

    def tap_norms(coef):
      learning = toy.learning(
        group_lrp_is_embedding=True,
        **{"feature_selection.learning_config_overwrite.group_lrp_regularizer_coef": coef},
      )
      s = np.asarray(stages.stage1_scores(prep, labels, [learning], train, keys, num_classes=3))[0, 0]
      return math.sqrt(s[:30].sum()), math.sqrt(s[30:].sum())  # each tap's kernel norm

    a_weak, b_weak = tap_norms(0.0)
    a_strong, b_strong = tap_norms(0.05)
    self.assertGreater(a_weak, 1.0)
    self.assertLess(a_strong, 0.1 * a_weak)  # the noise tap is switched off as a whole...
    self.assertGreater(b_strong, 0.5)  # ...the informative one survives


class TrainerOptionsTest(absltest.TestCase):
  """One step from a zero kernel on the whole set shows the update rule exactly."""

  def _one_step(self, **spec_kw):
    feats, labels = toy.two_taps(n=64)
    x = jnp.asarray(np.concatenate([feats["a"], feats["b"]], 1))
    spec = probe.TrainSpec(
      num_classes=3, training_steps=1, batch_size=64, zero_init=True, use_cosine_decay=False, **spec_kw
    )
    params, _ = probe.train(x, labels, probe.HParams(learning_rate=0.5), jax.random.key(0), spec=spec)
    start = probe.init_head(jax.random.key(0), x.shape[1], spec)

    def loss(p):
      return probe.optax.softmax_cross_entropy_with_integer_labels(probe.logits_fn(p, x), labels).mean()

    return np.asarray(params["w"]), np.asarray(jax.grad(loss)(start)["w"])

  def test_zero_init_starts_at_zero(self):
    spec = probe.TrainSpec(num_classes=3, zero_init=True)
    self.assertEqual(float(jnp.abs(probe.init_head(jax.random.key(0), 5, spec)["w"]).max()), 0.0)
    glorot = probe.init_head(jax.random.key(0), 5, probe.TrainSpec(num_classes=3))["w"]
    self.assertGreater(float(jnp.abs(glorot).max()), 0.1)
    head = head2toe.fit(*toy.two_taps(), toy.learning(learning_rate=0.0, output_head_zeroinit=True), seed=0)
    self.assertEqual(float(np.abs(head.params["w"]).max()), 0.0)

  def test_sgd_step_is_minus_lr_times_gradient(self):
    w, g = self._one_step(optimizer="sgd")
    np.testing.assert_allclose(w, -0.5 * g, rtol=1e-5, atol=1e-7)

  def test_adam_first_step_is_minus_lr_times_sign(self):
    w, g = self._one_step(optimizer="adam")
    big = np.abs(g) > 1e-4
    np.testing.assert_allclose(w[big], -0.5 * np.sign(g[big]), rtol=1e-3)

  def test_grad_clip_value_clips_each_entry(self):
    w, g = self._one_step(optimizer="sgd", grad_clip_value=0.01)
    self.assertGreater(np.abs(g).max(), 0.05)  # clipping bites
    np.testing.assert_allclose(w, -0.5 * np.clip(g, -0.01, 0.01), rtol=1e-5, atol=1e-7)

  def test_cosine_decay(self):
    spec = probe.TrainSpec(num_classes=3, training_steps=100)
    hp = probe.HParams(learning_rate=0.2)
    lrs = [float(probe.learning_rate_at(jnp.asarray(s), hp, spec)) for s in (0, 50, 100)]
    np.testing.assert_allclose(lrs, [0.2, 0.1, 0.0], atol=1e-7)
    flat = probe.TrainSpec(num_classes=3, training_steps=100, use_cosine_decay=False)
    self.assertAlmostEqual(float(probe.learning_rate_at(jnp.asarray(50), hp, flat)), 0.2, places=7)

  def test_l1_and_l2_regularizers_shrink_the_kernel(self):
    feats, labels = toy.two_taps()
    plain = head2toe.fit(feats, labels, toy.learning(**{"feature_selection.type": "none"}), seed=0)
    l1 = head2toe.fit(
      feats, labels, toy.learning(l1_regularizer=1e-2, **{"feature_selection.type": "none"}), seed=0
    )
    l2 = head2toe.fit(
      feats, labels, toy.learning(l2_regularizer=1e-1, **{"feature_selection.type": "none"}), seed=0
    )
    self.assertLess(np.abs(l1.params["w"]).sum(), 0.5 * np.abs(plain.params["w"]).sum())
    self.assertLess((l2.params["w"] ** 2).sum(), 0.5 * (plain.params["w"] ** 2).sum())


class InputTapTest(absltest.TestCase):
  def test_include_input_adds_the_pooled_image_first(self):
    from h2t import backbones

    backbone = backbones.create("efficientnet_lite0", input_size=32)
    config = vtab_config.get_config()
    config.backbone.additional_features = "block3_output"
    config.backbone.include_input = True
    self.assertEqual(
      evaluate.resolve_taps(backbone, config.backbone), ("input", "block3_output", "pre_logits")
    )
    config.backbone.include_input = False
    self.assertNotIn("input", evaluate.resolve_taps(backbone, config.backbone))
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    got = features.extract(backbone, images, taps=["input"], target_size=48)["input"]
    # 32x32x3 to 48 features: 4 cells a side, 8x8 windows of the normalised image.
    x = (images.astype(np.float32) - 127.0) / 128.0
    want = x.reshape(2, 4, 8, 4, 8, 3).mean(axis=(2, 4)).reshape(2, 48)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  absltest.main()
