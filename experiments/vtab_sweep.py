"""Runs Head2Toe over many tasks and backbones, resumably, then writes the report.

    python experiments/vtab_sweep.py --config=configs/vtab.py --root=sweeps/vtab \
        --backbones=vit_b16,resnet50 --checkpoints=vit_b16=ViT-B_16.npz,resnet50=r50.safetensors \
        --tasks=vtab --config.data_dir=DIR
    python experiments/vtab_sweep.py --config=configs/vtab.py --root=sweeps/offline \
        --tasks=digits,fashion_mnist --config.backbone.input_size=112

Each (backbone, task) runs `h2t.evaluate.run` in its own workdir,
`ROOT/<backbone>/<task>/`, with the config's overrides (`--config.x=y`, as for
`h2t.main`). Folder tasks get `folder_<basename>`, and `folder_<basename>_<hash
of the path>` when two folders of the sweep share a basename, so every task
has its own workdir. A workdir that holds a readable results.json is finished
and skipped; one without (a killed run) starts again, reusing the feature
cache that the killed run completed (every file is written atomically); a
damaged results.json is named in a warning and its run starts again. A
finished workdir whose results.json was made with another config stops the
sweep before any work, naming the differing options. A task that fails (e.g.
VTAB data not prepared) is logged and the sweep goes on; the exit status is
then 1. At the end the report of everything under ROOT is written to
ROOT/report (`python -m h2t.report`). Mistakes on the command line end in one
`error:` line and exit status 1.

VTAB-1k tasks read TFDS data from `--config.data_dir`, or the prepared VTAB-1k
folders (NOAH's layout) when that directory holds them (h2t/data/vtab_folder.py).

--tasks takes task names ('digits', 'fashion_mnist', 'folder:PATH', VTAB-1k
names) and the words 'vtab' (all 19 VTAB-1k tasks), 'natural', 'specialized',
'structured' (a VTAB group).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging as py_logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from h2t import config as config_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags, defined only when run as a program (importing defines none)."""
  flags.DEFINE_string("root", None, "Folder of the workdirs: ROOT/<backbone>/<task>/.")
  flags.DEFINE_list(
    "tasks", [], "Tasks and/or vtab|natural|specialized|structured (default: config.dataset)."
  )
  flags.DEFINE_list("backbones", [], "Backbone names (default: config.backbone.name).")
  flags.DEFINE_list(
    "checkpoints",
    [],
    "name=PATH per backbone (default: config.backbone.checkpoint for the config's backbone).",
  )
  config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/vtab.py).", lock_config=True
  )
  flags.mark_flags_as_required(["root", "config"])


@dataclasses.dataclass(frozen=True)
class Job:
  """One (backbone, task) of the sweep and its workdir."""

  backbone: str
  task: str
  workdir: str

  @property
  def results_path(self) -> str:
    return os.path.join(self.workdir, "results.json")

  @property
  def finished(self) -> bool:
    """Whether the workdir holds a readable results.json (a damaged one does not count)."""
    return read_results(self.results_path)[0] is not None


def read_results(path: str) -> tuple[dict[str, Any] | None, str | None]:
  """`(results, None)` for a finished run, `(None, None)` without results.json, `(None, why)` if damaged."""
  if not os.path.exists(path):
    return None, None
  try:
    with open(path, encoding="utf-8") as f:
      results = json.load(f)
  except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
    return None, f"{type(e).__name__}: {e}"
  if not isinstance(results, dict) or not all(
    isinstance(results.get(k), dict) for k in ("config", "methods")
  ):
    return None, "not an h2t results file (it lacks a config or methods)"
  return results, None


def expand_tasks(specs: Sequence[str]) -> list[str]:
  """Task names and group words -> task names, in order, without repeats."""
  from h2t import data
  from h2t.data import vtab

  out: list[str] = []
  for spec in specs:
    spec = spec.strip()
    if spec == "vtab":
      names = list(vtab.TASKS)
    elif spec in vtab.GROUPS:
      names = [t for t, s in vtab.TASKS.items() if s.group == spec]
    else:
      data.check_task_name(spec)
      names = [spec]
    # Two spellings of one folder ('folder:a', 'folder:./a/') are one task.
    seen = {_task_key(n) for n in out}
    for n in names:
      if _task_key(n) not in seen:
        out.append(n)
        seen.add(_task_key(n))
  return out


def _task_key(task: str) -> str:
  from h2t.data import folder

  return folder.PREFIX + folder.root_of(task) if folder.is_folder_name(task) else task


def task_dir(task: str) -> str:
  """The workdir folder name of a task ('folder:PATH' -> 'folder_<basename>')."""
  from h2t.data import folder

  return folder.short_name(task) if folder.is_folder_name(task) else task


