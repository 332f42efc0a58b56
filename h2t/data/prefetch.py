"""Reading ahead on a host thread, so that decoding overlaps the device's work.

    for images, labels in prefetch(task.batches("test", 64, image_size=224), size=2):
      ...

The source is iterated (and `transform` applied) on one background thread, at
most `size` items ahead of the consumer. An exception raised there is raised
again in the consumer, the same object, with its message and traceback. When
the consumer stops early (breaks out of its loop, or closes the iterator) the
thread stops after the item it is working on, and the source is closed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_ITEM, _END, _ERROR = range(3)
_POLL_SECONDS = 0.05  # how often a blocked producer looks for the consumer's stop


def _put(q: queue.Queue, entry: tuple[int, Any], stop: threading.Event) -> bool:
  """Puts `entry` unless the consumer stopped first; returns whether it was put."""
  while not stop.is_set():
    try:
      q.put(entry, timeout=_POLL_SECONDS)
      return True
    except queue.Full:
      pass
  return False


def _produce(source: Iterable, transform: Callable | None, q: queue.Queue, stop: threading.Event) -> None:
  it = iter(source)
  try:
    for item in it:
      if stop.is_set():
        return
      if not _put(q, (_ITEM, item if transform is None else transform(item)), stop):
        return
    _put(q, (_END, None), stop)
  except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which raises it
    _put(q, (_ERROR, e), stop)
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()


def prefetch(source: Iterable, size: int = 2, *, transform: Callable | None = None) -> Iterator:
  """Iterates `source` on a background thread, up to `size` items ahead.

  Args:
    source: any iterable (a task's batch generator, a tf.data iterator).
    size: items read ahead; 0 reads in the caller's thread, as a plain loop.
    transform: applied to every item on the background thread too (e.g.
      padding a batch and sending it to the device).

  Yields:
    `transform(item)` (or `item`) for every item of `source`, in order.
  """
  if size < 0:
    raise ValueError(f"prefetch size={size}; expected 0 (no thread) or more items to read ahead")
  if size == 0:
    for item in source:
      yield item if transform is None else transform(item)
    return
  q: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()
  thread = threading.Thread(
    target=_produce, args=(source, transform, q, stop), name="h2t-prefetch", daemon=True
  )
  thread.start()
  try:
    while True:
      kind, value = q.get()
      if kind == _END:
        return
      if kind == _ERROR:
        raise value
      yield value
  finally:
    stop.set()
    # Unblocks a producer waiting on a full queue at once; one busy reading
    # its source stops after that item (the thread is a daemon either way).
    while not q.empty():
      q.get_nowait()
    thread.join(timeout=1.0)
