"""One run over several processes (hosts): joining, splitting the reads, gathering, failing together.

    spec = h2t.multihost.resolve(True, "10.0.0.1:1234", 2, 0)   # or resolve(True, None, None, None): JAX detects
    h2t.multihost.initialize(spec)

What is split and what is not:

* Extraction: process p reads (decodes) and runs the backbone on batches i
  of a split with i % P == p (`share`; the task's reader skips the others'
  batches before decoding them, so no image is decoded by two processes); the
  pooled training features are gathered once (`cache.extract_split`), so every
  process holds the same `[1000, D]` arrays in the split's order.
* The CV (stage 1, selection and stage 2 of every distinct grid point on
  every fold) is split: the units are the (batch, fold) pairs of the grid's
  plan (`grid.plan`: one batch per method and compiled program), and unit k
  runs on process k % P (`grid.cv_units`), which trains all the batch's
  points on that fold; within a process its heads are spread over its own
  devices (`HeadSharding` over `jax.local_devices()`). The fold accuracies are
  then gathered as bytes (`gather_cells`), so every process holds the
  one-process table bit for bit and makes the same choice. A unit keeps a
  whole batch's points because the head count of a program changes how XLA's
  CPU matmuls block their sums (splitting points changed weights in the last
  bits); a fold is a batch axis with its own key, so fold shares are exact.
  At most 5 x batches processes have CV work; more sit out the CV.
* The final fit (each method's chosen point on all 1000 images) runs on every
  process, on the same data with the same seeds: every process gets the same
  heads, which each needs for its share of the streamed test.
* The streamed test is split like extraction (and so is the check of the
  test images before training, `Task.verify`); the correct counts are summed.
* Process 0 alone touches the workdir: the lock, the feature cache (it reads
  it and hands the features to the others, `from_writer`), the heads,
  results.json, TensorBoard and log.txt.

Failures: a process that fails writes its message into the coordination
service's key-value store (`abort`) and exits; every process runs a watchdog
thread that polls that store and ends its own process with an `error:` line
when another has failed, or when the coordinator (process 0) is gone. A
process killed outright (no message) is noticed by JAX's heartbeats
(`heartbeat_timeout_seconds`), which end the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging as py_logging
import os
import sys
import threading
from collections.abc import Sequence

import numpy as np
from absl import logging

FAILED = "h2t/failed/"  # key prefix: FAILED + process id -> message
ACK = "h2t/ack/"  # key prefix: ACK + failed id + '/' + process id, written by a process that saw it
DONE_BARRIER = "h2t/done"
POLL_S = 0.5
ACK_WAIT_S = 10.0


@dataclasses.dataclass(frozen=True)
class Spec:
  """How to join the run; None fields are left to JAX's cluster detection (TPU pods, SLURM, MPI)."""

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  initialization_timeout_s: int = 300

  @property
  def detected(self) -> bool:
    return self.coordinator_address is None


def resolve(
  multihost: bool,
  coordinator_address: str | None,
  num_processes: int | None,
  process_id: int | None,
  initialization_timeout_s: int = 300,
) -> Spec | None:
  """The checked settings of `--multihost` and its three flags; None for a one-process run.

  Raises:
    ValueError: a flag without `--multihost`, some but not all three, or a value out of range.
  """
  given = {
    "--coordinator_address": coordinator_address,
    "--num_processes": num_processes,
    "--process_id": process_id,
  }
  named = [k for k, v in given.items() if v is not None]
  if not multihost:
    if named:
      raise ValueError(f"{', '.join(named)} given without --multihost; add --multihost or leave them out")
    return None
  if named and len(named) < 3:
    missing = [k for k, v in given.items() if v is None]
    raise ValueError(
      f"--multihost with {', '.join(named)} but no {', '.join(missing)}: give all three "
      "(or none, to let JAX detect the cluster)"
    )
  if initialization_timeout_s < 1:
    raise ValueError(f"--multihost_timeout_s={initialization_timeout_s}: must be at least 1 second")
  if not named:
    return Spec(initialization_timeout_s=initialization_timeout_s)
  host, sep, port = coordinator_address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(
      f"--coordinator_address={coordinator_address!r}: expected HOST:PORT (e.g. 10.0.0.1:8476), "
      "the address of process 0"
    )
  if num_processes < 1:
    raise ValueError(f"--num_processes={num_processes}: must be at least 1")
  if not 0 <= process_id < num_processes:
    raise ValueError(
      f"--process_id={process_id}: must lie in [0, {num_processes}) for --num_processes={num_processes}"
    )
  return Spec(coordinator_address, num_processes, process_id, initialization_timeout_s)


_watchdog: _Watchdog | None = None


