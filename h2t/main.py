"""Runs Head2Toe on one task: `python -m h2t.main --config=configs/vtab.py --workdir=DIR`.

Overrides follow ml_collections: `--config.dataset=fashion_mnist`,
`--config.learning.feature_selection.keep_fraction=0.05`. A field given on
the command line wins over `config.sweep`, which then drops that field.
Every failure ends in one `error:` line; its traceback goes to WORKDIR/log.txt.

Several processes (hosts): `--multihost --coordinator_address=HOST:PORT
--num_processes=N --process_id=I` on each (or `--multihost` alone where JAX
detects the cluster: TPU pods, SLURM, Open MPI); see `h2t.multihost`.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "workdir", None, "Folder for results.json, heads, caches, TensorBoard events and the log."
)
flags.DEFINE_bool(
  "multihost",
  False,
  "One run over several processes (hosts): joins them with jax.distributed.initialize, using "
  "--coordinator_address, --num_processes and --process_id, or JAX's cluster detection when none is given.",
)
flags.DEFINE_string("coordinator_address", None, "--multihost: HOST:PORT of process 0 (the coordinator).")
flags.DEFINE_integer("num_processes", None, "--multihost: how many processes take part.")
flags.DEFINE_integer("process_id", None, "--multihost: this process's index, 0 .. num_processes - 1.")
flags.DEFINE_integer(
  "multihost_timeout_s", 300, "--multihost: seconds to wait for every process to join before giving up."
)
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/vtab.py).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

_HELD_LOCK: list = []  # the workdir lock of this process (released by the kernel when it ends)
_TRACE = py_logging.getLogger("h2t.trace")  # tracebacks: log.txt only, never the terminal
_TRACE.propagate = False


def _hide_gpus_from_tensorflow() -> None:
  # TensorFlow only reads data; it must leave the accelerators to JAX.
  try:
    import tensorflow as tf
  except ImportError:
    return
  tf.config.set_visible_devices([], "GPU")


def _log_to_file(workdir: str) -> None:
  handler = py_logging.FileHandler(os.path.join(workdir, "log.txt"))
  handler.setFormatter(py_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  logging.get_absl_logger().addHandler(handler)
  _TRACE.addHandler(handler)


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments: {' '.join(argv[1:])}; options are --flag=value (see --helpshort)")
  from h2t import config as config_lib
  from h2t import multihost

  try:
    config, workdir = FLAGS.config, FLAGS.workdir
    config.to_dict()  # a config file that failed to load raises here
  except (OSError, ValueError) as e:  # the --config file failed to load
    sys.exit(f"error: --config: {_one_line(e, last=True)}")
  try:
    spec = multihost.resolve(
      FLAGS.multihost,
      FLAGS.coordinator_address,
      FLAGS.num_processes,
      FLAGS.process_id,
      FLAGS.multihost_timeout_s,
    )
  except ValueError as e:
    sys.exit(f"error: {e}")
  if spec is not None:
    # Joined first, so that any later failure, on any process, stops them all (multihost.abort).
    _hide_gpus_from_tensorflow()
    try:
      multihost.initialize(spec)
    except RuntimeError as e:
      sys.exit(f"error: {e}")
  fail = multihost.abort  # sys.exit in a one-process run
  try:
    dropped = config_lib.resolve_cli_overrides(config, config_lib.cli_keys(sys.argv[1:]))
    config_lib.validate(config)
    if spec is not None:
      multihost.check_same("the config", config.to_json(sort_keys=True))
  except ValueError as e:
    fail(f"error: {e}")
  writes = spec is None or multihost.is_writer()  # process 0 alone writes the workdir
  if writes:
    from h2t import files

    try:
      os.makedirs(workdir, exist_ok=True)
      # Held until the process ends, before anything is written: a second run on this workdir stops
      # here, without touching the first's log or TensorBoard files.
      _HELD_LOCK.append(files.workdir_lock(workdir))  # referenced, so the lock lives as long as the process
      _HELD_LOCK[-1].__enter__()
    except files.WorkdirBusy as e:
      fail(f"error: {e}")
    except OSError as e:
      fail(f"error: cannot create --workdir={workdir}: {e.strerror or e}; choose a writable folder")
    _log_to_file(workdir)
  else:
    _TRACE.addHandler(py_logging.StreamHandler())  # no log.txt here: tracebacks go to stderr
  for path in dropped:
    logging.info("config.%s was given on the command line: the sweep no longer varies it", path)
  _hide_gpus_from_tensorflow()
  import jax
  from clu import metric_writers

  from h2t import evaluate, platform

  logging.info("JAX devices: %s", jax.devices())
  compiled = config.compilation_cache_dir or os.path.join(
    config.cache_dir or os.path.join(workdir, "cache"), "jax"
  )
  if not writes:
    compiled = "off"  # several processes: process 0 alone writes, compiled programs included
  try:
    where = platform.enable_compilation_cache("" if compiled == "off" else compiled)
  except OSError as e:
    where = ""
    logging.warning("compilation cache %s cannot be used (%s); compiling every program", compiled, e)
  logging.info("compilation cache: %s", where or "off")
  writer = metric_writers.create_default_writer(workdir, just_logging=not writes)
  writer.write_hparams(
    {k: v for k, v in config_lib.flat(config.to_dict()).items() if isinstance(v, (int, float, str, bool))}
  )
  try:
    results = evaluate.run(config, workdir, writer=writer)
  except Exception as e:  # noqa: BLE001 -- every failure becomes one line; the traceback goes to log.txt
    _TRACE.exception("run failed")
    logging.error("run failed: %s", e)
    kind = (
      ""
      if isinstance(e, (ValueError, OSError, FloatingPointError, RuntimeError))
      else f"{type(e).__name__}: "
    )
    details = f" (details: {os.path.join(workdir, 'log.txt')})" if writes else ""
    fail(f"error: {kind}{e}{details}")
  finally:
    writer.close()
  multihost.finish()
  print("\n".join(evaluate.summary_lines(results)))
  if writes:
    print(f"results: {os.path.join(workdir, 'results.json')}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a clear message for an unknown `--config.KEY` or a bad value."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:
    from h2t import config as config_lib

    sys.exit(f"error: {config_lib.unknown_key_message(argv) or e}")
  except flags.Error as e:
    traceback_inside = "Traceback (most recent call last)" in str(e)  # a config file that raised
    sys.exit(f"error: {_one_line(e, last=traceback_inside)} (--helpshort lists the flags)")
  except (OSError, ValueError) as e:  # the --config file: missing, unreadable, an unknown variant
    sys.exit(f"error: {_one_line(e)}")


def _one_line(e: BaseException, last: bool = False) -> str:
  """An exception's message on one line (absl and ml_collections wrap theirs over several).

  `last`: only its last line (where a wrapped traceback's own message is).
  """
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[-1] if last and lines else " ".join(lines)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
