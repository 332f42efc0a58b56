"""Settings that depend on the machine: batch sizes, the persistent compilation cache.

    h2t.platform.enable_compilation_cache(os.path.join(cache_dir, "jax"))  # before the first jit call
    batch_size = h2t.platform.resolve_batch_size(config.backbone.batch_size)  # 0 -> per platform

`CompileMonitor` counts what JAX compiled (and what it read from the
persistent cache) while it is active; benchmarks use it to report the compile
share of a phase.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
from absl import logging

# Images per extraction forward pass, per device, when the config leaves it 0:
# a CPU gains nothing beyond ~64 (and holds every tap of the batch in RAM);
# an accelerator needs a large batch to keep its cores busy.
_DEFAULT_BATCH_SIZE = {"cpu": 64, "gpu": 256, "cuda": 256, "rocm": 256, "tpu": 256}


def default_batch_size(platform: str, num_devices: int = 1) -> int:
  """Extraction batch size for `platform` ('cpu', 'gpu', 'tpu'; 'cuda'/'rocm' count as 'gpu').

  On an accelerator every device gets 256 images; on the CPU the batch is 64 in
  all (simulated CPU devices share the same cores), rounded up to a multiple of
  `num_devices` so that the batch splits evenly over the devices.
  """
  if platform not in _DEFAULT_BATCH_SIZE:
    raise ValueError(
      f"platform={platform!r} has no default extraction batch size; expected one of "
      f"{', '.join(_DEFAULT_BATCH_SIZE)} (or set config.backbone.batch_size > 0)"
    )
  if num_devices < 1:
    raise ValueError(f"num_devices={num_devices}; expected at least 1")
  per_device = _DEFAULT_BATCH_SIZE[platform]
  if platform == "cpu":
    return -(-per_device // num_devices) * num_devices
  return per_device * num_devices


def resolve_batch_size(batch_size: int) -> int:
  """`batch_size` itself when positive; 0 -> `default_batch_size` of JAX's default backend."""
  if batch_size < 0:
    raise ValueError(
      f"extraction batch_size={batch_size}; expected a positive number of images, or 0 for the "
      "platform's default (64 on a CPU, 256 per accelerator)"
    )
  if batch_size:
    return int(batch_size)
  return default_batch_size(jax.default_backend(), jax.local_device_count())


def enable_compilation_cache(
  path: str, *, min_compile_time_secs: float = 0.0, min_entry_size_bytes: int = 0
) -> str:
  """Keeps every compiled XLA program in `path`, so that later processes reuse it.

  Call it before the first `jax.jit` call of the process: JAX fixes its cache
  when it first compiles. The defaults cache every program, even those that
  compile in under a second (JAX's own default skips them, which would leave
  most CPU programs out).

  Args:
    path: a folder (created if missing); '' leaves the cache off.
    min_compile_time_secs: programs that compile faster are not written.
    min_entry_size_bytes: smaller programs are not written.

  Returns:
    The absolute path of the cache folder ('' when off).
  """
  if not path:
    return ""
  if min_compile_time_secs < 0 or min_entry_size_bytes < 0:
    raise ValueError(
      f"min_compile_time_secs={min_compile_time_secs}, min_entry_size_bytes={min_entry_size_bytes}; "
      "expected values >= 0"
    )
  path = os.path.abspath(os.path.expanduser(path))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(min_entry_size_bytes))
  return path


_COMPILE_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)


@dataclasses.dataclass
class CompileMonitor:
  """What JAX traced, compiled and read from the persistent cache while active.

      with platform.CompileMonitor() as compiled:
        run()
      compiled.seconds, compiled.backend_compiles, compiled.cache_hits

  Attributes:
    seconds: tracing + lowering + XLA compilation (a cache hit's backend time
      is the time it took to read the program).
    backend_compiles: XLA programs built or read from the cache.
    cache_hits: programs read from the persistent cache.
    cache_misses: programs the persistent cache did not hold.
    by_function: `{function name: [programs, seconds]}`, which functions the
      compile time went to (eager operations appear under their primitive's name).
  """

  seconds: float = 0.0
  backend_compiles: int = 0
  cache_hits: int = 0
  cache_misses: int = 0
  by_function: dict[str, list] = dataclasses.field(default_factory=dict)

  def _on_duration(self, event: str, duration: float, **kwargs) -> None:
    if event in _COMPILE_EVENTS:
      self.seconds += duration
      self.backend_compiles += event == _COMPILE_EVENTS[-1]
      entry = self.by_function.setdefault(str(kwargs.get("fun_name", "?")), [0, 0.0])
      entry[0] += event == _COMPILE_EVENTS[-1]
      entry[1] += duration

  def _on_event(self, event: str, **kwargs) -> None:
    del kwargs
    self.cache_hits += event == "/jax/compilation_cache/cache_hits"
    self.cache_misses += event == "/jax/compilation_cache/cache_misses"

  def __enter__(self) -> CompileMonitor:
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    jax.monitoring.register_event_listener(self._on_event)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._on_duration)
    jax.monitoring.unregister_event_listener(self._on_event)


@dataclasses.dataclass
class ExtractionStats:
  """What `extract_batches(..., stats=...)` moved and waited for (added to, never reset).

  Attributes:
    images: real images extracted (padding excluded).
    batches: forward passes.
    bytes_to_device: image batches sent, padding included.
    bytes_from_device: feature batches and finiteness flags fetched, padding included.
    feature_bytes: pooled features of the real images: the least any extraction fetches.
    input_wait_seconds: time the device loop waited for the reading thread.
    device_wait_seconds: time spent waiting for a batch's features to arrive.
  """

  images: int = 0
  batches: int = 0
  bytes_to_device: int = 0
  bytes_from_device: int = 0
  feature_bytes: int = 0
  input_wait_seconds: float = 0.0
  device_wait_seconds: float = 0.0


class Progress:
  """Logs images/s and the time left every 10 s."""

  def __init__(self, total: int | None):
    self.total, self.start = total, time.perf_counter()
    self.last = self.start

  def __call__(self, done: int) -> None:
    now = time.perf_counter()
    if now - self.last > 10:
      rate = done / (now - self.start)
      eta = f", {(self.total - done) / rate:.0f}s left" if self.total else ""
      logging.info(
        "extracted %d%s images, %.1f images/s%s", done, f"/{self.total}" if self.total else "", rate, eta
      )
      self.last = now
