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
  kept_per_tap_<backbone>_<task>.png
                        where Head2Toe's kept features come from: kept count
                        and kept share of each tap, taps in network order.
  kept_share_<backbone>.png
                        the same for every task of a backbone, as a heatmap
                        (two or more tasks with the same taps).
  cv_grid_<backbone>_<task>.png
                        5-fold CV accuracy over the hyperparameter grid, per
                        method, with the chosen point marked (runs with a grid).

Accuracies are in percent. A row reports test accuracy when its runs have
one, else (eval_mode 'valid') the mean 5-fold CV accuracy, marked as such.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

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
  """Every results.json at or below `paths` (files or folders), sorted."""
  found = []
  for p in paths:
    if os.path.isfile(p):
      found.append(os.path.abspath(p))
      continue
    if not os.path.isdir(p):
      raise FileNotFoundError(f"{p!r} is neither a results.json file nor a folder")
    for folder, _, files in os.walk(p):
      if RESULTS_FILE in files:
        found.append(os.path.abspath(os.path.join(folder, RESULTS_FILE)))
  return sorted(set(found))


def load_runs(paths: Iterable[str]) -> list[Run]:
  """Reads every results.json found by `find_results`; unreadable ones are skipped with a warning."""
  runs = []
  for path in find_results(paths):
    try:
      with open(path) as f:
        results = json.load(f)
      if not isinstance(results.get("backbone"), Mapping) or not {"task", "methods"} <= set(results):
        raise ValueError("lacks task, backbone or methods")
    except (OSError, ValueError, AttributeError) as e:
      logging.warning("skipping %s: not a readable h2t results file (%s)", path, e)
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


def markdown_report(rows: Sequence[Row], runs: Sequence[Run]) -> str:
  """table.md: the Table 1 layout, its notes, and the list of runs."""
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
  return "\n".join(parts)


# ----------------------------------------------------------------------------- figures


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")  # files only; works with no display
  import matplotlib.pyplot as plt

  return plt


def _kept_counts(run: Run, method: str = "head2toe") -> tuple[list[str], list[int], list[int]] | None:
  """`(taps in network order, kept per tap, features per tap)`, or None without that method."""
  m = run.results["methods"].get(method, {})
  kept = m.get("kept_per_tap")
  if not kept:
    return None
  taps = list(run.results.get("taps") or kept)
  sizes = run.results.get("tap_sizes", {})
  return taps, [int(kept.get(t, 0)) for t in taps], [int(sizes.get(t, 0)) for t in taps]


