"""head2toe_plus: Head2Toe's selection; its probe plus ridge, or LDA on ridge's scores, chosen by CV."""

import os

import numpy as np
from absl.testing import absltest, parameterized

import configs.vtab as vtab_config
from h2t import config as config_lib
from h2t import head2toe, plus, ridge
from h2t.head import Head
from tests import toy


def _features(n: int = 200, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Three taps; classes are told apart by a few features of the second tap."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, size=n).astype(np.int32)
  feats = {f"t{i}": rng.normal(size=(n, 40)).astype(np.float32) for i in range(3)}
  feats["t1"][:, :4] += 2.0 * np.eye(3)[labels] @ rng.normal(size=(3, 4)).astype(np.float32)
  return feats, labels


def _ordered(n: int = 300, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Five classes in order along 4 features of tap t1: ridge's argmax masks the middle ones."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 5, size=n).astype(np.int32)
  feats = {f"t{i}": rng.normal(size=(n, 40)).astype(np.float32) for i in range(3)}
  feats["t1"][:, :4] = labels[:, None] + 0.3 * feats["t1"][:, :4]
  return feats, labels


def _learning(steps: int = 40):
  learning = vtab_config.get_config().learning
  learning.training_steps = steps
  learning.train_batch_size = 32
  return learning


def _logits(head: Head, feats) -> np.ndarray:
  return np.asarray(head.predict(feats))


class PlusTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    # A small grid keeps the test fast; the module's full grid is what runs.
    for name, value in (("COEFS", (1e-4,)), ("KEEP_FRACTIONS", (0.05, 0.15))):
      self.enter_context(absltest.mock.patch.object(plus, name, value))

  def test_blend_is_the_sum_of_the_two_heads(self):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 5))
    p = {"w": rng.normal(size=(5, 3)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)}
    r = {"w": rng.normal(size=(5, 3)), "b": rng.normal(size=3)}
    for beta in (0.0, 4.0):
      h = plus.blend(p, r, beta)
      np.testing.assert_allclose(
        x @ h["w"] + h["b"], (x @ p["w"] + p["b"]) + beta * (x @ r["w"] + r["b"]), rtol=1e-5, atol=1e-5
      )
    np.testing.assert_array_equal(plus.blend(p, r, np.inf)["w"], r["w"].astype(np.float32))

  def test_choose_takes_the_best_and_the_first_on_ties(self):
    learnings = plus.grid_learnings(_learning())
    acc = np.zeros((len(learnings), len(ridge.L2_REGS), len(plus.BETAS)))
    acc[1, 3, 2] = acc[1, 4, 5] = 0.9
    point, l2_index, choice = plus.choose(acc, learnings)
    self.assertEqual((point, l2_index), (1, 3))
    self.assertFalse(choice.discriminant)
    self.assertEqual(choice.keep_fraction, 0.15)
    self.assertEqual(choice.l2_reg, ridge.L2_REGS[3])
    self.assertEqual(choice.beta, plus.BETAS[2])
    self.assertEqual(choice.cv_accuracy, 0.9)

  def test_discriminant_reads_out_the_classes_ridge_masks(self):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=600)
    x = np.concatenate([labels[:, None] + 0.15 * rng.normal(size=(600, 1)), rng.normal(size=(600, 20))], 1)
    r = ridge.Solver(x, labels, 5).params(1.0, dtype=np.float64)
    z = x @ r["w"] + r["b"]
    self.assertLess((z.argmax(1) == labels).mean(), 0.7)  # the middle classes are rarely the largest score
    head = plus.compose(r, plus.discriminant(z, labels, 5))
    pred = (x @ head["w"] + head["b"]).argmax(1)
    self.assertGreater((pred == labels).mean(), 0.95)
    self.assertEqual(head["w"].dtype, np.float32)

  def test_discriminant_is_the_gaussian_posterior(self):
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), [10, 20, 30])
    s = rng.normal(size=(60, 4)) + 2.0 * np.eye(3, 4)[labels]
    lda = plus.discriminant(s, labels, 3)
    means = np.stack([s[labels == c].mean(0) for c in range(3)])
    resid = s - means[labels]
    cov = resid.T @ resid / (60 - 3)
    cov += plus.LDA_SHRINKAGE * np.trace(cov) / 4 * np.eye(4)
    inv = np.linalg.inv(cov)
    diff = s[:, None, :] - means[None]
    log_density = -0.5 * np.einsum("ncd,de,nce->nc", diff, inv, diff) + np.log([10 / 60, 20 / 60, 30 / 60])
    gap = (s @ lda["w"] + lda["b"]) - log_density  # the x^T inv x term: the same for every class
    np.testing.assert_allclose(gap - gap[:, :1], 0.0, atol=1e-9)

  def test_discriminant_never_predicts_a_class_without_examples(self):
    rng = np.random.default_rng(3)
    labels = rng.choice([0, 2], size=40)
    lda = plus.discriminant(rng.normal(size=(40, 3)), labels, 3)
    self.assertTrue(np.all(lda["w"][:, 1] == 0.0))
    z = rng.normal(size=(100, 3)) * 50 @ lda["w"] + lda["b"]
    self.assertNotIn(1, z.argmax(1))

  def test_choose_reads_the_last_column_as_the_discriminant(self):
    learnings = plus.grid_learnings(_learning())
    acc = np.zeros((len(learnings), len(ridge.L2_REGS), len(plus.BETAS) + 1))
    acc[0, 2, len(plus.BETAS)] = 0.7
    point, l2_index, choice = plus.choose(acc, learnings)
    self.assertEqual((point, l2_index), (0, 2))
    self.assertTrue(choice.discriminant)
    self.assertTrue(np.isinf(choice.beta))
    self.assertEqual(choice.to_dict()["beta"], "inf")

  def test_fit_chooses_the_discriminant_where_ridge_masks_classes(self):
    feats, labels = _ordered(n=303)  # not a multiple of the 5 folds: 3 examples are never validated
    learning = _learning()
    # Per-feature z-scores keep the classes on a line (unit vectors per tap would bend it).
    learning.feature_normalization = "per_feature"
    with absltest.mock.patch.object(plus, "BETAS", (np.inf,)):  # ridge alone or its discriminant
      head = plus.fit(feats, labels, learning, seed=3, num_classes=5)
    choice = head.meta.extra["own_cv"]["chosen"]
    self.assertTrue(choice["discriminant"])
    self.assertGreater(head.meta.extra["own_cv"]["cv_accuracy"], 0.9)
    test_feats, test_labels = _ordered(seed=1)
    self.assertGreater((_logits(head, test_feats).argmax(1) == test_labels).mean(), 0.9)
    # The head is ridge's on the kept features followed by a C x C map: w = W_ridge M.
    learning.feature_selection.keep_fraction = choice["keep_fraction"]
    learning.feature_selection.learning_config_overwrite.group_lrp_regularizer_coef = choice["coef"]
    probe_head = head2toe.fit(feats, labels, learning, seed=3, num_classes=5)
    xk = np.asarray(probe_head.transform(feats), np.float64)
    r = ridge.Solver(xk, labels, 5).params(choice["l2_reg"], dtype=np.float64)
    self.assertLess(((xk @ r["w"] + r["b"]).argmax(1) == labels).mean(), 0.8)
    m = np.linalg.lstsq(r["w"], head.params["w"].astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(
      r["w"] @ m, head.params["w"], rtol=1e-3, atol=1e-4 * np.abs(head.params["w"]).max()
    )

  def test_with_beta_zero_it_is_head2toe(self):
    feats, labels = _features()
    with (
      absltest.mock.patch.object(plus, "BETAS", (0.0,)),
      absltest.mock.patch.object(plus, "DISCRIMINANT", False),
    ):
      head = plus.fit(feats, labels, _learning(), seed=3, num_classes=3)
    choice = head.meta.extra["own_cv"]["chosen"]
    self.assertEqual(choice["beta"], 0.0)
    learning = _learning()
    learning.feature_selection.keep_fraction = choice["keep_fraction"]
    learning.feature_selection.learning_config_overwrite.group_lrp_regularizer_coef = choice["coef"]
    reference = head2toe.fit(feats, labels, learning, seed=3, num_classes=3)
    self.assertEqual(
      {t: v.tolist() for t, v in head.kept.items()}, {t: v.tolist() for t, v in reference.kept.items()}
    )
    np.testing.assert_array_equal(head.params["w"], reference.params["w"])
    np.testing.assert_array_equal(head.params["b"], reference.params["b"])

  @parameterized.parameters("unit_vector", "per_feature")
  def test_head_adds_ridge_on_the_kept_features(self, normalization):
    feats, labels = _features()
    learning = _learning()
    learning.feature_normalization = normalization
    with absltest.mock.patch.object(plus, "DISCRIMINANT", False):  # test_fit_chooses_the_discriminant...
      head = plus.fit(feats, labels, learning, seed=3, num_classes=3)
    choice = head.meta.extra["own_cv"]["chosen"]
    # The classes are separable by the planted features.
    self.assertGreater(head.meta.extra["own_cv"]["cv_accuracy"], 0.8)
    learning.feature_selection.keep_fraction = choice["keep_fraction"]
    learning.feature_selection.learning_config_overwrite.group_lrp_regularizer_coef = choice["coef"]
    probe_head = head2toe.fit(feats, labels, learning, seed=3, num_classes=3)
    # The ridge part, solved here from the kept features as the head reads them.
    xk = np.asarray(probe_head.transform(feats), np.float64)
    r = ridge.Solver(xk, labels, 3).params(choice["l2_reg"], dtype=np.float64)
    beta = np.inf if choice["beta"] == "inf" else choice["beta"]
    want = (
      (xk @ r["w"] + r["b"]) if np.isinf(beta) else _logits(probe_head, feats) + beta * (xk @ r["w"] + r["b"])
    )
    np.testing.assert_allclose(_logits(head, feats), want, rtol=2e-4, atol=2e-4)
    self.assertEqual(head.num_features, probe_head.num_features)
    self.assertGreater((_logits(head, feats).argmax(1) == labels).mean(), 0.9)

  def test_config_errors(self):
    for overrides, needle in (
      ({"learning.output_head_type": "linear"}, "output_head_type"),
      ({"learning.feature_selection.type": "none"}, "selects features"),
    ):
      config = vtab_config.get_config()
      config.methods = ("head2toe_plus",)
      for path, value in overrides.items():
        node = config
        *parents, leaf = path.split(".")
        for part in parents:
          node = node[part]
        node[leaf] = value
      with self.assertRaisesRegex(config_lib.ConfigError, needle):
        config_lib.validate(config)


class PlusMainTest(toy.TempDirTestCase):
  def test_main_records_the_choice_and_writes_a_usable_head(self):
    workdir = self.path("w")
    proc = toy.run_main(
      workdir, toy.NO_GRID, "--config.methods=head2toe_plus", fast=toy.fast(steps=10), timeout=900
    )
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    r = toy.results(workdir)["methods"]["head2toe_plus"]
    self.assertIn(r["chosen_point"]["keep_fraction"], plus.KEEP_FRACTIONS)
    self.assertGreater(r["cv_accuracy"], 0.3)
    self.assertGreater(r["test_accuracy"], 0.3)
    head = Head.load(os.path.join(workdir, "head_head2toe_plus.npz"))
    self.assertEqual(head.num_features, r["num_kept"])
    self.assertEqual(head.meta.extra["own_cv"]["chosen"]["beta"], r["chosen_point"]["beta"])


if __name__ == "__main__":
  absltest.main()
