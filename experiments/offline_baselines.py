r"""Head2Toe and its baselines on the offline tasks, one CV protocol, one table.

    cd /work/main && nohup /work/venv/bin/python experiments/offline_baselines.py \
        --root=/tmp/h2t_offline > /tmp/offline_baselines.log 2>&1 &
    # smoke test (tiny: 20 probe steps, 4 fine-tuning steps, 64 px digits):
    /work/venv/bin/python experiments/offline_baselines.py --quick --tasks=digits \
        --input_sizes=digits=64 --root=/tmp/h2t_offline_quick --out=/tmp/offline_quick.md

On the offline backbone (EfficientNet-Lite0, the packaged ImageNet weights),
for each task (`digits`, `fashion_mnist`) every method variant runs through
`h2t.evaluate.run` with eval_mode 'test': 5-fold CV of the variant's own grid
(`config.sweep`) on the 1000 training images, the chosen point fitted on all
of them, then the test split. One call per (task, variant), each in its own
workdir `ROOT/<task>/<variant>/`, all sharing one feature cache
(`config.cache_dir = ROOT/cache`), so the training images are extracted once
per task (by the first variant that runs) and read back by the others.

Variants (method, grid):
  head2toe          configs/vtab.py's sweep: l2,1 coefficient of the selection
                    run {1e-4, 1e-5} x keep_fraction {0.05, 0.1}
  linear            `pre_logits` alone, same trainer; learning_rate {0.1, 0.01}
  all_features_l1   every tap, no selection; learning.l1_regularizer {1e-4, 1e-5}
  all_features_l2   every tap, no selection; learning.l2_regularizer {1e-3, 1e-4}
  all_features_l21  every tap, no selection; learning.group_lrp_regularizer_coef
                    {1e-4, 1e-5}
  ridge             closed form on every tap; picks its own L2 by its own CV
  finetune          backbone + linear head on `pre_logits`, end to end, not
                    grid-searched; steps and learning rate are the probe's
                    (500, 0.1) times --finetune_steps_multiplier (0.2) and
                    --finetune_lr_multiplier (0.001), in batches of
                    --finetune_batch_size (32: a 224 px batch of 128 needs
                    more than 21 GB on the CPU; 32 peaks at about 8 GB)
The penalty scale: every tap is unit-normalised, so the concatenated vector
has norm sqrt(51); the loss is mean cross-entropy (about 2.3 at the start)
and the penalties are sums over the [42488, 10] kernel (at initialisation
sum|W| ~ 2e3, sum W^2 ~ 20, sum of row norms ~ 1e3), so the values above put
each penalty between about 0.1% and 10% of the starting loss; the penalties
grow as the weights do.

A variant whose workdir holds a results.json is finished and reused (a
killed run continues where it stopped; one made with another config stops
the script before any work). The table goes to --out
(experiments/results/offline.md; with --quick, ROOT/offline_quick.md unless
--out is given).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags, logging

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join("experiments", "results", "offline.md")

HEAD2TOE_SWEEP = None  # configs/vtab.py's own sweep.
# variant -> (method, config.sweep). '' = one point, no CV search.
VARIANTS: dict[str, tuple[str, str | None]] = {
  "head2toe": ("head2toe", HEAD2TOE_SWEEP),
  "linear": ("linear", "learning.learning_rate=0.1,0.01"),
  "all_features_l1": ("all_features", "learning.l1_regularizer=1e-4,1e-5"),
  "all_features_l2": ("all_features", "learning.l2_regularizer=1e-3,1e-4"),
  "all_features_l21": ("all_features", "learning.group_lrp_regularizer_coef=1e-4,1e-5"),
  "ridge": ("ridge", ""),
  "finetune": ("finetune", ""),
}
FINETUNE_ONLY = ("learning.finetune_steps_multiplier", "learning.finetune_lr_multiplier")
# Short names of swept options in the table.
SHORT = {
  "learning.feature_selection.learning_config_overwrite.group_lrp_regularizer_coef": "sel. l2,1",
  "learning.feature_selection.keep_fraction": "keep",
  "learning.learning_rate": "lr",
  "learning.l1_regularizer": "l1",
  "learning.l2_regularizer": "l2",
  "learning.group_lrp_regularizer_coef": "l2,1",
}


def define_flags() -> None:
  """The command line's flags, defined only when run as a program."""
  flags.DEFINE_string("root", "/tmp/h2t_offline_baselines", "Workdirs: ROOT/<task>/<variant>/, ROOT/cache.")
  flags.DEFINE_list("tasks", ["digits", "fashion_mnist"], "Offline tasks.")
  flags.DEFINE_list("variants", list(VARIANTS), f"Method variants, of {', '.join(VARIANTS)}.")
  flags.DEFINE_list(
    "input_sizes",
    ["digits=224", "fashion_mnist=112"],
    "TASK=PX backbone input size per task (a task not named runs at the checkpoint's 224 px).",
  )
  flags.DEFINE_float(
    "finetune_steps_multiplier",
    0.2,
    "learning.finetune_steps_multiplier: fine-tuning steps = 500 x this (a full 500-step fine-tune "
    "at 224 px is far too slow on a 2-core CPU; 100 steps of 32 images = 3.2 epochs).",
  )
  flags.DEFINE_float(
    "finetune_lr_multiplier",
    0.001,
    "learning.finetune_lr_multiplier: fine-tuning learning rate = 0.1 x this (Adam on a whole network; "
    "1e-3 collapsed to chance on digits at 224 px).",
  )
  flags.DEFINE_integer(
    "finetune_batch_size",
    32,
    "learning.train_batch_size of the finetune variant only (the probes keep 128): a 224 px step of "
    "batch 128 needs more than 21 GB on the CPU and was killed for memory.",
  )
  flags.DEFINE_bool(
    "quick", False, "Tiny smoke test: 20 probe steps (4 fine-tuning steps); --out defaults to ROOT."
  )
  flags.DEFINE_multi_string("note", [], "An extra line for the table's notes (repeatable).")
  flags.DEFINE_string(
    "out", None, f"The markdown table (default {DEFAULT_OUT}; ROOT/offline_quick.md with --quick)."
  )


