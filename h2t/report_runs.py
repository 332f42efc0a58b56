"""The runs a report reads: every results.json below some folders, as `Run`s.

Also the names the report gives tasks' groups, methods and metrics, and
`ReportError`, the user errors `python -m h2t.report` prints as one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from absl import logging

from h2t.data import vtab

GROUP_TITLES = {
  "natural": "Natural",
  "specialized": "Specialized",
  "structured": "Structured",
  "other": "Other",
}
GROUP_ORDER = ("natural", "specialized", "structured", "other")
METHOD_TITLES = {"head2toe": "Head2Toe", "linear": "Linear"}
METRIC_TITLES = {"test": "test", "valid": "5-fold CV"}
RESULTS_FILE = "results.json"
ACCURACY_KEYS = ("test_accuracy", "valid_accuracy")


class ReportError(ValueError):
  """A user error (missing folder, unusable --out, no runs); `python -m h2t.report` prints it as `error:`."""


def task_group(task: str) -> str:
  """'natural', 'specialized' or 'structured' for a VTAB-1k task, else 'other'."""
  spec = vtab.TASKS.get(task)
  return spec.group if spec is not None else "other"


def vtab_group_sizes() -> dict[str, int]:
  """Number of VTAB-1k tasks in each group (7, 4, 8)."""
  sizes = dict.fromkeys(vtab.GROUPS, 0)
  for spec in vtab.TASKS.values():
    sizes[spec.group] += 1
  return sizes


@dataclasses.dataclass(frozen=True)
class Run:
  """One results.json: `path` and its parsed `results`."""

  path: str
  results: Mapping[str, Any]

  @property
  def task(self) -> str:
    return self.results["task"]

  @property
  def backbone(self) -> str:
    return self.results["backbone"]["name"]

  @property
  def input_size(self) -> int:
    return int(self.results["backbone"]["input_size"])

  @property
  def label(self) -> str:
    """`<backbone>_<task>`, safe as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.backbone}_{self.task}")


def find_results(paths: Iterable[str]) -> list[str]:
  """Every results.json at or below `paths` (files or folders), sorted.

  Raises:
    ReportError: a path is neither a file nor a folder.
  """
  found = []
  for p in paths:
    if os.path.isfile(p):
      found.append(os.path.abspath(p))
      continue
    if not os.path.isdir(p):
      raise ReportError(f"{p!r}: no such folder or file; give folders of runs (or their results.json files)")
    for folder, _, files in os.walk(p):
      if RESULTS_FILE in files:
        found.append(os.path.abspath(os.path.join(folder, RESULTS_FILE)))
  return sorted(set(found))


def check_results(results: Any) -> None:
  """Raises ValueError saying what is missing when `results` is not what h2t.evaluate writes."""
  if not isinstance(results, Mapping):
    raise ValueError(f"a JSON {type(results).__name__}, not an object")
  missing = [k for k in ("task", "backbone", "methods") if k not in results]
  if missing:
    raise ValueError(f"lacks {', '.join(missing)}")
  backbone, methods = results["backbone"], results["methods"]
  if not isinstance(backbone, Mapping) or not {"name", "input_size"} <= set(backbone):
    raise ValueError("its backbone lacks name or input_size")
  if not isinstance(results["task"], str) or not isinstance(backbone["name"], str):
    raise ValueError("its task or backbone name is not a string")
  if not isinstance(methods, Mapping) or not all(isinstance(m, Mapping) for m in methods.values()):
    raise ValueError("its methods are not an object of objects")
  numbers = [("backbone input_size", backbone["input_size"])]
  numbers += [(f"{name} {k}", m[k]) for name, m in methods.items() for k in ACCURACY_KEYS if k in m]
  for what, value in numbers:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"its {what} {value!r} is not a number")


def load_runs(paths: Iterable[str], skipped: list[tuple[str, str]] | None = None) -> list[Run]:
  """Reads every results.json found by `find_results`.

  A damaged one (not JSON, cut short, or not what h2t.evaluate writes) is
  skipped with a warning that names it, and appended to `skipped` as
  `(path, reason)`: one bad file should not hide the other runs of a sweep,
  and the report lists what it left out (table.md, "Skipped").
  """
  runs = []
  for path in find_results(paths):
    try:
      with open(path, encoding="utf-8") as f:
        results = json.load(f)
      check_results(results)
    except (OSError, ValueError) as e:
      reason = getattr(e, "strerror", None) or str(e)
      logging.warning("skipping %s: not a readable h2t results file (%s)", path, reason)
      if skipped is not None:
        skipped.append((path, reason))
      continue
    runs.append(Run(path, results))
  return runs


def method_accuracy(method_results: Mapping[str, Any]) -> tuple[str, float] | None:
  """`(metric, accuracy in %)` of one method's results: test if present, else CV."""
  if "test_accuracy" in method_results:
    return "test", 100.0 * float(method_results["test_accuracy"])
  if "valid_accuracy" in method_results:
    return "valid", 100.0 * float(method_results["valid_accuracy"])
  return None
