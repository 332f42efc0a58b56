"""Tables and figures from results.json files: `python -m h2t.report RESULTS_DIR... [--out=DIR]`.

Every `results.json` below the given folders (recursively) is read. Written
to `--out` (default: `<first RESULTS_DIR>/report`):

  table.md, table.csv   accuracy in the layout of the paper's Table 1: one row
                        per (method, backbone, metric), the VTAB-1k tasks in
                        their groups (Natural, Specialized, Structured), each
                        group's mean, and the VTAB mean = the mean of the three
                        group means (how VTAB-1k and the paper average: the
                        published 70.9 is the mean of 80.2, 84.7 and 47.7).
                        Other tasks (digits, image folders, ...) go in an
                        "Other" group that no mean counts. table.md also lists
                        every run (input size, features kept, head size, time).
  runs.csv              one line per (run, method), with those details.
  *.png                 the figures of h2t.report_figures: kept features per
                        tap, per task and per backbone, and CV accuracy over
                        the grid.

Accuracies are in percent. A row reports test accuracy when its runs have
one, else (eval_mode 'valid') the mean 5-fold CV accuracy, marked as such.

A damaged results.json (not JSON, cut short, not what h2t.evaluate writes)
is skipped with a warning naming it, and listed under "Skipped" in table.md:
one bad file should not hide the rest of a sweep, and the report says what
it left out. The command fails, with one `error:` line, when a RESULTS_DIR
does not exist, when no readable results.json is found, or when `--out` is a
file or cannot be written.

This module holds the tables and the command; h2t.report_runs reads the
runs and h2t.report_figures draws; their public names are importable from
here too.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging

from h2t.data import vtab
from h2t.report_figures import (
  chosen_index,
  grid_entries,
  plot_grid,
  plot_kept_per_tap,
  plot_kept_share,
  write_figures,
)
from h2t.report_runs import (
  GROUP_ORDER,
  GROUP_TITLES,
  METHOD_TITLES,
  METRIC_TITLES,
  RESULTS_FILE,
  ReportError,
  Run,
  find_results,
  load_runs,
  method_accuracy,
  task_group,
  vtab_group_sizes,
)

__all__ = [
  "GROUP_ORDER",
  "GROUP_TITLES",
  "METHOD_TITLES",
  "METRIC_TITLES",
  "RESULTS_FILE",
  "ReportError",
  "Row",
  "Run",
  "chosen_index",
  "find_results",
  "grid_entries",
  "load_runs",
  "markdown_report",
  "markdown_table",
  "method_accuracy",
  "plot_grid",
  "plot_kept_per_tap",
  "plot_kept_share",
  "run_records",
  "table_columns",
  "table_grid",
  "table_rows",
  "task_group",
  "vtab_group_sizes",
  "write_figures",
  "write_report",
]


@dataclasses.dataclass
class Row:
  """One table row: a method on a backbone, one accuracy (%) per task."""

  method: str
  backbone: str
  metric: str
  accuracies: dict[str, float] = dataclasses.field(default_factory=dict)
  sources: dict[str, str] = dataclasses.field(default_factory=dict)

  @property
  def title(self) -> str:
    method = METHOD_TITLES.get(self.method, self.method)
    metric = "" if self.metric == "test" else f" ({METRIC_TITLES.get(self.metric, self.metric)})"
    return f"{method}{metric}"

  def group_mean(self, group: str) -> float | None:
    """Mean over the group's tasks this row has (None if it has none)."""
    values = [a for t, a in self.accuracies.items() if task_group(t) == group]
    return sum(values) / len(values) if values else None

  def group_count(self, group: str) -> int:
    return sum(task_group(t) == group for t in self.accuracies)

  def vtab_mean(self) -> float | None:
    """Mean of the VTAB group means (None without any VTAB task)."""
    means = [m for m in (self.group_mean(g) for g in vtab.GROUPS) if m is not None]
    return sum(means) / len(means) if means else None

  def vtab_complete(self) -> bool:
    return all(self.group_count(g) == n for g, n in vtab_group_sizes().items())


