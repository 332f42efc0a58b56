"""Small shared pieces of the tests: toy features and config overrides."""

from __future__ import annotations

import ml_collections
import numpy as np

import configs.vtab as vtab_config


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
