"""h2t.report (tables, group means, figures) and experiments/vtab_sweep.py (resumable sweep)."""

import csv
import importlib.util
import json
import os
import sys
import time

from absl.testing import absltest

import configs.vtab as vtab_config
from h2t import report
from h2t.data import vtab
from tests import toy
from tests.toy import ROOT, make_tempdir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TAPS = [f"block{i}_{kind}" for i in range(16) for kind in ("expand", "depthwise", "output")] + [
  "head",
  "pre_logits",
]


def fake_results(task, accuracies, *, backbone="vit_b16", eval_mode="test", grid=None):
  """A results.json dict as h2t.evaluate writes it; `accuracies`: {method: fraction}."""
  kept = {t: (i * 7) % 40 for i, t in enumerate(TAPS)}
  methods = {}
  for method, acc in accuracies.items():
    key = "test_accuracy" if eval_mode == "test" else "valid_accuracy"
    methods[method] = {key: acc, "num_kept": sum(kept.values()), "kept_per_tap": kept, "head_bytes": 1000}
  results = {
    "task": task,
    "num_classes": 10,
    "eval_mode": eval_mode,
    "backbone": {"name": backbone, "checkpoint_id": "x", "input_size": 224},
    "taps": TAPS,
    "tap_sizes": dict.fromkeys(TAPS, 100),
    "num_features": 100 * len(TAPS),
    "methods": methods,
    "timings_s": {"load": 1.0, "test": 2.0},
  }
  if grid is not None:
    results["grid"] = grid
  return results


def write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def assert_png(test, path):
  test.assertTrue(os.path.exists(path), path)
  with open(path, "rb") as f:
    test.assertEqual(f.read(8), PNG_SIGNATURE, path)
  test.assertGreater(os.path.getsize(path), 5000, path)


class ReportTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.dir = make_tempdir(self)
    # Head2Toe: natural tasks at 80%, specialized at 90%, structured at 40 and 60% (mean 50%);
    # Linear: 60% everywhere, on fewer tasks. digits is an offline task counted in no mean.
    self.structured = [t for t, s in vtab.TASKS.items() if s.group == "structured"]
    for name, spec in vtab.TASKS.items():
      if spec.group == "structured":
        acc = 0.4 if self.structured.index(name) % 2 == 0 else 0.6
      else:
        acc = {"natural": 0.8, "specialized": 0.9}[spec.group]
      methods = {"head2toe": acc}
      if name in ("dtd", "eurosat"):
        methods["linear"] = 0.6
      write_json(os.path.join(self.dir, "vit_b16", name, "results.json"), fake_results(name, methods))
    write_json(
      os.path.join(self.dir, "vit_b16", "digits", "results.json"),
      fake_results("digits", {"head2toe": 0.99, "linear": 0.1}),
    )

  def test_group_means_follow_vtab(self):
    self.assertEqual(report.vtab_group_sizes(), {"natural": 7, "specialized": 4, "structured": 8})
    rows = {row.method: row for row in report.table_rows(report.load_runs([self.dir]))}
    h2t = rows["head2toe"]
    self.assertAlmostEqual(h2t.group_mean("natural"), 80.0)
    self.assertAlmostEqual(h2t.group_mean("specialized"), 90.0)
    self.assertAlmostEqual(h2t.group_mean("structured"), 50.0)
    # The mean of the three group means (73.33), not of the 19 tasks ((7*80 + 4*90 + 8*50) / 19 = 69.5).
    self.assertAlmostEqual(h2t.vtab_mean(), (80 + 90 + 50) / 3)
    self.assertTrue(h2t.vtab_complete())
    self.assertEqual(h2t.accuracies["digits"], 99.0)  # listed under Other, in no mean
    linear = rows["linear"]
    self.assertAlmostEqual(linear.vtab_mean(), 60.0)
    self.assertFalse(linear.vtab_complete())

  def test_published_head2toe_mean(self):
    # FACTS: the published 70.9 is the mean of the group means 80.2 / 84.7 / 47.7.
    row = report.Row("head2toe", "vit_b16", "test")
    for group, mean in (("natural", 80.2), ("specialized", 84.7), ("structured", 47.7)):
      for t, s in vtab.TASKS.items():
        if s.group == group:
          row.accuracies[t] = mean
    self.assertEqual(f"{row.vtab_mean():.1f}", "70.9")

  def test_tables_and_figures(self):
    out = os.path.join(self.dir, "report")
    written = report.write_report([self.dir], out)
    with open(os.path.join(out, "table.csv")) as f:
      table = list(csv.DictReader(f))
    by_method = {r["method"]: r for r in table}
    self.assertEqual(set(by_method), {"Head2Toe", "Linear"})
    self.assertEqual(by_method["Head2Toe"]["Natural mean"], "80.00")
    self.assertEqual(by_method["Head2Toe"]["Structured mean"], "50.00")
    self.assertEqual(by_method["Head2Toe"]["VTAB mean"], "73.33")
    self.assertEqual(by_method["Head2Toe"]["digits"], "99.00")
    self.assertEqual(by_method["Linear"]["dtd"], "60.00")
    self.assertEqual(by_method["Linear"]["caltech101"], "")
    # Column order: the paper's groups in order, each followed by its mean; Other last; VTAB mean at the end.
    header = list(table[0])
    self.assertEqual(header[:3], ["method", "backbone", "caltech101"])
    self.assertLess(header.index("Natural mean"), header.index("patch_camelyon"))
    self.assertLess(header.index("Structured mean"), header.index("digits"))
    self.assertEqual(header[-1], "VTAB mean")
    with open(os.path.join(out, "table.md")) as f:
      md = f.read()
    self.assertIn("| Head2Toe | vit_b16 |", md)
    self.assertIn("73.3 |", md)
    self.assertIn("60.0 (1/7)", md)  # linear's natural mean covers one of seven tasks
    with open(os.path.join(out, "runs.csv")) as f:
      self.assertEqual(len(list(csv.DictReader(f))), 19 + 2 + 2)  # one line per (run, method)
    # One bar chart per run with head2toe, one heatmap for the backbone; no grid in these runs.
    self.assertLen(written["figures"], 20 + 1)
    for path in written["figures"]:
      assert_png(self, path)
    self.assertFalse([p for p in written["figures"] if "cv_grid" in p])

  def test_valid_mode_runs_form_their_own_row(self):
    write_json(
      os.path.join(self.dir, "cv", "dtd", "results.json"),
      fake_results("dtd", {"head2toe": 0.5}, eval_mode="valid"),
    )
    rows = report.table_rows(report.load_runs([self.dir]))
    titles = [(r.title, r.metric) for r in rows]
    self.assertIn(("Head2Toe (5-fold CV)", "valid"), titles)

  def test_unreadable_results_are_skipped(self):
    damaged = fake_results("dtd", {"head2toe": "high"})
    no_size = fake_results("dtd", {"head2toe": 0.5})
    del no_size["backbone"]["input_size"]
    texts = {
      "truncated": '{"task": "dtd", "meth',
      "other": '{"accuracy": 1}',
      "a_list": "[1, 2]",
      "damaged": json.dumps(damaged),
      "no_size": json.dumps(no_size),
    }
    for name, text in texts.items():
      os.makedirs(os.path.join(self.dir, name))
      with open(os.path.join(self.dir, name, "results.json"), "w") as f:
        f.write(text)
    skipped = []
    runs = report.load_runs([self.dir], skipped)
    self.assertLen(runs, 19 + 1)
    reasons = {os.path.basename(os.path.dirname(path)): reason for path, reason in skipped}
    self.assertEqual(set(reasons), set(texts))
    self.assertIn("lacks task, backbone, methods", reasons["other"])
    self.assertIn("input_size", reasons["no_size"])
    self.assertIn("head2toe test_accuracy 'high' is not a number", reasons["damaged"])
    # The report is written from the readable runs and names the skipped files.
    out = os.path.join(self.dir, "report")
    report.write_report([self.dir], out)
    with open(os.path.join(out, "table.md")) as f:
      md = f.read()
    self.assertIn("## Skipped", md)
    self.assertIn(os.path.join(self.dir, "truncated", "results.json"), md)

  def test_newest_duplicate_wins(self):
    path = os.path.join(self.dir, "again", "dtd", "results.json")
    write_json(path, fake_results("dtd", {"head2toe": 0.25}))
    future = time.time() + 60
    os.utime(path, (future, future))
    rows = {r.method: r for r in report.table_rows(report.load_runs([self.dir]))}
    self.assertEqual(rows["head2toe"].accuracies["dtd"], 25.0)

  def test_grid_figure(self):
    grid = {
      "head2toe": [
        {"point": {"learning.feature_selection.keep_fraction": kf, "learning.learning_rate": lr}, "mean": m}
        | {"fold_accuracies": [m] * 5}
        for (kf, lr), m in zip(
          [(kf, lr) for kf in (0.01, 0.1) for lr in (0.1, 0.01, 0.001)], [0.5, 0.6, 0.7, 0.8, 0.9, 0.85]
        )
      ],
      "linear": [
        {"point": {"learning.learning_rate": lr}, "mean": m, "fold_accuracies": [m - 0.01, m + 0.01]}
        for lr, m in ((0.1, 0.7), (0.01, 0.75), (0.001, 0.72))
      ],
    }
    results = fake_results("dtd", {"head2toe": 0.9, "linear": 0.75}, grid=grid)
    results["methods"]["head2toe"]["chosen_point"] = grid["head2toe"][4]["point"]
    run = report.Run("x/results.json", results)
    entries = report.grid_entries(results)
    self.assertEqual(report.chosen_index(results, "head2toe", entries["head2toe"]), 4)
    self.assertEqual(report.chosen_index(results, "linear", entries["linear"]), 1)  # best mean
    path = os.path.join(self.dir, "grid.png")
    self.assertTrue(report.plot_grid(run, path))
    assert_png(self, path)
    # A run without a grid, or with a malformed one, draws nothing and does not fail.
    self.assertFalse(report.plot_grid(report.Run("y", fake_results("dtd", {"head2toe": 0.5})), path + "2"))
    self.assertFalse(
      report.plot_grid(report.Run("z", fake_results("dtd", {"head2toe": 0.5}, grid=[1, 2])), path + "3")
    )
    self.assertFalse(os.path.exists(path + "2") or os.path.exists(path + "3"))

  def test_command_line(self):
    small = make_tempdir(self)  # two runs: the command, not the figures, is under test here
    for task in ("dtd", "digits"):
      write_json(os.path.join(small, task, "results.json"), fake_results(task, {"head2toe": 0.5}))
    proc = toy.run_python("-m", "h2t.report", small)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertIn("| Head2Toe | vit_b16 | 50.0 |", proc.stdout)
    self.assertTrue(os.path.exists(os.path.join(small, "report", "table.csv")))  # the default --out

  def assert_error_line(self, proc, *needles):
    """One `error:` line last on stderr, naming `needles`; no traceback; a non-zero exit."""
    self.assertNotEqual(proc.returncode, 0, proc.stdout[-2000:])
    self.assertNotIn("Traceback", proc.stderr)
    last = proc.stderr.strip().splitlines()[-1]
    self.assertTrue(last.startswith("error: "), proc.stderr[-2000:])
    for needle in needles:
      self.assertIn(needle, last)

  def test_command_line_errors(self):
    empty = make_tempdir(self)
    self.assert_error_line(toy.run_python("-m", "h2t.report", empty), "no results.json found", empty)
    missing = os.path.join(empty, "no_such_runs")
    self.assert_error_line(toy.run_python("-m", "h2t.report", missing), missing, "no such folder")

    runs = make_tempdir(self)
    write_json(os.path.join(runs, "dtd", "results.json"), fake_results("dtd", {"head2toe": 0.5}))
    a_file = os.path.join(runs, "table.md")
    with open(a_file, "w") as f:
      f.write("an older report")
    proc = toy.run_python("-m", "h2t.report", runs, f"--out={a_file}")
    self.assert_error_line(proc, a_file, "is a file, not a folder")
    with open(a_file) as f:
      self.assertEqual(f.read(), "an older report")  # left alone
    below_a_file = os.path.join(a_file, "report")  # cannot be created: its parent is a file
    proc = toy.run_python("-m", "h2t.report", runs, f"--out={below_a_file}")
    self.assert_error_line(proc, below_a_file, "give --out a folder you can write to")

  def test_command_line_with_damaged_results(self):
    runs = make_tempdir(self)
    damaged = os.path.join(runs, "dtd_killed", "results.json")
    os.makedirs(os.path.dirname(damaged))
    with open(damaged, "w") as f:
      f.write('{"task": "dtd", "backbone": {"na')
    # Alone, it is an error naming it.
    self.assert_error_line(toy.run_python("-m", "h2t.report", runs), "no readable results.json", damaged)
    # Among readable runs, it is skipped with a warning naming it; the report of the others is written.
    write_json(os.path.join(runs, "dtd", "results.json"), fake_results("dtd", {"head2toe": 0.5}))
    proc = toy.run_python("-m", "h2t.report", runs)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertIn(f"skipping {damaged}", proc.stderr)
    self.assertIn("| Head2Toe | vit_b16 | 50.0 |", proc.stdout)
    self.assertIn(f"`{damaged}`", proc.stdout)  # table.md's Skipped list


