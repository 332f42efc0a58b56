"""Every real checkpoint format of ResNet-50 and ViT-B/16, written for a tiny model and loaded back.

The writers below produce what the published files hold (the inverse of the
converters, written independently of them): the vision_transformer npz, the
big_vision npz (scanned or not), timm's ViT state dict, torchvision's / timm's
ResNet state dict.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from safetensors.numpy import save_file

from h2t import checkpoints
from h2t.checkpoints import google_vit
from h2t.models import resnet, vit
from tests import toy

TINY_VIT = dict(patch=4, width=128, depth=2, heads=2, mlp_dim=256)  # head width 64, as timm's
TINY_VIT_SIZE = 16
TINY_RESNET = dict(stage_sizes=(1, 2, 1, 1), width=8, num_classes=10)
TINY_RESNET_SIZE = 32


def _random_params(module, size: int, seed: int = 0) -> dict:
  """Parameters of `module` with every entry random (BatchNorm variances positive)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
  rng = np.random.default_rng(seed)
  flat = {}
  for key, s in checkpoints.flatten(shapes).items():
    value = rng.normal(size=s.shape).astype(np.float32)
    flat[key] = np.abs(value) + 0.5 if key.endswith("/var") else value
  return checkpoints.unflatten(flat)


def _write_vision_transformer_npz(params, path: str) -> None:
  np.savez(path, **checkpoints.flatten(params))


def _write_big_vision_npz(params, path: str, *, scanned: bool) -> None:
  renumber = {
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "LayerNorm_2": "LayerNorm_1",
  }
  renumber["MlpBlock_3"] = "MlpBlock_0"
  out, blocks = {}, {}
  for key, value in checkpoints.flatten(params).items():
    if key == google_vit.POSEMB:
      # big_vision adds position embeddings before prepending the class token.
      assert not value[:, 0].any()
      out["params/pos_embedding"] = value[:, 1:]
    elif m := re.fullmatch(r"Transformer/encoderblock_(\d+)/([^/]+)/(.+)", key):
      i, module, rest = m.groups()
      blocks.setdefault(f"{renumber.get(module, module)}/{rest}", {})[int(i)] = value
    else:
      out[f"params/{key}"] = value
  for name, layers in blocks.items():
    if scanned:
      out[f"params/Transformer/encoderblock/{name}"] = np.stack([layers[i] for i in sorted(layers)])
    else:
      out.update({f"params/Transformer/encoderblock_{i}/{name}": v for i, v in layers.items()})
  out["opt/state/mu/head/bias"] = np.zeros(3, np.float32)  # training checkpoints carry optimizer state
  np.savez(path, **out)


def _timm_vit_state_dict(params) -> dict[str, np.ndarray]:
  p = params
  d = p["embedding"]["kernel"].shape[-1]
  out = {
    "cls_token": p["cls"],
    "pos_embed": p["Transformer"]["posembed_input"]["pos_embedding"],
    "patch_embed.proj.weight": p["embedding"]["kernel"].transpose(3, 2, 0, 1),
    "patch_embed.proj.bias": p["embedding"]["bias"],
    "norm.weight": p["Transformer"]["encoder_norm"]["scale"],
    "norm.bias": p["Transformer"]["encoder_norm"]["bias"],
  }
  if "head" in p:
    out["head.weight"] = p["head"]["kernel"].T
    out["head.bias"] = p["head"]["bias"]
  i = 0
  while (b := p["Transformer"].get(f"encoderblock_{i}")) is not None:
    mha = b["MultiHeadDotProductAttention_1"]
    t = f"blocks.{i}."
    out[t + "attn.qkv.weight"] = np.concatenate(
      [mha[n]["kernel"].reshape(d, d).T for n in ("query", "key", "value")]
    )
    out[t + "attn.qkv.bias"] = np.concatenate([mha[n]["bias"].reshape(d) for n in ("query", "key", "value")])
    out[t + "attn.proj.weight"] = mha["out"]["kernel"].reshape(d, d).T
    out[t + "attn.proj.bias"] = mha["out"]["bias"]
    for norm, flax_name in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
      out[t + f"{norm}.weight"] = b[flax_name]["scale"]
      out[t + f"{norm}.bias"] = b[flax_name]["bias"]
    for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
      out[t + f"mlp.{fc}.weight"] = b["MlpBlock_3"][dense]["kernel"].T
      out[t + f"mlp.{fc}.bias"] = b["MlpBlock_3"][dense]["bias"]
    i += 1
  return out


