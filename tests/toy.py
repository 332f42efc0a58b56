"""Small shared pieces of the tests: toy features, config overrides, and `python -m h2t.main` runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np
from absl.testing import parameterized

import configs.vtab as vtab_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "vtab.py")
FAST_INPUT_SIZE = 32
NO_GRID = "--config.sweep="  # no hyperparameter grid: the config's own point, no 5-fold CV


def fast(steps: int = 30) -> tuple[str, ...]:
  """Overrides for a small, fast run on the real packaged backbone: 32 px inputs, `steps` training steps."""
  return (
    f"--config.backbone.input_size={FAST_INPUT_SIZE}",
    "--config.backbone.additional_features_target_size=64",
    f"--config.learning.training_steps={steps}",
  )


FAST = fast()


def environ(env_extra: Mapping[str, str] | None = None) -> dict[str, str]:
  """This process's environment with this checkout first on PYTHONPATH, and `env_extra` set."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.update(env_extra or {})
  return env


def run_command(cmd: Sequence[str], *, env_extra=None, timeout: float = 600) -> subprocess.CompletedProcess:
  """Runs `cmd` to its end in this checkout (cwd and PYTHONPATH), its output captured as text."""
  return subprocess.run(
    cmd, capture_output=True, text=True, env=environ(env_extra), cwd=ROOT, timeout=timeout
  )


def run_python(*args: str, env_extra=None, timeout: float = 600) -> subprocess.CompletedProcess:
  """`python ARGS...` through `run_command`."""
  return run_command([sys.executable, *args], env_extra=env_extra, timeout=timeout)


def main_command(workdir: str, *overrides: str, fast: Sequence[str] = FAST) -> list[str]:
  """The `python -m h2t.main` command line for `workdir`: the vtab config, then `fast`, then `overrides`."""
  return [sys.executable, "-m", "h2t.main", f"--config={CONFIG}", f"--workdir={workdir}", *fast, *overrides]


def run_main(
  workdir: str, *overrides: str, fast: Sequence[str] = FAST, env_extra=None, timeout: float = 600
) -> subprocess.CompletedProcess:
  """Runs `main_command(workdir, *overrides, fast=fast)` to its end."""
  return run_command(main_command(workdir, *overrides, fast=fast), env_extra=env_extra, timeout=timeout)


def results(workdir: str) -> dict:
  """The run's results.json."""
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def make_tempdir(test, prefix: str = "h2t_test_") -> str:
  """A fresh folder, removed after the test (absltest's create_tempdir needs parsed flags)."""
  path = tempfile.mkdtemp(prefix=prefix)
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def override(config: ml_collections.ConfigDict, **values) -> ml_collections.ConfigDict:
  """Sets dotted paths (`override(c, **{'feature_selection.keep_fraction': 0.1})`); returns `config`."""
  for key, value in values.items():
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def learning(steps: int = 60, **values) -> ml_collections.ConfigDict:
  """The default `config.learning` with `steps` training steps and `values` set."""
  base = vtab_config.get_config().learning
  base.training_steps = steps
  return override(base, **values)


def two_taps(seed: int = 0, n: int = 200, labels: np.ndarray | None = None):
  """`({'a': [n, 30] noise, 'b': [n, 20]}, labels [n])`: 3 classes, the label in b's first 3 features."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, n).astype(np.int32) if labels is None else labels
  a = rng.normal(size=(n, 30)).astype(np.float32)
  b = rng.normal(size=(n, 20)).astype(np.float32)
  b[:, :3] += 4.0 * np.eye(3, dtype=np.float32)[labels]
  return {"a": a, "b": b}, labels


class TempDirTestCase(parameterized.TestCase):
  """A test case with its own temporary folder: `self.dir`, and `self.path(name)` inside it."""

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.dir = tmp.name

  def path(self, name: str) -> str:
    return os.path.join(self.dir, name)
