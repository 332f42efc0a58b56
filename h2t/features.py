"""Feature extraction: every tap pooled to a target size on the device, at the backbone's pace.

`extract_batches` streams a task's images through the backbone: a host thread
reads (decodes, resizes) and sends batches ahead; each batch's taps are pooled
(`h2t.pooling`, the reference's rules) and concatenated on the device into one
`[batch, D]` array, checked for finiteness there, and fetched in one transfer
while the next batch already runs; the host hands out per-tap views of it.
`extract` and `extract_task_split` collect a whole set of images.

The backbone can run in bfloat16 (`dtype='bfloat16'`: parameters and inputs
cast on the device, taps pooled in float32).
"""

from __future__ import annotations

import collections
import functools
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from h2t import platform, sharding
from h2t.backbones import Backbone
from h2t.data import prefetch as prefetch_lib
from h2t.platform import ExtractionStats  # noqa: F401 -- part of this module's API
from h2t.pooling import (  # noqa: F401 -- part of this module's API
  CLS_TOKEN_POOL_MODES,
  SIZE_SEP,
  check_taps,
  pool_size_for,
  pool_tap,
  sized_taps,
  split_tap,
)

DTYPES = ("float32", "bfloat16")
_STATIC = ("backbone", "taps", "target_size", "cls_token_pool", "pool_size", "dtype")


def check_dtype(dtype: str) -> str:
  """Validates the backbone's compute dtype (`config.backbone.dtype`)."""
  if dtype not in DTYPES:
    raise ValueError(
      f"backbone dtype={dtype!r}; expected one of {', '.join(DTYPES)} "
      "(bfloat16 runs the backbone faster on accelerators, features stay float32)"
    )
  return dtype


def _pooled_taps(
  params,
  images: jax.Array,
  *,
  backbone: Backbone,
  taps: tuple[str, ...],
  target_size: int,
  cls_token_pool: str,
  pool_size: int,
  dtype: str,
) -> dict[str, jax.Array]:
  """`images [n, h, w, 3]` -> `{tap: [n, d_tap] float32}`: the backbone runs in `dtype`,
  every tap is pooled in float32."""
  x = backbone.preprocess(images)
  if dtype == "float32":
    _, all_taps = backbone.apply(params, x)
  else:
    low = jnp.dtype(dtype)
    params = jax.tree_util.tree_map(
      lambda p: p.astype(low) if jnp.issubdtype(p.dtype, jnp.floating) else p, params
    )
    _, all_taps = backbone.apply(params, x.astype(low))
  out = {}
  for name in taps:
    tap, size = split_tap(name)
    t = x if tap == "input" else all_taps[tap]
    size = target_size if size is None else size
    # Pooled in float32: window sums of bfloat16 activations would lose digits.
    out[name] = pool_tap(t.astype(jnp.float32), size, cls_token_pool, pool_size=pool_size)
  return out


@functools.partial(jax.jit, static_argnames=_STATIC)
def _extract_batch(params, images: jax.Array, **static) -> tuple[jax.Array, jax.Array]:
  """`images [B, h, w, 3]` -> `(features [B, D] float32, bad [B] bool)`.

  `features` holds the pooled taps side by side in `taps` order, so a batch
  leaves the device as one array; `bad[i]`: image i may have a non-finite
  feature (checked here, so the host scans only the flagged rows).
  """
  pooled = _pooled_taps(params, images, **static)
  feats = jnp.concatenate(list(pooled.values()), axis=1)
  # A row's sum is non-finite if any of its features is (or if it overflows, which the host
  # then rules out). On the CPU it costs nothing measurable; `isfinite(feats).all(axis=1)`
  # added a fifth to a near-free backbone's batch (experiments/bench_host_overhead.py --checks).
  return feats, ~jnp.isfinite(feats.sum(axis=1))


@jax.jit
def _take_columns(feats: jax.Array, columns: jax.Array) -> jax.Array:
  """`feats [B, D]`, `columns [k] int32` -> `feats[:, columns]`, `[B, k]` (exact: a gather)."""
  return jnp.take(feats, columns, axis=1)