def table_rows(runs: Sequence[Run]) -> list[Row]:
  """Rows keyed by (method, backbone, metric), in first-seen order.

  When several runs give the same cell, the newest results.json wins and a
  warning names both files.
  """
  rows: dict[tuple[str, str, str], Row] = {}
  mtimes: dict[str, float] = {}
  for run in runs:
    for method, r in run.results["methods"].items():
      got = method_accuracy(r)
      if got is None:
        continue
      metric, acc = got
      row = rows.setdefault((method, run.backbone, metric), Row(method, run.backbone, metric))
      previous = row.sources.get(run.task)
      mtime = os.path.getmtime(run.path)
      if previous is not None:
        keep_new = mtime >= mtimes[previous]
        logging.warning(
          "%s on %s/%s appears in %s and %s; reporting %s",
          method,
          run.backbone,
          run.task,
          previous,
          run.path,
          run.path if keep_new else previous,
        )
        if not keep_new:
          continue
      row.accuracies[run.task] = acc
      row.sources[run.task] = run.path
      mtimes[run.path] = mtime
  return list(rows.values())


def table_columns(rows: Sequence[Row]) -> list[tuple[str, list[str]]]:
  """`[(group, tasks)]` of the groups any row has, tasks in VTAB's order (others sorted)."""
  present = {t for row in rows for t in row.accuracies}
  columns = []
  for group in GROUP_ORDER:
    if group == "other":
      tasks = sorted(t for t in present if task_group(t) == "other")
    else:
      tasks = [t for t, spec in vtab.TASKS.items() if spec.group == group and t in present]
    if tasks:
      columns.append((group, tasks))
  return columns


def _fmt(value: float | None, digits: int = 1) -> str:
  return "" if value is None else f"{value:.{digits}f}"


def table_grid(rows: Sequence[Row], *, digits: int = 1, mark_incomplete: bool = True) -> list[list[str]]:
  """The Table 1 layout as a header line plus one line of strings per row."""
  columns = table_columns(rows)
  has_vtab = any(g != "other" for g, _ in columns)
  sizes = vtab_group_sizes()
  header = ["method", "backbone"]
  for group, tasks in columns:
    header += tasks
    if group != "other":
      header.append(f"{GROUP_TITLES[group]} mean")
  if has_vtab:
    header.append("VTAB mean")
  lines = [header]
  for row in rows:
    line = [row.title, row.backbone]
    for group, tasks in columns:
      line += [_fmt(row.accuracies.get(t), digits) for t in tasks]
      if group != "other":
        mean = _fmt(row.group_mean(group), digits)
        n = row.group_count(group)
        if mark_incomplete and mean and n < sizes[group]:
          mean += f" ({n}/{sizes[group]})"
        line.append(mean)
    if has_vtab:
      mean = _fmt(row.vtab_mean(), digits)
      if mark_incomplete and mean and not row.vtab_complete():
        mean += " *"
      line.append(mean)
    lines.append(line)
  return lines


def markdown_table(lines: Sequence[Sequence[str]]) -> str:
  header, *body = lines
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  out += ["| " + " | ".join(line) + " |" for line in body]
  return "\n".join(out)


def run_records(runs: Sequence[Run], base: str | None = None) -> list[dict[str, Any]]:
  """One flat record per (run, method): what runs.csv and the run list hold.

  Paths are relative to `base` when given (so that a report moved with its
  results still names them).
  """
  records = []
  for run in runs:
    r = run.results
    for method, m in r["methods"].items():
      got = method_accuracy(m)
      timings = r.get("timings_s", {})
      records.append(
        {
          "task": run.task,
          "group": GROUP_TITLES[task_group(run.task)],
          "backbone": run.backbone,
          "input_size": run.input_size,
          "method": method,
          "metric": got[0] if got else "",
          "accuracy": round(got[1], 4) if got else "",
          "valid_accuracy": round(100 * m["valid_accuracy"], 4) if "valid_accuracy" in m else "",
          "num_kept": m.get("num_kept", ""),
          "num_features": r.get("num_features", ""),
          "head_bytes": m.get("head_bytes", ""),
          "time_s": round(sum(timings.values()), 1) if timings else "",
          "path": os.path.relpath(run.path, base) if base else run.path,
        }
      )
  return records


def _csv_text(lines: Sequence[Sequence[Any]]) -> str:
  buf = io.StringIO()
  csv.writer(buf, lineterminator="\n").writerows(lines)
  return buf.getvalue()


def _atomic_write(path: str, data: str | bytes) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)
  os.replace(tmp, path)


