"""ViT-B/16: size, taps and their meaning, and numerical parity with an independent PyTorch ViT."""

from __future__ import annotations

import importlib.util
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from h2t import checkpoints
from h2t.models import common, vit

HAVE_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def _expected_tap_shapes(n: int, size: int) -> dict[str, tuple[int, ...]]:
  t = 1 + (size // 16) ** 2
  shapes = {"root_output_with_cls": (n, t, 768), "position_embedded_input": (n, t, 768)}
  for i in range(12):
    shapes.update(
      {
        f"encoder_{i}_pre_attn": (n, t, 768),
        f"encoder_{i}_attn": (n, t, 768),
        f"encoder_{i}_mlp_1": (n, t, 3072),
        f"encoder_{i}_mlp_2": (n, t, 768),
      }
    )
  shapes.update({"encoded_sequence": (n, t, 768), "cls_embedded": (n, 768), "pre_logits": (n, 768)})
  return shapes


class ViTArchitectureTest(absltest.TestCase):
  def test_vit_b16_parameter_count(self):
    shapes = jax.eval_shape(vit.ViT().init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    count = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(shapes["params"]))
    self.assertEqual(count, 86_567_656)

  def test_vit_b16_produces_every_tap_with_its_shape(self):
    module = vit.ViT()
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(module.init, jax.random.key(0), x)
    logits, taps = jax.eval_shape(module.apply, params, x)
    self.assertLen(vit.tap_names(), 53)
    self.assertEqual(set(taps), set(vit.tap_names()))
    self.assertEqual({k: v.shape for k, v in taps.items()}, _expected_tap_shapes(2, 224))
    self.assertEqual(logits.shape, (2, 1000))

  def test_tap_semantics(self):
    module = vit.ViT(patch=4, width=32, depth=2, heads=2, mlp_dim=64, num_classes=10)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    params = module.init(jax.random.key(0), x)
    logits, taps = module.apply(params, x)
    self.assertEqual(tuple(taps), vit.tap_names(2))
    p = params["params"]
    # Class token first, then position embeddings added to every token.
    np.testing.assert_array_equal(taps["root_output_with_cls"][:, 0], np.broadcast_to(p["cls"][0], (2, 32)))
    np.testing.assert_allclose(
      taps["position_embedded_input"],
      taps["root_output_with_cls"] + p["Transformer"]["posembed_input"]["pos_embedding"],
      rtol=1e-6,
    )
    # A block's input is the previous block's output.
    np.testing.assert_array_equal(taps["encoder_0_pre_attn"], taps["position_embedded_input"])
    np.testing.assert_array_equal(taps["encoder_1_pre_attn"], taps["encoder_0_mlp_2"])
    self.assertEqual(taps["encoder_1_mlp_1"].shape, (2, 17, 64))
    # The class token of the normalised sequence; no representation layer here.
    np.testing.assert_array_equal(taps["cls_embedded"], taps["encoded_sequence"][:, 0])
    np.testing.assert_array_equal(taps["pre_logits"], taps["cls_embedded"])
    self.assertEqual(logits.shape, (2, 10))

  def test_representation_layer_and_no_head(self):
    module = vit.ViT(patch=4, width=32, depth=1, heads=2, mlp_dim=64, num_classes=0, representation_size=24)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    params = module.init(jax.random.key(0), x)
    logits, taps = module.apply(params, x)
    self.assertNotIn("head", params["params"])
    self.assertEqual(logits.shape, (2, 0))
    self.assertEqual(taps["pre_logits"].shape, (2, 24))
    self.assertLessEqual(float(jnp.abs(taps["pre_logits"]).max()), 1.0)  # tanh
    self.assertEqual(vit.from_params(params["params"], gelu_approximate=False), module)

  def test_load_without_checkpoint_says_where_to_download(self):
    with self.assertRaisesRegex(checkpoints.CheckpointError, r"gs://vit_models/.*timm/vit_base_patch16_224"):
      vit.load(None)


def _hf_to_timm(state_dict, depth: int) -> dict:
  """transformers' ViT key names -> timm's (q/k/v fused into `qkv`)."""
  sd = {k: v.numpy() for k, v in state_dict.items()}
  out = {
    "cls_token": sd["vit.embeddings.cls_token"],
    "pos_embed": sd["vit.embeddings.position_embeddings"],
    "patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
    "patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
    "norm.weight": sd["vit.layernorm.weight"],
    "norm.bias": sd["vit.layernorm.bias"],
    "head.weight": sd["classifier.weight"],
    "head.bias": sd["classifier.bias"],
  }
  for i in range(depth):
    hf, tm = f"vit.layers.{i}.", f"blocks.{i}."
    for leaf in ("weight", "bias"):
      out[tm + f"attn.qkv.{leaf}"] = np.concatenate([sd[hf + f"attention.{p}_proj.{leaf}"] for p in "qkv"])
      out[tm + f"attn.proj.{leaf}"] = sd[hf + f"attention.o_proj.{leaf}"]
      out[tm + f"norm1.{leaf}"] = sd[hf + f"layernorm_before.{leaf}"]
      out[tm + f"norm2.{leaf}"] = sd[hf + f"layernorm_after.{leaf}"]
      out[tm + f"mlp.fc1.{leaf}"] = sd[hf + f"mlp.fc1.{leaf}"]
      out[tm + f"mlp.fc2.{leaf}"] = sd[hf + f"mlp.fc2.{leaf}"]
  return out


@absltest.skipUnless(HAVE_TORCH, "needs torch and transformers (the test extra)")
class ViTParityTest(absltest.TestCase):
  """The Flax ViT-B/16 against transformers' PyTorch ViT-B/16, through a timm-named safetensors file."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    import torch
    import transformers
    from safetensors.numpy import save_file

    torch.manual_seed(0)
    cls.size = 64  # 4x4 patches + class token: the full-width model, cheaply.
    config = transformers.ViTConfig(
      image_size=cls.size,
      patch_size=16,
      hidden_size=768,
      num_hidden_layers=12,
      num_attention_heads=12,
      intermediate_size=3072,
      num_labels=1000,
      layer_norm_eps=1e-6,  # timm's and Google's
      hidden_act="gelu",  # exact, as timm
    )
    model = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():  # zero-initialised tensors would hide mapping mistakes
      model.vit.embeddings.cls_token.normal_()
      model.vit.embeddings.position_embeddings.normal_(0.0, 0.5)
      for name, p in model.named_parameters():
        if "layernorm" in name:
          p.add_(0.2 * torch.randn_like(p))
    cls.tmp = tempfile.TemporaryDirectory()
    path = os.path.join(cls.tmp.name, "vit-random.safetensors")
    save_file(_hf_to_timm(model.state_dict(), 12), path)
    cls.loaded = vit.load(path)
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, 3, cls.size, cls.size)).astype(np.float32)
    with torch.no_grad():
      out = model(torch.from_numpy(x), output_hidden_states=True)
      encoded = model.vit(torch.from_numpy(x)).last_hidden_state.numpy()
    cls.ref_logits = out.logits.numpy()
    cls.ref_taps = {"position_embedded_input": out.hidden_states[0].numpy(), "encoded_sequence": encoded}
    for i in (0, 5, 11):
      cls.ref_taps[f"encoder_{i}_mlp_2"] = out.hidden_states[i + 1].numpy()
    cls.ref_taps["cls_embedded"] = encoded[:, 0]
    cls.logits, cls.taps = jax.jit(cls.loaded.module.apply)(
      {"params": cls.loaded.params}, x.transpose(0, 2, 3, 1)
    )

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_loaded_model_description(self):
    self.assertEqual(self.loaded.input_size, self.size)  # from the position-embedding grid
    self.assertEqual(self.loaded.normalization, common.MINUS_ONE_ONE)
    self.assertFalse(self.loaded.module.gelu_approximate)
    self.assertEqual(self.loaded.module.heads, 12)
    self.assertLen(self.loaded.tap_names, 53)
    self.assertRegex(self.loaded.checkpoint_id, r"^vit-random\.safetensors:[0-9a-f]{16}$")

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
