"""The streamed test pass (issue #12): it runs the training extraction's program and fetches only the
kept features, with the numbers of a pass over the kept taps alone."""

from unittest import mock

import numpy as np
from absl.testing import absltest

from h2t import features, head, platform, streaming
from h2t.data import base
from tests import test_features as tf

TAPS = ("map", "tokens", "level", "input")
SIZES = {"map": 20, "tokens": 20, "level": 2, "input": 12}  # at target size 20


def _toy_head(kept: dict, norm: str, seed: int, classes: int = 3) -> head.Head:
  rng = np.random.default_rng(seed)
  k = sum(len(v) for v in kept.values())
  stats = None
  if norm == "per_feature":
    stats = {"mean": rng.normal(size=k).astype(np.float32), "var": rng.uniform(0.5, 2, k).astype(np.float32)}
  params = {
    "w": rng.normal(size=(k, classes)).astype(np.float32),
    "b": rng.normal(size=classes).astype(np.float32),
  }
  meta = head.HeadMeta(
    backbone="toy", checkpoint_id="toy:0", input_size=8, target_size=20, num_classes=classes
  )
  return head.Head({t: np.asarray(v) for t, v in kept.items()}, params, norm, stats, meta)


def _heads() -> dict[str, head.Head]:
  return {
    "unit": _toy_head({"map": [1, 5, 19], "level": [1]}, "unit_vector", 0),
    "std": _toy_head({"tokens": [0, 3], "map": [5, 7, 8]}, "per_feature", 1),
    "plain": _toy_head({"input": np.arange(12)}, "", 2),
  }


class KeepTest(absltest.TestCase):
  def test_kept_columns_are_the_full_extraction_gathered(self):
    backbone, images = tf._toy_backbone(), tf._toy_images(21)
    keep = {"tokens": np.array([3, 0, 19]), "map": np.array([2]), "level": np.array([], int)}
    stats = features.ExtractionStats()
    full = list(
      features.extract_batches(backbone, tf._batches(images, 8), taps=TAPS, target_size=20, batch_size=8)
    )
    kept = list(
      features.extract_batches(
        backbone, tf._batches(images, 8), taps=TAPS, target_size=20, batch_size=8, keep=keep, stats=stats
      )
    )
    self.assertEqual(len(kept), 3)
    for (f, labels), (g, kept_labels) in zip(full, kept, strict=True):
      np.testing.assert_array_equal(kept_labels, labels)
      self.assertEqual(list(g), list(keep))
      for tap, idx in keep.items():
        np.testing.assert_array_equal(g[tap], f[tap][:, idx], err_msg=tap)
    self.assertEqual(stats.feature_bytes, 21 * 4 * 4)  # 4 kept features per image
    self.assertEqual(stats.bytes_from_device, 3 * 8 * (4 * 4 + 1))  # a bucket of 4 columns, a flag

  def test_a_non_finite_tap_that_is_not_kept_is_still_named(self):
    backbone, images = tf._toy_backbone(), tf._toy_images(12)
    images[9] = 0.0  # 'level' is NaN for a black image
    stream = features.extract_batches(
      backbone, tf._batches(images, 8), taps=TAPS, target_size=20, batch_size=8, keep={"map": np.array([0])}
    )
    with self.assertRaisesRegex(FloatingPointError, r"tap 'level' .* image\(s\) 9 \(images 8\.\.12\)"):
      list(stream)

  def test_kept_taps_must_be_extracted(self):
    backbone, images = tf._toy_backbone(), tf._toy_images(4)
    with self.assertRaisesRegex(ValueError, "keep names taps"):
      list(
        features.extract_batches(
          backbone, tf._batches(images, 4), taps=["map"], target_size=20, batch_size=4, keep={"level": [0]}
        )
      )


class StreamTestTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.backbone = tf._toy_backbone()
    images = tf._toy_images(37, seed=3)  # 4 batches of 8 and a last one of 5
    labels = np.random.default_rng(4).integers(0, 3, 37).astype(np.int32)
    self.task = base.array_task("toy", 3, {"test": (images, labels)})
    self.images, self.labels = images, labels

  def _want(self, heads):
    """Each head on the features of its own taps, the whole test set at once."""
    out = {}
    for name, h in heads.items():
      feats = features.extract(self.backbone, self.images, taps=list(h.taps), target_size=20, batch_size=8)
      out[name] = float((h.predict(feats).argmax(-1) == self.labels).mean())
    return out

  def test_accuracies_with_and_without_the_run_taps(self):
    heads = _heads()
    want = self._want(heads)
    self.assertEqual(streaming.stream_test(self.backbone, self.task, heads, 8), want)
    got = streaming.stream_test(self.backbone, self.task, heads, 8, dict.fromkeys(heads, TAPS))
    self.assertEqual(got, want)

  def test_the_last_batch_is_padded_and_the_logits_kept(self):
    heads = _heads()
    seen = {}
    original = head.Head.predict

    def spy(h, feats):
      out = original(h, feats)
      seen.setdefault(h.num_features, []).append(out)
      return out

    with mock.patch.object(head.Head, "predict", spy):
      streaming.stream_test(self.backbone, self.task, heads, 8, dict.fromkeys(heads, TAPS))
    for h in heads.values():
      batches = seen[h.num_features]
      self.assertEqual([len(b) for b in batches], [8] * 5)  # the last batch padded: one program
      feats = features.extract(self.backbone, self.images, taps=TAPS, target_size=20, batch_size=8)
      np.testing.assert_allclose(np.concatenate(batches)[:37], h.predict(feats), rtol=1e-6, atol=1e-6)

  def test_the_training_extraction_program_is_reused(self):
    def task_heads(pick):  # heads of another task: other kept features, as many
      return {
        n: _toy_head({t: pick(v) for t, v in h.kept.items()}, h.normalization, seed)
        for seed, (n, h) in enumerate(_heads().items())
      }

    features.extract(self.backbone, self.images[:3], taps=TAPS, target_size=20, batch_size=8)  # "training"
    first = task_heads(lambda v: v[:1])
    streaming.stream_test(self.backbone, self.task, first, 8, dict.fromkeys(first, TAPS))
    second = task_heads(lambda v: v[-1:])
    with platform.CompileMonitor() as compiled:
      got = streaming.stream_test(self.backbone, self.task, second, 8, dict.fromkeys(second, TAPS))
    self.assertEqual(got, self._want(second))
    self.assertNotIn("jit(_extract_batch)", compiled.by_function)
    self.assertNotIn("jit(_take_columns)", compiled.by_function)  # 5 kept columns either time: a bucket of 8


if __name__ == "__main__":
  absltest.main()
