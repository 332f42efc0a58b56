"""What a run reports: TensorBoard scalars and the summary `h2t.main` prints."""

from __future__ import annotations

import resource
from collections.abc import Sequence
from typing import Any


def write_scalars(writer, results: dict[str, Any]) -> None:
  """TensorBoard scalars: timings, every float of each method, CV accuracy by grid point."""
  scalars = {f"timing/{k}": v for k, v in results["timings_s"].items()}
  for method, r in results["methods"].items():
    for k, v in r.items():
      if isinstance(v, float):
        scalars[f"{method}/{k}"] = v
  writer.write_scalars(0, scalars)
  for method, entries in results["grid"].items():
    for i, e in enumerate(entries):
      writer.write_scalars(i, {f"{method}/cv_accuracy_by_grid_point": e["mean"]})
  writer.flush()


def summary_lines(results: dict[str, Any]) -> Sequence[str]:
  """A short human-readable summary of `results` (what `h2t.main` prints)."""
  lines = [
    f"task {results['task']} ({results['num_classes']} classes), backbone {results['backbone']['name']} "
    f"at {results['backbone']['input_size']} px: {results['num_features']} features from {len(results['taps'])} "
    f"taps; {results['num_grid_points']} grid point(s) x 5 folds"
  ]
  for method, r in results["methods"].items():
    parts = [f"  {method:9s}"]
    if "valid_accuracy" in r:
      parts.append(f"CV accuracy {100 * r['valid_accuracy']:6.2f}%")
    elif "cv_accuracy" in r:  # its own CV (ridge: random folds; head2toe_plus: the reference's folds)
      parts.append(f"own CV accuracy {100 * r['cv_accuracy']:6.2f}%")
    if "test_accuracy" in r:
      detail = (
        f"{r['num_kept']} features"
        if "num_kept" in r
        else f"{r.get('trainable_parameters', 0)} parameters trained"
      )
      parts.append(f"test accuracy {100 * r['test_accuracy']:6.2f}%  ({detail})")
    if r.get("chosen_point"):
      parts.append("chosen " + ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in r["chosen_point"].items()))
    lines.append("  ".join(parts))
  per_process = results.get("cv_heads_per_process", [])
  if len(per_process) > 1:
    lines.append(
      f"  cv: {sum(per_process)} heads (distinct point x fold) split over the processes: "
      + ", ".join(map(str, per_process))
    )
  t = results["timings_s"]
  lines.append(
    "  time: "
    + ", ".join(f"{k} {v:.1f}s" for k, v in t.items())
    + f"; peak RSS {results['peak_rss_mib']:.0f} MiB"
  )
  return lines


def peak_rss_mib() -> float:
  """The process's peak resident memory so far, MiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record_heads(ctx, chosen, heads: dict, test_acc, results) -> None:
  """Each method's entry of results.json: test accuracy, chosen point, kept features, head file (`ctx`: the
  run's `h2t.evaluate.Context`)."""
  from absl import logging

  from h2t import methods as methods_lib
  from h2t.head import OWN_CV

  for name, head in heads.items():
    method = methods_lib.METHODS[name]
    cfg = ctx.points[chosen[name]][1]
    sizes = {t: int(v.shape[1]) for t, v in method.features(ctx.features(cfg)).items()}
    r = results["methods"].setdefault(name, {})
    point = ctx.points[chosen[name]][0] if method.searched else {}
    if not method.selects:  # the selection options do nothing for it (methods.Method.learning)
      point = {k: v for k, v in point.items() if not k.startswith("learning.feature_selection.")}
    r.update(
      test_accuracy=test_acc[name],
      chosen_point=point,
      num_kept=head.num_features,
      kept_per_tap={
        t: len(head.kept.get(t, ())) for t in (results["tap_sizes"] if method.selects else sizes)
      },
      head_file=f"head_{name}.npz",
      final_train_loss=head.meta.final_train_loss,
    )
    if OWN_CV in head.meta.extra:  # a method with its own CV (ridge, head2toe_plus): its choice and accuracy
      r.update(
        chosen_point=head.meta.extra[OWN_CV]["chosen"], cv_accuracy=head.meta.extra[OWN_CV]["cv_accuracy"]
      )
    if method.fit == "probe":  # steps of both stages (head2toe) / wall time, compile included
      steps = int(cfg.learning.training_steps) * (2 if method.selects else 1)
      r["probe_steps_per_s"] = steps / ctx.timings[f"fit_{name}"]
    logging.info("%s: test accuracy %.4f with %d features", name, test_acc[name], head.num_features)