def _torchvision_resnet_state_dict(params) -> dict[str, np.ndarray]:
  out = {}
  for key, value in checkpoints.flatten(params).items():
    *module, leaf = key.split("/")
    if leaf == "kernel":
      leaf, value = "weight", (value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T)
    leaf = {"mean": "running_mean", "var": "running_var"}.get(leaf, leaf)
    out[".".join(module + [leaf])] = value
    if leaf == "running_var":
      out[".".join(module + ["num_batches_tracked"])] = np.array(100, np.int64)
  return out


def _write_safetensors(state_dict, path: str) -> None:
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path)


def _assert_trees_equal(test, got, want) -> None:
  got, want = checkpoints.flatten(got), checkpoints.flatten(want)
  test.assertEqual(sorted(got), sorted(want))
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


class CheckpointTestCase(toy.TempDirTestCase):
  """Tests with a temporary folder."""


class ViTRoundTripTest(CheckpointTestCase):
  def _tiny_params(self, **kw):
    module = vit.ViT(**{**TINY_VIT, "num_classes": 10, **kw})
    params = _random_params(module, TINY_VIT_SIZE)
    # big_vision has no position embedding for the class token: zero there.
    params["Transformer"]["posembed_input"]["pos_embedding"][:, 0] = 0.0
    return module, params

  @parameterized.named_parameters(
    ("vision_transformer_npz", "vit.npz", lambda p, f: _write_vision_transformer_npz(p, f), True),
    ("big_vision_npz_scanned", "bv.npz", lambda p, f: _write_big_vision_npz(p, f, scanned=True), True),
    ("big_vision_npz", "bv.npz", lambda p, f: _write_big_vision_npz(p, f, scanned=False), True),
    (
      "timm_safetensors",
      "model.safetensors",
      lambda p, f: _write_safetensors(_timm_vit_state_dict(p), f),
      False,
    ),
  )
  def test_loads_back_identical_parameters(self, filename, write, google):
    module, params = self._tiny_params()
    write(params, self.path(filename))
    loaded = vit.load(self.path(filename))
    self.assertEqual(loaded.module, module.clone(gelu_approximate=google))
    self.assertEqual(loaded.input_size, TINY_VIT_SIZE)
    _assert_trees_equal(self, loaded.params, params)
    logits, taps = loaded.module.apply({"params": loaded.params}, jnp.zeros((1, 16, 16, 3)))
    self.assertEqual(set(taps), set(loaded.tap_names))
    self.assertEqual(logits.shape, (1, 10))

  def test_original_imagenet21k_layout_with_representation_layer(self):
    module, params = self._tiny_params(representation_size=32, num_classes=21)
    _write_vision_transformer_npz(params, self.path("ViT-B_16.npz"))
    loaded = vit.load(self.path("ViT-B_16.npz"))
    self.assertEqual(loaded.module, module.clone(gelu_approximate=True))
    _assert_trees_equal(self, loaded.params, params)

  def test_timm_file_without_head(self):
    module, params = self._tiny_params(num_classes=0)
    _write_safetensors(_timm_vit_state_dict(params), self.path("orig_in21k.safetensors"))
    loaded = vit.load(self.path("orig_in21k.safetensors"))
    self.assertEqual(loaded.module.num_classes, 0)
    _assert_trees_equal(self, loaded.params, params)

  def test_other_input_size_resamples_position_embeddings(self):
    _, params = self._tiny_params()
    posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
    # A grid that is linear in the row index stays linear when resampled.
    posemb[0, 1:] = np.repeat(np.arange(4.0), 4)[:, None] * np.ones(128)
    _write_vision_transformer_npz(params, self.path("vit.npz"))
    loaded = vit.load(self.path("vit.npz"), input_size=32)
    self.assertEqual(loaded.input_size, 32)
    new = loaded.params["Transformer"]["posembed_input"]["pos_embedding"]
    self.assertEqual(new.shape, (1, 1 + 8 * 8, 128))
    np.testing.assert_array_equal(new[:, 0], posemb[:, 0])  # class token kept
    rows = new[0, 1:, 0].reshape(8, 8)
    np.testing.assert_allclose(rows, np.repeat(rows[:, :1], 8, axis=1))  # constant along a row
    np.testing.assert_allclose(np.diff(rows[1:-1, 0]), 0.5, rtol=1e-5)  # half a cell per new row
    _, taps = loaded.module.apply({"params": loaded.params}, jnp.zeros((1, 32, 32, 3)))
    self.assertEqual(taps["encoded_sequence"].shape, (1, 65, 128))

  def test_input_size_must_be_a_multiple_of_the_patch(self):
    _, params = self._tiny_params()
    _write_vision_transformer_npz(params, self.path("vit.npz"))
    with self.assertRaisesRegex(checkpoints.CheckpointError, "multiple of the patch size 4"):
      vit.load(self.path("vit.npz"), input_size=30)


