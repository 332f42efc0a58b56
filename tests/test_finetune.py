"""Full fine-tuning of the packaged EfficientNet-Lite0 on a few digits, at 32 px.

One compiled training step serves every test that trains the backbone (same
backbone object, image count, batch size and class count); its compilation
dominates this file's time.
"""

import numpy as np
from absl.testing import absltest
from flax import traverse_util
from sklearn.datasets import load_digits

import configs.vtab as vtab_config
from h2t import backbones, finetune
from h2t.data import base

STEPS = 12
BACKBONE = None


def _backbone():
  global BACKBONE
  if BACKBONE is None:  # one object: jit caches by backbone identity
    BACKBONE = backbones.create("efficientnet_lite0", input_size=32)
  return BACKBONE


def _digits(n=48, classes=4):
  """`n` grey 8x8 digits of the first `classes` classes, as uint8 pixels in [0, 255]."""
  d = load_digits()
  keep = d.target < classes
  return (d.images[keep][:n] * (255 / 16)).astype(np.uint8), d.target[keep][:n].astype(np.int32)


def _learning(**overrides):
  learning = vtab_config.get_config().learning
  learning.training_steps = STEPS
  learning.train_batch_size = 16
  learning.learning_rate = 1e-3  # 3e-3 already wrecks the pretrained features here
  learning.finetune_lr_multiplier = 1.0
  learning.finetune_steps_multiplier = 1.0
  learning.update(overrides)
  return learning


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


class FinetuneTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.backbone = _backbone()
    cls.before = _flat(cls.backbone.params)
    cls.images, cls.labels = _digits()
    cls.params, cls.head, cls.losses = finetune.fit(
      cls.backbone, cls.images, cls.labels, _learning(), seed=0, num_classes=4
    )

  def test_loss_goes_down_and_fits_the_training_set(self):
    self.assertEqual(self.losses.shape, (STEPS,))
    self.assertAlmostEqual(float(self.losses[0]), np.log(4), delta=0.05)  # unit features, small head
    self.assertLess(self.losses[-4:].mean(), self.losses[:4].mean() - 0.04)
    acc = finetune.evaluate(self.backbone, self.params, self.head, [(self.images, self.labels)])
    self.assertGreater(acc, 0.6)  # chance is 0.25

  def test_backbone_changes_but_batchnorm_statistics_do_not(self):
    after = _flat(self.params)
    self.assertEqual(set(after), set(self.before))
    stats = [k for k in after if k.rsplit("/", 1)[1] in finetune.BN_STATISTICS]
    self.assertLen(stats, 2 * 49)  # 49 BatchNorms in EfficientNet-Lite0
    for k in stats:
      np.testing.assert_array_equal(after[k], self.before[k], err_msg=k)
    changed = [k for k in after if not np.array_equal(after[k], self.before[k])]
    self.assertIn("_conv_stem/kernel", changed)
    self.assertIn("_blocks_0/_bn1/weight", changed)  # BatchNorm scale and shift do train
    self.assertGreater(len(changed), 100)
    self.assertEqual(self.head["w"].shape, (1280, 4))

  def test_input_backbone_is_left_intact(self):
    # The step donates its buffers; the caller's backbone must survive that.
    for k, v in _flat(self.backbone.params).items():
      np.testing.assert_array_equal(v, self.before[k], err_msg=k)

  def test_lr_multiplier_scales_the_learning_rate(self):
    _, _, losses = finetune.fit(
      self.backbone,
      self.images,
      self.labels,
      _learning(learning_rate=1e-2, finetune_lr_multiplier=0.1),
      seed=0,
      num_classes=4,
    )
    np.testing.assert_allclose(losses, self.losses, rtol=1e-5)

  def test_steps_multiplier_scales_the_step_count(self):
    _, _, losses = finetune.fit(
      self.backbone, self.images, self.labels, _learning(finetune_steps_multiplier=2.0), seed=0, num_classes=4
    )
    self.assertEqual(losses.shape, (2 * STEPS,))

  def test_head_only_leaves_the_backbone_untouched_and_ignores_multipliers(self):
    params, head, losses = finetune.fit(
      self.backbone,
      self.images,
      self.labels,
      _learning(learning_rate=1e-2, finetune_steps_multiplier=2.0, finetune_lr_multiplier=100.0),
      seed=0,
      num_classes=4,
      train_backbone=False,
    )
    self.assertEqual(losses.shape, (STEPS,))
    for k, v in _flat(params).items():
      np.testing.assert_array_equal(v, self.before[k], err_msg=k)
    self.assertLess(losses[-4:].mean(), losses[:4].mean() - 0.1)  # the head does learn

  def test_evaluate_streams_a_task_with_a_short_last_batch(self):
    task = base.array_task("digits4", 4, {"test": (self.images, self.labels)})
    logits = finetune.predict(
      self.backbone, self.params, self.head, self.images, finetune.StepSpec(tap="pre_logits")
    )
    expected = float((np.asarray(logits).argmax(-1) == self.labels).mean())
    # 48 images in batches of 20: the last batch of 8 is padded and its padding ignored.
    got = finetune.evaluate(self.backbone, self.params, self.head, task, split="test", batch_size=20)
    self.assertAlmostEqual(got, expected, places=6)


class FinetuneSettingsTest(absltest.TestCase):
  def test_finetune_learning_multiplies_lr_and_steps(self):
    learning = _learning(
      learning_rate=0.01, training_steps=500, finetune_lr_multiplier=0.5, finetune_steps_multiplier=1.5
    )
    out = finetune.finetune_learning(learning)
    self.assertAlmostEqual(out.learning_rate, 0.005)
    self.assertEqual(out.training_steps, 750)
    self.assertEqual(learning.training_steps, 500)  # a copy

  def test_finetune_learning_rejects_zero_steps(self):
    with self.assertRaisesRegex(ValueError, "no step"):
      finetune.finetune_learning(_learning(training_steps=10, finetune_steps_multiplier=0.01))

  def test_is_trainable(self):
    self.assertFalse(finetune.is_trainable("_blocks_3/_bn1/mean"))
    self.assertFalse(finetune.is_trainable("layer1_0/bn2/var"))
    self.assertTrue(finetune.is_trainable("_blocks_3/_bn1/weight"))
    self.assertTrue(finetune.is_trainable("_conv_stem/kernel"))
    self.assertFalse(finetune.is_trainable("_conv_stem/kernel", train_backbone=False))

  def test_per_feature_normalization_is_refused(self):
    images, labels = _digits(8)
    with self.assertRaisesRegex(ValueError, "per_feature"):
      finetune.fit(
        _backbone(), images, labels, _learning(feature_normalization="per_feature"), seed=0, num_classes=4
      )

  def test_spatial_tap_is_refused(self):
    images, labels = _digits(8)
    with self.assertRaisesRegex(ValueError, "pooled"):
      finetune.fit(_backbone(), images, labels, _learning(), seed=0, num_classes=4, tap="head")
    with self.assertRaisesRegex(ValueError, "not a tap"):
      finetune.fit(_backbone(), images, labels, _learning(), seed=0, num_classes=4, tap="nope")


if __name__ == "__main__":
  absltest.main()