def initialize(spec: Spec) -> None:
  """Joins the run (`jax.distributed.initialize`) and starts the failure watchdog.

  The CPU's cross-process collectives are set to gloo first (the CPU client
  has none otherwise); accelerators ignore that setting.
  """
  global _watchdog
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
      coordinator_address=spec.coordinator_address,
      num_processes=spec.num_processes,
      process_id=spec.process_id,
      initialization_timeout=spec.initialization_timeout_s,
    )
  except Exception as e:  # noqa: BLE001 -- reported as one line by the caller
    where = spec.coordinator_address or "the address JAX detected"
    raise RuntimeError(
      f"could not join the run at {where} ({type(e).__name__}: {str(e).strip().splitlines()[0]}); "
      "check that every process got the same --coordinator_address and --num_processes "
      "and a distinct --process_id"
    ) from e
  logging.info("process %d of %d joined the run", jax.process_index(), jax.process_count())
  if jax.process_count() > 1:
    _watchdog = _Watchdog(_client(), jax.process_index(), jax.process_count())
    _watchdog.start()


def _client():
  from jax._src import distributed  # the coordination service's key-value store lives only here

  return distributed.global_state.client


def index() -> int:
  import jax

  return jax.process_index()


def count() -> int:
  import jax

  return jax.process_count()


def is_writer() -> bool:
  """Whether this process writes the workdir (process 0; always true in a one-process run)."""
  return index() == 0


class _Watchdog(threading.Thread):
  """Ends this process when another one reports a failure, or the coordinator is gone."""

  def __init__(self, client, me: int, n: int):
    super().__init__(name="h2t-multihost-watchdog", daemon=True)
    self.client, self.me, self.n = client, me, n
    self.stopped = threading.Event()

  def run(self) -> None:
    while not self.stopped.wait(POLL_S):
      try:
        failed = self.client.key_value_dir_get(FAILED)
      except Exception as e:  # noqa: BLE001 -- any error here means the service is unreachable
        if self.stopped.is_set():
          return
        _exit(
          f"error: process {self.me} of {self.n} lost contact with the coordinator (process 0): "
          f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}; see process 0's output"
        )
      others = sorted((k, v) for k, v in failed if k.rsplit("/", 1)[-1] != str(self.me))
      if others and not self.stopped.is_set():
        key, message = others[0]
        who = key.rsplit("/", 1)[-1]
        try:
          self.client.key_value_set(f"{ACK}{who}/{self.me}", "1", allow_overwrite=True)
        except Exception:  # noqa: BLE001 -- the failed process only waits a bounded time for this
          pass
        _exit(f"error: process {who} of {self.n} failed, so process {self.me} stops too: {message}")


def _exit(line: str, code: int = 1) -> None:
  """Prints `line`, flushes the logs and ends the process at once.

  `os._exit` skips `jax.distributed.shutdown`'s barrier, which would wait for
  processes that are stopping too.
  """
  logging.error("%s", line)  # process 0: into log.txt too
  print(line, file=sys.stderr, flush=True)
  sys.stdout.flush()
  for handler in logging.get_absl_logger().handlers + py_logging.getLogger("h2t.trace").handlers:
    try:
      handler.flush()
    except Exception:  # noqa: BLE001
      pass
  os._exit(code)


def abort(line: str) -> None:
  """Ends a failed process: tells the others (they stop too), waits briefly for them to see it, exits 1.

  `line` is the process's own `error:` line. Without other processes it is
  `sys.exit(line)`.
  """
  if _watchdog is None:
    sys.exit(line)
  _watchdog.stopped.set()
  me, n = _watchdog.me, _watchdog.n
  message = line.removeprefix("error: ")
  try:
    _watchdog.client.key_value_set(f"{FAILED}{me}", message, allow_overwrite=True)
    for other in range(n):
      if other != me:  # the coordinator must outlive the others' reading of the message
        _watchdog.client.blocking_key_value_get(f"{ACK}{me}/{other}", int(ACK_WAIT_S * 1000))
  except Exception:  # noqa: BLE001 -- an absent acknowledgement (already stopped) is no reason to wait longer
    pass
  _exit(f"error: process {me} of {n}: {message}")


def finish(timeout_s: float = 24 * 3600) -> None:
  """Waits until every process has finished its run, then stops the watchdog (a clean exit follows)."""
  if _watchdog is None:
    return
  _watchdog.client.wait_at_barrier(DONE_BARRIER, int(timeout_s * 1000))
  _watchdog.stopped.set()


def check_same(what: str, text: str) -> None:
  """Raises ValueError unless every process passes the same `text` (e.g. its resolved config)."""
  if count() == 1:
    return
  from jax.experimental import multihost_utils

  digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
  every = np.asarray(multihost_utils.process_allgather(digest))
  differ = [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]
  if differ:
    raise ValueError(
      f"{what} of process(es) {', '.join(map(str, differ))} differs from process 0's; "
      "start every process with the same command line (only --process_id differs)"
    )