def _columns(layout, keep: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
  """Column numbers in `_extract_batch`'s features of `keep`'s features (taps in `keep` order),
  padded with column 0 to a power of two (at most D), so that tasks keeping about as many features
  share the gather's program. Returns `(columns [bucket] int32, k real columns)`."""
  start = {tap: lo for tap, lo, _ in layout}
  cols = np.concatenate([start[t] + np.asarray(idx, int) for t, idx in keep.items()] + [np.zeros(0, int)])
  bucket = min(1 << max(len(cols) - 1, 0).bit_length(), max(layout[-1][2], len(cols)))
  return np.concatenate([cols, np.zeros(bucket - len(cols), int)]).astype(np.int32), len(cols)


# backbone -> {(static settings, image shape, dtype): ((tap, start, stop), ...)}; weak, so a
# dropped backbone (and its parameters) is not kept alive by this cache.
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layout(params, images: jax.Array, static: dict) -> tuple[tuple[str, int, int], ...]:
  """Column range of every tap in `_extract_batch`'s features, from shapes alone."""
  key = (tuple(static[k] for k in _STATIC[1:]), tuple(images.shape), str(images.dtype))
  known = _LAYOUTS.setdefault(static["backbone"], {})
  if key not in known:
    shapes = jax.eval_shape(functools.partial(_pooled_taps, **static), params, images)
    stops = np.cumsum([0] + [shapes[t].shape[1] for t in static["taps"]])
    known[key] = tuple(zip(static["taps"], stops[:-1].tolist(), stops[1:].tolist(), strict=True))
  return known[key]


def _check_finite(
  feats: np.ndarray, bad: np.ndarray, layout, first: int, backbone: Backbone, dtype: str
) -> None:
  """Raises FloatingPointError, naming the taps and images, if a flagged row of `feats [b, D]` has a
  non-finite feature; `first` is the number of the batch's first image in the stream."""
  rows = np.flatnonzero(bad)
  broken = ~np.isfinite(feats[rows])  # only the flagged rows are scanned
  taps = [tap for tap, lo, hi in layout if broken[:, lo:hi].any()]
  if not taps:
    return  # every feature is finite: the row sum overflowed
  lo, hi = next((lo, hi) for tap, lo, hi in layout if tap == taps[0])
  images = rows[broken[:, lo:hi].any(axis=1)] + first
  shown = ", ".join(map(str, images[:5])) + (f" and {len(images) - 5} more" if len(images) > 5 else "")
  others = f" (so did tap(s) {', '.join(map(repr, taps[1:]))})" if len(taps) > 1 else ""
  hint = "; try dtype='float32'" if dtype != "float32" else ""
  raise FloatingPointError(
    f"tap {taps[0]!r} of backbone {backbone.name!r} produced non-finite features for image(s) {shown} "
    f"(images {first}..{first + len(bad)}){others}; check the checkpoint and the input value range{hint}"
  )


def _pooling(taps, target_size, cls_token_pool, pool_size, dtype) -> dict:
  """The static pooling settings of `_extract_batch` (all but the backbone)."""
  return dict(
    taps=tuple(taps),
    target_size=int(target_size),
    cls_token_pool=cls_token_pool,
    pool_size=int(pool_size),
    dtype=dtype,
  )


def _stream(
  backbone: Backbone,
  batches: Iterable[tuple[np.ndarray, np.ndarray]],
  pooling: dict,
  *,
  batch_size: int,
  total: int | None,
  prefetch: int = 2,
  in_flight: int = 2,
  stats: ExtractionStats | None = None,
  keep: dict[str, np.ndarray] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, tuple[tuple[str, int, int], ...]]]:
  """`extract_batches`, yielding `(features [b, D], labels [b], layout)` per batch,
  `layout` the `(tap, start, stop)` column range of every tap. `pooling`: `_pooling(...)`.

  With `keep` (`{tap: indices}`) only those features leave the device: `features [b, k]` are
  `keep`'s columns, tap by tap, and `layout` gives their ranges."""
  static = dict(backbone=backbone, **pooling)
  static["taps"] = check_taps(backbone, static["taps"])
  dtype = check_dtype(static["dtype"])
  if in_flight < 1:
    raise ValueError(f"in_flight={in_flight}; expected at least 1 batch on the device")
  batch_size = platform.resolve_batch_size(batch_size)
  params, placement = sharding.data_parallel(backbone, batch_size)
  stats = ExtractionStats() if stats is None else stats
  progress = platform.Progress(total)

  def send(batch):  # on the reading thread
    images, labels = batch
    b = len(labels)
    if b > batch_size:
      raise ValueError(f"a batch of {b} images is larger than batch_size={batch_size}")
    images = np.asarray(images)
    if b < batch_size:
      images = np.concatenate([images, np.zeros((batch_size - b,) + images.shape[1:], images.dtype)])
    stats.bytes_to_device += images.nbytes
    return jax.device_put(images, placement), np.asarray(labels, np.int32)

  def fetch(out, whole, labels, layout):
    start = time.perf_counter()
    feats, bad = jax.device_get(out)  # both arrays in one round trip
    stats.device_wait_seconds += time.perf_counter() - start
    stats.bytes_from_device += feats.nbytes + bad.nbytes
    b = len(labels)
    if bad[:b].any():  # a flagged row: the whole batch's features name the tap
      _check_finite(np.asarray(jax.device_get(whole))[:b], bad[:b], layout, stats.images, backbone, dtype)
    feats = feats[:b, :kept] if keep is not None else feats[:b]
    stats.images += b
    stats.feature_bytes += feats.nbytes
    progress(stats.images)
    return feats, labels, kept_layout if keep is not None else layout

  columns = kept = kept_layout = None
  if keep is not None:
    unknown = sorted(set(keep) - set(static["taps"]))
    if unknown:
      raise ValueError(f"keep names taps {unknown} that are not extracted (taps={static['taps']})")
    stops = np.cumsum([0] + [len(idx) for idx in keep.values()]).tolist()
    kept_layout = tuple(zip(keep, stops[:-1], stops[1:], strict=True))
  pending: collections.deque = collections.deque()
  source = prefetch_lib.prefetch(batches, prefetch, transform=send)
  try:
    while True:
      start = time.perf_counter()
      item = next(source, None)
      stats.input_wait_seconds += time.perf_counter() - start
      if item is None:
        break
      images, labels = item
      layout = _layout(params, images, static)
      # Dispatch is asynchronous: this batch runs on the device while older ones are fetched.
      out = whole = _extract_batch(params, images, **static)
      if keep is not None:
        if columns is None:
          columns, kept = _columns(layout, keep)
          columns = jax.device_put(columns)
        out = (_take_columns(whole[0], columns), whole[1])
      for array in out:
        array.copy_to_host_async()
      stats.batches += 1
      pending.append((out, whole[0], labels, layout))
      if len(pending) >= in_flight:
        yield fetch(*pending.popleft())
    while pending:
      yield fetch(*pending.popleft())
  finally:
    source.close()