def markdown_report(rows: Sequence[Row], runs: Sequence[Run], skipped: Sequence[tuple[str, str]] = ()) -> str:
  """table.md: the Table 1 layout, its notes, the list of runs, and the results files it skipped."""
  parts = ["# h2t results", "", "Accuracy (%).", "", markdown_table(table_grid(rows)), ""]
  notes = []
  if any(g != "other" for g, _ in table_columns(rows)):
    notes.append(
      "VTAB mean = mean of the Natural, Specialized and Structured group means, as VTAB-1k and the "
      "paper report it. `(k/n)`: a group mean over k of its n tasks; `*`: a VTAB mean without all 19 tasks."
    )
  if any(g == "other" for g, _ in table_columns(rows)):
    notes.append("Other: tasks outside VTAB-1k, counted in no mean.")
  if any(row.metric == "valid" for row in rows):
    notes.append("5-fold CV: mean accuracy over the 5 folds of the 1000 training images (eval_mode 'valid').")
  parts += [f"- {n}" for n in notes] + ["", "## Runs", ""]
  fields = ["task", "backbone", "input_size", "method", "metric", "accuracy", "num_kept", "num_features"]
  fields += ["head_bytes", "time_s"]
  records = run_records(runs)
  lines = [
    ["task", "backbone", "input px", "method", "metric", "accuracy", "kept", "of", "head bytes", "time s"]
  ]
  lines += [
    [f"{rec[f]:.2f}" if isinstance(rec[f], float) else str(rec[f]) for f in fields] for rec in records
  ]
  parts += [markdown_table(lines), ""]
  if skipped:
    parts += ["## Skipped", "", "Not readable as h2t results, so in no table:", ""]
    parts += [f"- `{path}`: {reason}" for path, reason in skipped] + [""]
  return "\n".join(parts)


# ----------------------------------------------------------------------------- entry points


def prepare_out(out: str) -> None:
  """Creates the report folder `out`; ReportError naming it when it is a file or cannot be written."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise ReportError(f"--out {out!r} is a file, not a folder; give --out a new or existing folder")
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise ReportError(
      f"cannot create --out {out!r} ({e.strerror or e}); give --out a folder you can write to"
    ) from e
  if not os.access(out, os.W_OK | os.X_OK):
    raise ReportError(
      f"cannot write in --out {out!r} (permission denied); give --out a folder you can write to"
    )


def write_report(paths: Sequence[str], out: str) -> dict[str, list[str]]:
  """Writes the tables and figures of every results.json below `paths` into `out`.

  Returns:
    `{'tables': [...], 'figures': [...]}`, the files written.

  Raises:
    ReportError: a path does not exist, no readable results.json was found,
      or `out` is a file or cannot be written.
  """
  skipped: list[tuple[str, str]] = []
  runs = load_runs(paths, skipped)
  if not runs:
    where = ", ".join(paths)
    if not skipped:
      raise ReportError(f"no {RESULTS_FILE} found below {where}; give the folders that hold the runs")
    first, reason = skipped[0]
    more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
    raise ReportError(f"no readable {RESULTS_FILE} below {where}: {first} ({reason}){more} skipped")
  prepare_out(out)
  rows = table_rows(runs)
  written: dict[str, list[str]] = {"tables": [], "figures": []}

  def put(name: str, text: str) -> None:
    path = os.path.join(out, name)
    _atomic_write(path, text)
    written["tables"].append(path)

  try:
    put("table.md", markdown_report(rows, runs, skipped))
    put("table.csv", _csv_text(table_grid(rows, digits=2, mark_incomplete=False)))
    base = os.path.commonpath([os.path.abspath(p if os.path.isdir(p) else os.path.dirname(p)) for p in paths])
    records = run_records(runs, base)
    put("runs.csv", _csv_text([list(records[0])] + [list(r.values()) for r in records]))
    written["figures"] = write_figures(runs, out)
  except OSError as e:
    raise ReportError(
      f"cannot write {e.filename or out!r} ({e.strerror or e}); give --out a folder you can write to"
    ) from e
  return written


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags, defined only when run as a program (importing defines none)."""
  flags.DEFINE_string("out", None, "Folder for the tables and figures (default: <first RESULTS_DIR>/report).")


def main(argv: Sequence[str]) -> None:
  paths = list(argv[1:])
  if not paths:
    sys.exit("error: name a folder of runs: python -m h2t.report RESULTS_DIR [RESULTS_DIR...] [--out=DIR]")
  out = FLAGS.out or os.path.join(
    paths[0] if os.path.isdir(paths[0]) else os.path.dirname(paths[0]), "report"
  )
  try:
    written = write_report(paths, out)
  except ReportError as e:
    sys.exit(f"error: {e}")
  with open(os.path.join(out, "table.md")) as f:
    print(f.read())
  for kind, files in written.items():
    print(f"{kind}: " + (", ".join(files) if files else "none"))


if __name__ == "__main__":
  define_flags()
  app.run(main)
