r"""Which readouts should head2toe_plus's CV choose among? Blends against probe / ridge / LDA.

    .venv/bin/python experiments/plus_readouts.py --features_dir=/tmp/h2t_plus_readouts \
        [--tasks=digits,fashion_mnist,shapes_count,shapes_location] [--seeds=8,9,10]

For every (task, seed) this scores every candidate of head2toe_plus's grid
(`plus.COEFS` x `plus.KEEP_FRACTIONS` selection points x `ridge.L2_REGS` x
readout) twice: by the reference's 5-fold CV on the 1000 training images, and
on the test split (each candidate refitted on the 1000 images, its kept set
from a selection run on them). The readouts are Head2Toe's probe, the probe's
logits plus `beta` x ridge's for `beta` in `BLEND_BETAS` (what an earlier
head2toe_plus also offered), ridge alone, and LDA on ridge's scores
(`plus.discriminant`, fitted on out-of-fold scores as `plus.fit` does).

It then prints, per task and candidate set, the mean test accuracy of the
candidate the CV picks (argmax, ties to the first in grid order). The test
split only scores; it chooses nothing.

Features: EfficientNet-Lite0 (packaged weights) at the tasks' beyond_paper
sizes, every tap pooled to <= 1024 features, as `h2t.main` extracts them;
stored once per task as `<features_dir>/<task>.npz` (`<split>/<tap>@1024`,
`<split>/labels`) with `<task>.json` (`std`: the tap specs, `num_classes`),
and reused when present.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

import numpy as np
from absl import app, flags

from h2t import backbones, data, features, head2toe, inputs, plus, ridge
from h2t.data import base as data_base

FLAGS = flags.FLAGS
flags.DEFINE_list("tasks", ["digits", "fashion_mnist", "shapes_count", "shapes_location"], "Offline tasks.")
flags.DEFINE_list("seeds", ["8", "9", "10"], "config.seed values.")
flags.DEFINE_string("features_dir", "/tmp/h2t_plus_readouts", "Where the extracted features are kept.")
flags.DEFINE_string("out", None, "Also write the markdown table here.")

SIZES = {"digits": 224, "fashion_mnist": 112, "shapes_count": 112, "shapes_location": 112}
BLEND_BETAS = (1.0, 4.0, 16.0, 64.0)
# Columns of the score tables, in the tie order of the earlier head2toe_plus (beta 0, the blends, inf, LDA).
COLUMNS = ("probe",) + tuple(f"probe+{b:g}xridge" for b in BLEND_BETAS) + ("ridge", "discriminant")
RULES = {
  "probe, blends, ridge, LDA (earlier)": COLUMNS,
  "probe, ridge, LDA (now)": ("probe", "ridge", "discriminant"),
  "ridge alone": ("ridge",),
  "probe alone": ("probe",),
}


def load_features(task_name: str) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, int]:
  """`(train {tap: [n, d]}, train labels, test [m, D] float32, test labels, num_classes)`."""
  path = os.path.join(FLAGS.features_dir, task_name)
  if not os.path.exists(path + ".json"):
    size = SIZES[task_name]
    backbone = backbones.create("efficientnet_lite0", input_size=size)
    specs = [f"{t}@1024" for t in backbone.tap_names]
    task = data.get_task(task_name)
    arrays = {}
    for split in ("train800val200", "test"):
      images, labels = task.arrays(split, image_size=size)
      out = features.extract(backbone, images, taps=specs, target_size=1024, batch_size=64)
      arrays.update({f"{split}/{s}": out[s] for s in specs}, **{f"{split}/labels": labels})
    os.makedirs(FLAGS.features_dir, exist_ok=True)
    with open(path + ".tmp.npz", "wb") as f:
      np.savez(f, **arrays)
    os.replace(path + ".tmp.npz", path + ".npz")
    with open(path + ".json.tmp", "w") as f:
      json.dump({"std": specs, "num_classes": task.num_classes}, f)
    os.replace(path + ".json.tmp", path + ".json")
  with open(path + ".json") as f:
    meta = json.load(f)
  z = np.load(path + ".npz")
  train = {s.split("@")[0]: z[f"train800val200/{s}"] for s in meta["std"]}
  test = np.concatenate([z[f"test/{s}"] for s in meta["std"]], axis=1).astype(np.float32)
  return train, z["train800val200/labels"], test, z["test/labels"], int(meta["num_classes"])


def unit_per_tap(x: np.ndarray, tap_of: np.ndarray, num_taps: int) -> np.ndarray:
  """Each tap's columns of `x [n, K]` scaled to unit norm per row (the config's 'unit_vector')."""
  sq = np.zeros((num_taps, len(x)))
  np.add.at(sq, tap_of, (x * x).T)
  norm = np.sqrt(sq)[tap_of].T
  return np.where(norm > 0, x / np.where(norm > 0, norm, 1.0), 0.0)


def column_accuracies(z_probe, z_ridge, lda, labels) -> np.ndarray:
  """`[len(COLUMNS)]` accuracy of every readout, given the probe's and ridge's logits."""
  zs = [z_probe] + [z_probe + b * z_ridge for b in BLEND_BETAS] + [z_ridge, z_ridge @ lda["w"] + lda["b"]]
  return np.array([(z.argmax(axis=1) == labels).mean() for z in zs])


def score_tables(task_name: str, seed: int, train, y, x_test, y_test, num_classes):
  """CV and test accuracy `[P, len(L2_REGS), len(COLUMNS)]` of every candidate."""
  from bench_common import load_config  # experiments/ is on sys.path

  learning = load_config().learning
  if learning.feature_normalization != "unit_vector":
    raise ValueError("this study reproduces the 'unit_vector' normalisation only")
  prep, y, num_classes = inputs.fit_inputs(train, y, learning, num_classes)
  learnings = plus.grid_learnings(learning)
  x = np.asarray(prep.x, np.float64)
  tap_of, num_taps = np.asarray(prep.tap_of), len(prep.taps)
  shape = (len(learnings), len(ridge.L2_REGS), len(COLUMNS))
  cv, test = np.zeros(shape), np.zeros(shape)
  oof = np.zeros((len(learnings), len(ridge.L2_REGS), len(y), num_classes))
  probe_va = {}
  folds = None
  for members, _, splits, run in head2toe.fold_runs(prep, y, learnings, seed=seed, num_classes=num_classes):
    folds = splits
    for i, (tr, va) in enumerate(splits):
      for j, p in enumerate(members):
        mask = run.kept_mask[i, j] > 0
        idx = run.kept_idx[i, j][mask]
        xk = unit_per_tap(x[:, idx], tap_of[idx], num_taps)
        probe_va[p, i] = xk[va] @ run.params["w"][i, j][mask] + run.params["b"][i, j]
        solver = ridge.Solver(xk[tr], y[tr], num_classes)
        for k, l2 in enumerate(ridge.L2_REGS):
          r = solver.params(l2, dtype=np.float64)
          oof[p, k, va] = xk[va] @ r["w"] + r["b"]
  for p in range(len(learnings)):
    for k in range(len(ridge.L2_REGS)):
      for i, (tr, va) in enumerate(folds):
        lda = plus.discriminant(oof[p, k, tr], y[tr], num_classes)
        cv[p, k] += column_accuracies(probe_va[p, i], oof[p, k, va], lda, y[va]) / data_base.NUM_FOLDS
  validated = np.zeros(len(y), bool)
  for _, va in folds:
    validated[va] = True
  final = head2toe.run_grid(
    prep, y, learnings, [(np.arange(len(y)), None)], [head2toe.FINAL_FOLD], seed=seed, num_classes=num_classes
  )
  for p in range(len(learnings)):
    mask = final.kept_mask[0, p] > 0
    idx = final.kept_idx[0, p][mask]
    xk = unit_per_tap(x[:, idx], tap_of[idx], num_taps)
    xt = unit_per_tap(x_test[:, idx].astype(np.float64), tap_of[idx], num_taps)
    z_probe = xt @ final.params["w"][0, p][mask] + final.params["b"][0, p]
    solver = ridge.Solver(xk, y, num_classes)
    for k, l2 in enumerate(ridge.L2_REGS):
      r = solver.params(l2, dtype=np.float64)
      lda = plus.discriminant(oof[p, k, validated], y[validated], num_classes)
      test[p, k] = column_accuracies(z_probe, xt @ r["w"] + r["b"], lda, y_test)
  return cv, test


def pick(cv: np.ndarray, columns) -> tuple[int, int, int]:
  """The CV's argmax among `columns`, ties to the first in grid order (point, penalty, column)."""
  allowed = np.isin(np.array(COLUMNS), columns)
  return np.unravel_index(int(np.argmax(np.where(allowed, cv, -np.inf))), cv.shape)