def extract_batches(
  backbone: Backbone,
  batches: Iterable[tuple[np.ndarray, np.ndarray]],
  *,
  taps: Sequence[str],
  target_size: int,
  batch_size: int,
  cls_token_pool: str = "normal",
  pool_size: int = 0,
  total: int | None = None,
  dtype: str = "float32",
  prefetch: int = 2,
  in_flight: int = 2,
  stats: ExtractionStats | None = None,
  keep: Mapping[str, np.ndarray] | None = None,
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
  """Streams `(images, labels)` batches through the backbone, at the device's pace.

  Every batch is padded to `batch_size`, so the extractor compiles once; the
  padding rows are dropped before yielding. A host thread reads `batches`
  (decoding, resizing) and sends them to the device up to `prefetch` batches
  ahead; `in_flight` batches are dispatched before the oldest one's features
  are fetched, as one `[b, D]` array whose per-tap columns are yielded as
  views (no copies). Finiteness is checked on the device.

  Args:
    backbone: from `h2t.backbones.create`.
    batches: `(images [b, h, w, 3] pixels in [0, 255], labels [b])`, b <= batch_size.
    taps: tap names (see `check_taps`).
    target_size: features per tap (see `pool_tap`).
    batch_size: images per forward pass; 0 takes the platform's
      (`h2t.platform.default_batch_size`: 64 on a CPU, 256 per accelerator).
    cls_token_pool: 'normal', 'only_cls' or 'nopool_cls' (see `pool_tap`).
    pool_size: fixed pool size when `target_size` is 0.
    total: images in `batches`, for the progress log.
    dtype: the backbone's compute dtype: 'float32', or 'bfloat16' (parameters
      and inputs cast on the device, taps pooled and returned in float32). On
      EfficientNet-Lite0 at 224 px it costs 0.6% (stem) to 14% (head,
      pre_logits) relative L2 error per tap, cosine >= 0.977 between an
      image's unit-normalised tap vectors
      (experiments/results/bench_extraction_cpu.md).
    prefetch: batches read ahead on the host thread (0: no thread).
    in_flight: batches dispatched before the oldest is fetched (1: one at a time).
    stats: if given, bytes moved and time spent waiting are added to it.
    keep: `{tap: int indices}` (taps among `taps`): only these features are
      fetched, gathered on the device; the extraction program stays `taps`'s
      (one already compiled for an earlier pass over the same taps).

  Yields:
    `({tap: [b, d_tap] float32}, labels [b] int32)` per input batch, taps in
    `taps` order; with `keep`, `{tap: [b, len(keep[tap])]}` in `keep`'s order.
    A non-finite feature (of any tap in `taps`) raises FloatingPointError
    naming the tap and the images.
  """
  for feats, labels, layout in _stream(
    backbone,
    batches,
    _pooling(taps, target_size, cls_token_pool, pool_size, dtype),
    batch_size=batch_size,
    total=total,
    prefetch=prefetch,
    in_flight=in_flight,
    stats=stats,
    keep=None if keep is None else dict(keep),
  ):
    yield {tap: feats[:, lo:hi] for tap, lo, hi in layout}, labels


def _collect(stream) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """A whole `_stream` as `({tap: [n, d_tap]}, labels [n])`: views of one `[n, D]` array."""
  parts = list(stream)
  if not parts:
    raise ValueError("no images to extract features from")
  whole = np.concatenate([p[0] for p in parts])
  return {tap: whole[:, lo:hi] for tap, lo, hi in parts[0][2]}, np.concatenate([p[1] for p in parts])


def extract(
  backbone: Backbone,
  images: np.ndarray,
  *,
  taps: Sequence[str],
  target_size: int,
  batch_size: int = 64,
  cls_token_pool: str = "normal",
  pool_size: int = 0,
  dtype: str = "float32",
) -> dict[str, np.ndarray]:
  """Pooled features of in-memory images.

  Args:
    backbone: from `h2t.backbones.create`.
    images: `[n, h, w, 3]` pixels in [0, 255].
    taps: tap names (see `backbone.tap_names`; 'input' is the image).
    target_size: features per tap (see `pool_tap`).
    batch_size: images per forward pass (0: the platform's).
    dtype: the backbone's compute dtype (see `extract_batches`).

  Returns:
    `{tap: [n, d_tap] float32}`.
  """
  n = len(images)
  batch_size = platform.resolve_batch_size(batch_size)
  batches = (
    (images[i : i + batch_size], np.zeros(min(batch_size, n - i), np.int32)) for i in range(0, n, batch_size)
  )
  return _collect(
    _stream(
      backbone,
      batches,
      _pooling(taps, target_size, cls_token_pool, pool_size, dtype),
      batch_size=batch_size,
      total=n,
      prefetch=0,
    )
  )[0]


def extract_task_split(
  backbone: Backbone,
  task,
  split: str,
  *,
  taps: Sequence[str],
  target_size: int,
  cls_token_pool: str = "normal",
  pool_size: int = 0,
  batch_size: int = 64,
  stats: ExtractionStats | None = None,
  dtype: str = "float32",
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Features and labels of a whole task split: `({tap: [n, d]}, labels [n])`.

  `batch_size` 0 takes the platform's; `dtype`, `stats`: see `extract_batches`.
  """
  batch_size = platform.resolve_batch_size(batch_size)
  return _collect(
    _stream(
      backbone,
      task.batches(split, batch_size, image_size=backbone.input_size),
      _pooling(taps, target_size, cls_token_pool, pool_size, dtype),
      batch_size=batch_size,
      total=task.size(split),
      stats=stats,
    )
  )