def task_dirs(tasks: Sequence[str]) -> dict[str, str]:
  """Task -> its workdir folder name, distinct for distinct tasks.

  Folder tasks whose basenames collide get `_<hash of the absolute path>`
  appended, so that no task's results land in another's workdir.
  """
  from h2t.data import folder

  short = {t: task_dir(t) for t in tasks}
  counts: dict[str, int] = {}
  for d in short.values():
    counts[d] = counts.get(d, 0) + 1
  out = {}
  for t, d in short.items():
    if counts[d] > 1 and folder.is_folder_name(t):
      d = f"{d}_{hashlib.sha256(folder.root_of(t).encode()).hexdigest()[:8]}"
    out[t] = d
  clashes = sorted({d for d in out.values() if list(out.values()).count(d) > 1})
  if clashes:
    raise ValueError(f"several tasks would share the workdir(s) {', '.join(clashes)}; list each task once")
  return out


def plan(root: str, backbones: Sequence[str], tasks: Sequence[str]) -> list[Job]:
  """Every (backbone, task), backbone-major, each with its own workdir under `root`."""
  dirs = task_dirs(tasks)
  return [Job(b, t, os.path.join(root, b, dirs[t])) for b in backbones for t in tasks]


def parse_checkpoints(items: Sequence[str], backbones: Sequence[str] | None = None) -> dict[str, str]:
  """`['vit_b16=/a.npz', ...]` -> `{'vit_b16': '/a.npz'}`; every name must be one of `backbones`."""
  out = {}
  for item in items:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise ValueError(f"--checkpoints item {item!r} is not of the form BACKBONE=PATH")
    out[name.strip()] = path.strip()
  unused = [n for n in out if backbones is not None and n not in backbones]
  if unused:
    raise ValueError(
      f"--checkpoints names {', '.join(unused)}, which the sweep does not run (backbones: "
      f"{', '.join(backbones)}); add it to --backbones or drop its checkpoint"
    )
  return out


def job_config(config, job: Job, checkpoints: Mapping[str, str]):
  """The config of one job: the sweep's config with its task, backbone and checkpoint."""
  import ml_collections

  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.dataset = job.task
  same_backbone = job.backbone == config.backbone.name
  cfg.backbone.checkpoint = checkpoints.get(job.backbone, config.backbone.checkpoint if same_backbone else "")
  cfg.backbone.name = job.backbone
  return cfg


def config_differences(stored: Mapping[str, Any], cfg) -> list[str]:
  """Options whose value in a finished run's results.json differs from `cfg`."""
  # JSON round trip: the stored config went through it (tuples became lists).
  now = config_lib.flat(json.loads(json.dumps(cfg.to_dict())))
  then = config_lib.flat(stored)
  return sorted(k for k in set(now) | set(then) if now.get(k, "<absent>") != then.get(k, "<absent>"))


def check_finished(jobs: Sequence[Job], configs: Sequence[Any]) -> None:
  """Raises ValueError if a finished job was made with another config."""
  problems = []
  for job, cfg in zip(jobs, configs, strict=True):
    results, _ = read_results(job.results_path)
    if results is None:
      continue
    diff = config_differences(results["config"], cfg)
    if diff:
      problems.append(f"{job.results_path} (differs in {', '.join(diff)})")
  if problems:
    raise ValueError(
      "finished runs under --root were made with another config: "
      + "; ".join(problems)
      + ". Delete those results.json files to rerun them, or use another --root."
    )


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(done: int, total: int, elapsed: float, durations: Sequence[float]) -> str:
  """`[done/total] elapsed, about T left`; T = mean time of the jobs run so far x jobs left."""
  line = f"[{done}/{total}] elapsed {_duration(elapsed)}"
  if durations and done < total:
    line += f", about {_duration(sum(durations) / len(durations) * (total - done))} left"
  return line


def _accuracy_text(results: Mapping[str, Any]) -> str:
  parts = []
  for method, r in results.get("methods", {}).items():
    if "test_accuracy" in r:
      parts.append(f"{method} {100 * r['test_accuracy']:.2f}%")
    elif "valid_accuracy" in r:
      parts.append(f"{method} {100 * r['valid_accuracy']:.2f}% (CV)")
  return ", ".join(parts)