def load_sweep_module():
  spec = importlib.util.spec_from_file_location(
    "vtab_sweep", os.path.join(ROOT, "experiments", "vtab_sweep.py")
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules["vtab_sweep"] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


class SweepTest(absltest.TestCase):
  def test_task_words_and_plan(self):
    sweep = load_sweep_module()
    self.assertLen(sweep.expand_tasks(["vtab"]), 19)
    self.assertEqual(
      sweep.expand_tasks(["digits", "specialized", "eurosat"]),
      ["digits", "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"],
    )
    with self.assertRaisesRegex(ValueError, "unknown task 'mnist'.*folder:PATH"):
      sweep.expand_tasks(["mnist"])
    jobs = sweep.plan("/r", ["a", "b"], ["digits", "folder:/data/My Photos/"])
    self.assertEqual(
      [j.workdir for j in jobs],
      ["/r/a/digits", "/r/a/folder_My_Photos", "/r/b/digits", "/r/b/folder_My_Photos"],
    )
    self.assertEqual(sweep.parse_checkpoints(["vit_b16=/x.npz"]), {"vit_b16": "/x.npz"})
    with self.assertRaisesRegex(ValueError, "BACKBONE=PATH"):
      sweep.parse_checkpoints(["vit_b16"])
    self.assertEqual(sweep.progress_line(1, 4, 30, [30]), "[1/4] elapsed 30s, about 1m30s left")

  def test_sweep_resumes_and_reports(self):
    root = make_tempdir(self)
    args = [os.path.join(ROOT, "experiments", "vtab_sweep.py"), f"--config={toy.CONFIG}", f"--root={root}"]
    args += ["--tasks=digits", *toy.fast(steps=20), toy.NO_GRID, "--config.methods=('head2toe',)"]
    # A run killed before it finished left a workdir without results.json: it is run again.
    os.makedirs(os.path.join(root, "efficientnet_lite0", "digits", "cache"))
    proc = toy.run_python(*args)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("[1/1] elapsed", proc.stderr)
    results_path = os.path.join(root, "efficientnet_lite0", "digits", "results.json")
    with open(results_path) as f:
      first = json.load(f)
    self.assertBetween(first["methods"]["head2toe"]["test_accuracy"], 0.5, 1.0)
    self.assertTrue(os.path.exists(os.path.join(root, "report", "table.md")))
    mtime = os.path.getmtime(results_path)

    # Finished: skipped.
    proc = toy.run_python(*args)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("1 finished before, 0 to run", proc.stderr)
    self.assertEqual(os.path.getmtime(results_path), mtime)

    # Finished with another config: refused before any work, naming the option.
    sweep = load_sweep_module()
    config = vtab_config.get_config()
    config.backbone.input_size = toy.FAST_INPUT_SIZE
    jobs = sweep.plan(root, ["efficientnet_lite0"], ["digits"])
    with self.assertRaisesRegex(
      ValueError,
      r"another config: .*digits/results.json \(differs in .*backbone.additional_features_target_size",
    ):
      sweep.run_sweep(config, root, jobs, {})

    # A task that fails is reported; the sweep goes on with the others.
    jobs = sweep.plan(root, ["efficientnet_lite0"], ["folder:" + os.path.join(root, "missing")])
    failed = sweep.run_sweep(config, root, jobs, {})
    self.assertLen(failed, 1)
    self.assertIn("does not exist", failed[0][1])
    self.assertFalse(jobs[0].finished)


if __name__ == "__main__":
  absltest.main()
