"""The report's figures (matplotlib, written as PNG files; no display needed).

kept_per_tap_<backbone>_<task>.png   where Head2Toe's kept features come from: kept
                                     count and kept share of each tap, taps in network order.
kept_share_<backbone>.png            the same for every task of a backbone, as a heatmap
                                     (two or more tasks with the same taps).
cv_grid_<backbone>_<task>.png        5-fold CV accuracy over the hyperparameter grid, per
                                     method, with the chosen point marked (runs with a grid).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from h2t.report_runs import GROUP_ORDER, METHOD_TITLES, METRIC_TITLES, Run, method_accuracy, task_group


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


def write_figures(runs: Sequence[Run], out: str) -> list[str]:
  """Every figure of `runs` that has something to show, written into the folder `out`; returns their paths."""
  written = []
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
        written.append(path)
  for backbone, group in by_backbone.items():
    path = os.path.join(out, f"kept_share_{re.sub(r'[^A-Za-z0-9_.-]+', '_', backbone)}.png")
    if plot_kept_share(sorted(group, key=lambda r: (GROUP_ORDER.index(task_group(r.task)), r.task)), path):
      written.append(path)
  return written