def parse_sizes(items: Sequence[str]) -> dict[str, int]:
  """`['digits=224']` -> `{'digits': 224}`."""
  out = {}
  for item in items:
    task, sep, px = item.partition("=")
    if not sep or not task.strip() or not px.strip().isdigit():
      raise ValueError(f"--input_sizes item {item!r} is not of the form TASK=PX")
    out[task.strip()] = int(px)
  return out


def load_base_config():
  """`configs/vtab.py`'s default config."""
  from bench_common import load_config  # experiments/ is on sys.path

  return load_config()


def variant_config(base, task: str, variant: str, root: str, input_size: int, quick: bool):
  """The config of one (task, variant) run."""
  import ml_collections

  method, sweep = VARIANTS[variant]
  cfg = ml_collections.ConfigDict(base.to_dict())
  cfg.dataset = task
  cfg.methods = (method,)
  # The head2toe sweep string of configs/vtab.py names selection options; every
  # other variant searches its own options (or nothing).
  cfg.sweep = base.sweep if sweep is None else sweep
  cfg.cache_dir = os.path.join(root, "cache")
  cfg.backbone.name = "efficientnet_lite0"
  cfg.backbone.input_size = input_size
  if method == "finetune":
    cfg.learning.finetune_steps_multiplier = FLAGS.finetune_steps_multiplier
    cfg.learning.finetune_lr_multiplier = FLAGS.finetune_lr_multiplier
    cfg.learning.train_batch_size = FLAGS.finetune_batch_size
  if quick:
    cfg.learning.training_steps = 20
  return cfg