def plot_kept_per_tap(run: Run, path: str) -> bool:
  """Bar chart of Head2Toe's kept features per tap (count, and share of the tap). False: nothing to plot."""
  got = _kept_counts(run)
  if got is None:
    return False
  taps, kept, sizes = got
  plt = _pyplot()
  m = run.results["methods"]["head2toe"]
  fig, ax = plt.subplots(figsize=(max(8.0, 0.22 * len(taps) + 2.0), 5.0), constrained_layout=True)
  x = list(range(len(taps)))
  ax.bar(x, kept, color="tab:blue", label="kept features (left axis)")
  ax.set_ylabel("kept features")
  ax.set_xticks(x)
  ax.set_xticklabels(taps, rotation=90, fontsize=7)
  ax.set_xlim(-0.7, len(taps) - 0.3)
  ax.set_xlabel("tap (network order: input → output)")
  share = ax.twinx()
  pct = [100.0 * k / s if s else 0.0 for k, s in zip(kept, sizes)]
  share.plot(
    x, pct, "o", color="tab:orange", markersize=3.5, label="% of the tap's features kept (right axis)"
  )
  share.set_ylabel("% of the tap's features kept")
  share.set_ylim(0, max(5.0, max(pct) * 1.1))
  handles = ax.get_legend_handles_labels()[0] + share.get_legend_handles_labels()[0]
  ax.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
  acc = method_accuracy(m)
  acc_text = f", {acc[1]:.2f}% {METRIC_TITLES[acc[0]]}" if acc else ""
  num_features = run.results.get("num_features", sum(sizes))
  ax.set_title(
    f"Head2Toe on {run.task}: where the kept features come from\n"
    f"{run.backbone} at {run.input_size} px; {sum(kept)} of {num_features} features kept "
    f"from {sum(k > 0 for k in kept)} of {len(taps)} taps{acc_text}",
    fontsize=10,
  )
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def plot_kept_share(runs: Sequence[Run], path: str) -> bool:
  """Heatmap: rows = tasks, columns = taps; cell = % of the task's kept features from that tap.

  Needs two or more runs of one backbone with the same taps. False: nothing to plot.
  """
  counted = [(run, _kept_counts(run)) for run in runs]
  counted = [(run, c) for run, c in counted if c is not None]
  if len(counted) < 2 or len({tuple(c[0]) for _, c in counted}) != 1:
    return False
  import matplotlib.colors

  plt = _pyplot()
  taps = counted[0][1][0]
  share = np.array([[100.0 * k / max(sum(c[1]), 1) for k in c[1]] for _, c in counted])
  labels = [f"{run.task} ({run.input_size} px)" for run, _ in counted]
  fig, ax = plt.subplots(
    figsize=(max(8.0, 0.22 * len(taps) + 3.0), 2.6 + 0.4 * len(counted)), constrained_layout=True
  )
  # Square-root colours: one tap (often the last) can hold a third of the features and would wash out the rest.
  norm = matplotlib.colors.PowerNorm(0.5, vmin=0.0, vmax=max(float(share.max()), 1e-9))
  im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest", norm=norm)
  ax.set_xticks(range(len(taps)))
  ax.set_xticklabels(taps, rotation=90, fontsize=7)
  ax.set_yticks(range(len(labels)))
  ax.set_yticklabels(labels, fontsize=9)
  ax.set_xlabel("tap (network order: input → output)")
  fig.colorbar(im, ax=ax, label="% of kept", pad=0.01)
  ax.set_title(
    f"Head2Toe on {counted[0][0].backbone}: share of each task's kept features per tap (square-root colour scale)",
    fontsize=10,
  )
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def grid_entries(results: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
  """`{method: [{'point': {param: value}, 'fold_accuracies': [...], 'mean': float}]}`.

  Accepts `results['grid']` as that dict or as one list (for 'head2toe');
  returns {} when the run has no grid or a malformed one.
  """
  grid = results.get("grid")
  if not grid:
    return {}
  by_method = {"head2toe": grid} if isinstance(grid, list) else dict(grid)
  out = {}
  for method, entries in by_method.items():
    ok = (
      isinstance(entries, list) and entries and all(isinstance(e, Mapping) and "point" in e for e in entries)
    )
    if not ok:
      logging.warning("results['grid'][%r] is not a list of grid points; not plotted", method)
      continue
    clean = []
    for e in entries:
      folds = [100.0 * float(a) for a in e.get("fold_accuracies", [])]
      mean = 100.0 * float(e["mean"]) if "mean" in e else (sum(folds) / len(folds) if folds else math.nan)
      clean.append({"point": dict(e["point"]), "folds": folds, "mean": mean})
    out[method] = clean
  return out


def chosen_index(results: Mapping[str, Any], method: str, entries: Sequence[Mapping[str, Any]]) -> int | None:
  """Index of the chosen grid point: the run's own record when present, else the best mean."""
  chosen = results.get("methods", {}).get(method, {}).get("chosen_point")
  if chosen is None:
    top = results.get("chosen")
    chosen = top.get(method, top) if isinstance(top, Mapping) else top
  if isinstance(chosen, int) and 0 <= chosen < len(entries):
    return chosen
  if isinstance(chosen, Mapping):
    for i, e in enumerate(entries):
      if e["point"] == dict(chosen):
        return i
  means = [e["mean"] for e in entries]
  return max(range(len(means)), key=lambda i: means[i]) if means else None


def _short_names(params: Sequence[str]) -> dict[str, str]:
  """Last path component of each parameter, longer where that is ambiguous."""
  out = {}
  for p in params:
    parts = p.split(".")
    k = 1
    while k < len(parts) and sum(q.split(".")[-k:] == parts[-k:] for q in params) > 1:
      k += 1
    out[p] = ".".join(parts[-k:])
  return out


def _fmt_value(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:g}"
  return str(v)


def _plot_grid_1d(ax, entries, param: str, name: str, chosen: int | None) -> None:
  values = [e["point"][param] for e in entries]
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
  if numeric:
    xs = [float(v) for v in values]
    if min(xs) > 0 and max(xs) / min(xs) >= 10:
      ax.set_xscale("log")
  else:
    xs = list(range(len(values)))
    ax.set_xticks(xs)
    ax.set_xticklabels([_fmt_value(v) for v in values])
  order = sorted(range(len(xs)), key=lambda i: xs[i])
  for i in order:
    ax.plot([xs[i]] * len(entries[i]["folds"]), entries[i]["folds"], ".", color="0.6", markersize=4)
  ax.plot(
    [xs[i] for i in order], [entries[i]["mean"] for i in order], "o-", color="tab:blue", label="mean of folds"
  )
  ax.plot([], [], ".", color="0.6", label="one fold")
  if chosen is not None:
    ax.plot([xs[chosen]], [entries[chosen]["mean"]], "*", color="tab:red", markersize=14, label="chosen")
  ax.set_xlabel(name)
  ax.set_ylabel("CV accuracy (%)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)


def _plot_grid_2d(
  fig, ax, entries, params: Sequence[str], names: Mapping[str, str], chosen: int | None
) -> None:
  import matplotlib.patches

  py, px = params
  ys = list(dict.fromkeys(e["point"][py] for e in entries))
  xs = list(dict.fromkeys(e["point"][px] for e in entries))
  acc = np.full((len(ys), len(xs)), np.nan)
  for e in entries:
    acc[ys.index(e["point"][py]), xs.index(e["point"][px])] = e["mean"]
  im = ax.imshow(acc, cmap="viridis", aspect="auto")
  finite = acc[np.isfinite(acc)]
  middle = (finite.min() + finite.max()) / 2 if finite.size else 0
  for i in range(len(ys)):
    for j in range(len(xs)):
      if np.isfinite(acc[i, j]):
        color = "black" if acc[i, j] > middle else "white"
        ax.text(j, i, f"{acc[i, j]:.1f}", ha="center", va="center", fontsize=9, color=color)
  if chosen is not None:
    i, j = ys.index(entries[chosen]["point"][py]), xs.index(entries[chosen]["point"][px])
    ax.add_patch(
      matplotlib.patches.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5)
    )
  ax.set_xticks(range(len(xs)))
  ax.set_xticklabels([_fmt_value(v) for v in xs])
  ax.set_yticks(range(len(ys)))
  ax.set_yticklabels([_fmt_value(v) for v in ys])
  ax.set_xlabel(names[px])
  ax.set_ylabel(names[py])
  fig.colorbar(im, ax=ax, label="mean CV accuracy (%)")


def _plot_grid_bars(ax, entries, params: Sequence[str], names: Mapping[str, str], chosen: int | None) -> None:
  labels = [", ".join(f"{names[p]}={_fmt_value(e['point'][p])}" for p in params) for e in entries]
  ys = list(range(len(entries)))
  colors = ["tab:red" if i == chosen else "tab:blue" for i in ys]
  ax.barh(ys, [e["mean"] for e in entries], color=colors)
  ax.set_yticks(ys)
  ax.set_yticklabels(labels, fontsize=7)
  ax.invert_yaxis()
  low = min(e["mean"] for e in entries)
  ax.set_xlim(max(0.0, low - 5), 100)
  ax.set_xlabel("mean CV accuracy (%) (red: chosen)")


def plot_grid(run: Run, path: str) -> bool:
  """CV accuracy over the grid, one panel per method. False: no grid of 2+ points with differing results."""
  # A method the grid does not change (linear under a keep-fraction sweep) gets no panel.
  grids = {
    m: e
    for m, e in grid_entries(run.results).items()
    if len(e) > 1 and len({json.dumps([x["mean"], x["folds"]]) for x in e}) > 1
  }
  if not grids:
    return False
  plt = _pyplot()
  width = 6.0
  fig, axes = plt.subplots(
    1, len(grids), figsize=(width * len(grids), 4.6), constrained_layout=True, squeeze=False
  )
  for ax, (method, entries) in zip(axes[0], grids.items()):
    params = list(dict.fromkeys(p for e in entries for p in e["point"]))
    varying = [p for p in params if len({json.dumps(e["point"].get(p)) for e in entries}) > 1]
    names = _short_names(varying)
    chosen = chosen_index(run.results, method, entries)
    if len(varying) == 1:
      _plot_grid_1d(ax, entries, varying[0], names[varying[0]], chosen)
    elif len(varying) == 2 and len(entries) == len(
      {(json.dumps(e["point"][varying[0]]), json.dumps(e["point"][varying[1]])) for e in entries}
    ):
      _plot_grid_2d(fig, ax, entries, varying, names, chosen)
    else:
      _plot_grid_bars(ax, entries, varying or params, _short_names(varying or params), chosen)
    title = METHOD_TITLES.get(method, method)
    if chosen is not None:
      best = entries[chosen]
      setting = ", ".join(f"{names.get(p, p)}={_fmt_value(best['point'][p])}" for p in varying)
      title += f": chosen {setting} ({best['mean']:.1f}%)"
    ax.set_title(title, fontsize=9)
  fig.suptitle(
    f"5-fold CV accuracy over the grid: {run.task}, {run.backbone} at {run.input_size} px", fontsize=10
  )
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


# ----------------------------------------------------------------------------- entry points


def write_report(paths: Sequence[str], out: str) -> dict[str, list[str]]:
  """Writes the tables and figures of every results.json below `paths` into `out`.

  Returns:
    `{'tables': [...], 'figures': [...]}`, the files written.
  """
  runs = load_runs(paths)
  if not runs:
    raise FileNotFoundError(f"no {RESULTS_FILE} found below {', '.join(paths)}")
  os.makedirs(out, exist_ok=True)
  rows = table_rows(runs)
  written: dict[str, list[str]] = {"tables": [], "figures": []}

  def put(name: str, text: str) -> None:
    path = os.path.join(out, name)
    _atomic_write(path, text)
    written["tables"].append(path)

  put("table.md", markdown_report(rows, runs))
  put("table.csv", _csv_text(table_grid(rows, digits=2, mark_incomplete=False)))
  base = os.path.commonpath([os.path.abspath(p if os.path.isdir(p) else os.path.dirname(p)) for p in paths])
  records = run_records(runs, base)
  put("runs.csv", _csv_text([list(records[0])] + [list(r.values()) for r in records]))

  by_backbone: dict[str, list[Run]] = {}
  labels: dict[str, int] = {}
  for run in runs:
    by_backbone.setdefault(run.backbone, []).append(run)
    # Two runs of one task and backbone (other settings) get distinct file names.
    labels[run.label] = labels.get(run.label, 0) + 1
    label = run.label if labels[run.label] == 1 else f"{run.label}_{labels[run.label]}"
    for name, plot in (("kept_per_tap", plot_kept_per_tap), ("cv_grid", plot_grid)):
      path = os.path.join(out, f"{name}_{label}.png")
      if plot(run, path):
        written["figures"].append(path)
  for backbone, group in by_backbone.items():
    path = os.path.join(out, f"kept_share_{re.sub(r'[^A-Za-z0-9_.-]+', '_', backbone)}.png")
    if plot_kept_share(sorted(group, key=lambda r: (GROUP_ORDER.index(task_group(r.task)), r.task)), path):
      written["figures"].append(path)
  return written


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags, defined only when run as a program (importing defines none)."""
  flags.DEFINE_string("out", None, "Folder for the tables and figures (default: <first RESULTS_DIR>/report).")


def main(argv: Sequence[str]) -> None:
  paths = list(argv[1:])
  if not paths:
    raise app.UsageError("usage: python -m h2t.report RESULTS_DIR [RESULTS_DIR...] [--out=DIR]")
  out = FLAGS.out or os.path.join(
    paths[0] if os.path.isdir(paths[0]) else os.path.dirname(paths[0]), "report"
  )
  try:
    written = write_report(paths, out)
  except FileNotFoundError as e:
    sys.exit(f"error: {e}")
  with open(os.path.join(out, "table.md")) as f:
    print(f.read())
  for kind, files in written.items():
    print(f"{kind}: " + (", ".join(files) if files else "none"))


if __name__ == "__main__":
  define_flags()
  app.run(main)
