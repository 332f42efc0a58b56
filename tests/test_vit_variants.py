"""ViT checkpoint files people hold: which one a file is, and clear words for look-alikes.

Tiny ViTs written in the real formats (vision_transformer npz, timm
safetensors) with the parameters that tell the variants apart: the
representation layer (`pre_logits`), the head's class count, an all-zero head.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from absl.testing import absltest

from h2t import checkpoints
from h2t.models import vit
from tests.test_checkpoint_formats import (
  TINY_VIT,
  TINY_VIT_SIZE,
  _assert_trees_equal,
  _random_params,
  _timm_vit_state_dict,
  _write_safetensors,
  _write_vision_transformer_npz,
)


class ViTVariantsTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.dir = tmp.name

  def params(self, **kw):
    module = vit.ViT(**{**TINY_VIT, **kw})
    return _random_params(module, TINY_VIT_SIZE)

  def test_original_imagenet21k_npz_is_named_with_its_zero_head(self):
    params = self.params(representation_size=32, num_classes=vit.IMAGENET21K_CLASSES)
    params["head"]["kernel"][:] = 0.0
    path = os.path.join(self.dir, "ViT-B_16.npz")
    _write_vision_transformer_npz(params, path)
    with self.assertLogs("absl", level="INFO") as logs:
      loaded = vit.load(path)
    self.assertEqual(loaded.module.representation_size, 32)
    text = "\n".join(logs.output)
    self.assertIn("looks like the original ImageNet-21k ViT", text)
    self.assertIn("head is all zeros", text)
    self.assertNotIn("WARNING", text)  # the file its name promises

  def test_finetuned_file_named_like_the_original_is_flagged(self):
    params = self.params(num_classes=1000)
    path = os.path.join(self.dir, "ViT-B_16.npz")
    _write_vision_transformer_npz(params, path)
    with self.assertLogs("absl", level="WARNING") as logs:
      vit.load(path)
    self.assertIn("is not the original ImageNet-21k ViT-B_16.npz", logs.output[0])
    self.assertIn("1000 classes", logs.output[0])
    self.assertIn("the ImageNet-1k fine-tuned file of the same name", logs.output[0])

  def test_augreg_file_named_like_the_original_is_flagged(self):
    params = self.params(num_classes=vit.IMAGENET21K_CLASSES)
    path = os.path.join(self.dir, "ViT-B_16.npz")
    _write_vision_transformer_npz(params, path)
    with self.assertLogs("absl", level="WARNING") as logs:
      vit.load(path)
    self.assertIn("probably an AugReg ImageNet-21k file", logs.output[0])

  def test_augreg_imagenet21k_is_told_from_the_original(self):
    params = self.params(num_classes=vit.IMAGENET21K_CLASSES)
    path = os.path.join(self.dir, "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz")
    _write_vision_transformer_npz(params, path)
    with self.assertLogs("absl", level="INFO") as logs:
      loaded = vit.load(path)
    self.assertEqual(loaded.module.representation_size, 0)
    self.assertIn("looks like an AugReg ImageNet-21k ViT", "\n".join(logs.output))

  def test_old_timm_file_with_the_representation_layer_loads_it(self):
    params = self.params(representation_size=32, num_classes=10)
    state_dict = _timm_vit_state_dict(params)
    state_dict["pre_logits.fc.weight"] = params["pre_logits"]["kernel"].T
    state_dict["pre_logits.fc.bias"] = params["pre_logits"]["bias"]
    path = os.path.join(self.dir, "jx_vit_base_patch16_224_in21k.safetensors")
    _write_safetensors(state_dict, path)
    loaded = vit.load(path)
    self.assertEqual(loaded.module.representation_size, 32)
    _assert_trees_equal(self, loaded.params, params)

  def test_half_a_representation_layer_is_named(self):
    params = self.params(num_classes=10)
    state_dict = _timm_vit_state_dict(params)
    state_dict["pre_logits.fc.bias"] = np.zeros(32, np.float32)
    path = os.path.join(self.dir, "odd.safetensors")
    _write_safetensors(state_dict, path)
    with self.assertRaisesRegex(checkpoints.CheckpointError, "pre_logits.fc.bias"):
      vit.load(path)

  def test_other_vit_families_are_refused_with_what_they_are(self):
    for marker, words in (("fc_norm.weight", "MAE"), ("norm_pre.weight", "CLIP"), ("reg_token", "register")):
      state_dict = _timm_vit_state_dict(self.params(num_classes=10))
      state_dict[marker] = np.zeros((1, 1, 128) if marker == "reg_token" else (128,), np.float32)
      path = os.path.join(self.dir, f"{marker}.safetensors")
      _write_safetensors(state_dict, path)
      with self.assertRaisesRegex(
        checkpoints.CheckpointError, rf"{path} is a ViT with .*{words}.*{marker!r}"
      ):
        vit.load(path)


if __name__ == "__main__":
  absltest.main()
