"""Reference options of #6 with their effects: output_head_type, fs_dataset, data_fraction, ..."""

import os
import tempfile

import jax
import numpy as np
from absl.testing import absltest

import configs.vtab as vtab_config
from h2t import backbones, data, evaluate, features, head2toe, predict, probe, stages
from tests import toy


class OutputHeadTypeTest(absltest.TestCase):
  def test_parse(self):
    self.assertEqual(probe.parse_output_head_type("nohidden", 5), (0, True))
    self.assertEqual(probe.parse_output_head_type("random_100", 5), (100, False))
    self.assertEqual(probe.parse_output_head_type("trainable_1000", 5), (1000, True))
    self.assertEqual(probe.parse_output_head_type("trainable_0", 5), (5, True))  # 0 -> classes
    with self.assertRaisesRegex(ValueError, "random_N"):
      probe.parse_output_head_type("hidden_100", 5)

  def test_unknown_type_fails_before_training(self):
    feats, labels = toy.two_taps()
    with self.assertRaisesRegex(ValueError, "output_head_type='random'"):
      head2toe.fit(feats, labels, toy.learning(output_head_type="random"), seed=0)

  def _fit(self, head_type, lr=0.1, selection="none"):
    feats, labels = toy.two_taps()
    learning = toy.learning(
      output_head_type=head_type, learning_rate=lr, **{"feature_selection.type": selection}
    )
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
    feats, labels = toy.two_taps()
    x = np.concatenate([feats["a"], feats["b"]], 1)
    spec = probe.TrainSpec(num_classes=3, training_steps=30, hidden_units=8, hidden_trainable=False)
    key = jax.random.key(0)
    params, _ = probe.train(x, labels, probe.HParams(learning_rate=0.1), key, spec=spec)
    start = probe.init_head(jax.random.split(key)[0], x.shape[1], spec)
    np.testing.assert_array_equal(params["hidden_w"], start["hidden_w"])
    self.assertFalse(np.allclose(params["w"], start["w"]))

  def test_selection_scores_rows_of_the_hidden_kernel(self):
    feats, labels = toy.two_taps()
    x = np.concatenate([feats["a"], feats["b"]], 1)
    spec = probe.TrainSpec(num_classes=3, training_steps=30, hidden_units=12)
    hp = probe.HParams(*[np.asarray([v], np.float32) for v in (0.1, 0.0, 0.0, 1e-3)])
    w, _ = stages.train_all_features(x, labels, np.arange(len(labels)), hp, jax.random.key(0), spec=spec)
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


def _two_tasks(n=200):
  """Task A's label lives in tap 'b', task B's in tap 'a' (same taps and widths)."""
  feats_a, labels_a = toy.two_taps(seed=1, n=n)
  rng = np.random.default_rng(2)
  labels_b = rng.integers(0, 4, n).astype(np.int32)
  feats_b = {
    "a": rng.normal(size=(n, 30)).astype(np.float32),
    "b": rng.normal(size=(n, 20)).astype(np.float32),
  }
  feats_b["a"][:, :4] += 4.0 * np.eye(4, dtype=np.float32)[labels_b]
  return (feats_a, labels_a), (feats_b, labels_b)


class FsDatasetTest(absltest.TestCase):
  def _fs_learning(self):
    return toy.learning(**{"feature_selection.keep_fraction": 0.08})  # 4 of 50 features

  def test_selects_on_the_other_task(self):
    (fa, la), (fb, lb) = _two_tasks()
    own = head2toe.fit(fa, la, self._fs_learning(), seed=0)
    self.assertEqual(list(own.kept), ["b"])  # its own signal
    src = head2toe.SelectionSource.from_features(fb, lb, name="task_b")
    other = head2toe.fit(fa, la, self._fs_learning(), seed=0, select_from=src)
    self.assertEqual(list(other.kept), ["a"])  # task B's signal
    np.testing.assert_array_equal(other.kept["a"], [0, 1, 2, 3])
    self.assertEqual(other.params["b"].shape, (3,))  # the head is task A's

  def test_cross_validation_selects_on_the_other_task(self):
    (fa, la), (fb, lb) = _two_tasks(n=250)
    learning = self._fs_learning()
    src = head2toe.SelectionSource.from_features(fb, lb)
    own = head2toe.cross_validate(head2toe.prepare(fa), la, [learning], seed=0, num_classes=3)
    other = head2toe.cross_validate(
      head2toe.prepare(fa), la, [learning], seed=0, num_classes=3, select_from=src
    )
    self.assertGreater(own.mean(), 0.9)
    self.assertLess(other.mean(), 0.6)  # task B's features say nothing about A's labels

  def test_mismatched_features_are_an_error(self):
    (fa, la), (fb, lb) = _two_tasks()
    src = head2toe.SelectionSource.from_features({"a": fb["a"]}, lb, name="task_b")
    with self.assertRaisesRegex(ValueError, "fs_dataset 'task_b'.*same backbone"):
      head2toe.fit(fa, la, self._fs_learning(), seed=0, select_from=src)

  def test_unknown_fs_dataset_is_named(self):
    from h2t import evaluate

    config = vtab_config.get_config()
    config.learning.feature_selection.fs_dataset = "cifar1000"
    with self.assertRaisesRegex(ValueError, "fs_dataset='cifar1000'.*cifar100"):
      evaluate.validate(config)