def ridge_cv(cfg, workdir: str) -> dict[str, Any]:
  """Ridge's own CV accuracy, which results.json does not keep: the same call as `fit_ridge`.

  Reads the cached training features; `select_l2_reg` with the run's seed
  picks the same L2 as the run did (checked against the saved head).
  """
  from h2t import backbones, cache, data, evaluate, files, head2toe, normalize, ridge

  path = os.path.join(workdir, "ridge_cv.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  backbone = backbones.create(cfg.backbone.name, None, input_size=int(cfg.backbone.input_size) or None)
  task = data.get_task(cfg.dataset)
  taps = evaluate.resolve_taps(backbone, cfg.backbone)
  feats, labels, _ = cache.train_features(backbone, task, taps, cfg.backbone, cfg.cache_dir)
  x, _ = normalize.features_matrix(feats, list(feats), cfg.learning.feature_normalization)
  l2, acc = ridge.select_l2_reg(x, labels, num_classes=task.num_classes, seed=int(cfg.seed))
  saved = head2toe.Head.load(os.path.join(workdir, "head_ridge.npz")).meta["ridge_l2_reg"]
  if float(saved) != float(l2):
    raise RuntimeError(f"ridge CV picked l2_reg={l2}, the run's head has {saved}")
  out = {
    "l2_reg": float(l2),
    "l2_regs": list(map(float, ridge.L2_REGS)),
    "cv_accuracy": list(map(float, acc)),
  }
  out["chosen_cv_accuracy"] = out["cv_accuracy"][out["l2_regs"].index(float(l2))]
  files.atomic_write_json(path, out)
  return out


def finetune_parameters() -> dict[str, int]:
  """EfficientNet-Lite0's parameter counts: all, BatchNorm statistics, ImageNet classifier."""
  import numpy as np
  from flax import traverse_util

  from h2t import backbones

  flat = traverse_util.flatten_dict(backbones.create("efficientnet_lite0").params, sep="/")
  size = {k: int(np.size(v)) for k, v in flat.items()}
  return {
    "all": sum(size.values()),
    "bn_statistics": sum(v for k, v in size.items() if k.rsplit("/", 1)[-1] in ("mean", "var")),
    "imagenet_classifier": sum(v for k, v in size.items() if k.startswith("_fc/")),
  }


def _flat_keys(d: Mapping[str, Any], prefix: str = "") -> set[str]:
  out = set()
  for k, v in d.items():
    out |= _flat_keys(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}"}
  return out


def git_state() -> str:
  """`commit` of the checkout, and whether h2t/ or configs/ had uncommitted changes."""
  import subprocess

  try:
    head = subprocess.run(
      ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "-C", REPO, "status", "--porcelain", "h2t", "configs"],
      capture_output=True,
      text=True,
      check=True,
    ).stdout.split()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return head + (" with uncommitted changes in h2t/ or configs/" if dirty else "")


def code_line(runs_by_task) -> str:
  """The commits the runs were made with (recorded at run time), and the one writing the table."""
  seen: dict[str, list[str]] = {}
  for task, runs in runs_by_task.items():
    for variant, r in runs.items():
      seen.setdefault(r.get("_code", "not recorded"), []).append(f"{task}/{variant}")
  parts = [f"{code} ({', '.join(names)})" for code, names in seen.items()]
  return "runs made at commit " + "; ".join(parts) + f"; table written at commit {git_state()}"


def _g(v: Any) -> str:
  return f"{v:g}" if isinstance(v, float) else str(v)


def method_row(variant: str, results: Mapping[str, Any], extra: Mapping[str, Any], counts) -> dict[str, Any]:
  """One table row from a run's results.json."""
  method = VARIANTS[variant][0]
  r = results["methods"][method]
  t = results["timings_s"]
  classes = int(results["num_classes"])
  row = {"variant": variant, "test": 100 * r["test_accuracy"]}
  row["cv"] = 100 * r["valid_accuracy"] if "valid_accuracy" in r else None
  row["time"] = sum(v for k, v in t.items() if k in (f"cv_{method}", f"fit_{method}", "finetune", "test"))
  if method == "finetune":
    dim = int(results["tap_sizes"]["pre_logits"])
    head = dim * classes + classes
    # results.json's count covers every backbone leaf: the frozen BatchNorm
    # statistics and the ImageNet classifier (unused by a head on pre_logits) too.
    backbone_needed = int(r["trainable_parameters"]) - counts["imagenet_classifier"]
    row["params"] = backbone_needed - counts["bn_statistics"] + head
    row["bytes"] = 4 * (backbone_needed + head)  # float32, BN statistics included
    row["features"] = f"{dim} (pre_logits)"
    lcfg = results["config"]["learning"]
    steps = int(int(lcfg["training_steps"]) * float(lcfg["finetune_steps_multiplier"]))
    lr = float(lcfg["learning_rate"]) * float(lcfg["finetune_lr_multiplier"])
    row["point"] = f"not searched: {steps} steps of {lcfg['train_batch_size']}, lr {lr:g}"
  else:
    row["params"] = int(r["num_kept"]) * classes + classes
    row["bytes"] = int(r["head_bytes"])
    row["features"] = f"{r['num_kept']} / {results['num_features']}"
    if method == "ridge":
      row["point"] = f"l2_reg={extra['l2_reg']:g} (own CV)"
      row["cv"] = 100 * extra["chosen_cv_accuracy"]
    else:
      point = r.get("chosen_point") or {}
      row["point"] = ", ".join(f"{SHORT.get(k, k)}={_g(v)}" for k, v in point.items()) or "-"
  return row


