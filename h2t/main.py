"""Runs Head2Toe on one task: `python -m h2t.main --config=configs/vtab.py --workdir=DIR`.

Overrides follow ml_collections: `--config.dataset=fashion_mnist`,
`--config.learning.feature_selection.keep_fraction=0.05`.
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  _hide_gpus_from_tensorflow()
  import jax

  if FLAGS.multihost:
    jax.distributed.initialize()
  from clu import metric_writers

  from h2t import evaluate

  config = FLAGS.config
  workdir = FLAGS.workdir
  try:
    evaluate.validate(config)
  except ValueError as e:
    sys.exit(f"error: {e}")
  os.makedirs(workdir, exist_ok=True)
  _log_to_file(workdir)
  logging.info("JAX devices: %s", jax.devices())
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams(
    {k: v for k, v in _flat(config.to_dict()).items() if isinstance(v, (int, float, str, bool))}
  )
  try:
    results = evaluate.run(config, workdir, writer=writer)
  except (ValueError, FileNotFoundError) as e:
    logging.exception("run failed")
    sys.exit(f"error: {e}")
  finally:
    writer.close()
  print("\n".join(evaluate.summary_lines(results)))
  print(f"results: {os.path.join(workdir, 'results.json')}")


def _load_config_file(spec: str):
  """Calls `get_config` of a config file given as `path[:arg]`."""
  import importlib.util

  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_h2t_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _explain_bad_override(argv: list[str]) -> str | None:
  """Names the first `--config.KEY=...` whose KEY the config lacks, with the valid keys."""
  import difflib

  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  try:
    flat = _flat(_load_config_file(spec).to_dict())
  except Exception:  # noqa: BLE001 -- the original error is shown instead.
    return None
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config.") :].split("=", 1)[0]
    if key in flat:
      continue
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = sorted({k[len(parent) :].split(".")[0] for k in flat if k.startswith(parent)})
    close = difflib.get_close_matches(key, list(flat), n=3, cutoff=0.5)
    close += [k for k in flat if k.endswith("." + key.rsplit(".", 1)[-1]) and k not in close]
    msg = f"unknown config key {key!r}"
    if siblings:
      msg += f"; the keys under {parent.rstrip('.') or 'config'!r} are: {', '.join(siblings)}"
    if close:
      msg += f". Did you mean {' or '.join(repr(c) for c in close)}?"
    return msg
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a clear message for an unknown `--config.KEY`."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:
    sys.exit(f"error: {_explain_bad_override(argv) or e}")
  except flags.Error as e:
    sys.exit(f"error: {e}\n\n{FLAGS.main_module_help()}")


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