def share():
  """This process's share of every split: batch i when i % count() == index() (`h2t.data.base.Share`).

  A task reads only these batches (`Task.batches(..., share=share())`): no
  other process decodes them, and this one decodes no other.
  """
  from h2t.data import base

  return base.Share(index(), count())


def gather_rows(
  feats: dict[str, np.ndarray], labels: np.ndarray, positions: Sequence[tuple[int, int]], total: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Every process's rows (`positions` in the split) gathered in the split's order, on every process."""
  from jax.experimental import multihost_utils

  local = len(labels)
  pos = np.concatenate([np.arange(s, s + r, dtype=np.int32) for s, r in positions] or [np.zeros(0, np.int32)])
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(local)))
  width = int(sizes.max())

  def padded(a: np.ndarray, fill) -> np.ndarray:
    out = np.full((width,) + a.shape[1:], fill, a.dtype)
    out[: len(a)] = a
    return out

  tree = {
    "pos": padded(pos, -1),
    "labels": padded(labels, 0),
    "feats": {k: padded(v, 0) for k, v in feats.items()},
  }
  every = multihost_utils.process_allgather(tree)
  pos_all = np.asarray(every["pos"]).reshape(-1)
  keep = np.flatnonzero(pos_all >= 0)
  order = keep[np.argsort(pos_all[keep], kind="stable")]
  if not np.array_equal(pos_all[order], np.arange(total)):
    raise RuntimeError(
      f"the processes' shares of the split do not tile its {total} images "
      f"(got {len(order)} rows); every process must read the same data"
    )

  def ordered(a) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape((-1,) + a.shape[2:])[order]

  # Tap order is `feats`' (network order); the gathered pytree's dict comes back sorted.
  return {k: ordered(every["feats"][k]) for k in feats}, ordered(every["labels"])


def writer_decides(value: bool) -> bool:
  """Process 0's `value`, on every process (e.g. whether it found the feature cache)."""
  if count() == 1:
    return value
  from jax.experimental import multihost_utils

  return bool(np.asarray(multihost_utils.broadcast_one_to_all(np.int32(value))))


def from_writer(feats: dict[str, np.ndarray] | None, labels: np.ndarray | None):
  """Process 0's `(feats, labels)` on every process (the others pass None)."""
  if count() == 1:
    return feats, labels
  import json

  from jax.experimental import multihost_utils

  meta = b""
  if is_writer():
    meta = json.dumps({"n": len(labels), "taps": [[k, v.shape[1]] for k, v in feats.items()]}).encode()
  size = int(np.asarray(multihost_utils.broadcast_one_to_all(np.int32(len(meta)))))
  buf = np.zeros(size, np.uint8)
  if is_writer():
    buf[:] = np.frombuffer(meta, np.uint8)
  meta = json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes())
  n = meta["n"]
  if not is_writer():
    feats = {k: np.zeros((n, d), np.float32) for k, d in meta["taps"]}
    labels = np.zeros(n, np.int32)
  got = multihost_utils.broadcast_one_to_all({"feats": feats, "labels": labels})
  return {k: np.asarray(got["feats"][k]) for k, _ in meta["taps"]}, np.asarray(got["labels"])


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
  """Each entry summed over the processes (same keys, same order on every process)."""
  if count() == 1:
    return counts
  from jax.experimental import multihost_utils

  keys = list(counts)
  every = np.asarray(multihost_utils.process_allgather(np.asarray([counts[k] for k in keys], np.int32)))
  return {k: int(v) for k, v in zip(keys, every.sum(axis=0), strict=True)}


def gather_cells(values: np.ndarray, done: np.ndarray) -> np.ndarray:
  """Each cell of `values` (float64) from the one process that computed it (`done`), on every process.

  The values travel as their bytes (JAX would round float64 to float32), so
  they arrive bit for bit.

  Raises:
    RuntimeError: a cell computed by no process, or by several.
  """
  values = np.ascontiguousarray(values, np.float64)
  if count() == 1:
    if not np.asarray(done).all():
      raise RuntimeError(f"{int((~np.asarray(done)).sum())} cell(s) of the CV table were never computed")
    return values
  from jax.experimental import multihost_utils

  every = multihost_utils.process_allgather(
    {"bits": values.view(np.uint32), "done": np.asarray(done, np.uint8)}
  )
  got = np.asarray(every["done"]).astype(bool)  # [P, ...]
  owners = got.sum(axis=0)
  if not (owners == 1).all():
    raise RuntimeError(
      f"the processes' shares of the CV do not tile it: {int((owners == 0).sum())} cell(s) computed by "
      f"no process, {int((owners > 1).sum())} by several"
    )
  cells = np.ascontiguousarray(np.asarray(every["bits"], np.uint32)).view(np.float64)  # [P, ...]
  owner = got.argmax(axis=0)[None]
  return np.take_along_axis(cells, owner, axis=0)[0]
