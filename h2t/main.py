"""Runs Head2Toe on one task: `python -m h2t.main --config=configs/vtab.py --workdir=DIR`.

Overrides follow ml_collections: `--config.dataset=fashion_mnist`,
`--config.learning.feature_selection.keep_fraction=0.05`. A field given on
the command line wins over `config.sweep`, which then drops that field.
Every failure ends in one `error:` line; its traceback goes to WORKDIR/log.txt.
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
  "Call jax.distributed.initialize() first: a multi-host run, settings from the environment.",
)
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/vtab.py).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

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
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from h2t import config as config_lib

  config, workdir = FLAGS.config, FLAGS.workdir
  try:
    dropped = config_lib.resolve_cli_overrides(config, config_lib.cli_keys(sys.argv[1:]))
    config_lib.validate(config)
  except ValueError as e:
    sys.exit(f"error: {e}")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    sys.exit(f"error: cannot create --workdir={workdir}: {e.strerror or e}; choose a writable folder")
  _log_to_file(workdir)
  for path in dropped:
    logging.info("config.%s was given on the command line: the sweep no longer varies it", path)
  _hide_gpus_from_tensorflow()
  import jax

  if FLAGS.multihost:
    jax.distributed.initialize()
  from clu import metric_writers

  from h2t import evaluate, platform

  logging.info("JAX devices: %s", jax.devices())
  compiled = config.compilation_cache_dir or os.path.join(
    config.cache_dir or os.path.join(workdir, "cache"), "jax"
  )
  try:
    where = platform.enable_compilation_cache("" if compiled == "off" else compiled)
  except OSError as e:
    where = ""
    logging.warning("compilation cache %s cannot be used (%s); compiling every program", compiled, e)
  logging.info("compilation cache: %s", where or "off")
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
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
    sys.exit(f"error: {kind}{e} (details: {os.path.join(workdir, 'log.txt')})")
  finally:
    writer.close()
  print("\n".join(evaluate.summary_lines(results)))
  print(f"results: {os.path.join(workdir, 'results.json')}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a clear message for an unknown `--config.KEY` or a bad value."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:
    from h2t import config as config_lib

    sys.exit(f"error: {config_lib.unknown_key_message(argv) or e}")
  except flags.Error as e:
    sys.exit(f"error: {e}\n\n{FLAGS.main_module_help()}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
