"""Image files of every mode a PNG or JPEG can have reach the backbone with their contrast; bad files name themselves.

Every file here is written by Pillow in the real format, then read back through
`h2t.data.folder.load_image`, the one reader of training (folder tasks) and prediction images.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib

import numpy as np
from absl.testing import absltest, parameterized
from PIL import Image

from h2t.data import folder
from tests import toy

W, H = 64, 8


def _ramp(maximum: int, dtype) -> np.ndarray:
  """[H, W] horizontal gradient from 0 to `maximum`."""
  return np.tile(np.round(np.linspace(0, maximum, W)), (H, 1)).astype(dtype)


class ImageModesTest(toy.TempDirTestCase):
  def read(self, im: Image.Image, name: str, **save_kw) -> np.ndarray:
    im.save(self.path(name), **save_kw)
    with Image.open(self.path(name)) as reopened:
      self.opened_mode = reopened.mode
    out = folder.load_image(self.path(name), W)  # square resize: [W, W, 3]
    self.assertEqual(out.shape, (W, W, 3))
    self.assertEqual(out.dtype, np.uint8)
    return out

  def assertGradient(self, out: np.ndarray, *, lo: int = 0, hi: int = 255, tol: int = 0) -> None:
    row = out[W // 2].astype(int)  # [W, 3]
    np.testing.assert_array_equal(row, np.repeat(row[:, :1], 3, axis=1))  # grey stays grey
    self.assertTrue(np.all(np.diff(row[:, 0]) >= 0), row[:, 0])  # increasing
    self.assertLessEqual(abs(row[0, 0] - lo), tol)
    self.assertLessEqual(abs(row[-1, 0] - hi), tol)

  @parameterized.parameters(("I;16", "<u2"), ("I;16B", ">u2"))
  def test_16_bit_grey_png_spans_0_to_255(self, mode, dtype):
    ramp = _ramp(65535, np.uint16)
    im = Image.frombytes(mode, (W, H), ramp.astype(dtype).tobytes())
    out = self.read(im, "g16.png")
    self.assertEqual(self.opened_mode, "I;16")
    self.assertGradient(out)
    # Each 16-bit value v becomes round(v / 257) (32896 -> 128), not white as Pillow's convert('RGB') gives.
    np.testing.assert_array_equal(np.asarray(folder.to_rgb(im))[0, :, 0], np.round(ramp[0] / 257))

  def test_16_bit_dark_image_keeps_its_contrast(self):
    ramp = _ramp(4096, np.uint16)  # a typical 12-bit sensor range in a 16-bit PNG
    out = self.read(Image.fromarray(ramp), "dark16.png")
    self.assertGradient(out, hi=16)
    self.assertGreater(len(np.unique(out)), 10)

  @parameterized.parameters(("L", "png"), ("L", "jpg"))
  def test_8_bit_grey(self, mode, ext):
    out = self.read(Image.fromarray(_ramp(255, np.uint8)), f"g8.{ext}")
    self.assertGradient(out, tol=3 if ext == "jpg" else 0)

  def test_1_bit(self):
    bits = _ramp(255, np.uint8) > 127
    out = self.read(Image.fromarray(bits), "bits.png")
    self.assertEqual(self.opened_mode, "1")
    self.assertEqual(set(np.unique(out)), {0, 255})

  @parameterized.parameters("png", "jpg")
  def test_rgb(self, ext):
    rgb = np.stack([_ramp(255, np.uint8), 255 - _ramp(255, np.uint8), np.full((H, W), 60, np.uint8)], -1)
    out = self.read(Image.fromarray(rgb), f"rgb.{ext}", **({"quality": 95} if ext == "jpg" else {}))
    tol = 4 if ext == "jpg" else 0
    np.testing.assert_allclose(out[W // 2, [0, -1]].astype(int), [[0, 255, 60], [255, 0, 60]], atol=tol)

  def test_cmyk_jpeg(self):
    cmyk = np.zeros((H, W, 4), np.uint8)
    cmyk[..., 3] = _ramp(255, np.uint8)  # black ink from none to full
    out = self.read(Image.fromarray(cmyk, mode="CMYK"), "cmyk.jpg", quality=95)
    self.assertEqual(self.opened_mode, "CMYK")
    row = out[W // 2, :, 0].astype(int)
    self.assertGreater(row[0], 245)
    self.assertLess(row[-1], 10)

  def test_alpha_is_composited_on_black(self):
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = _ramp(255, np.uint8)
    out = self.read(Image.fromarray(rgba), "rgba.png")
    np.testing.assert_array_equal(out[W // 2, 0], [0, 0, 0])  # transparent
    np.testing.assert_array_equal(out[W // 2, -1], [200, 100, 50])  # opaque
    half = folder.to_rgb(Image.fromarray(np.full((1, 1, 4), (200, 100, 50, 128), np.uint8)))
    np.testing.assert_array_equal(np.asarray(half)[0, 0], [100, 50, 25])

  def test_grey_alpha(self):
    la = np.stack([np.full((H, W), 240, np.uint8), _ramp(255, np.uint8)], -1)
    out = self.read(Image.fromarray(la, mode="LA"), "la.png")
    self.assertEqual(self.opened_mode, "LA")
    self.assertGradient(out, hi=240)

  def test_palette_with_a_transparent_index(self):
    idx = (_ramp(255, np.uint8) // 64).astype(np.uint8)  # 4 palette entries
    im = Image.fromarray(idx, mode="P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255] + [0] * (256 * 3 - 12))
    out = self.read(im, "p.png", transparency=1)
    self.assertEqual(self.opened_mode, "P")
    np.testing.assert_array_equal(out[W // 2, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[W // 2, W // 4 + 2], [0, 0, 0])  # index 1: transparent
    np.testing.assert_array_equal(out[W // 2, -1], [255, 255, 255])

  def test_palette_without_transparency(self):
    im = Image.fromarray(_ramp(255, np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    out = self.read(im, "p_grey.png")
    self.assertEqual(self.opened_mode, "P")
    self.assertGradient(out, tol=2)


def _png_with_size(width: int, height: int) -> bytes:
  """A PNG whose header claims `width x height` (its data is for 1x1)."""

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return (
    b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b"")
  )


class BadImageFilesTest(parameterized.TestCase):
  def _valid(self, ext: str) -> bytes:
    path = os.path.join(self.dir, f"valid.{ext}")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    with open(path, "rb") as f:
      return f.read()

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.dir = tmp.name

  def assertNamedError(self, content: bytes, name: str) -> str:
    path = os.path.join(self.dir, name)
    with open(path, "wb") as f:
      f.write(content)
    with self.assertRaises(ValueError) as cm:
      folder.load_image(path, 16)
    self.assertIn(path, str(cm.exception))
    return str(cm.exception)

  @parameterized.parameters("png", "jpg")
  def test_truncated_at_many_offsets(self, ext):
    data = self._valid(ext)
    # Up to the last 12 bytes (a PNG's IEND chunk): cuts that lose pixel data.
    for n in range(0, len(data) - 12, max(1, len(data) // 40)):
      self.assertNamedError(data[:n], f"cut{n}.{ext}")

  def test_empty_and_text_files(self):
    self.assertNamedError(b"", "empty.png")
    msg = self.assertNamedError(b"hello, not an image", "notes.jpg")
    self.assertIn("PNG or JPEG", msg)

  def test_decompression_bomb_header(self):
    msg = self.assertNamedError(_png_with_size(30000, 30000), "bomb.png")
    self.assertIn("DecompressionBomb", msg)


if __name__ == "__main__":
  absltest.main()
