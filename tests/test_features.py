"""Pooling every tap to a target size, as the reference does."""

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from h2t import features


def _ramp(*shape):
  return jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)


class PoolSizeTest(parameterized.TestCase):
  @parameterized.parameters(
    # (shape, target, expected pool): per_side = int(sqrt(T // c)), pool = w // per_side.
    ((2, 8, 8, 4), 64, 2),  # T//c = 16 -> 4 per side -> pool 2
    ((2, 8, 8, 4), 16, 4),  # 4 -> 2 per side -> pool 4
    ((2, 8, 8, 4), 4, 0),  # c >= T -> global
    ((2, 7, 7, 64), 8192, 0),  # 11 per side > 7 -> pool 0 -> global (the reference's fallback)
    ((2, 197, 768), 15360, 9),  # int(197 / 20)
    ((2, 196, 768), 768, 0),  # c >= T
  )
  def test_reference_pool_sizes(self, shape, target, expected):
    self.assertEqual(features.pool_size_for(shape, target), expected)

  def test_zero_target_uses_pool_size(self):
    self.assertEqual(features.pool_size_for((1, 8, 8, 4), 0, pool_size=3), 3)


class PoolTapTest(parameterized.TestCase):
  def test_4d_average_pool_values(self):
    x = _ramp(1, 4, 4, 1)  # values 0..15 row-major
    out = features.pool_tap(x, target_size=4)  # c=1 -> 2 per side -> pool 2
    # Means of the four 2x2 windows.
    np.testing.assert_allclose(out, [[2.5, 4.5, 10.5, 12.5]])

  def test_4d_flatten_order_is_h_w_c(self):
    x = _ramp(1, 4, 4, 2)
    out = features.pool_tap(x, target_size=8)  # T//c = 4 -> 2 per side -> pool 2
    self.assertEqual(out.shape, (1, 8))
    # First window, both channels: means of channel 0 and 1 over rows 0-1, cols 0-1.
    np.testing.assert_allclose(out[0, :2], [np.mean([0, 2, 8, 10]), np.mean([1, 3, 9, 11])])

  def test_4d_valid_pooling_drops_the_remainder(self):
    x = _ramp(1, 5, 5, 1)
    out = features.pool_tap(x, target_size=4)  # pool = 5 // 2 = 2 -> 2x2 windows, last row/col dropped
    np.testing.assert_allclose(
      out,
      [[np.mean([0, 1, 5, 6]), np.mean([2, 3, 7, 8]), np.mean([10, 11, 15, 16]), np.mean([12, 13, 17, 18])]],
    )

  def test_4d_channels_at_least_target_is_global_pool(self):
    x = _ramp(2, 3, 3, 8)
    np.testing.assert_allclose(features.pool_tap(x, target_size=8), x.mean(axis=(1, 2)))

  def test_3d_pooling(self):
    x = _ramp(1, 6, 2)
    out = features.pool_tap(x, target_size=6)  # pool = int(6 / 3) = 2 -> 3 groups x 2 channels
    np.testing.assert_allclose(out, [[1, 2, 5, 6, 9, 10]])

  def test_3d_channels_at_least_target_is_token_mean(self):
    x = _ramp(2, 5, 4)
    np.testing.assert_allclose(features.pool_tap(x, target_size=4), x.mean(axis=1))

  def test_only_cls(self):
    x = _ramp(2, 5, 3)
    np.testing.assert_allclose(features.pool_tap(x, 100, "only_cls"), x[:, 0])

  def test_nopool_cls_keeps_cls_and_pools_the_rest(self):
    x = _ramp(1, 5, 2)  # cls token + 4 tokens
    out = features.pool_tap(x, target_size=2, cls_token_pool="nopool_cls")  # c >= T -> mean of the 4
    np.testing.assert_allclose(out, [[0, 1, 5, 6]])

  def test_2d_unchanged(self):
    x = _ramp(3, 7)
    np.testing.assert_array_equal(features.pool_tap(x, 2), x)

  def test_bad_mode(self):
    with self.assertRaisesRegex(ValueError, "only_cls"):
      features.pool_tap(_ramp(1, 3, 2), 4, "cls")


if __name__ == "__main__":
  absltest.main()
