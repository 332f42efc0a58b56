"""head2toe_plus: Head2Toe's selection; its probe, ridge, or LDA on ridge's scores, chosen by CV."""

import os

import numpy as np
from absl.testing import absltest, parameterized

import configs.vtab as vtab_config
from h2t import config as config_lib
from h2t import head2toe, inputs, plus, ridge
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

  def test_choose_takes_the_best_and_the_first_on_ties(self):
    learnings = plus.grid_learnings(_learning())
    acc = np.zeros((len(learnings), len(ridge.L2_REGS), len(plus.READOUTS)))
    acc[1, 3, 1] = acc[1, 4, 2] = 0.9
    point, l2_index, choice = plus.choose(acc, learnings)
    self.assertEqual((point, l2_index), (1, 3))
    self.assertEqual(choice.readout, "ridge")
    self.assertEqual(choice.keep_fraction, 0.15)
    self.assertEqual(choice.l2_reg, ridge.L2_REGS[3])
    self.assertEqual(choice.cv_accuracy, 0.9)
    # The probe's accuracy is the same at every penalty; a tie at its point goes to it.
    acc[1, :, 0] = 0.9
    _, _, choice = plus.choose(acc, learnings)
    self.assertEqual(choice.readout, "probe")
    self.assertIsNone(choice.l2_reg)
    self.assertEqual(
      choice.to_dict(), {"coef": 1e-4, "keep_fraction": 0.15, "readout": "probe", "l2_reg": None}
    )

  def test_choose_names_the_discriminant(self):
    learnings = plus.grid_learnings(_learning())
    acc = np.zeros((len(learnings), len(ridge.L2_REGS), len(plus.READOUTS)))
    acc[0, 2, plus.READOUTS.index("discriminant")] = 0.7
    point, l2_index, choice = plus.choose(acc, learnings)
    self.assertEqual((point, l2_index), (0, 2))
    self.assertEqual(choice.readout, "discriminant")
    self.assertEqual(choice.to_dict()["l2_reg"], ridge.L2_REGS[2])

  def test_cv_probe_column_is_head2toes_cv(self):
    feats, labels = _features()
    learning = _learning()
    prep, labels, _ = inputs.fit_inputs(feats, labels, learning, 3)
    learnings = plus.grid_learnings(learning)
    cv = plus.cross_validate(prep, labels, learnings, seed=3, num_classes=3)
    self.assertEqual(cv.accuracy.shape, (len(learnings), len(ridge.L2_REGS), len(plus.READOUTS)))
    probe = cv.accuracy[..., plus.READOUTS.index("probe")]
    np.testing.assert_array_equal(probe, np.broadcast_to(probe[:, :1], probe.shape))
    reference = head2toe.cross_validate(prep, labels, learnings, seed=3, num_classes=3).mean(axis=1)
    np.testing.assert_allclose(probe[:, 0], reference, atol=1e-9)
    # Ridge's column is its own: it moves with the penalty.
    self.assertGreater(np.ptp(cv.accuracy[..., plus.READOUTS.index("ridge")]), 0.0)

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

  def test_fit_chooses_the_discriminant_where_ridge_masks_classes(self):
    feats, labels = _ordered(n=303)  # not a multiple of the 5 folds: 3 examples are never validated
    learning = _learning()
    # Per-feature z-scores keep the classes on a line (unit vectors per tap would bend it).
    learning.feature_normalization = "per_feature"
    with absltest.mock.patch.object(plus, "READOUTS", ("ridge", "discriminant")):
      head = plus.fit(feats, labels, learning, seed=3, num_classes=5)
    choice = head.meta.extra["own_cv"]["chosen"]
    self.assertEqual(choice["readout"], "discriminant")
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

  def test_with_the_probe_readout_it_is_head2toe(self):
    feats, labels = _features()
    with absltest.mock.patch.object(plus, "READOUTS", ("probe",)):
      head = plus.fit(feats, labels, _learning(), seed=3, num_classes=3)
    choice = head.meta.extra["own_cv"]["chosen"]
    self.assertEqual((choice["readout"], choice["l2_reg"]), ("probe", None))
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
  def test_ridge_readout_is_ridge_on_the_kept_features(self, normalization):
    feats, labels = _features()
    learning = _learning()
    learning.feature_normalization = normalization
    with absltest.mock.patch.object(plus, "READOUTS", ("ridge",)):
      head = plus.fit(feats, labels, learning, seed=3, num_classes=3)
    choice = head.meta.extra["own_cv"]["chosen"]
    self.assertEqual(choice["readout"], "ridge")
    # The classes are separable by the planted features.
    self.assertGreater(head.meta.extra["own_cv"]["cv_accuracy"], 0.8)
    learning.feature_selection.keep_fraction = choice["keep_fraction"]
    learning.feature_selection.learning_config_overwrite.group_lrp_regularizer_coef = choice["coef"]
    probe_head = head2toe.fit(feats, labels, learning, seed=3, num_classes=3)
    # Ridge solved here from the kept features as the head reads them.
    xk = np.asarray(probe_head.transform(feats), np.float64)
    r = ridge.Solver(xk, labels, 3).params(choice["l2_reg"], dtype=np.float64)
    np.testing.assert_allclose(_logits(head, feats), xk @ r["w"] + r["b"], rtol=2e-4, atol=2e-4)
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
    self.assertIn(r["chosen_point"]["readout"], plus.READOUTS)
    self.assertEqual(head.meta.extra["own_cv"]["chosen"], r["chosen_point"])


if __name__ == "__main__":
  absltest.main()