class ResNetRoundTripTest(CheckpointTestCase):
  def test_torchvision_and_timm_safetensors_load_back(self):
    module = resnet.ResNet(**TINY_RESNET)
    params = _random_params(module, TINY_RESNET_SIZE)
    _write_safetensors(_torchvision_resnet_state_dict(params), self.path("model.safetensors"))
    loaded = resnet.load(self.path("model.safetensors"), input_size=TINY_RESNET_SIZE)
    self.assertEqual(loaded.module, module)
    self.assertEqual(loaded.tap_names, resnet.tap_names(TINY_RESNET["stage_sizes"]))
    _assert_trees_equal(self, loaded.params, params)


def _message(fn) -> str:
  try:
    fn()
  except checkpoints.CheckpointError as e:
    return str(e)
  raise AssertionError("no CheckpointError raised")


class StrictLoadingTest(CheckpointTestCase):
  """A damaged file fails with a message that names every damaged parameter."""

  def _resnet_file(self, edit) -> str:
    params = _random_params(resnet.ResNet(**TINY_RESNET), TINY_RESNET_SIZE)
    sd = _torchvision_resnet_state_dict(params)
    edit(sd)
    _write_safetensors(sd, self.path("model.safetensors"))
    return self.path("model.safetensors")

  def test_resnet_renamed_missing_and_misshaped(self):
    def edit(sd):
      sd["layer1.0.conv_2.weight"] = sd.pop("layer1.0.conv2.weight")
      del sd["layer2.0.bn1.running_var"]
      sd["layer3.0.conv1.weight"] = sd["layer3.0.conv1.weight"][:, :-1]

    msg = _message(lambda: resnet.load(self._resnet_file(edit), input_size=TINY_RESNET_SIZE))
    self.assertIn("missing (2)", msg)
    self.assertIn("layer1/0/conv2/kernel", msg)
    self.assertIn("layer2/0/bn1/var", msg)
    self.assertIn("unexpected (1): layer1/0/conv_2/kernel", msg)
    self.assertNotIn("\n", msg)  # one line on the terminal
    self.assertRegex(msg, r"layer3/0/conv1/kernel: checkpoint \(1, 1, 63, 32\), model \(1, 1, 64, 32\)")

  def test_vit_npz_renamed_missing_and_misshaped(self):
    params = _random_params(vit.ViT(**TINY_VIT, num_classes=10), TINY_VIT_SIZE)
    flat = checkpoints.flatten(params)
    flat["Transformer/encoderblock_1/MlpBlock_3/Dense_9/bias"] = flat.pop(
      "Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"
    )
    del flat["Transformer/encoder_norm/scale"]
    del flat["Transformer/encoderblock_1/LayerNorm_0/scale"]  # must not shorten the model
    flat["Transformer/encoderblock_0/LayerNorm_2/bias"] = np.zeros(7, np.float32)
    np.savez(self.path("vit.npz"), **flat)
    msg = _message(lambda: vit.load(self.path("vit.npz")))
    self.assertIn("missing (3)", msg)
    self.assertIn("unexpected (1)", msg)
    for name in (
      "Transformer/encoderblock_1/LayerNorm_0/scale",
      "Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias",
      "Transformer/encoderblock_1/MlpBlock_3/Dense_9/bias",
      "Transformer/encoder_norm/scale",
      "Transformer/encoderblock_0/LayerNorm_2/bias: checkpoint (7,), model (128,)",
    ):
      self.assertIn(name, msg)

  def test_timm_vit_renamed_parameter(self):
    params = _random_params(vit.ViT(**TINY_VIT, num_classes=10), TINY_VIT_SIZE)
    sd = _timm_vit_state_dict(params)
    sd["blocks.1.norm3.weight"] = sd.pop("blocks.1.norm2.weight")
    _write_safetensors(sd, self.path("model.safetensors"))
    msg = _message(lambda: vit.load(self.path("model.safetensors")))
    self.assertIn("Transformer/encoderblock_1/LayerNorm_2/scale", msg)
    self.assertIn("blocks.1.norm3.weight", msg)

  def test_wrong_family_is_named(self):
    path = self._resnet_file(lambda sd: None)
    msg = _message(lambda: vit.load(path))
    self.assertIn("is not a timm ViT state dict", msg)
    self.assertIn("patch_embed.proj.weight", msg)


class ResamplingTest(absltest.TestCase):
  def test_same_grid_is_untouched(self):
    posemb = np.random.default_rng(0).normal(size=(1, 1 + 9, 5)).astype(np.float32)
    self.assertIs(google_vit.resample_position_embeddings(posemb, 3), posemb)

  def test_not_a_square_grid(self):
    with self.assertRaisesRegex(checkpoints.CheckpointError, "square grid"):
      google_vit.grid_size(np.zeros((1, 11, 4)))


if __name__ == "__main__":
  absltest.main()