def run_job(job: Job, cfg) -> dict[str, Any]:
  """`h2t.evaluate.run` in the job's workdir, with its log file and TensorBoard writer (as h2t.main)."""
  import jax
  from clu import metric_writers

  from h2t import evaluate

  os.makedirs(job.workdir, exist_ok=True)
  handler = py_logging.FileHandler(os.path.join(job.workdir, "log.txt"))
  handler.setFormatter(py_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  logging.get_absl_logger().addHandler(handler)
  writer = metric_writers.create_default_writer(job.workdir, just_logging=jax.process_index() > 0)
  try:
    writer.write_hparams(
      {k: v for k, v in config_lib.flat(cfg.to_dict()).items() if isinstance(v, (int, float, str, bool))}
    )
    return evaluate.run(cfg, job.workdir, writer=writer)
  finally:
    writer.close()
    logging.get_absl_logger().removeHandler(handler)
    handler.close()


def run_sweep(
  config, root: str, jobs: Sequence[Job], checkpoints: Mapping[str, str]
) -> list[tuple[Job, str]]:
  """Runs the unfinished jobs in order, logging progress; returns `[(job, error)]` of the failed ones."""
  from h2t import evaluate

  configs = [job_config(config, job, checkpoints) for job in jobs]
  for cfg in configs:
    evaluate.validate(cfg)
  for job in jobs:
    _, damage = read_results(job.results_path)
    if damage:
      logging.warning(
        "%s is damaged (%s): %s on %s is not counted as finished and runs again",
        job.results_path,
        damage,
        job.backbone,
        job.task,
      )
  check_finished(jobs, configs)
  total = len(jobs)
  done = sum(job.finished for job in jobs)
  logging.info("sweep of %d runs under %s: %d finished before, %d to run", total, root, done, total - done)
  start, durations, failed = time.perf_counter(), [], []
  for job, cfg in zip(jobs, configs, strict=True):
    if job.finished:
      continue
    logging.info(
      "%s: running %s on %s in %s",
      progress_line(done, total, time.perf_counter() - start, durations),
      job.backbone,
      job.task,
      job.workdir,
    )
    t0 = time.perf_counter()
    try:
      results = run_job(job, cfg)
      outcome = _accuracy_text(results)
    except (ValueError, FileNotFoundError) as e:
      # The user's data, checkpoint or settings: the message says what to do; no traceback.
      logging.error("%s on %s failed: %s", job.backbone, job.task, e)
      failed.append((job, f"{type(e).__name__}: {e}"))
      outcome = "FAILED"
    except Exception as e:  # noqa: BLE001 -- one failing task must not stop the sweep.
      logging.exception("%s on %s failed", job.backbone, job.task)
      failed.append((job, f"{type(e).__name__}: {e}"))
      outcome = "FAILED"
    durations.append(time.perf_counter() - t0)
    done += 1
    logging.info(
      "%s: %s on %s: %s in %s",
      progress_line(done, total, time.perf_counter() - start, durations),
      job.backbone,
      job.task,
      outcome,
      _duration(durations[-1]),
    )
  return failed


def _last_line(text: str) -> str:
  """The last non-empty line of a message (absl wraps config errors in a traceback's text)."""
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  return lines[-1] if lines else str(text)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; a bad flag or config override ends in one `error:` line."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config lacks
    sys.exit(f"error: {config_lib.unknown_key_message(argv) or _last_line(str(e))}")
  except flags.Error as e:
    sys.exit(f"error: {_last_line(str(e))} (--helpshort lists the flags)")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments: {' '.join(argv[1:])}")
  from h2t import report
  from h2t.data import pipeline

  try:
    config = FLAGS.config
    config.to_dict()  # a config file that failed to load raises here
  except (OSError, AttributeError) as e:
    sys.exit(f"error: cannot load the config file: {_last_line(str(e))}")
  root = os.path.abspath(FLAGS.root)
  if os.path.exists(root) and not os.path.isdir(root):
    sys.exit(f"error: --root={FLAGS.root} is a file; give a folder for the workdirs")
  pipeline.hide_gpus_from_tensorflow()
  try:
    tasks = expand_tasks(FLAGS.tasks or [config.dataset])
    backbones = FLAGS.backbones or [config.backbone.name]
    jobs = plan(root, backbones, tasks)
    failed = run_sweep(config, root, jobs, parse_checkpoints(FLAGS.checkpoints, backbones))
  except ValueError as e:
    sys.exit(f"error: {e}")
  if any(job.finished for job in jobs):
    out = os.path.join(root, "report")
    report.write_report([root], out)
    print(f"report: {out}/table.md")
  if failed:
    for job, e in failed:
      logging.error("failed: %s/%s: %s", job.backbone, job.task, e)
    names = ", ".join(f"{j.backbone}/{j.task}" for j, _ in failed)
    first = _last_line(failed[0][1])
    sys.exit(
      f"error: {len(failed)} of {len(jobs)} runs failed ({names}); the first: {first}; "
      "see the log above and their log.txt"
    )


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