def main(argv) -> None:
  del argv
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  lines = [
    "| task | candidates | test acc. of the CV's pick (%) | its CV acc. (%) | picks (seed: point, l2, readout) |",
    "|---|---|---|---|---|",
  ]
  start = time.time()
  for task_name in FLAGS.tasks:
    train, y, x_test, y_test, num_classes = load_features(task_name)
    tables = {}
    for seed in map(int, FLAGS.seeds):
      tables[seed] = score_tables(task_name, seed, train, y, x_test, y_test, num_classes)
      print(f"{task_name} seed {seed}: {time.time() - start:.0f} s", flush=True)
    for rule, columns in RULES.items():
      tests, cvs, picks = [], [], []
      for seed, (cv, test) in tables.items():
        i = pick(cv, columns)
        tests.append(100 * test[i])
        cvs.append(100 * cv[i])
        l2 = "-" if COLUMNS[i[2]] == "probe" else f"{ridge.L2_REGS[i[1]]:g}"
        picks.append(f"{seed}: {i[0]}, {l2}, {COLUMNS[i[2]]}")
      lines.append(
        f"| {task_name} | {rule} | {np.mean(tests):.2f} ± {np.std(tests):.2f} | {np.mean(cvs):.2f} | "
        f"{'; '.join(picks)} |"
      )
    print("\n".join(lines[-len(RULES) :]), flush=True)
  table = "\n".join(lines)
  print(table)
  if FLAGS.out:
    with open(FLAGS.out + ".tmp", "w") as f:
      f.write(f"Command: `{shlex.join(['python'] + sys.argv)}` ({time.time() - start:.0f} s)\n\n{table}\n")
    os.replace(FLAGS.out + ".tmp", FLAGS.out)


if __name__ == "__main__":
  app.run(main)
