"""Pooling every tap to a target size, as the reference does; the pipelined extraction."""

import os
import subprocess
import sys
import tempfile
import textwrap
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from h2t import backbones, features, platform
from h2t.data import base, local, prefetch
from h2t.models import common


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


class _ToyNet(nn.Module):
  """Taps of every rank: 'map' [n, 8, 8, 5], 'tokens' [n, 64, 5], 'level' [n, 2].

  'level' is sqrt(mean pixel - 1): NaN exactly for a (nearly) black image.
  """

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(1.0), (3, 5))
    fmap = jnp.tanh(x @ w / 255.0)
    tokens = fmap.reshape(x.shape[0], -1, 5) * 2.0
    level = jnp.sqrt(x.mean(axis=(1, 2, 3)) - 1.0)[:, None] * jnp.asarray([1.0, -1.0])
    return level, {"map": fmap, "tokens": tokens, "level": level}


def _toy_backbone() -> backbones.Backbone:
  module = _ToyNet()
  params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  return backbones.Backbone(
    name="toy",
    module=module,
    params=params,
    input_size=8,
    normalization=common.Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    tap_names=("map", "tokens", "level"),
    checkpoint_id="toy:0",
  )


def _toy_images(n: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(10, 255, (n, 8, 8, 3)).astype(np.float32)


TOY_TAPS = ("map", "tokens", "level", "input", "map@5")


def _batches(images, batch_size):
  for i in range(0, len(images), batch_size):
    yield images[i : i + batch_size], np.arange(i, min(i + batch_size, len(images)), dtype=np.int32)


def _one_batch_at_a_time(backbone, images, taps, batch_size, target_size):
  """The reference: each padded batch alone, each tap pooled and fetched on its own."""

  @jax.jit
  def pooled(params, x):
    x = backbone.preprocess(x)
    _, all_taps = backbone.apply(params, x)
    out = {}
    for name in taps:
      tap, size = features.split_tap(name)
      out[name] = features.pool_tap(x if tap == "input" else all_taps[tap], size or target_size)
    return out

  parts = []
  for i in range(0, len(images), batch_size):
    x = images[i : i + batch_size]
    b = len(x)
    x = np.concatenate([x, np.zeros((batch_size - b,) + x.shape[1:], x.dtype)])
    parts.append({k: np.asarray(v)[:b] for k, v in pooled(backbone.params, x).items()})
  return {k: np.concatenate([p[k] for p in parts]) for k in taps}


class PipelinedExtractionTest(parameterized.TestCase):
  @parameterized.parameters((2, 2), (0, 1), (1, 3))
  def test_bit_identical_to_one_batch_at_a_time(self, prefetch_size, in_flight):
    backbone, images = _toy_backbone(), _toy_images(37)  # 4 batches of 8 and a last one of 5
    want = _one_batch_at_a_time(backbone, images, TOY_TAPS, 8, 20)
    stream = features.extract_batches(
      backbone,
      _batches(images, 8),
      taps=TOY_TAPS,
      target_size=20,
      batch_size=8,
      prefetch=prefetch_size,
      in_flight=in_flight,
    )
    parts = list(stream)
    self.assertEqual([len(p[1]) for p in parts], [8, 8, 8, 8, 5])
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), np.arange(37))  # order kept
    for batch, _ in parts:
      self.assertEqual(list(batch), list(TOY_TAPS))
    for tap in TOY_TAPS:
      got = np.concatenate([p[0][tap] for p in parts])
      self.assertEqual(got.dtype, np.float32)
      np.testing.assert_array_equal(got, want[tap], err_msg=tap)
    # Ranks 4, 3, 2 and the image: 20, 20, 2, 20 features and a global pool (5).
    self.assertEqual([want[t].shape[1] for t in TOY_TAPS], [20, 20, 2, 12, 5])

  def test_extract_and_task_split_match_the_stream(self):
    backbone, images = _toy_backbone(), _toy_images(21, seed=1)
    want = _one_batch_at_a_time(backbone, images, TOY_TAPS, 8, 20)
    got = features.extract(backbone, images, taps=TOY_TAPS, target_size=20, batch_size=8)
    task = base.array_task("toy", 3, {"all": (images, np.arange(21, dtype=np.int32) % 3)})
    split, labels = features.extract_task_split(
      backbone, task, "all", taps=TOY_TAPS, target_size=20, batch_size=8
    )
    np.testing.assert_array_equal(labels, np.arange(21) % 3)
    for tap in TOY_TAPS:
      np.testing.assert_array_equal(got[tap], want[tap], err_msg=tap)
      np.testing.assert_array_equal(split[tap], want[tap], err_msg=tap)

  def test_lite0_bit_identical_to_one_batch_at_a_time(self):
    backbone = backbones.create("efficientnet_lite0", input_size=32)
    images, _ = local.load_digits().arrays("test", image_size=32)
    images = images[:12]
    taps = backbone.tap_names
    want = _one_batch_at_a_time(backbone, images, taps, 8, 256)
    got = features.extract(backbone, images, taps=taps, target_size=256, batch_size=8)
    for tap in taps:
      np.testing.assert_array_equal(got[tap], want[tap], err_msg=tap)

  def test_stats_count_bytes_moved(self):
    backbone, images = _toy_backbone(), _toy_images(21)
    stats = features.ExtractionStats()
    list(
      features.extract_batches(
        backbone, _batches(images, 8), taps=TOY_TAPS, target_size=20, batch_size=8, stats=stats
      )
    )
    dim = 20 + 20 + 2 + 12 + 5
    self.assertEqual((stats.images, stats.batches), (21, 3))
    self.assertEqual(stats.bytes_to_device, 3 * 8 * images[0].nbytes)  # padded batches
    self.assertEqual(stats.feature_bytes, 21 * dim * 4)
    self.assertEqual(stats.bytes_from_device, 3 * 8 * (dim * 4 + 1))  # features + a flag per image

  def test_nan_in_one_tap_names_the_tap_and_images(self):
    backbone, images = _toy_backbone(), _toy_images(30)
    images[13] = 0.0  # 'level' is NaN for a black image, the other taps stay finite
    stream = features.extract_batches(
      backbone, _batches(images, 8), taps=TOY_TAPS, target_size=20, batch_size=8
    )
    with self.assertRaisesRegex(
      FloatingPointError, r"tap 'level' of backbone 'toy' .* image\(s\) 13 \(images 8\.\.16\)"
    ):
      list(stream)

  def test_infinity_in_two_taps_names_both(self):
    backbone, images = _toy_backbone(), _toy_images(16)
    images[5, 0, 0, 0] = np.inf  # 'map' stays finite (tanh), 'level' and the image itself do not
    with self.assertRaisesRegex(
      FloatingPointError, r"tap 'level' .* image\(s\) 5 \(images 0\.\.8\) \(so did tap\(s\) 'input'\)"
    ):
      features.extract(backbone, images, taps=TOY_TAPS, target_size=20, batch_size=8)

  def test_huge_finite_features_are_no_error(self):
    # Their row sum overflows to inf on the device; the host finds every feature finite.
    backbone, images = _toy_backbone(), _toy_images(4)
    images[1] = 2e36  # 192 features (pool 1) of 2e36: their sum, 3.8e38, is over float32's 3.4e38
    got = features.extract(backbone, images, taps=["input"], target_size=192, batch_size=4)
    self.assertEqual(got["input"].shape, (4, 192))
    self.assertTrue(np.isfinite(got["input"]).all())
    self.assertEqual(got["input"].max(), np.float32(2e36))

  def test_padding_rows_are_not_checked(self):
    # The padding images are black, so their 'level' is NaN: only real images count.
    backbone, images = _toy_backbone(), _toy_images(11)
    got = features.extract(backbone, images, taps=["level"], target_size=20, batch_size=8)
    self.assertTrue(np.isfinite(got["level"]).all())

  def test_reader_exception_reaches_the_caller(self):
    backbone, images = _toy_backbone(), _toy_images(24)

    def broken():
      yield from _batches(images[:16], 8)
      raise OSError("image 17.jpg is truncated")

    stream = features.extract_batches(backbone, broken(), taps=TOY_TAPS, target_size=20, batch_size=8)
    with self.assertRaisesRegex(OSError, r"^image 17\.jpg is truncated$"):
      list(stream)

  def test_oversized_batch_error_from_the_thread(self):
    backbone, images = _toy_backbone(), _toy_images(12)
    with self.assertRaisesRegex(ValueError, "a batch of 12 images is larger than batch_size=8"):
      list(
        features.extract_batches(backbone, _batches(images, 12), taps=["map"], target_size=20, batch_size=8)
      )

  def test_stopping_early_stops_the_reader(self):
    backbone, images = _toy_backbone(), _toy_images(8)
    closed = threading.Event()

    def endless():
      try:
        while True:
          yield images, np.zeros(8, np.int32)
      finally:
        closed.set()

    stream = features.extract_batches(backbone, endless(), taps=["map"], target_size=20, batch_size=8)
    next(stream)
    stream.close()
    self.assertTrue(closed.wait(timeout=30))
    self.assertFalse([t for t in threading.enumerate() if t.name == "h2t-prefetch" and t.is_alive()])

  def test_bad_dtype_and_in_flight(self):
    backbone = _toy_backbone()
    with self.assertRaisesRegex(ValueError, r"dtype='float16'; expected one of float32, bfloat16"):
      features.extract(backbone, _toy_images(2), taps=["map"], target_size=20, dtype="float16")
    with self.assertRaisesRegex(ValueError, "in_flight=0"):
      list(
        features.extract_batches(
          backbone, _batches(_toy_images(2), 2), taps=["map"], target_size=20, batch_size=2, in_flight=0
        )
      )

  def test_bfloat16_close_to_float32(self):
    backbone = backbones.create("efficientnet_lite0", input_size=64)
    images, _ = local.load_digits().arrays("test", image_size=64)
    images = images[:16]
    taps = ("stem", "block5_output", "block15_output", "pre_logits")
    f32 = features.extract(backbone, images, taps=taps, target_size=1024, batch_size=16)
    bf16 = features.extract(backbone, images, taps=taps, target_size=1024, batch_size=16, dtype="bfloat16")
    for tap in taps:
      self.assertEqual(bf16[tap].dtype, np.float32)
      # Stated tolerance: 20% relative L2 error per tap. Measured at 64 px: 0.5% (stem) to 10%
      # (pre_logits); at 224 px up to 13.5% (experiments/results/bench_extraction_cpu.md).
      err = np.linalg.norm(bf16[tap] - f32[tap]) / np.linalg.norm(f32[tap])
      self.assertLess(err, 0.2, tap)
      self.assertGreater(err, 0.0, tap)  # it really ran in bfloat16