class DataFractionTest(absltest.TestCase):
  def test_training_subset_is_balanced_k_shot(self):
    _, labels = toy.two_taps(n=300)
    sub = head2toe.training_subset(np.arange(300), labels, toy.learning(data_fraction=0.03), 3)
    self.assertEqual(np.bincount(labels[sub]).tolist(), [10, 10, 10])  # k = int(1000 * 0.03 / 3)
    everything = head2toe.training_subset(np.arange(300), labels, toy.learning(), 3)
    np.testing.assert_array_equal(everything, np.arange(300))

  def test_fit_reads_only_the_subset(self):
    feats, labels = toy.two_taps(n=300)
    learning = toy.learning(data_fraction=0.03)
    sub = head2toe.training_subset(np.arange(300), labels, learning, 3)
    outside = np.setdiff1d(np.arange(300), sub)
    noisy = {t: v.copy() for t, v in feats.items()}
    for v in noisy.values():
      v[outside] = 100.0
    a = head2toe.fit(feats, labels, learning, seed=0)
    b = head2toe.fit(noisy, labels, learning, seed=0)
    np.testing.assert_array_equal(a.params["w"], b.params["w"])
    full = head2toe.fit(feats, labels, toy.learning(), seed=0)  # data_fraction 1 reads every example
    full_noisy = head2toe.fit(noisy, labels, toy.learning(), seed=0)
    self.assertFalse(np.array_equal(full.params["w"], full_noisy.params["w"]))

  def test_cross_validation_subsets_each_fold(self):
    labels = np.random.default_rng(5).integers(0, 3, 250).astype(np.int32)
    labels[:50] = 0  # fold 0's validation block is all class 0: fold subsets differ in size
    feats, _ = toy.two_taps(n=250, labels=labels)
    learning = toy.learning(data_fraction=0.06)  # k = 20 per class
    acc = head2toe.cross_validate(head2toe.prepare(feats), labels, [learning], seed=0, num_classes=3)
    self.assertEqual(acc.shape, (1, 5))
    self.assertGreater(acc.mean(), 0.7)  # 60 training examples per fold; chance is 1/3
    noisy = {t: v.copy() for t, v in feats.items()}
    sub0 = head2toe.training_subset(np.arange(50, 250), labels, learning, 3)
    unused = np.setdiff1d(np.arange(50, 250), sub0)  # fold 0 never reads these in training
    for v in noisy.values():
      v[unused] = 100.0
    again = head2toe.cross_validate(head2toe.prepare(noisy), labels, [learning], seed=0, num_classes=3)
    self.assertEqual(acc[0, 0], again[0, 0])

  def test_bad_fraction(self):
    from h2t import evaluate

    config = vtab_config.get_config()
    config.learning.data_fraction = 0.0
    with self.assertRaisesRegex(ValueError, r"data_fraction=0.0: expected a value > 0.0 and <= 1.0"):
      evaluate.validate(config)


def _fast_config(workdir_cache, **overrides):
  """The offline default, small: EfficientNet-Lite0 at 32 px, 20 steps, a 2-point grid."""
  config = vtab_config.get_config()
  config.backbone.input_size = 32
  config.backbone.additional_features_target_size = 64
  config.learning.training_steps = 20
  config.sweep = "learning.feature_selection.keep_fraction=0.05,0.1"
  config.cache_dir = workdir_cache
  return toy.override(config, **overrides)