def machine_lines() -> list[str]:
  import jax

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return [
    f"- machine: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
    f"jax {jax.__version__} ({jax.default_backend()}; devices {', '.join(str(d) for d in jax.devices())})",
  ]


def render(
  rows_by_task, runs_by_task, sizes, command: str, elapsed: float, loads: tuple, counts, failed, quick, reused
) -> str:
  """The markdown report."""
  base = load_base_config()
  lines = ["# Head2Toe and its baselines on the offline tasks (EfficientNet-Lite0, ImageNet)", ""]
  if quick:
    lines += ["**SMOKE TEST (--quick): 20 probe steps, numbers meaningless.**", ""]
  lines += [f"`{command}`", ""]
  lines += machine_lines()
  lines += [
    f"- code: {code_line(runs_by_task)}",
    (
      f"- load average (1 min) at start {loads[0]:.2f}, at end {loads[1]:.2f} (other jobs may have shared "
      "the cores: the times are upper bounds)"
      if reused < sum(len(r) for r in rows_by_task.values())
      else "- every run was made by an earlier invocation and reused here (other jobs may have shared the "
      "cores: the times are upper bounds)"
    ),
    "- backbone: `efficientnet_lite0`, packaged ImageNet-1k weights, 51 taps average-pooled to about "
    f"{base.backbone.additional_features_target_size} features each, unit-normalised per tap",
    "- input sizes: " + ", ".join(f"{t} {sizes.get(t, 224)} px" for t in rows_by_task),
    "- protocol (`h2t.evaluate.run`, eval_mode 'test'): 5-fold CV of each variant's grid on the 1000 "
    "training images (`train800val200`), the best point (first on ties) refitted on all 1000, then "
    "the test split (digits 797 images, fashion_mnist 10,000)",
    f"- probe training: Adam, lr {base.learning.learning_rate:g} (unless searched), "
    f"{20 if quick else base.learning.training_steps} steps, batch {base.learning.train_batch_size}, cosine decay, "
    "mean cross-entropy + penalty",
    f"- fine-tuning: {FLAGS.finetune_steps_multiplier:g} x the steps and {FLAGS.finetune_lr_multiplier:g} x "
    "the learning rate of the probe (`learning.finetune_steps_multiplier` / `finetune_lr_multiplier`), "
    f"batches of {FLAGS.finetune_batch_size} (the probes' 128 ran out of memory at 224 px), "
    "BatchNorm statistics frozen; not grid-searched",
    "",
    "Grids (`config.sweep` of each variant; the Cartesian product, 5 folds each):",
    "",
    "| variant | method | grid |",
    "|---|---|---|",
  ]
  for v in FLAGS.variants:
    method, sweep = VARIANTS[v]
    sweep = base.sweep if sweep is None else sweep
    grid_text = sweep.replace(";", "; ") if sweep else "-"
    if v == "ridge":
      grid_text = "its own 5-fold CV (random folds) over `h2t.ridge.L2_REGS`"
    lines.append(f"| {v} | {method} | `{grid_text}` |" if sweep else f"| {v} | {method} | {grid_text} |")
  lines += [
    "",
    "| task | method | test acc. (%) | CV acc. (%) | chosen grid point | features | trainable params "
    "| stored bytes / task | wall time (s) |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for task, rows in rows_by_task.items():
    for row in rows:
      if "error" in row:
        lines.append(f"| {task} | {row['variant']} | FAILED: {row['error']} | | | | | | |")
        continue
      cv = f"{row['cv']:.2f}" if row["cv"] is not None else "-"
      lines.append(
        f"| {task} | {row['variant']} | {row['test']:.2f} | {cv} | {row['point']} | {row['features']} "
        f"| {row['params']} | {row['bytes']} | {row['time']:.1f} |"
      )
  lines += ["", "Shared per task (not in the methods' wall times):", ""]
  lines += ["| task | input | training features | extraction of the 1000 training images (s) | test images |"]
  lines += ["|---|---|---|---|---|"]
  for task, runs in runs_by_task.items():
    if not runs:
      continue
    first = next(iter(runs.values()))
    extract = [r["timings_s"]["extract_train"] for r in runs.values() if not r["train_features_cached"]]
    ext = f"{extract[0]:.1f}" if extract else "cached before this root"
    test_n = {"digits": 797, "fashion_mnist": 10000}.get(task, "?")
    lines.append(
      f"| {task} | {first['backbone']['input_size']} px | {first['num_features']} from {len(first['taps'])} "
      f"taps | {ext} | {test_n} |"
    )
  recorded = sum(sum(r["timings_s"].values()) for runs in runs_by_task.values() for r in runs.values())
  lines += [
    "",
    f"Total wall time: {recorded:.1f} s recorded by the runs (every phase, loading and extraction included); "
    f"this invocation of the script took {elapsed:.1f} s and reused {reused} finished run(s).",
    "",
    "Notes:",
    "",
    "- Wall time per method = its CV (`cv_<method>`), final fit (`fit_<method>`) or fine-tune "
    "(`finetune`, test included), plus its own streamed pass over the test split (`test`: images -> "
    "taps -> kept features -> logits; every variant streams the test split once, compile included). "
    "Backbone loading (~5 s per run) and the shared extraction are left out.",
    "- CV accuracy: the mean 5-fold accuracy of the chosen grid point; ridge's is its own 5-fold CV on "
    "random folds (not the protocol's folds), recomputed from the cached features because results.json "
    "does not keep it; fine-tuning has none.",
    "- Trainable parameters: a probe head has features x classes + classes. Fine-tuning trains the "
    f"backbone up to `pre_logits` ({counts['all']} leaves in all, less {counts['bn_statistics']} frozen "
    f"BatchNorm statistics and the {counts['imagenet_classifier']}-parameter ImageNet classifier, which a "
    "head on `pre_logits` does not use; results.json's `trainable_parameters` counts both) plus its "
    "1280 x classes + classes head.",
    "- Stored bytes per task: the head file (`head_<method>.npz`: weights, kept indices, normalisation "
    "statistics, metadata) for the probes; for fine-tuning the whole network up to `pre_logits` in float32 "
    "(BatchNorm statistics included) plus the head, since a fine-tuned model must be stored per task.",
    f"- **Caveat, fine-tuning**: {int(500 * FLAGS.finetune_steps_multiplier)} steps "
    f"({FLAGS.finetune_steps_multiplier:g} x the probe's 500) of {FLAGS.finetune_batch_size} images "
    f"(the probe's batch of 128 at 224 px needs more than 21 GB on the CPU and was killed for memory) at "
    f"{FLAGS.finetune_lr_multiplier:g} x the probe's learning rate, chosen for a 2-core CPU and Adam on a "
    "whole network, not searched; the reference fine-tunes with multipliers 1 and a grid, so this row is a "
    "weak fine-tuning baseline.",
    "- Head2Toe's grid here is the default 4-point one (README's fashion_mnist figure used 12 points).",
  ]
  lines += [f"- {note}" for note in FLAGS.note]
  if failed:
    lines += ["", "Failed runs: " + "; ".join(f"{t}/{v}: {e}" for t, v, e in failed)]
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if REPO not in sys.path:  # h2t from this checkout, installed or not
    sys.path.insert(0, REPO)
  from vtab_sweep import Job, config_differences, run_job  # experiments/ is on sys.path

  # Every h2t module a run uses, imported now: the code is fixed at the start of the script.
  from h2t import evaluate, files, finetune, ridge  # noqa: F401
  from h2t.data import pipeline

  pipeline.hide_gpus_from_tensorflow()
  start, load0 = time.perf_counter(), os.getloadavg()[0]
  unknown = [v for v in FLAGS.variants if v not in VARIANTS]
  if unknown:
    sys.exit(f"error: unknown variants {unknown}; expected some of {', '.join(VARIANTS)}")
  try:
    sizes = parse_sizes(FLAGS.input_sizes)
  except ValueError as e:
    sys.exit(f"error: {e}")
  root = os.path.abspath(FLAGS.root)
  out = FLAGS.out or (
    os.path.join(root, "offline_quick.md") if FLAGS.quick else os.path.join(REPO, DEFAULT_OUT)
  )
  base = load_base_config()
  plan = []
  for task in FLAGS.tasks:
    for variant in FLAGS.variants:
      cfg = variant_config(base, task, variant, root, sizes.get(task, 224), FLAGS.quick)
      evaluate.validate(cfg)
      job = Job("efficientnet_lite0", task, os.path.join(root, task, variant))
      if job.finished:
        with open(job.results_path) as f:
          stored = json.load(f).get("config", {})
        # Options added to configs/vtab.py after the run (absent from its config) are not differences.
        # The fine-tuning options do not touch the probes.
        ignored = FINETUNE_ONLY if VARIANTS[variant][0] != "finetune" else ()
        diff = [k for k in config_differences(stored, cfg) if k in _flat_keys(stored) and k not in ignored]
        if diff:
          sys.exit(
            f"error: {job.results_path} was made with another config (differs in {', '.join(diff)}); "
            "delete it or use another --root"
          )
      plan.append((task, variant, cfg, job))
  reused = sum(j.finished for *_, j in plan)
  logging.info("%d runs under %s, %d finished before", len(plan), root, reused)
  runs_by_task: dict[str, dict[str, Any]] = {t: {} for t in FLAGS.tasks}
  rows_by_task: dict[str, list[dict[str, Any]]] = {t: [] for t in FLAGS.tasks}
  failed = []
  counts = finetune_parameters()
  for i, (task, variant, cfg, job) in enumerate(plan):
    try:
      if job.finished:
        logging.info("[%d/%d] %s/%s: finished before, reused", i + 1, len(plan), task, variant)
        with open(job.results_path) as f:
          results = json.load(f)
      else:
        logging.info("[%d/%d] %s/%s: running in %s", i + 1, len(plan), task, variant, job.workdir)
        t0 = time.perf_counter()
        code = git_state()  # the code this run imported (h2t may change while the script runs)
        results = run_job(job, cfg)
        files.atomic_write_json(os.path.join(job.workdir, "offline_run.json"), {"code": code})
        logging.info(
          "[%d/%d] %s/%s: done in %.1fs: %s",
          i + 1,
          len(plan),
          task,
          variant,
          time.perf_counter() - t0,
          "; ".join(evaluate.summary_lines(results)[1:]),
        )
      extra = ridge_cv(cfg, job.workdir) if VARIANTS[variant][0] == "ridge" else {}
      side = os.path.join(job.workdir, "offline_run.json")
      if os.path.exists(side):
        with open(side) as f:
          results = dict(results, _code=json.load(f)["code"])
      runs_by_task[task][variant] = results
      rows_by_task[task].append(method_row(variant, results, extra, counts))
    except Exception as e:  # noqa: BLE001 -- one failing run must not stop the others.
      logging.exception("%s/%s failed", task, variant)
      failed.append((task, variant, f"{type(e).__name__}: {e}"))
      rows_by_task[task].append({"variant": variant, "error": f"{type(e).__name__}"})
  command = shlex.join([sys.executable, "experiments/offline_baselines.py", *sys.argv[1:]])
  text = render(
    rows_by_task,
    runs_by_task,
    sizes,
    command.strip(),
    time.perf_counter() - start,
    (load0, os.getloadavg()[0]),
    counts,
    failed,
    FLAGS.quick,
    reused,
  )
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write(text)
  print(text)
  print(f"table: {out}")
  if failed:
    sys.exit("failed runs:\n" + "\n".join(f"  {t}/{v}: {e}" for t, v, e in failed))


if __name__ == "__main__":
  define_flags()
  app.run(main)
