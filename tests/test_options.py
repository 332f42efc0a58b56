"""Reference options of #6 with their effects: output_head_type, fs_dataset, data_fraction, ..."""

import os
import tempfile

import jax
import numpy as np
from absl.testing import absltest

import configs.vtab as vtab_config
from h2t import head2toe, probe


def _toy(seed=0, n=200):
  """Two taps; tap 'b' carries the label in its first 3 features."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, n).astype(np.int32)
  a = rng.normal(size=(n, 30)).astype(np.float32)
  b = rng.normal(size=(n, 20)).astype(np.float32)
  b[:, :3] += 4.0 * np.eye(3, dtype=np.float32)[labels]
  return {"a": a, "b": b}, labels


def _learning(**overrides):
  learning = vtab_config.get_config().learning
  learning.training_steps = 60
  for k, v in overrides.items():
    node = learning
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return learning


class OutputHeadTypeTest(absltest.TestCase):
  def test_parse(self):
    self.assertEqual(probe.parse_output_head_type("nohidden", 5), (0, True))
    self.assertEqual(probe.parse_output_head_type("random_100", 5), (100, False))
    self.assertEqual(probe.parse_output_head_type("trainable_1000", 5), (1000, True))
    self.assertEqual(probe.parse_output_head_type("trainable_0", 5), (5, True))  # 0 -> classes
    with self.assertRaisesRegex(ValueError, "random_N"):
      probe.parse_output_head_type("hidden_100", 5)

  def test_unknown_type_fails_before_training(self):
    feats, labels = _toy()
    with self.assertRaisesRegex(ValueError, "output_head_type='random'"):
      head2toe.fit(feats, labels, _learning(output_head_type="random"), seed=0)

  def _fit(self, head_type, lr=0.1, selection="none"):
    feats, labels = _toy()
    learning = _learning(output_head_type=head_type, learning_rate=lr, **{"feature_selection.type": selection})
    return head2toe.fit(feats, labels, learning, seed=3), feats, labels

  def test_random_hidden_layer_stays_at_its_initialisation(self):
    start, _, _ = self._fit("random_16", lr=0.0)  # lr 0: the heads as initialised
    trained, feats, labels = self._fit("random_16")
    self.assertEqual(trained.params["hidden_w"].shape, (50, 16))
    self.assertEqual(trained.params["w"].shape, (16, 3))
    np.testing.assert_array_equal(trained.params["hidden_w"], start.params["hidden_w"])
    np.testing.assert_array_equal(trained.params["hidden_b"], start.params["hidden_b"])
    self.assertGreater(np.abs(trained.params["w"] - start.params["w"]).max(), 1e-2)
    # A frozen random ReLU layer of 16 units loses some of the signal (chance: 1/3).
    self.assertGreater((trained.predict(feats).argmax(-1) == labels).mean(), 0.7)

  def test_trainable_hidden_layer_is_trained(self):
    start, _, _ = self._fit("trainable_16", lr=0.0)
    trained, feats, labels = self._fit("trainable_16")
    self.assertGreater(np.abs(trained.params["hidden_w"] - start.params["hidden_w"]).max(), 1e-2)
    self.assertGreater((trained.predict(feats).argmax(-1) == labels).mean(), 0.9)

  def test_probe_train_freezes_random_layer(self):
    feats, labels = _toy()
    x = np.concatenate([feats["a"], feats["b"]], 1)
    spec = probe.TrainSpec(num_classes=3, training_steps=30, hidden_units=8, hidden_trainable=False)
    key = jax.random.key(0)
    params, _ = probe.train(x, labels, probe.HParams(learning_rate=0.1), key, spec=spec)
    start = probe.init_head(jax.random.split(key)[0], x.shape[1], spec)
    np.testing.assert_array_equal(params["hidden_w"], start["hidden_w"])
    self.assertFalse(np.allclose(params["w"], start["w"]))

  def test_selection_scores_rows_of_the_hidden_kernel(self):
    feats, labels = _toy()
    x = np.concatenate([feats["a"], feats["b"]], 1)
    spec = probe.TrainSpec(num_classes=3, training_steps=30, hidden_units=12)
    hp = probe.HParams(*[np.asarray([v], np.float32) for v in (0.1, 0.0, 0.0, 1e-3)])
    w, _ = probe.train_all_features(x, labels, np.arange(len(labels)), hp, jax.random.key(0), spec=spec)
    self.assertEqual(w.shape, (1, 50, 12))
    # Head2Toe with a trainable hidden layer still finds the informative tap.
    head, _, _ = self._fit("trainable_12", selection="connectivity_l2")
    self.assertIn("b", head.kept)
    self.assertGreaterEqual(len(head.kept["b"]), 3)

  def test_save_load_keeps_the_hidden_layer(self):
    trained, feats, _ = self._fit("random_16")
    with tempfile.TemporaryDirectory() as tmp:
      trained.save(os.path.join(tmp, "head.npz"))
      loaded = head2toe.Head.load(os.path.join(tmp, "head.npz"))
    np.testing.assert_allclose(loaded.predict(feats), trained.predict(feats), rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
