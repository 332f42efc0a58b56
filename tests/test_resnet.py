"""ResNet-50: size, taps, and numerical parity with an independent PyTorch ResNet-50."""

from __future__ import annotations

import importlib.util
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from h2t import checkpoints
from h2t.models import common, resnet

HAVE_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def _learnable_count(params) -> int:
  # BatchNorm statistics are parameters here but buffers in PyTorch's count.
  flat = checkpoints.flatten(params)
  return sum(int(np.prod(v.shape)) for k, v in flat.items() if k.rsplit("/", 1)[-1] not in ("mean", "var"))


def _expected_tap_shapes(n: int, size: int) -> dict[str, tuple[int, ...]]:
  """Shapes of ResNet-50's taps, derived from the architecture by hand."""
  s = size // 4
  shapes = {"after_root": (n, s, s, 64)}
  in_ch, in_s = 64, s
  for i, units in enumerate(resnet.RESNET50_STAGE_SIZES, start=1):
    width, out_s = 64 * 2 ** (i - 1), s // 2 ** (i - 1)
    for k in range(1, units + 1):
      shapes[f"block{i}_unit{k}_layer0"] = (n, in_s, in_s, in_ch)
      shapes[f"block{i}_unit{k}_layer1"] = (n, in_s, in_s, width)
      shapes[f"block{i}_unit{k}_layer2"] = (n, out_s, out_s, width)
      in_ch, in_s = 4 * width, out_s
  shapes["pre_logits_pre_pooling"] = (n, size // 32, size // 32, 2048)
  shapes["pre_logits"] = (n, 2048)
  shapes["logits"] = (n, 1000)
  return shapes


class ResNetArchitectureTest(absltest.TestCase):
  def test_resnet50_parameter_count(self):
    shapes = jax.eval_shape(resnet.ResNet().init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    self.assertEqual(_learnable_count(shapes["params"]), 25_557_032)

  def test_resnet50_produces_every_tap_with_its_shape(self):
    module = resnet.ResNet()
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(module.init, jax.random.key(0), x)
    logits, taps = jax.eval_shape(module.apply, params, x)
    names = resnet.tap_names()
    self.assertLen(names, 52)
    self.assertEqual(set(taps), set(names))
    self.assertEqual({k: v.shape for k, v in taps.items()}, _expected_tap_shapes(2, 224))
    self.assertEqual(logits.shape, (2, 1000))

  def test_tiny_resnet_taps_follow_the_network(self):
    module = resnet.ResNet(stage_sizes=(1, 2, 1, 1), width=8, num_classes=10)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    params = module.init(jax.random.key(0), x)
    logits, taps = module.apply(params, x)
    self.assertEqual(tuple(taps), resnet.tap_names((1, 2, 1, 1)))
    self.assertEqual(logits.shape, (2, 10))
    np.testing.assert_array_equal(taps["block1_unit1_layer0"], taps["after_root"])
    np.testing.assert_array_equal(taps["logits"], logits)
    # A post-ReLU tap is non-negative; pre_logits is the mean of the last map.
    self.assertGreaterEqual(float(taps["block2_unit2_layer1"].min()), 0.0)
    np.testing.assert_allclose(
      taps["pre_logits"], taps["pre_logits_pre_pooling"].mean(axis=(1, 2)), rtol=1e-6
    )

  def test_from_params_infers_the_architecture(self):
    module = resnet.ResNet(stage_sizes=(1, 2, 1, 1), width=8, num_classes=10)
    params = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    self.assertEqual(resnet.from_params(params), module)

  def test_load_without_checkpoint_says_where_to_download(self):
    with self.assertRaisesRegex(checkpoints.CheckpointError, r"download\.pytorch\.org.*timm/resnet50"):
      resnet.load(None)


def _hf_to_torchvision(state_dict) -> dict:
  """transformers' ResNet key names -> torchvision's (same tensors)."""
  out = {}
  for key, value in state_dict.items():
    parts = key.split(".")
    if key.startswith("resnet.embedder.embedder."):
      name = {"convolution": "conv1", "normalization": "bn1"}[parts[3]] + "." + parts[4]
    elif key.startswith("resnet.encoder.stages."):
      stage, unit = int(parts[3]), int(parts[5])
      prefix = f"layer{stage + 1}.{unit}"
      if parts[6] == "shortcut":
        name = f"{prefix}.downsample.{0 if parts[7] == 'convolution' else 1}.{parts[8]}"
      else:  # layer.{j}.convolution|normalization
        j = int(parts[7]) + 1
        name = f"{prefix}.{'conv' if parts[8] == 'convolution' else 'bn'}{j}.{parts[9]}"
    elif key.startswith("classifier.1."):
      name = "fc." + parts[2]
    else:
      raise KeyError(key)
    out[name] = value
  return out


@absltest.skipUnless(HAVE_TORCH, "needs torch and transformers (the test extra)")
class ResNetParityTest(absltest.TestCase):
  """The Flax ResNet-50 against transformers' PyTorch ResNet-50 (torchvision's v1.5 layout)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.ResNetConfig(
      num_labels=1000,
      embedding_size=64,
      hidden_sizes=[256, 512, 1024, 2048],
      depths=[3, 4, 6, 3],
      layer_type="bottleneck",
      downsample_in_bottleneck=False,  # stride on the 3x3: v1.5
      downsample_in_first_stage=False,
    )
    model = transformers.ResNetForImageClassification(config).eval()
    # Fresh BatchNorm is the identity; random statistics make the test see them.
    with torch.no_grad():
      for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
          m.weight.uniform_(0.5, 1.5)
          m.bias.normal_(0.0, 0.2)
          m.running_mean.normal_(0.0, 0.2)
          m.running_var.uniform_(0.5, 1.5)
    cls.tmp = tempfile.TemporaryDirectory()
    path = os.path.join(cls.tmp.name, "resnet50-random.pth")
    torch.save(_hf_to_torchvision(model.state_dict()), path)
    cls.size = 64
    cls.loaded = resnet.load(path, input_size=cls.size)
    x = np.random.default_rng(0).normal(size=(2, 3, cls.size, cls.size)).astype(np.float32)
    with torch.no_grad():
      out = model(torch.from_numpy(x), output_hidden_states=True)
    cls.ref_logits = out.logits.numpy()
    hidden = [h.numpy().transpose(0, 2, 3, 1) for h in out.hidden_states]
    cls.ref_taps = {
      "after_root": hidden[0],
      "block2_unit1_layer0": hidden[1],
      "block3_unit1_layer0": hidden[2],
      "block4_unit1_layer0": hidden[3],
      "pre_logits_pre_pooling": hidden[4],
      "pre_logits": hidden[4].mean(axis=(1, 2)),
    }
    cls.logits, cls.taps = jax.jit(cls.loaded.module.apply)(
      {"params": cls.loaded.params}, x.transpose(0, 2, 3, 1)
    )

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_loaded_model_description(self):
    self.assertEqual(self.loaded.input_size, self.size)
    self.assertEqual(self.loaded.normalization, common.IMAGENET)
    self.assertLen(self.loaded.tap_names, 52)
    self.assertRegex(self.loaded.checkpoint_id, r"^resnet50-random\.pth:[0-9a-f]{16}$")

  def test_logits_match(self):
    scale = np.abs(self.ref_logits).max()
    err = np.abs(np.asarray(self.logits) - self.ref_logits).max() / scale
    self.assertLess(err, 1e-4)

  def test_intermediate_taps_match(self):
    for name, ref in self.ref_taps.items():
      with self.subTest(name):
        got = np.asarray(self.taps[name])
        self.assertEqual(got.shape, ref.shape)
        self.assertLess(np.abs(got - ref).max() / np.abs(ref).max(), 1e-4)


if __name__ == "__main__":
  absltest.main()
