"""Small file helpers shared by the commands: atomic writes and strict JSON.

Every file h2t writes goes to a temporary name in the same folder and is then
renamed, so a killed run never leaves a half-written file under a real name.
Temporary names end in `TMP_SUFFIX`, so a later run can sweep them away.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

import numpy as np

TMP_SUFFIX = ".h2t-tmp"
LOCK_NAME = ".h2t.lock"


def _readable(fd: int) -> None:
  """mkstemp makes files 0600; results are ordinary files (0666 less the umask)."""
  umask = os.umask(0)
  os.umask(umask)
  os.fchmod(fd, 0o666 & ~umask)


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
  """Calls `write(file)` on a temporary file beside `path`, then renames it to `path`."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=TMP_SUFFIX)
  try:
    _readable(fd)
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_savez(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """`np.savez` of `arrays` to `path`, atomically."""
  atomic_write(path, lambda f: np.savez(f, **arrays))


def strict_json(obj: Any) -> Any:
  """`obj` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, Mapping):
    return {k: strict_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict_json(v) for v in obj]
  return obj


def atomic_write_json(path: str, obj: Any) -> None:
  """Writes `obj` as strict JSON (non-finite floats as null), atomically."""
  text = json.dumps(strict_json(obj), indent=2, sort_keys=True, allow_nan=False)
  atomic_write(path, lambda f: f.write(text.encode()))


def sweep_temporaries(folder: str, older_than_s: float = 0.0) -> list[str]:
  """Removes temporary files a killed run left in `folder` (not recursive); returns their paths.

  `older_than_s` spares younger files, which another live run (sharing a
  cache folder) may still be writing.
  """
  removed = []
  if not os.path.isdir(folder):
    return removed
  now = time.time()
  for name in os.listdir(folder):
    path = os.path.join(folder, name)
    try:
      if name.endswith(TMP_SUFFIX) and os.path.isfile(path) and now - os.path.getmtime(path) >= older_than_s:
        os.unlink(path)
        removed.append(path)
    except OSError:
      pass  # gone already, or not ours to remove
  return removed


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds `workdir/.h2t.lock` for the run; a second run on the same workdir fails at once.

  The lock is an `fcntl.flock`: the kernel drops it when its process dies, so
  a lock left by a killed run is simply taken over. Entering also sweeps the
  temporary files a killed run left behind. A process that holds the lock
  already (`h2t.main` takes it before it writes its log) enters again freely.
  """
  key = os.path.realpath(workdir)
  if key in _HELD:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
      raise WorkdirBusy(
        f"workdir {workdir} is in use by another h2t run (pid {holder}); wait for it to finish "
        "or choose another --workdir"
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _HELD.add(key)
    sweep_temporaries(workdir)
    yield
  finally:
    _HELD.discard(key)
    os.close(fd)


_HELD: set[str] = set()  # workdirs this process has locked
