"""The hyperparameter grid: `config.sweep` -> grid points.

`config.sweep` is a string of `path=v1,v2,...` items separated by `;`, where
`path` is any config field below `learning.` or `backbone.`:

    --config.sweep='learning.feature_selection.keep_fraction=0.01,0.1;
                    learning.learning_rate=0.1,0.01'

A string keeps the sweep overridable from the command line (a locked
ConfigDict cannot gain keys there). Each value is parsed as a Python literal
and must have the type of the field it replaces. The grid is the Cartesian
product, in the order written (the last item varies fastest).
"""

from __future__ import annotations

import ast
import copy
import itertools
from collections.abc import Sequence
from typing import Any

import ml_collections

SWEEPABLE_PREFIXES = ("learning.", "backbone.")


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ValueError(f"config.sweep names {path!r}, which is not a config field")
    node = node[part]
  return node


def _set(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  *parents, leaf = path.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def _parse_value(text: str, like: Any, path: str) -> Any:
  try:
    value = ast.literal_eval(text.strip())
  except (ValueError, SyntaxError):
    value = text.strip()  # a bare word: a string option such as 'sgd'
  if isinstance(like, bool) or isinstance(value, bool):
    ok = isinstance(like, bool) and isinstance(value, bool)
  elif isinstance(like, float):
    ok = isinstance(value, (int, float))
    value = float(value) if ok else value
  else:
    ok = isinstance(value, type(like))
  if not ok:
    raise ValueError(
      f"config.sweep: {path}={text.strip()!r} is a {type(value).__name__}; the field is a {type(like).__name__}"
    )
  return value


def parse_sweep(sweep: str, config: ml_collections.ConfigDict) -> list[tuple[str, list[Any]]]:
  """`'a.b=1,2;c=x'` -> `[('a.b', [1, 2]), ('c', ['x'])]`, checked against `config`."""
  items = []
  for chunk in sweep.split(";"):
    chunk = chunk.strip()
    if not chunk:
      continue
    if "=" not in chunk:
      raise ValueError(f"config.sweep item {chunk!r} is not of the form path=v1,v2")
    path, values = (s.strip() for s in chunk.split("=", 1))
    if not path.startswith(SWEEPABLE_PREFIXES):
      raise ValueError(f"config.sweep: {path!r} is not below {' or '.join(SWEEPABLE_PREFIXES)}")
    like = _get(config, path)
    if isinstance(like, ml_collections.ConfigDict):
      raise ValueError(f"config.sweep: {path!r} is a group of options, not one option")
    parsed = [_parse_value(v, like, path) for v in values.split(",") if v.strip()]
    if not parsed:
      raise ValueError(f"config.sweep: {path!r} has no values")
    if any(p == path for p, _ in items):
      raise ValueError(f"config.sweep names {path!r} twice")
    items.append((path, parsed))
  return items


def points(config: ml_collections.ConfigDict) -> list[tuple[dict[str, Any], ml_collections.ConfigDict]]:
  """Every grid point: `(overrides {path: value}, full config)`.

  With an empty sweep there is one point: the config itself.
  """
  items = parse_sweep(config.get("sweep", ""), config)
  out = []
  for combo in itertools.product(*[values for _, values in items]):
    overrides = {path: value for (path, _), value in zip(items, combo, strict=True)}
    point = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
    for path, value in overrides.items():
      _set(point, path, value)
    out.append((overrides, point))
  return out


def group_by(points_: Sequence[tuple[dict[str, Any], Any]], key) -> dict[Any, list[int]]:
  """Indices of points grouped by `key(config)`, in first-seen order."""
  groups: dict[Any, list[int]] = {}
  for i, (_, cfg) in enumerate(points_):
    groups.setdefault(key(cfg), []).append(i)
  return groups