class MultiTargetSizesTest(absltest.TestCase):
  def test_tap_names(self):
    self.assertEqual(features.split_tap("block3_output@4096"), ("block3_output", 4096))
    self.assertEqual(features.split_tap("pre_logits"), ("pre_logits", None))
    with self.assertRaisesRegex(ValueError, "integer size"):
      features.split_tap("block3_output@big")
    # Size by size, as the reference concatenates them.
    self.assertEqual(features.sized_taps(["a", "b"], [16, 64]), ("a@16", "b@16", "a@64", "b@64"))

  def test_each_sized_tap_is_pooled_at_its_size(self):
    backbone = backbones.create("efficientnet_lite0", input_size=64)
    x = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3)).astype(np.uint8)
    both = features.extract(backbone, x, taps=["block3_output@160", "block3_output@640"], target_size=0)
    for size in (160, 640):
      alone = features.extract(backbone, x, taps=["block3_output"], target_size=size)["block3_output"]
      np.testing.assert_allclose(both[f"block3_output@{size}"], alone, rtol=1e-5, atol=1e-5)
    self.assertEqual(both["block3_output@160"].shape, (3, 160))  # 8x8x40 -> 2x2x40
    self.assertEqual(both["block3_output@640"].shape, (3, 640))  # -> 4x4x40

  def test_run_uses_every_size(self):
    with tempfile.TemporaryDirectory() as tmp:
      config = _fast_config(
        os.path.join(tmp, "cache"),
        **{
          "backbone.additional_features_multi_target_sizes": "16,64",
          "backbone.additional_features": "block5_output",
        },
      )
      r = evaluate.run(config, tmp)
      self.assertEqual(r["taps"], ["block5_output@16", "pre_logits@16", "block5_output@64", "pre_logits@64"])
      self.assertEqual(r["tap_sizes"]["block5_output@16"], 80)  # c = 80 >= 16: global pooling
      self.assertEqual(r["methods"]["linear"]["num_kept"], 1280)  # pre_logits once
      head = head2toe.Head.load(os.path.join(tmp, "head_head2toe.npz"))
      self.assertTrue(set(head.kept) <= set(r["taps"]))
      self.assertGreater(r["methods"]["head2toe"]["test_accuracy"], 0.3)  # chance 0.1

  def test_bad_sizes(self):
    config = vtab_config.get_config()
    config.backbone.additional_features_multi_target_sizes = "1024,big"
    with self.assertRaisesRegex(ValueError, "multi_target_sizes='1024,big': expected positive integers"):
      evaluate.validate(config)


class SeveralBackbonesTest(absltest.TestCase):
  def test_members_taps_are_prefixed_and_equal_the_single_backbone(self):
    pair = backbones.create("efficientnet_lite0+efficientnet_lite0", input_size=32)
    self.assertLen(pair.tap_names, 2 * len(backbones.create("efficientnet_lite0", input_size=32).tap_names))
    self.assertEqual(pair.tap_names[0], "efficientnet_lite0_0/stem")
    self.assertIn("efficientnet_lite0_1/pre_logits", pair.tap_names)
    single = backbones.create("efficientnet_lite0", input_size=32)
    x = np.random.default_rng(1).integers(0, 256, (2, 48, 48, 3)).astype(np.uint8)
    got = features.extract(pair, x, taps=["efficientnet_lite0_1/pre_logits"], target_size=64)
    want = features.extract(single, x, taps=["pre_logits"], target_size=64)
    np.testing.assert_allclose(got["efficientnet_lite0_1/pre_logits"], want["pre_logits"], atol=1e-5)

  def test_errors_name_the_problem(self):
    with self.assertRaisesRegex(ValueError, "unknown backbone 'resnet18' in 'resnet50\\+resnet18'"):
      backbones.create("resnet50+resnet18")
    with self.assertRaisesRegex(ValueError, "2 members but 3 checkpoints"):
      backbones.create("efficientnet_lite0+efficientnet_lite0", "a,b,c")
    config = vtab_config.get_config()
    config.backbone.name = "efficientnet_lite0+efficientnet_lite0"
    config.methods = ("head2toe", "finetune")
    with self.assertRaisesRegex(ValueError, "'finetune', which fine-tunes one backbone"):
      evaluate.validate(config)

  def test_run_and_predict(self):
    with tempfile.TemporaryDirectory() as tmp:
      config = _fast_config(
        os.path.join(tmp, "cache"), **{"backbone.name": "efficientnet_lite0+efficientnet_lite0"}
      )
      r = evaluate.run(config, tmp)
      self.assertEqual(
        r["num_features"],
        2 * sum(v for t, v in r["tap_sizes"].items() if t.startswith("efficientnet_lite0_0/")),
      )
      self.assertEqual(r["methods"]["linear"]["num_kept"], 2 * 1280)  # both members' pre_logits
      # The saved head rebuilds the pair from its meta and classifies the test images as the run did.
      head = head2toe.Head.load(os.path.join(tmp, "head_head2toe.npz"))
      task = data.get_task("digits")
      images, labels = task.arrays("test", image_size=32)
      pred, _ = predict.predict_images(head, images)
      self.assertAlmostEqual(
        float((pred == labels).mean()), r["methods"]["head2toe"]["test_accuracy"], places=6
      )


if __name__ == "__main__":
  absltest.main()
