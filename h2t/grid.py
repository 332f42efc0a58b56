"""The hyperparameter grid: `config.sweep` -> grid points.

`config.sweep` is a string of `path=v1,v2,...` items separated by `;`, where
`path` is any config field below `learning.` or `backbone.`:

    --config.sweep='learning.feature_selection.keep_fraction=0.01,0.1;
                    learning.learning_rate=0.1,0.01'

A string keeps the sweep overridable from the command line (a locked
ConfigDict cannot gain keys there). Each value is parsed as a Python literal
and must have the type of the field it replaces. The grid is the Cartesian
product, in the order written (the last item varies fastest).

`plan` is the one place where grid points are grouped: by the features they
need (every field of `h2t.config.FEATURE_FIELDS`: backbone, checkpoint,
input size, taps, pooling), the task they select on (`fs_dataset`) and the
shape of their compiled program (`program_key`); identical learning configs
run once. `group_by` is the grouping primitive every caller uses.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import itertools
import json
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import ml_collections
import numpy as np

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
    if isinstance(like, float) and not isinstance(like, bool):
      try:
        value = float(value)  # 'nan', 'inf': numbers, which validation then refuses
      except ValueError:
        pass
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


def group_by(items: Sequence[Any], key: Callable[[Any], Hashable]) -> dict[Any, list[int]]:
  """Indices of `items` grouped by `key(item)`, groups and members in first-seen order."""
  groups: dict[Any, list[int]] = {}
  for i, item in enumerate(items):
    groups.setdefault(key(item), []).append(i)
  return groups


def _json(d: Any) -> str:
  return json.dumps(d, sort_keys=True, default=str)


def program_key(learning: ml_collections.ConfigDict) -> str:
  """What must be equal for grid points to share one compiled program.

  Everything except the traced values: learning rate, L1/L2/group
  coefficients, keep fraction and offset.
  """
  traced = {"learning_rate", "l1_regularizer", "l2_regularizer", "group_lrp_regularizer_coef"}
  d = {k: v for k, v in learning.to_dict().items() if k not in traced}
  fs = dict(d.pop("feature_selection"))
  fs.pop("keep_fraction")
  fs.pop("keep_fraction_offset")
  overwrite = {k: v for k, v in fs.pop("learning_config_overwrite").items() if k not in traced}
  return _json([d, fs, overwrite])


BACKBONE_FIELDS = ("backbone.name", "backbone.checkpoint", "backbone.input_size")


def backbone_key(config: ml_collections.ConfigDict) -> tuple[str, str, int]:
  """The network a point runs: (name, checkpoint, input size)."""
  b = config.backbone
  return (b.name, b.checkpoint, int(b.input_size))


def feature_key(config: ml_collections.ConfigDict, fields: Sequence[str]) -> str:
  """The values of `fields` (`h2t.config.FEATURE_FIELDS`: every setting that changes a point's
  features, or `BACKBONE_FIELDS` for 2-D taps such as `pre_logits`, which pooling does not change)."""

  def get(path):
    node = config
    for part in path.split("."):
      if part not in node:
        return ""  # older configs lack newer fields; their defaults apply
      node = node[part]
    return node

  return _json({f: get(f) for f in fields})


@dataclasses.dataclass(frozen=True)
class Batch:
  """Grid points of one method that run as one `head2toe.cross_validate` call.

  Attributes:
    method: the method's name.
    features: the `feature_key` of every point.
    source: the task selection runs on (`fs_dataset`; '' = the task itself).
    runs: groups of points whose learning configs are identical; the first
      point of each group is trained, the others share its accuracies.
  """

  method: str
  features: str
  source: str
  runs: tuple[tuple[int, ...], ...]

  @property
  def points(self) -> tuple[int, ...]:
    return tuple(i for run in self.runs for i in run)


def plan(grid_points, methods, feature_fields: Sequence[str]) -> list[Batch]:
  """Every (method, batch of grid points) the CV runs, in order.

  Args:
    grid_points: `points(config)`.
    methods: `h2t.methods.Method` records of the searched methods.
    feature_fields: the fields that change the features (`h2t.config.FEATURE_FIELDS`).
  """
  out = []
  for method in methods:
    learnings = [method.learning(cfg.learning) for _, cfg in grid_points]

    def key(i, method=method, learnings=learnings):
      cfg = grid_points[i][1]
      source = cfg.learning.feature_selection.get("fs_dataset", "") if method.selects else ""
      fields = feature_fields if method.pooled else BACKBONE_FIELDS
      return (feature_key(cfg, fields), source, program_key(learnings[i]))

    for (features, source, _), members in group_by(range(len(grid_points)), key).items():
      same = group_by(members, lambda i, learnings=learnings: _json(learnings[i].to_dict()))
      runs = tuple(tuple(members[j] for j in idx) for idx in same.values())
      out.append(Batch(method.name, features, source, runs))
  return out


def describe(batches: Sequence[Batch], grid_points) -> list[str]:
  """One line per batch: what the log prints once before the CV."""
  lines = []
  for b in batches:
    first = grid_points[b.runs[0][0]][0]
    lines.append(
      f"{b.method}: {len(b.runs)} distinct point(s) of {len(b.points)} in one program "
      f"(first {first or 'the config itself'})" + (f", selecting on {b.source}" if b.source else "")
    )
  return lines


def cv_units(num_batches: int, num_processes: int) -> np.ndarray:
  """`[num_batches, NUM_FOLDS]`: the process that runs each (batch, fold) of the CV (round robin).

  A unit is one fold of one `grid.plan` batch, with all the batch's points:
  each compiled program keeps the head axis of a one-process run, so its
  arithmetic, hence every fold accuracy, is the same bit for bit (splitting
  a batch's points instead changes the head count, and with it how XLA's CPU
  matmuls block their sums: the weights then differ in the last bits).
  """
  from h2t.data.base import NUM_FOLDS

  k = np.arange(num_batches * NUM_FOLDS).reshape(num_batches, NUM_FOLDS)
  return k % num_processes