# Extracts the toy backbone's features on however many devices XLA_FLAGS simulates.
SHARDED_SCRIPT = textwrap.dedent(
  """
  import sys
  sys.path.insert(0, {root!r})
  import jax, numpy as np
  from tests import test_features as t
  from h2t import features
  got = features.extract(t._toy_backbone(), t._toy_images(21), taps=t.TOY_TAPS, target_size=20, batch_size=8)
  np.savez({out!r}, devices=jax.local_device_count(), **{{k.replace("@", "_"): v for k, v in got.items()}})
  """
)


class ShardedExtractionTest(absltest.TestCase):
  def test_four_devices_give_the_features_of_one(self):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
      got = {}
      for devices in (1, 4):
        out = os.path.join(tmp, f"{devices}.npz")
        env = dict(
          os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu"
        )
        code = SHARDED_SCRIPT.format(root=root, out=out)
        proc = subprocess.run(
          [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
        )
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        got[devices] = dict(np.load(out))
    self.assertEqual((int(got[1].pop("devices")), int(got[4].pop("devices"))), (1, 4))
    self.assertEqual(sorted(got[1]), sorted(got[4]))
    for tap in got[1]:
      np.testing.assert_allclose(got[4][tap], got[1][tap], rtol=1e-6, atol=1e-6, err_msg=tap)


class PrefetchTest(absltest.TestCase):
  def test_order_and_transform(self):
    self.assertEqual(
      list(prefetch.prefetch(range(10), 3, transform=lambda i: i * i)), [i * i for i in range(10)]
    )
    self.assertEqual(list(prefetch.prefetch(range(4), 0)), [0, 1, 2, 3])

  def test_exception_is_the_same_object(self):
    error = KeyError("missing feature 'label'")

    def source():
      yield 1
      raise error

    got = prefetch.prefetch(source(), 2)
    self.assertEqual(next(got), 1)
    with self.assertRaises(KeyError) as ctx:
      next(got)
    self.assertIs(ctx.exception, error)

  def test_negative_size(self):
    with self.assertRaisesRegex(ValueError, "prefetch size=-1"):
      list(prefetch.prefetch(range(3), -1))


class PlatformTest(absltest.TestCase):
  def test_default_batch_size(self):
    self.assertEqual(platform.default_batch_size("cpu"), 64)
    self.assertEqual(platform.default_batch_size("cpu", 3), 66)  # a multiple of the devices
    self.assertEqual(platform.default_batch_size("gpu"), 256)
    self.assertEqual(platform.default_batch_size("cuda", 2), 512)
    self.assertEqual(platform.default_batch_size("tpu", 8), 2048)
    with self.assertRaisesRegex(ValueError, r"platform='metal' .* expected one of cpu, gpu"):
      platform.default_batch_size("metal")

  def test_resolve_batch_size(self):
    self.assertEqual(platform.resolve_batch_size(32), 32)
    self.assertEqual(
      platform.resolve_batch_size(0),
      platform.default_batch_size(jax.default_backend(), jax.local_device_count()),
    )
    with self.assertRaisesRegex(ValueError, "batch_size=-4"):
      platform.resolve_batch_size(-4)


if __name__ == "__main__":
  absltest.main()
