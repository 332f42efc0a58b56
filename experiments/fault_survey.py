"""Fault survey: runs every h2t command on user mistakes and damaged inputs, and classifies each outcome.

    python experiments/fault_survey.py [--out=experiments/results/fault_survey.md] [--only=SUBSTRING]

Builds its inputs in a temporary folder ($T in the table): damaged and crafted files written with the real
writers (torch.save, safetensors, np.savez, PIL), folder tasks, head files and results.json files. Each case
is a real command line (a subprocess, run from the repository root with this Python) or, for the kill and
concurrency cases, a scripted sequence. Outcomes:

  ok-error       non-zero exit, the last stderr line starts with `error:` and names the offending
                 value / path, no `Traceback` in stderr (Python API: a ValueError / FloatingPointError
                 whose message names the problem)
  ok-run         exit 0 and the result is right
  BAD-traceback  a Traceback reached the terminal
  BAD-crash      the process died of a signal
  BAD-silent     exit 0 where an error was due, or a wrong result
  BAD-unclear    an error that is not one `error:` line naming the value / path
  BAD-lost       work lost or outputs mixed
  BAD-hang       no end within the case's timeout
  BAD-refused    an error where success was due (a case that should run)

The table is rewritten after every case, so a partial survey is readable.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PY = sys.executable
CONFIG = "configs/vtab.py"
FAST = (
  "--config.backbone.input_size=32",
  "--config.backbone.additional_features_target_size=64",
  "--config.learning.training_steps=20",
)
NO_GRID = "--config.sweep="
# Every command imports this checkout's h2t (a script under experiments/ would otherwise import the installed one).
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
RUN_TIMEOUT = 240  # a full fast run takes ~30-90 s on the shared 2-core machine
FAIL_TIMEOUT = 90


@dataclasses.dataclass
class Result:
  name: str
  steps: str
  expected: str
  outcome: str
  detail: str
  seconds: float


class Survey:
  def __init__(self, tmp: str, out_md: str, only: str | None):
    self.t = tmp
    self.out_md = out_md
    self.only = only
    self.results: list[Result] = []
    self.names: set[str] = set()

  # ---- display ----------------------------------------------------------------------------------

  def show(self, cmd: Sequence[str] | str) -> str:
    text = cmd if isinstance(cmd, str) else shlex.join(cmd)
    return text.replace(self.t, "$T").replace(PY, "python")

  def p(self, *parts: str) -> str:
    return os.path.join(self.t, *parts)

  # ---- running ----------------------------------------------------------------------------------

  def wanted(self, name: str) -> bool:
    assert name not in self.names, f"duplicate case name {name}"
    self.names.add(name)
    return self.only is None or self.only in name

  def record(self, name, steps, expected, outcome, detail, seconds):
    r = Result(name, steps, expected, outcome, detail.strip().replace("\n", " ⏎ ")[:600], seconds)
    old = [i for i, o in enumerate(self.results) if o.name == name]
    if old:  # --update: a case run again replaces its row
      self.results[old[0]] = r
    else:
      self.results.append(r)
    print(f"[{len(self.results):3d}] {outcome:14s} {name} ({seconds:.0f}s): {r.detail[:200]}", flush=True)
    self.write_md()

  def exec(self, cmd: Sequence[str], timeout: float, env: dict | None = None):
    """(returncode or None on timeout, stdout, stderr, seconds)."""
    t0 = time.time()
    proc = subprocess.Popen(
      list(cmd),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      stdin=subprocess.DEVNULL,
      text=True,
      env=dict(ENV, **(env or {})),
      start_new_session=True,
    )
    try:
      out, err = proc.communicate(timeout=timeout)
      return proc.returncode, out, err, time.time() - t0
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      out, err = proc.communicate()
      return None, out, err, time.time() - t0

  @staticmethod
  def classify_error(rc, out, err, names: Sequence[str]) -> tuple[str, str]:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if rc is None:
      return "BAD-hang", f"no end within the timeout; last stderr line: {last}"
    if rc < 0:
      return "BAD-crash", f"killed by signal {-rc}; last stderr line: {last}"
    if "Traceback" in err or "Traceback" in out:
      exc = next((ln for ln in reversed(lines) if re.match(r"^[\w.]*(Error|Exception)\b", ln)), last)
      return "BAD-traceback", f"rc={rc}; {exc}"
    if rc == 0:
      return "BAD-silent", f"exit 0; stdout: {out.strip()[-300:]}"
    if not last.startswith("error:"):
      errs = [ln for ln in lines if ln.startswith("error:")]
      if errs:
        i = lines.index(errs[-1])
        return "BAD-unclear", (
          f"{errs[-1]} -- not one line: followed by {len(lines) - 1 - i} more stderr lines, "
          f"the first {lines[i + 1].strip()[:120]!r}"
        )
      return "BAD-unclear", f"rc={rc}; no error: line; last stderr line: {last}"
    missing = [n for n in names if n.lower() not in last.lower()]
    if missing:
      return "BAD-unclear", f"{last} -- does not name {', '.join(map(repr, missing))}"
    return "ok-error", last

  def error_case(self, name, cmd, names=(), *, timeout=FAIL_TIMEOUT, env=None, expected=None, after=None):
    """A command that must fail with one `error:` line naming all of `names`.

    `after(outcome, detail) -> (outcome, detail)` may downgrade the result (e.g. outputs changed).
    """
    if not self.wanted(name):
      return
    rc, out, err, s = self.exec(cmd, timeout, env)
    outcome, detail = self.classify_error(rc, out, err, names)
    if after is not None:
      outcome, detail = after(outcome, detail)
    exp = expected or ("error naming " + ", ".join(map(repr, names)) if names else "error")
    self.record(name, self.show(cmd), exp, outcome, detail, s)

  def run_case(
    self,
    name,
    cmd,
    check: Callable[[str, str], tuple[str, str] | None] | None = None,
    *,
    timeout=RUN_TIMEOUT,
    env=None,
    expected="exit 0, right result",
  ):
    """A command that must succeed; `check(stdout, stderr)` returns (BAD-class, problem) or None."""
    if not self.wanted(name):
      return None
    rc, out, err, s = self.exec(cmd, timeout, env)
    outcome, detail = self.classify_success(rc, out, err, check)
    self.record(name, self.show(cmd), expected, outcome, detail, s)
    return rc, out, err

  def either_case(self, name, cmd, names, check, *, timeout=RUN_TIMEOUT, expected=None):
    """A value in the allowed range that may still not run: a clean error (naming `names`) or a right result."""
    if not self.wanted(name):
      return
    rc, out, err, s = self.exec(cmd, timeout)
    if rc == 0 and "Traceback" not in err:
      outcome, detail = self.classify_success(rc, out, err, check)
    else:
      outcome, detail = self.classify_error(rc, out, err, names)
    exp = expected or f"exit 0 with a right result, or an error naming {', '.join(map(repr, names))}"
    self.record(name, self.show(cmd), exp, outcome, detail, s)

  def classify_success(self, rc, out, err, check):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if rc is None:
      return "BAD-hang", f"no end within the timeout; last stderr line: {last}"
    if rc < 0:
      return "BAD-crash", f"killed by signal {-rc}; last stderr line: {last}"
    if "Traceback" in err or "Traceback" in out:
      exc = next((ln for ln in reversed(lines) if re.match(r"^[\w.]*(Error|Exception)\b", ln)), last)
      return "BAD-traceback", f"rc={rc}; {exc}"
    if rc != 0:
      return "BAD-refused", f"rc={rc}; {last}"
    problem = check(out, err) if check else None
    if problem:
      return problem
    return "ok-run", (out.strip().splitlines() or [""])[-1][:300]

  def scripted(self, name, steps, expected, fn: Callable[[], tuple[str, str]]):
    if not self.wanted(name):
      return
    t0 = time.time()
    try:
      outcome, detail = fn()
    except Exception as e:  # noqa: BLE001 -- a broken scripted case is reported, not fatal
      outcome, detail = "SURVEY-ERROR", f"{type(e).__name__}: {e}"
    self.record(name, steps, expected, outcome, detail, time.time() - t0)

  # ---- commands ---------------------------------------------------------------------------------

  def main_cmd(self, workdir, *overrides, fast=True, grid=False):
    return [
      PY,
      "-m",
      "h2t.main",
      f"--config={CONFIG}",
      f"--workdir={workdir}",
      *(FAST if fast else ()),
      *(() if grid else (NO_GRID,)),
      *overrides,
    ]

  # ---- report -----------------------------------------------------------------------------------

  def summary(self) -> dict[str, int]:
    return dict(sorted(collections.Counter(r.outcome for r in self.results).items()))

  def write_md(self):
    def cell(s):
      return str(s).replace("|", "\\|").replace("\n", " ")

    counts = self.summary()
    lines = [
      "# Fault survey: every command, user mistakes and damaged inputs",
      "",
      "Generated by `python experiments/fault_survey.py` (run as `nice -n 10 /work/main/.venv/bin/python "
      "experiments/fault_survey.py` from the repository root). `$T` is the survey's temporary folder; "
      "`python` is the interpreter that ran the survey; every command runs from the repository root. "
      "Fast settings for runs that must execute the protocol: " + " ".join(f"`{f}`" for f in FAST) + ".",
      "",
      "Outcome classes: `ok-error` (non-zero exit, last stderr line `error: ...` naming the value/path, no "
      "traceback), `ok-run` (exit 0, right result), `BAD-traceback`, `BAD-crash` (signal), `BAD-silent` (exit 0 "
      "where an error was due, or a wrong result), `BAD-unclear` (the error is not one `error:` line naming "
      "the value/path), `BAD-lost` (work lost / outputs mixed), `BAD-hang` (timeout), `BAD-refused` (an error "
      "where success was due). For the Python API a ValueError / FloatingPointError naming the problem counts "
      "as ok-error.",
      "",
      f"## Summary ({len(self.results)} cases)",
      "",
      "| outcome | cases |",
      "|---|---|",
      *[f"| {k} | {v} |" for k, v in counts.items()],
      "",
      "## BAD cases",
      "",
      *[
        f"- **{cell(r.name)}** ({r.outcome}): `{cell(r.steps)}` — {cell(r.detail)}"
        for r in self.results
        if not r.outcome.startswith("ok-")
      ],
      "",
      "## All cases",
      "",
      "| # | case | command or steps | expected | outcome | error line or problem |",
      "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(self.results, 1):
      lines.append(
        f"| {i} | {cell(r.name)} | `{cell(r.steps)}` | {cell(r.expected)} | {r.outcome} | {cell(r.detail)} |"
      )
    os.makedirs(os.path.dirname(os.path.abspath(self.out_md)), exist_ok=True)
    notes = ""
    if os.path.exists(self.out_md):  # a hand-written notes section at the end is kept
      with open(self.out_md) as f:
        old = f.read()
      if "\n## Notes" in old:
        notes = "\n## Notes" + old.split("\n## Notes", 1)[1]
    with open(self.out_md, "w") as f:
      f.write("\n".join(lines) + "\n" + notes)


# ---- inputs ---------------------------------------------------------------------------------------


def write_bytes(path: str, data: bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return path


def png(path: str, size=(40, 40), seed=0, mode="RGB"):
  from PIL import Image

  rng = np.random.default_rng(seed)
  arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).convert(mode).save(path)
  return path


def special_images(folder: str) -> dict[str, str]:
  """The four unusual image kinds, each written with Pillow; name -> path."""
  from PIL import Image

  os.makedirs(folder, exist_ok=True)
  out = {}
  # 16-bit greyscale PNG: a horizontal ramp 0..65535.
  ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
  out["png16"] = os.path.join(folder, "grey16.png")
  Image.fromarray(ramp).save(out["png16"])  # mode I;16
  # CMYK JPEG, pure red (C=0, M=255, Y=255, K=0).
  cmyk = Image.new("CMYK", (48, 48), (0, 255, 255, 0))
  out["cmyk"] = os.path.join(folder, "red_cmyk.jpg")
  cmyk.save(out["cmyk"], quality=95)
  # Palette PNG with a transparent colour: left half index 1 (bright green, transparent), right half index 2.
  pal = Image.new("P", (48, 48), 2)
  pal.putpalette([0, 0, 0, 0, 255, 0, 255, 255, 255] + [0] * (256 * 3 - 9))
  pal.paste(1, (0, 0, 24, 48))
  out["palette_trns"] = os.path.join(folder, "palette_trns.png")
  pal.save(out["palette_trns"], transparency=1)
  # EXIF orientation 6 (rotate 90 CW to display): stored 64x32, top half white.
  arr = np.zeros((32, 64, 3), np.uint8)
  arr[:16] = 255
  im = Image.fromarray(arr)
  exif = im.getexif()
  exif[0x0112] = 6
  out["exif_rot"] = os.path.join(folder, "exif_rot.jpg")
  im.save(out["exif_rot"], exif=exif.tobytes(), quality=95)
  return out


def folder_task(root: str, per_class_train=4, per_class_test=2, classes=("a", "b"), extra=None) -> str:
  for ci, c in enumerate(classes):
    for i in range(per_class_train):
      png(os.path.join(root, "train", c, f"{i}.png"), seed=100 * ci + i)
    for i in range(per_class_test):
      png(os.path.join(root, "test", c, f"{i}.png"), seed=1000 + 100 * ci + i)
  for rel, data in (extra or {}).items():
    write_bytes(os.path.join(root, rel), data)
  return root


def truncated_png_bytes() -> bytes:
  buf = io.BytesIO()
  from PIL import Image

  Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
  data = buf.getvalue()
  return data[: len(data) // 2]


def build_checkpoints(d: str) -> dict[str, str]:
  import torch
  from safetensors.numpy import save_file

  from tests import checkpoint_craft as craft

  os.makedirs(d, exist_ok=True)
  out = {}
  sd = {
    "conv1.weight": torch.zeros(64, 3, 7, 7),
    "fc.weight": torch.zeros(10, 2048),
    "fc.bias": torch.zeros(10),
  }
  out["wrong_arch_pth"] = os.path.join(d, "wrong_arch.pth")
  torch.save(sd, out["wrong_arch_pth"])
  with open(out["wrong_arch_pth"], "rb") as f:
    data = f.read()
  out["truncated_pth"] = write_bytes(os.path.join(d, "truncated.pth"), data[: len(data) // 2])
  out["empty_pth"] = write_bytes(os.path.join(d, "empty.pth"), b"")
  out["random_pth"] = write_bytes(os.path.join(d, "random.pth"), np.random.default_rng(1).bytes(4096))
  out["random_safetensors"] = write_bytes(
    os.path.join(d, "random.safetensors"), np.random.default_rng(2).bytes(4096)
  )
  out["random_npz"] = write_bytes(os.path.join(d, "random.npz"), np.random.default_rng(3).bytes(4096))
  out["wrong_arch_safetensors"] = os.path.join(d, "wrong_arch.safetensors")
  save_file({"x": np.zeros((3, 3), np.float32)}, out["wrong_arch_safetensors"])
  out["wrong_arch_npz"] = os.path.join(d, "wrong_arch.npz")
  np.savez(out["wrong_arch_npz"], **{"embedding/kernel": np.zeros((16, 16, 3, 8), np.float32)})
  # safetensors whose header declares data past the end of the file.
  header = json.dumps({"w": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}).encode()
  out["safetensors_past_end"] = write_bytes(
    os.path.join(d, "past_end.safetensors"), len(header).to_bytes(8, "little") + header + b"\0" * 64
  )
  # torch zip file whose tensor's stride reaches far past its 12-element storage.
  f32 = np.arange(12, dtype=np.float32)
  s = craft.Storage("0", f32)
  out["crafted_stride_pth"] = os.path.join(d, "crafted_stride.pth")
  craft.write_zip(out["crafted_stride_pth"], {"conv1.weight": craft.Tensor(s, 0, (4,), (10**10,))})
  out["crafted_legacy_count_pth"] = os.path.join(d, "crafted_legacy_count.pth")
  craft.write_legacy(
    out["crafted_legacy_count_pth"], {"w": craft.Tensor(s, 0, (12,), (1,))}, counts={"0": 10**9}
  )
  out["text_file"] = write_bytes(os.path.join(d, "weights.txt"), b"not weights\n")
  out["dir"] = os.path.join(d, "a_folder.pth")
  os.makedirs(out["dir"], exist_ok=True)
  return out


def sha(path: str) -> str | None:
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def outputs_digest(workdir: str) -> dict[str, str | None]:
  return {n: sha(os.path.join(workdir, n)) for n in ("results.json", "head_head2toe.npz", "head_linear.npz")}


def load_results(workdir: str) -> dict | None:
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.loads(f.read(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"non-strict {c}")))


def accuracies(res: dict) -> dict[str, float]:
  return {m: v.get("test_accuracy") for m, v in res["methods"].items()}


# ---- the cases ------------------------------------------------------------------------------------


def config_cases(sv: Survey):
  w = sv.p("wd_cfg")
  bad = [
    # (case, override, tokens the error line must name)
    ("dataset unknown", "--config.dataset=nosuch_task", ["dataset", "nosuch_task"]),
    ("dataset empty", "--config.dataset=", ["dataset"]),
    ("eval_mode unknown", "--config.eval_mode=train", ["eval_mode", "train"]),
    ("seed negative", "--config.seed=-1", ["seed", "-1"]),
    ("seed float", "--config.seed=1.5", ["seed", "1.5"]),
    ("seed not a number", "--config.seed=abc", ["seed", "abc"]),
    ("seed empty", "--config.seed=", ["seed"]),
    ("methods unknown name", "--config.methods=('head2toe','nosuch')", ["methods", "nosuch"]),
    ("methods empty tuple", "--config.methods=()", ["methods"]),
    ("backbone.name unknown", "--config.backbone.name=resnet18", ["backbone.name", "resnet18"]),
    ("backbone.name empty", "--config.backbone.name=", ["backbone.name"]),
    (
      "backbone.name composite with unknown member",
      "--config.backbone.name=efficientnet_lite0+nosuch",
      ["nosuch"],
    ),
    ("backbone.input_size negative", "--config.backbone.input_size=-32", ["input_size", "-32"]),
    ("backbone.input_size too large", "--config.backbone.input_size=100000", ["input_size", "100000"]),
    ("backbone.input_size float", "--config.backbone.input_size=32.5", ["input_size", "32.5"]),
    ("backbone.input_size word", "--config.backbone.input_size=big", ["input_size", "big"]),
    ("backbone.include_input not bool", "--config.backbone.include_input=maybe", ["include_input", "maybe"]),
    (
      "backbone.additional_features_target_size negative",
      "--config.backbone.additional_features_target_size=-5",
      ["additional_features_target_size", "-5"],
    ),
    (
      "backbone.additional_features_pool_size negative",
      "--config.backbone.additional_features_pool_size=-1",
      ["additional_features_pool_size", "-1"],
    ),
    (
      "backbone.additional_features_multi_target_sizes garbage",
      "--config.backbone.additional_features_multi_target_sizes=abc",
      ["multi_target_sizes", "abc"],
    ),
    (
      "backbone.additional_features_multi_target_sizes zero",
      "--config.backbone.additional_features_multi_target_sizes=0,64",
      ["multi_target_sizes", "0,64"],
    ),
    ("backbone.cls_token_pool unknown", "--config.backbone.cls_token_pool=avg", ["cls_token_pool", "avg"]),
    ("backbone.batch_size negative", "--config.backbone.batch_size=-4", ["batch_size", "-4"]),
    ("learning.optimizer unknown", "--config.learning.optimizer=rmsprop", ["optimizer", "rmsprop"]),
    ("learning.learning_rate nan", "--config.learning.learning_rate=nan", ["learning_rate", "nan"]),
    ("learning.learning_rate inf", "--config.learning.learning_rate=inf", ["learning_rate", "inf"]),
    (
      "learning.learning_rate 1e400 (overflows to inf)",
      "--config.learning.learning_rate=1e400",
      ["learning_rate"],
    ),
    ("learning.learning_rate negative", "--config.learning.learning_rate=-0.1", ["learning_rate", "-0.1"]),
    ("learning.learning_rate empty", "--config.learning.learning_rate=", ["learning_rate"]),
    ("learning.learning_rate word", "--config.learning.learning_rate=fast", ["learning_rate", "fast"]),
    ("learning.grad_clip_value nan", "--config.learning.grad_clip_value=nan", ["grad_clip_value", "nan"]),
    ("learning.l1_regularizer negative", "--config.learning.l1_regularizer=-1", ["l1_regularizer", "-1"]),
    ("learning.l2_regularizer inf", "--config.learning.l2_regularizer=inf", ["l2_regularizer", "inf"]),
    (
      "learning.group_lrp_regularizer_coef negative",
      "--config.learning.group_lrp_regularizer_coef=-0.0001",
      ["group_lrp_regularizer_coef", "-0.0001"],
    ),
    (
      "learning.group_lrp_regularizer_r zero",
      "--config.learning.group_lrp_regularizer_r=0",
      ["group_lrp_regularizer_r"],
    ),
    (
      "learning.group_lrp_regularizer_p negative",
      "--config.learning.group_lrp_regularizer_p=-1",
      ["group_lrp_regularizer_p", "-1"],
    ),
    (
      "learning.group_lrp_regularizer_p nan",
      "--config.learning.group_lrp_regularizer_p=nan",
      ["group_lrp_regularizer_p"],
    ),
    (
      "learning.group_lrp_is_embedding not bool",
      "--config.learning.group_lrp_is_embedding=2",
      ["group_lrp_is_embedding", "2"],
    ),
    ("learning.training_steps zero", "--config.learning.training_steps=0", ["training_steps", "0"]),
    ("learning.training_steps negative", "--config.learning.training_steps=-5", ["training_steps", "-5"]),
    ("learning.training_steps float", "--config.learning.training_steps=2.5", ["training_steps", "2.5"]),
    (
      "learning.use_cosine_decay not bool",
      "--config.learning.use_cosine_decay=yes_please",
      ["use_cosine_decay", "yes_please"],
    ),
    ("learning.train_batch_size zero", "--config.learning.train_batch_size=0", ["train_batch_size", "0"]),
    ("learning.eval_batch_size negative", "--config.learning.eval_batch_size=-1", ["eval_batch_size", "-1"]),
    (
      "learning.feature_normalization unknown",
      "--config.learning.feature_normalization=l2",
      ["feature_normalization", "l2"],
    ),
    (
      "learning.output_head_zeroinit not bool",
      "--config.learning.output_head_zeroinit=2",
      ["output_head_zeroinit"],
    ),
    (
      "learning.output_head_type unknown",
      "--config.learning.output_head_type=hidden_5",
      ["output_head_type", "hidden_5"],
    ),
    (
      "learning.output_head_type negative width",
      "--config.learning.output_head_type=trainable_-3",
      ["output_head_type", "trainable_-3"],
    ),
    (
      "learning.finetune_lr_multiplier zero",
      "--config.learning.finetune_lr_multiplier=0",
      ["finetune_lr_multiplier"],
    ),
    (
      "learning.finetune_steps_multiplier nan",
      "--config.learning.finetune_steps_multiplier=nan",
      ["finetune_steps_multiplier"],
    ),
    ("learning.data_fraction zero", "--config.learning.data_fraction=0", ["data_fraction"]),
    ("learning.data_fraction above 1", "--config.learning.data_fraction=1.5", ["data_fraction", "1.5"]),
    ("learning.precision unknown", "--config.learning.precision=low", ["precision", "low"]),
    ("feature_selection.type unknown", "--config.learning.feature_selection.type=magic", ["type", "magic"]),
    (
      "feature_selection.keep_fraction zero",
      "--config.learning.feature_selection.keep_fraction=0",
      ["keep_fraction"],
    ),
    (
      "feature_selection.keep_fraction nan",
      "--config.learning.feature_selection.keep_fraction=nan",
      ["keep_fraction", "nan"],
    ),
    (
      "feature_selection.keep_fraction above 1",
      "--config.learning.feature_selection.keep_fraction=1.5",
      ["keep_fraction", "1.5"],
    ),
    (
      "feature_selection.keep_fraction_offset negative",
      "--config.learning.feature_selection.keep_fraction_offset=-1",
      ["keep_fraction_offset", "-1"],
    ),
    (
      "feature_selection.mean_interpolation_coef above 1",
      "--config.learning.feature_selection.mean_interpolation_coef=2",
      ["mean_interpolation_coef"],
    ),
    (
      "feature_selection.average_over_k zero",
      "--config.learning.feature_selection.average_over_k=0",
      ["average_over_k"],
    ),
    (
      "feature_selection.fs_dataset unknown",
      "--config.learning.feature_selection.fs_dataset=nosuch",
      ["fs_dataset", "nosuch"],
    ),
    (
      "feature_selection.is_overwrite not bool",
      "--config.learning.feature_selection.is_overwrite=maybe",
      ["is_overwrite", "maybe"],
    ),
    (
      "learning_config_overwrite coef nan",
      "--config.learning.feature_selection.learning_config_overwrite.group_lrp_regularizer_coef=nan",
      ["group_lrp_regularizer_coef", "nan"],
    ),
    (
      "learning_config_overwrite coef negative",
      "--config.learning.feature_selection.learning_config_overwrite.group_lrp_regularizer_coef=-1",
      ["group_lrp_regularizer_coef", "-1"],
    ),
    (
      "learning_config_overwrite of a key the default lacks (reference allows any learning key)",
      "--config.learning.feature_selection.learning_config_overwrite.learning_rate=0.5",
      ["learning_config_overwrite.learning_rate"],
    ),
    # unknown keys
    ("unknown key: typo in leaf", "--config.learning.learning_rat=0.1", ["learning.learning_rat"]),
    ("unknown key: typo in section", "--config.lerning.learning_rate=0.1", ["lerning"]),
    ("unknown key: backbone typo", "--config.backbone.nme=resnet50", ["backbone.nme"]),
    ("unknown key: top level", "--config.dataset_name=digits", ["dataset_name"]),
    ("finetune with composite backbone", "--config.methods=('finetune',)", ["finetune"]),
  ]
  for name, arg, tokens in bad:
    extra = (
      ("--config.backbone.name=efficientnet_lite0+efficientnet_lite0",)
      if "composite" in name and "finetune" in name
      else ()
    )
    sv.error_case(f"config: {name}", sv.main_cmd(w, arg, *extra), tokens)

  wm = sv.p("wd_methods_string")

  def only_head2toe(out, err):
    res = load_results(wm)
    if res is None:
      return "BAD-lost", "no results.json"
    got = sorted(res["methods"])
    return None if got == ["head2toe"] else ("BAD-silent", f"methods run: {got}")

  sv.run_case(
    "config: methods as a plain string runs that one method",
    sv.main_cmd(wm, "--config.methods=head2toe"),
    only_head2toe,
    expected="exit 0, results.json holds head2toe only (or an error)",
  )
  sv.error_case(
    "config: backbone.additional_features names an unknown tap",
    sv.main_cmd(w, "--config.backbone.additional_features=stem,nosuchtap"),
    ["nosuchtap"],
  )
  wt = sv.p("wd_taps_empty")

  def pre_logits_only(out, err):
    res = load_results(wt)
    if res is None:
      return "BAD-lost", "no results.json"
    return None if res["taps"] == ["pre_logits"] else ("BAD-silent", f"taps {res['taps']}")

  sv.run_case(
    "config: backbone.additional_features empty",
    sv.main_cmd(wt, "--config.backbone.additional_features="),
    pre_logits_only,
    expected="exit 0 with taps ['pre_logits'] (the reference always adds its output key), or an error",
  )
  sv.error_case(
    "config: fs_dataset is a folder task that does not exist",
    sv.main_cmd(w, f"--config.learning.feature_selection.fs_dataset=folder:{sv.p('no_fs_folder')}"),
    ["no_fs_folder"],
  )
  sv.error_case(
    "config: default backbone with a checkpoint path that does not exist",
    sv.main_cmd(w, f"--config.backbone.checkpoint={sv.p('nowhere.pth')}"),
    ["nowhere.pth"],
  )

  def finite_results(wd):
    def check(out, err):
      res = load_results(wd)
      if res is None:
        return "BAD-lost", "no results.json"
      accs = accuracies(res)
      if not all(isinstance(a, float) and 0 <= a <= 1 for a in accs.values()):
        return "BAD-silent", f"accuracies {accs}"
      return None

    return check

  we = sv.p("wd_s64")
  sv.either_case(
    "config: seed 2**64 (no upper bound in the schema)",
    sv.main_cmd(we, f"--config.seed={2**64}"),
    ["seed"],
    finite_results(we),
  )
  wk = sv.p("wd_keep_tiny")
  sv.either_case(
    "config: keep_fraction 1e-9 (in range, keeps < 1 feature)",
    sv.main_cmd(wk, "--config.learning.feature_selection.keep_fraction=1e-09"),
    ["keep_fraction"],
    finite_results(wk),
  )
  # Data-location fields.
  sv.error_case(
    "config: VTAB task with a data_dir that does not exist",
    sv.main_cmd(w, "--config.dataset=dtd", f"--config.data_dir={sv.p('no_tfds')}"),
    ["dtd"],
    timeout=150,
  )
  sv.error_case(
    "config: fashion_mnist_dir that does not exist",
    sv.main_cmd(
      w,
      "--config.dataset=fashion_mnist",
      f"--config.fashion_mnist_dir={sv.p('no_fm')}",
      f"--config.data_dir={sv.p('no_tfds')}",
    ),
    ["no_fm"],
    timeout=150,
  )
  # Config file and flag problems.
  sv.error_case(
    "config file missing",
    [PY, "-m", "h2t.main", "--config=configs/nosuch.py", f"--workdir={w}"],
    ["nosuch.py"],
  )
  sv.error_case(
    "config file variant unknown",
    [PY, "-m", "h2t.main", "--config=configs/vtab.py:papr", f"--workdir={w}"],
    ["papr"],
  )
  sv.error_case("--workdir missing", [PY, "-m", "h2t.main", f"--config={CONFIG}"], ["workdir"])
  sv.error_case("stray positional argument", sv.main_cmd(w) + ["extra_arg"], ["extra_arg"])
  sv.error_case("unknown top-level flag", sv.main_cmd(w) + ["--workdirr=x"], ["workdirr"])


def sweep_cases(sv: Survey):
  w = sv.p("wd_sweep")
  bad = [
    ("no '='", "learning.learning_rate", ["learning.learning_rate"]),
    ("unknown field", "learning.lr=0.1,0.2", ["learning.lr"]),
    ("duplicate field", "learning.learning_rate=0.1;learning.learning_rate=0.2", ["learning.learning_rate"]),
    ("value of the wrong type", "learning.training_steps=abc,5", ["training_steps", "abc"]),
    ("float for an int field", "learning.training_steps=20,2.5", ["training_steps", "2.5"]),
    ("bad value in one grid point (nan)", "learning.learning_rate=0.1,nan", ["learning_rate", "nan"]),
    (
      "bad value in one grid point (out of range)",
      "learning.feature_selection.keep_fraction=0.1,2",
      ["keep_fraction", "2"],
    ),
    ("bad value in one grid point (negative int)", "backbone.batch_size=64,-1", ["batch_size", "-1"]),
    ("empty value list", "learning.learning_rate=", ["learning_rate"]),
    ("field outside learning./backbone.", "dataset=dtd,digits", ["dataset"]),
    ("bool field given a word", "learning.use_cosine_decay=True,maybe", ["use_cosine_decay", "maybe"]),
    ("unknown backbone in one point", "backbone.name=efficientnet_lite0,nosuch", ["nosuch"]),
  ]
  for name, sweep, tokens in bad:
    sv.error_case(f"sweep: {name}", sv.main_cmd(w, f"--config.sweep={sweep}", grid=True), tokens)
  ws = sv.p("wd_sweep_separators")

  def one_point(out, err):
    res = load_results(ws)
    if res is None:
      return "BAD-lost", "no results.json"
    return (
      None if res.get("num_grid_points") == 1 else ("BAD-silent", f"{res.get('num_grid_points')} grid points")
    )

  sv.run_case(
    "sweep: only separators (';;') means no grid",
    sv.main_cmd(ws, "--config.sweep=;;", grid=True),
    one_point,
    expected="exit 0 with 1 grid point (an empty sweep), or an error",
  )
  sv.error_case(
    "sweep: --config.sweep and a field it sweeps both given",
    sv.main_cmd(
      w, "--config.sweep=learning.learning_rate=0.1,0.01", "--config.learning.learning_rate=0.05", grid=True
    ),
    ["learning_rate"],
  )


def checkpoint_cases(sv: Survey, ck: dict[str, str]):
  w = sv.p("wd_ckpt")

  def r50(path, name="resnet50"):
    return sv.main_cmd(w, f"--config.backbone.name={name}", f"--config.backbone.checkpoint={path}")

  for key, desc in [
    ("dir", "a directory"),
    ("empty_pth", "an empty .pth"),
    ("truncated_pth", "a truncated torch.save file"),
    ("wrong_arch_pth", "a torch.save file of another architecture"),
    ("random_pth", "random bytes (.pth)"),
    ("random_safetensors", "random bytes (.safetensors)"),
    ("wrong_arch_safetensors", "a safetensors file of another architecture"),
    ("safetensors_past_end", "safetensors header pointing past the end"),
    ("crafted_stride_pth", "a .pth with a crafted stride (10**10)"),
    ("crafted_legacy_count_pth", "a legacy .pth whose storage count exceeds the file"),
    ("text_file", "a .txt file"),
  ]:
    sv.error_case(f"checkpoint: resnet50 with {desc}", r50(ck[key]), [os.path.basename(ck[key])])
  sv.error_case("checkpoint: resnet50 with a missing file", r50(sv.p("ckpt", "missing.pth")), ["missing.pth"])
  sv.error_case("checkpoint: resnet50 without a checkpoint", r50(""), ["resnet50", "checkpoint"])
  sv.error_case(
    "checkpoint: vit_b16 with random bytes (.npz)", r50(ck["random_npz"], "vit_b16"), ["random.npz"]
  )
  sv.error_case(
    "checkpoint: vit_b16 with an npz of another architecture",
    r50(ck["wrong_arch_npz"], "vit_b16"),
    ["wrong_arch.npz"],
  )
  sv.error_case(
    "checkpoint: default backbone given a foreign file",
    sv.main_cmd(w, f"--config.backbone.checkpoint={ck['wrong_arch_pth']}"),
    ["wrong_arch.pth"],
  )
  sv.error_case(
    "checkpoint: composite backbone with one checkpoint for two members",
    r50(ck["wrong_arch_pth"], "resnet50+vit_b16"),
    ["checkpoint"],
  )
  fifo = sv.p("ckpt", "fifo.pth")
  if not os.path.exists(fifo):
    os.mkfifo(fifo)
  sv.error_case("checkpoint: a named pipe (nothing ever written)", r50(fifo), ["fifo.pth"], timeout=60)


def workdir_cases(sv: Survey, w0: str, folders: dict[str, str]):
  afile = write_bytes(sv.p("a_file"), b"x")
  sv.error_case("workdir: path is a file", sv.main_cmd(afile), ["a_file"])
  sv.error_case("workdir: parent is a file", sv.main_cmd(os.path.join(afile, "sub")), ["a_file"])
  sv.error_case("workdir: unwritable /proc path", sv.main_cmd("/proc/h2t_survey_wd"), ["/proc/h2t_survey_wd"])

  # A failing run on a workdir with complete outputs keeps them.
  if sv.wanted("workdir: failed run (damaged test image) keeps previous outputs"):
    wp = sv.p("wd_prev_fail")
    shutil.copytree(w0, wp, ignore=shutil.ignore_patterns("cache"))
    before = outputs_digest(wp)
    cmd = sv.main_cmd(wp, f"--config.dataset=folder:{folders['trunc_test']}")
    rc, out, err, s = sv.exec(cmd, FAIL_TIMEOUT)
    outcome, detail = sv.classify_error(rc, out, err, ["bad.png"])
    if outputs_digest(wp) != before:
      outcome, detail = "BAD-lost", f"outputs changed: {before} -> {outputs_digest(wp)}; {detail}"
    sv.record(
      "workdir: failed run (damaged test image) keeps previous outputs",
      sv.show(cmd),
      "error naming the image; previous results.json and heads unchanged",
      outcome,
      detail,
      s,
    )


def kill_sequence(sv: Survey, ref: dict | None):
  """Concurrent run, kill -9 mid-run, stale lock, stale temporaries, resume from the cache."""
  wk = sv.p("wd_kill")
  cmd = sv.main_cmd(wk)
  names = [
    "concurrency: second run on the same workdir",
    "kill -9 mid-run leaves no partial outputs",
    "stale lock after kill -9 is taken over",
    "stale temp file in the workdir is swept at start",
    "stale temp file in the cache folder is swept at start (cache hit)",
    "rerun after kill -9 resumes from the cache with the same numbers",
  ]
  if not any(sv.only is None or sv.only in n for n in names):
    for n in names:
      sv.names.add(n)
    return
  for n in names:
    sv.names.add(n)
  t0 = time.time()
  p1 = subprocess.Popen(
    cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=ENV
  )
  lock = os.path.join(wk, ".h2t.lock")
  deadline = time.time() + 120
  while time.time() < deadline and p1.poll() is None:
    if os.path.exists(lock) and open(lock).read().strip():
      break
    time.sleep(0.2)
  # (1) a second run (another seed) while the first holds the lock
  before = set(os.listdir(wk))
  log_before = (
    os.path.getsize(os.path.join(wk, "log.txt")) if os.path.exists(os.path.join(wk, "log.txt")) else 0
  )
  cmd2 = cmd + ["--config.seed=3"]
  rc, out, err, s = sv.exec(cmd2, FAIL_TIMEOUT)
  outcome, detail = sv.classify_error(rc, out, err, ["wd_kill"])
  new_files = sorted(n for n in set(os.listdir(wk)) - before if n.startswith("events."))
  with open(os.path.join(wk, "log.txt"), errors="replace") as f:
    f.seek(log_before)
    foreign = [
      ln for ln in f.read().splitlines() if "seed': 3" in ln or "'seed': 3" in ln or "run failed" in ln
    ]
  if outcome == "ok-error" and (new_files or foreign):
    outcome = "BAD-lost"
    detail = (
      f"{detail} -- but the refused run wrote into the busy workdir: {len(new_files)} TensorBoard events "
      f"file(s) with its own hparams (seed=3) and {len(foreign)} line(s) of its own in the live run's log.txt"
    )
  if p1.poll() is not None:
    detail += " (note: the first run had already ended when the second finished)"
  sv.record(
    names[0],
    f"start `{sv.show(cmd)}` in the background; when WORKDIR/.h2t.lock holds its pid, run the "
    "same command with --config.seed=3",
    "second run: error naming the workdir; nothing of it in the busy workdir",
    outcome,
    detail,
    s,
  )
  # (2) kill -9 once the feature cache is written (extraction done, training under way)
  deadline = time.time() + 200
  cache_ready = False
  while time.time() < deadline and p1.poll() is None:
    if [f for f in glob.glob(os.path.join(wk, "cache", "*.npz"))]:
      cache_ready = True
      time.sleep(2)
      break
    time.sleep(0.3)
  killed = p1.poll() is None
  if killed:
    os.killpg(p1.pid, signal.SIGKILL)
  p1.communicate()
  left = sorted(n for n in os.listdir(wk) if n.startswith(("results", "head_")))
  if not killed:
    outcome, detail = "SURVEY-ERROR", "the run ended before it could be killed"
  elif left:
    outcome, detail = "BAD-lost", f"after kill -9 the workdir holds {left}"
  else:
    outcome, detail = (
      "ok-run",
      f"killed after {time.time() - t0:.0f}s (cache written: {cache_ready}); no "
      "results.json or head files left",
    )
  sv.record(
    names[1],
    f"`{sv.show(cmd)}`; kill -9 its process group once WORKDIR/cache/*.npz exists",
    "no results.json / heads (no partial outputs)",
    outcome,
    detail,
    time.time() - t0,
  )
  # (3-5) stale temporaries, then rerun
  tmp_wd = write_bytes(os.path.join(wk, ".results.json.survey.h2t-tmp"), b"{half")
  tmp_cache = write_bytes(os.path.join(wk, "cache", ".x.npz.survey.h2t-tmp"), b"half")
  old = time.time() - 7200
  os.utime(tmp_wd, (old, old))
  os.utime(tmp_cache, (old, old))
  rc, out, err, s = sv.exec(cmd, RUN_TIMEOUT)
  base_outcome, base_detail = sv.classify_success(rc, out, err, None)
  steps = f"after the kill: put stale `*.h2t-tmp` files in WORKDIR and WORKDIR/cache (2 h old), rerun `{sv.show(cmd)}`"
  sv.record(
    names[2],
    steps,
    "exit 0 (lock of the dead run taken over)",
    base_outcome,
    base_detail if base_outcome != "ok-run" else "rerun took the lock over",
    s,
  )
  if base_outcome != "ok-run":
    for n in names[3:]:
      sv.record(n, steps, "exit 0", "SURVEY-ERROR", "rerun failed", 0)
    return
  for n, path in ((names[3], tmp_wd), (names[4], tmp_cache)):
    left = os.path.exists(path)
    sv.record(
      n,
      steps,
      f"{os.path.relpath(path, wk)} removed",
      "BAD-silent" if left else "ok-run",
      f"{os.path.relpath(path, wk)} (2 h old) still there after the rerun" if left else "removed",
      0,
    )
  res = load_results(wk)
  problems = []
  if not res.get("train_features_cached"):
    problems.append("train_features_cached is false: the cache was not reused")
  if ref is not None and accuracies(res) != accuracies(ref):
    problems.append(f"accuracies {accuracies(res)} differ from the uninterrupted run's {accuracies(ref)}")
  if ref is not None:
    kept = {m: v.get("kept_per_tap") for m, v in res["methods"].items()}
    kept0 = {m: v.get("kept_per_tap") for m, v in ref["methods"].items()}
    if kept != kept0:
      problems.append("kept features differ from the uninterrupted run's")
  sv.record(
    names[5],
    steps,
    "results from the cache, identical to an uninterrupted run",
    "BAD-silent" if problems else "ok-run",
    "; ".join(problems) or f"cached; {accuracies(res)}",
    0,
  )


def killed_run_keeps_outputs(sv: Survey, w0: str):
  name = "kill -9 of a rerun keeps the previous complete outputs (or none), never a mix"
  if not sv.wanted(name):
    return
  wp = sv.p("wd_prev_kill")
  shutil.copytree(w0, wp)
  before = outputs_digest(wp)
  cmd = sv.main_cmd(wp, "--config.seed=9")
  t0 = time.time()
  p = subprocess.Popen(
    cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, env=ENV
  )
  # Kill late: after the heads are trained (the fit phases take most of the run), as close to the commit as
  # a poll can get: as soon as any output file changes, or after 40 s.
  while p.poll() is None and time.time() - t0 < 40:
    if outputs_digest(wp) != before:
      break
    time.sleep(0.05)
  was_running = p.poll() is None
  if was_running:
    os.killpg(p.pid, signal.SIGKILL)
  p.communicate()
  after = outputs_digest(wp)
  changed = sorted(k for k in before if before[k] != after[k])
  if not was_running:
    outcome, detail = "SURVEY-ERROR", "the run ended before it was killed"
  elif after["results.json"] is None and changed:
    outcome, detail = (
      "ok-run",
      f"results.json removed, changed: {changed} (no complete old outputs, none new)",
    )
  elif after["results.json"] == before["results.json"] and changed:
    outcome, detail = "BAD-lost", f"old results.json beside new {changed}: mixed outputs"
  elif not changed:
    outcome, detail = "ok-run", f"killed at {time.time() - t0:.0f}s; previous outputs intact"
  else:
    outcome, detail = "ok-run", f"changed {changed}"
  sv.record(
    name,
    f"copy a finished workdir; `{sv.show(cmd)}`; kill -9 after 40 s or as soon as an output file changes",
    "previous outputs intact, or no results.json",
    outcome,
    detail,
    time.time() - t0,
  )


def cache_cases(sv: Survey, w0: str, ref: dict | None):
  def same_numbers(wd, want_cached=None):
    def check(out, err):
      res = load_results(wd)
      if res is None:
        return "BAD-lost", "no results.json"
      if ref is not None and accuracies(res) != accuracies(ref):
        return "BAD-silent", f"accuracies {accuracies(res)} != {accuracies(ref)}"
      if want_cached is not None and res.get("train_features_cached") != want_cached:
        return (
          "BAD-silent",
          f"train_features_cached={res.get('train_features_cached')}, expected {want_cached}",
        )
      return None

    return check

  cf = write_bytes(sv.p("cache_is_a_file"), b"not a folder")
  wd = sv.p("wd_cachefile")
  sv.run_case(
    "cache: cache_dir is a file (warning, run goes on)",
    sv.main_cmd(wd, f"--config.cache_dir={cf}"),
    same_numbers(wd),
    expected="exit 0 with a warning; same numbers as the reference run",
  )
  if sv.wanted("cache: damaged cache file is rebuilt"):
    wc = sv.p("wd_cache_damaged")
    shutil.copytree(w0, wc)
    for f in glob.glob(os.path.join(wc, "cache", "*.npz")):
      with open(f, "r+b") as fh:
        fh.seek(os.path.getsize(f) // 2)
        fh.write(b"\xff" * 4096)
    sv.names.discard("cache: damaged cache file is rebuilt")
    sv.run_case(
      "cache: damaged cache file is rebuilt",
      sv.main_cmd(wc),
      same_numbers(wc, want_cached=False),
      expected="exit 0, features re-extracted (train_features_cached false), same numbers",
    )
  wpm = sv.p("no", "such", "parent", "wd")
  sv.run_case(
    "workdir: parent folders missing (created)",
    sv.main_cmd(wpm),
    same_numbers(wpm),
    expected="exit 0 (parents created), same numbers",
  )


def override_wins_case(sv: Survey):
  wd = sv.p("wd_override")

  def check(out, err):
    res = load_results(wd)
    if res is None:
      return "BAD-lost", "no results.json"
    kf = res["config"]["learning"]["feature_selection"]["keep_fraction"]
    problems = []
    if kf != 0.3:
      problems.append(f"results.json config keep_fraction={kf}")
    n = res["methods"]["head2toe"]["num_kept"]
    want = int(0.3 * res["num_features"])
    if abs(n - want) > 1:
      problems.append(f"head2toe kept {n} features, 0.3 x {res['num_features']} = {want}")
    if res.get("num_grid_points") != 2:
      problems.append(f"{res.get('num_grid_points')} grid points (expected 2: the coef values only)")
    chosen = res["methods"]["head2toe"].get("chosen_point", {})
    if any("keep_fraction" in k and v != 0.3 for k, v in chosen.items()):
      problems.append(f"chosen point {chosen}")
    return ("BAD-silent", "; ".join(problems)) if problems else None

  sv.run_case(
    "sweep: command-line keep_fraction=0.3 wins over the default sweep (results.json checked)",
    sv.main_cmd(wd, "--config.learning.feature_selection.keep_fraction=0.3", grid=True),
    check,
    expected="exit 0; results.json keep_fraction 0.3, 2 grid points, ~0.3 of features kept",
  )


def folder_cases(sv: Survey, folders: dict[str, str]):
  w = sv.p("wd_folder")
  sv.error_case(
    "folder task: folder does not exist",
    sv.main_cmd(w, f"--config.dataset=folder:{sv.p('nofolder')}"),
    ["nofolder"],
  )
  for key, desc, tokens in [
    ("empty", "empty folder", ["empty"]),
    ("one_class", "one class", ["one_class"]),
    ("non_images", "only non-image files", ["non_images"]),
    ("few", "3 training images", ["few"]),
    ("test_extra_class", "test class missing from train", ["zebra"]),
    ("trunc_train", "truncated image in train", ["bad.png"]),
    ("trunc_test", "truncated image in test", ["bad.png"]),
    ("zero_byte", "zero-byte .jpg in train", ["zero.jpg"]),
    ("text_as_png", "a text file named .png", ["notes.png"]),
  ]:
    sv.error_case(
      f"folder task: {desc}", sv.main_cmd(w, f"--config.dataset=folder:{folders[key]}"), tokens, timeout=150
    )
  wm = sv.p("wd_folder_modes")

  def check(out, err):
    res = load_results(wm)
    if res is None:
      return "BAD-lost", "no results.json"
    accs = accuracies(res)
    if not all(isinstance(a, float) and 0 <= a <= 1 for a in accs.values()):
      return "BAD-silent", f"accuracies {accs}"
    return None

  sv.run_case(
    "folder task: 16-bit PNG, CMYK JPEG, palette+tRNS PNG, EXIF-rotated JPEG in train and test",
    sv.main_cmd(wm, f"--config.dataset=folder:{folders['modes']}"),
    check,
    timeout=RUN_TIMEOUT,
  )


API_PRELUDE = textwrap.dedent(
  """
  import sys, numpy as np
  import configs.vtab, h2t.head2toe
  learning = configs.vtab.get_config().learning
  learning.training_steps = 5
  rng = np.random.default_rng(0)
  feats = {"a": rng.normal(size=(100, 8)).astype(np.float32), "b": rng.normal(size=(100, 6)).astype(np.float32)}
  labels = np.arange(100) % 5
  kw = {}
  """
)
API_CALL = textwrap.dedent(
  """
  try:
    head = h2t.head2toe.fit(feats, labels, learning, seed=0, **kw)
  except (ValueError, FloatingPointError) as e:
    print(f"EXC {type(e).__name__}: {e}"); sys.exit(3)
  except Exception as e:
    print(f"OTHER {type(e).__name__}: {e}"); sys.exit(4)
  print("OK", {t: len(v) for t, v in head.kept.items()}, head.params["w"].shape)
  """
)


def api_case(sv: Survey, name: str, mutation: str, tokens: Sequence[str], expect_error=True, check_code=""):
  if not sv.wanted(name):
    return
  code = API_PRELUDE + textwrap.dedent(mutation) + API_CALL + textwrap.dedent(check_code)
  cmd = [PY, "-c", code]
  rc, out, err, s = sv.exec(cmd, FAIL_TIMEOUT)
  line = (out.strip().splitlines() or [""])[-1]
  if rc is None:
    outcome, detail = "BAD-hang", "timeout"
  elif rc < 0:
    outcome, detail = "BAD-crash", f"signal {-rc}"
  elif "Traceback" in err:
    outcome, detail = "BAD-traceback", err.strip().splitlines()[-1]
  elif rc == 3 and expect_error:
    missing = [t for t in tokens if t.lower() not in line.lower()]
    outcome, detail = ("BAD-unclear", f"{line} -- does not name {missing}") if missing else ("ok-error", line)
  elif rc == 4:
    outcome, detail = "BAD-unclear", line
  elif rc == 0 and expect_error:
    outcome, detail = "BAD-silent", f"no exception: {line}"
  elif rc == 0:
    outcome, detail = "ok-run", line
  else:
    outcome, detail = ("BAD-refused" if not expect_error else "BAD-unclear"), f"rc={rc}: {line}"
  steps = (
    "h2t.head2toe.fit(feats, labels, learning, seed=0) on toy features {a:[100,8], b:[100,6]}, labels "
    "arange(100)%5, 5 steps; then: " + " ".join(mutation.split())
  )
  sv.record(
    name,
    steps,
    "ValueError/FloatingPointError naming " + ", ".join(map(repr, tokens)) if expect_error else "a head",
    outcome,
    detail,
    s,
  )


def api_cases(sv: Survey):
  api_case(sv, "API: float labels (2.7)", "labels = labels.astype(float); labels[3] = 2.7", ["label", "2.7"])
  api_case(sv, "API: negative label", "labels = labels.copy(); labels[0] = -1", ["label", "-1"])
  api_case(
    sv,
    "API: label >= num_classes",
    "labels = labels.copy(); labels[0] = 7; kw['num_classes'] = 5",
    ["label", "7"],
  )
  api_case(sv, "API: NaN label", "labels = labels.astype(float); labels[1] = np.nan", ["label", "nan"])
  api_case(sv, "API: NaN feature", "feats['a'][3, 2] = np.nan", ["'a'"])
  api_case(sv, "API: -inf feature", "feats['b'][0, 0] = -np.inf", ["'b'"])
  api_case(sv, "API: 1-D features", "feats['a'] = feats['a'][:, 0]", ["'a'"])
  api_case(sv, "API: features and labels of different lengths", "labels = labels[:90]", ["90"])
  api_case(
    sv,
    "API: more labels than feature rows",
    "labels = np.concatenate([labels, labels[:10]])",
    ["110"],
  )
  api_case(sv, "API: taps with different numbers of rows", "feats['b'] = feats['b'][:50]", ["'b'"])
  api_case(sv, "API: no taps", "feats = {}", ["feature"])
  api_case(
    sv,
    "API: learning config with nan learning rate",
    "learning.learning_rate = float('nan')",
    ["learning_rate"],
  )


def predict_cases(sv: Survey, w0: str, imgs: dict[str, str], ck: dict[str, str]):
  head = os.path.join(w0, "head_head2toe.npz")
  d = sv.p("heads")
  os.makedirs(d, exist_ok=True)
  made = {}
  if os.path.exists(head):
    import dataclasses as dc

    from h2t.head import Head

    h = Head.load(head)
    with open(head, "rb") as f:
      data = f.read()
    made["empty"] = write_bytes(os.path.join(d, "empty.npz"), b"")
    made["truncated"] = write_bytes(os.path.join(d, "truncated.npz"), data[: len(data) // 2])
    made["foreign"] = os.path.join(d, "foreign.npz")
    np.savez(made["foreign"], w=np.zeros((3, 3)), b=np.zeros(3))
    made["resnet"] = os.path.join(d, "resnet_head.npz")
    dc.replace(h, meta=dc.replace(h.meta, backbone="resnet50")).save(made["resnet"])
    made["other_ckpt"] = os.path.join(d, "other_ckpt_head.npz")
    dc.replace(h, meta=dc.replace(h.meta, checkpoint_id="other.pth:0123456789abcdef")).save(
      made["other_ckpt"]
    )
    made["nan"] = os.path.join(d, "nan_head.npz")
    with np.load(head) as z:
      arrs = {k: z[k] for k in z.files}
    arrs["params/w"] = arrs["params/w"].copy()
    arrs["params/w"][0, 0] = np.nan
    np.savez(made["nan"], **arrs)
  else:
    for k in ("empty", "truncated", "foreign", "resnet", "other_ckpt", "nan"):
      made[k] = os.path.join(d, f"{k}_MISSING_BASELINE.npz")

  def pr(*args):
    return [PY, "-m", "h2t.predict", *args]

  img = imgs["plain"]
  sv.error_case("predict: head file missing", pr(f"--head={sv.p('nohead.npz')}", img), ["nohead.npz"])
  sv.error_case("predict: empty head file", pr(f"--head={made['empty']}", img), ["empty.npz"])
  sv.error_case("predict: truncated head file", pr(f"--head={made['truncated']}", img), ["truncated.npz"])
  sv.error_case("predict: foreign npz as head", pr(f"--head={made['foreign']}", img), ["foreign.npz"])
  sv.error_case(
    "predict: head is a checkpoint file", pr(f"--head={ck['wrong_arch_pth']}", img), ["wrong_arch.pth"]
  )
  sv.error_case(
    "predict: head of another backbone (resnet50), no --checkpoint",
    pr(f"--head={made['resnet']}", img),
    ["--checkpoint"],
  )
  sv.error_case(
    "predict: head trained on another checkpoint id", pr(f"--head={made['other_ckpt']}", img), ["checkpoint"]
  )
  sv.error_case("predict: head with a NaN weight", pr(f"--head={made['nan']}", img), ["nan_head.npz"])
  sv.error_case(
    "predict: --checkpoint foreign file for the head's backbone",
    pr(f"--head={head}", f"--checkpoint={ck['wrong_arch_pth']}", img),
    ["wrong_arch.pth"],
  )
  sv.error_case("predict: no --head", pr(img), ["--head"])
  sv.error_case("predict: no images", pr(f"--head={head}"), ["image"])
  empty_dir = sv.p("no_images_dir")
  write_bytes(os.path.join(empty_dir, "readme.txt"), b"hi")
  sv.error_case("predict: a folder without images", pr(f"--head={head}", empty_dir), ["no_images_dir"])
  sv.error_case("predict: image path missing", pr(f"--head={head}", sv.p("missing.png")), ["missing.png"])
  sv.error_case("predict: damaged image", pr(f"--head={head}", imgs["truncated"]), ["trunc_img.png"])
  sv.error_case(
    "predict: --output unwritable /proc path",
    pr(f"--head={head}", "--output=/proc/h2t_preds.csv", img),
    ["/proc/h2t_preds.csv"],
  )
  sv.error_case(
    "predict: --output is a folder", pr(f"--head={head}", f"--output={sv.p('heads')}", img), ["heads"]
  )
  sv.error_case(
    "predict: --output in a missing folder",
    pr(f"--head={head}", f"--output={sv.p('nodir', 'p.csv')}", img),
    ["p.csv"],
  )
  modes = [imgs[k] for k in ("png16", "cmyk", "palette_trns", "exif_rot")] + [img]

  def check(out, err):
    rows = [r for r in out.strip().splitlines()[1:] if r]
    if len(rows) != len(modes):
      return "BAD-silent", f"{len(rows)} rows for {len(modes)} images"
    for r in rows:
      label, prob = r.split(",")[1:3]
      if not (0 <= int(label) < 10 and 0 < float(prob) <= 1):
        return "BAD-silent", f"bad row {r}"
    return None

  sv.run_case(
    "predict: 16-bit PNG, CMYK JPEG, palette+tRNS PNG, EXIF JPEG, plain PNG",
    pr(f"--head={head}", *modes),
    check,
    expected="exit 0, 5 CSV rows with labels in 0..9",
  )


def image_mode_cases(sv: Survey, imgs: dict[str, str]):
  """Each unusual image read by h2t.data.folder.load_image, checked against an independent expectation."""
  checks = {
    "16-bit PNG keeps its contrast (ramp -> 0..255, not clipped)": (
      imgs["png16"],
      "a = load_image(P, 64).astype(float); g = a[..., 0]\n"
      "ok = g[:, 0].mean() < 5 and g[:, -1].mean() > 250 and 100 < g.mean() < 155 and (a[...,0]==a[...,1]).all()\n"
      "msg = f'min col {g[:, 0].mean():.1f} max col {g[:, -1].mean():.1f} mean {g.mean():.1f}'",
    ),
    "CMYK JPEG reads as red": (
      imgs["cmyk"],
      "a = load_image(P, 48).astype(float); m = a.reshape(-1, 3).mean(0)\n"
      "ok = m[0] > 200 and m[1] < 60 and m[2] < 60\nmsg = f'mean RGB {m.round(1)}'",
    ),
    "palette PNG with tRNS: transparent half reads black": (
      imgs["palette_trns"],
      "a = load_image(P, 48).astype(float)\n"
      "ok = a[:, :20].max() == 0 and a[:, 28:].min() > 250\nmsg = f'left max {a[:, :20].max()} right min {a[:, 28:].min()}'",
    ),
    "EXIF orientation 6 is applied (white half on the right)": (
      imgs["exif_rot"],
      "a = load_image(P, 64).astype(float).mean(-1)\n"
      "ok = a[:, 40:].mean() > 200 and a[:, :24].mean() < 50\n"
      "msg = f'left mean {a[:, :24].mean():.0f} right mean {a[:, 40:].mean():.0f}'",
    ),
  }
  for name, (path, code) in checks.items():
    full = f"import sys\nfrom h2t.data.folder import load_image\nP = {path!r}\n{code}\nprint(msg)\nsys.exit(0 if ok else 5)\n"
    cmd = [PY, "-c", full]
    if not sv.wanted(f"image: {name}"):
      continue
    rc, out, err, s = sv.exec(cmd, FAIL_TIMEOUT)
    outcome, detail = sv.classify_success(rc, out, err, None)
    if rc == 5:
      outcome = "BAD-silent"
    sv.record(
      f"image: {name}",
      f"h2t.data.folder.load_image({sv.show(path)}) checked: " + code.split("\n")[1],
      "right pixels",
      outcome,
      out.strip(),
      s,
    )


def report_cases(sv: Survey, w0: str):
  def rep(*args):
    return [PY, "-m", "h2t.report", *args]

  sv.error_case("report: missing dir", rep(sv.p("no_runs_here")), ["no_runs_here"])
  empty = sv.p("report_empty")
  os.makedirs(empty, exist_ok=True)
  sv.error_case("report: dir without runs", rep(empty), ["report_empty"])
  bad = sv.p("report_bad", "run1")
  os.makedirs(bad, exist_ok=True)
  with open(os.path.join(w0, "results.json"), "rb") as f:
    good = f.read()
  write_bytes(os.path.join(bad, "results.json"), good[: len(good) // 2])
  sv.error_case("report: truncated results.json", rep(sv.p("report_bad")), ["results.json"])
  nan = sv.p("report_nan", "run1")
  write_bytes(
    os.path.join(nan, "results.json"), good.replace(b'"test_accuracy": ', b'"test_accuracy": NaN, "x": ', 1)
  )
  nan_out = sv.p("report_nan_out")

  def nan_visible(out, err):
    with open(os.path.join(nan_out, "table.md")) as f:
      rows = [
        r
        for r in f.read().splitlines()
        if r.startswith("| Head2Toe") or r.startswith("| digits | efficientnet_lite0 | 32 | head2toe")
      ]
    shown = [r for r in rows if "94.4" in r or "94.5" in r]
    if shown:
      return "BAD-silent", f"a number where the file holds NaN: {shown[0]}"
    return None

  sv.run_case(
    "report: results.json with NaN accuracy (not strict JSON)",
    rep(sv.p("report_nan"), f"--out={nan_out}"),
    nan_visible,
    expected="an error naming the file, or the accuracy shown as nan/missing (never a number)",
  )
  schema = sv.p("report_schema", "run1")
  write_bytes(os.path.join(schema, "results.json"), b'{"methods": 3}')
  sv.error_case("report: results.json of the wrong shape", rep(sv.p("report_schema")), ["results.json"])
  write_bytes(os.path.join(sv.p("report_list", "run1"), "results.json"), b"[1, 2]")
  sv.error_case("report: results.json that is a JSON list", rep(sv.p("report_list")), ["results.json"])
  okdir = sv.p("report_ok")
  shutil.copytree(
    w0, os.path.join(okdir, "digits"), ignore=shutil.ignore_patterns("cache"), dirs_exist_ok=True
  )
  outfile = write_bytes(sv.p("report_out_file"), b"x")
  sv.error_case("report: --out is a file", rep(okdir, f"--out={outfile}"), ["report_out_file"])
  sv.error_case("report: --out under /proc", rep(okdir, "--out=/proc/h2t_report"), ["/proc/h2t_report"])
  sv.error_case("report: no arguments", rep(), ["RESULTS_DIR"])
  sv.run_case(
    "report: a folder with one run",
    rep(okdir, f"--out={sv.p('report_ok_out')}"),
    lambda o, e: None if os.path.exists(sv.p("report_ok_out", "table.md")) else ("BAD-silent", "no table.md"),
    expected="exit 0, table.md written",
    timeout=180,
  )


def prepare_sweep_cases(sv: Survey, ck: dict[str, str]):
  def prep(*args):
    return [PY, "-m", "h2t.data.prepare", *args]

  sv.error_case("prepare: unknown task", prep("--tasks=nosuch", f"--data_dir={sv.p('tfds')}"), ["nosuch"])
  sv.error_case("prepare: empty task list", prep("--tasks=", f"--data_dir={sv.p('tfds')}"), ["tasks"])
  sv.error_case(
    "prepare: unwritable data_dir (/proc)",
    prep("--tasks=dtd", "--data_dir=/proc/h2t_tfds"),
    ["/proc/h2t_tfds"],
    timeout=120,
  )
  afile = write_bytes(sv.p("tfds_file"), b"x")
  sv.error_case(
    "prepare: data_dir is a file", prep("--tasks=dtd", f"--data_dir={afile}"), ["tfds_file"], timeout=120
  )

  def sw(*args):
    return [
      PY,
      "experiments/vtab_sweep.py",
      f"--config={CONFIG}",
      f"--root={sv.p('sweep_root')}",
      *FAST,
      NO_GRID,
      *args,
    ]

  sv.error_case("vtab_sweep: unknown task group", sw("--tasks=natral"), ["natral"])
  sv.error_case("vtab_sweep: unknown backbone", sw("--tasks=digits", "--backbones=resnet5"), ["resnet5"])
  sv.error_case(
    "vtab_sweep: --checkpoints item without '='",
    sw("--tasks=digits", "--backbones=resnet50", "--checkpoints=resnet50"),
    ["resnet50"],
  )
  sv.error_case(
    "vtab_sweep: --checkpoints for a backbone not in --backbones",
    sw("--tasks=digits", "--backbones=efficientnet_lite0", f"--checkpoints=resnet50={ck['wrong_arch_pth']}"),
    ["resnet50"],
    timeout=RUN_TIMEOUT,
  )
  sv.error_case(
    "vtab_sweep: --checkpoints path missing",
    sw("--tasks=digits", "--backbones=resnet50", f"--checkpoints=resnet50={sv.p('nope.pth')}"),
    ["nope.pth"],
    timeout=150,
  )
  sv.error_case(
    "vtab_sweep: --root is a file",
    [
      PY,
      "experiments/vtab_sweep.py",
      f"--config={CONFIG}",
      f"--root={afile}",
      "--tasks=digits",
      *FAST,
      NO_GRID,
    ],
    ["tfds_file"],
    timeout=150,
  )


def build_folders(sv: Survey, imgs: dict[str, str]) -> dict[str, str]:
  f = {}
  f["empty"] = sv.p("folders", "empty")
  os.makedirs(f["empty"], exist_ok=True)
  f["one_class"] = sv.p("folders", "one_class")
  for i in range(6):
    png(os.path.join(f["one_class"], "only", f"{i}.png"), seed=i)
  f["non_images"] = sv.p("folders", "non_images")
  for c in ("a", "b"):
    for i in range(4):
      write_bytes(os.path.join(f["non_images"], c, f"{i}.txt"), b"text")
  f["few"] = sv.p("folders", "few")
  for i, c in enumerate(("a", "b", "a")):
    png(os.path.join(f["few"], "train", c, f"{i}.png"), seed=i)
  for c in ("a", "b"):
    png(os.path.join(f["few"], "test", c, "t.png"), seed=50)
  f["test_extra_class"] = folder_task(sv.p("folders", "test_extra_class"))
  png(os.path.join(f["test_extra_class"], "test", "zebra", "z.png"))
  bad = truncated_png_bytes()
  f["trunc_train"] = folder_task(sv.p("folders", "trunc_train"), extra={"train/a/bad.png": bad})
  f["trunc_test"] = folder_task(sv.p("folders", "trunc_test"), extra={"test/b/bad.png": bad})
  f["zero_byte"] = folder_task(sv.p("folders", "zero_byte"), extra={"train/a/zero.jpg": b""})
  f["text_as_png"] = folder_task(
    sv.p("folders", "text_as_png"), extra={"train/b/notes.png": b"hello, not a png\n"}
  )
  f["modes"] = folder_task(sv.p("folders", "modes"), per_class_train=3, per_class_test=1)
  for split in ("train", "test"):
    for k, c in (("png16", "a"), ("cmyk", "b"), ("palette_trns", "a"), ("exif_rot", "b")):
      shutil.copy(imgs[k], os.path.join(f["modes"], split, c, os.path.basename(imgs[k])))
  return f


def read_md_rows(path: str) -> list[Result]:
  """The rows of a table this script wrote (for --update)."""
  rows = []
  with open(path) as f:
    text = f.read().split("## All cases", 1)[1]
  for line in text.splitlines():
    if not re.match(r"^\| \d+ \|", line):
      continue
    cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
    _, name, steps, expected, outcome, detail = cells
    rows.append(Result(name, steps.strip("`"), expected, outcome, detail, 0.0))
  return rows


def guarded(sv: Survey, fn, *args):
  """Runs one section; a bug in the survey itself is recorded, and the survey goes on."""
  try:
    fn(sv, *args)
  except Exception as e:  # noqa: BLE001
    import traceback

    traceback.print_exc()
    sv.record(f"SURVEY-ERROR in {fn.__name__}", "-", "-", "SURVEY-ERROR", f"{type(e).__name__}: {e}", 0)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "fault_survey.md"))
  ap.add_argument("--only", default=None, help="run only the cases whose name contains this")
  ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
  ap.add_argument(
    "--update",
    action="store_true",
    help="read the rows of an existing --out table and replace only the cases run now (with --only)",
  )
  args = ap.parse_args()
  tmp = tempfile.mkdtemp(prefix="h2t_fault_survey_")
  sv = Survey(tmp, args.out, args.only)
  if args.update:
    sv.results = read_md_rows(args.out)
  t0 = time.time()
  try:
    imgs = special_images(sv.p("images"))
    imgs["plain"] = png(sv.p("images", "plain.png"), seed=7)
    imgs["truncated"] = write_bytes(sv.p("images", "trunc_img.png"), truncated_png_bytes())
    ck = build_checkpoints(sv.p("ckpt"))
    folders = build_folders(sv, imgs)

    # The reference run: its numbers, head and cache are reused below.
    w0 = sv.p("wd_ref")
    sv.run_case(
      "reference run (fast settings, no grid)",
      sv.main_cmd(w0),
      lambda o, e: None if load_results(w0) else ("BAD-lost", "no results.json"),
    )
    ref = load_results(w0) if os.path.exists(os.path.join(w0, "results.json")) else None

    guarded(sv, config_cases)
    guarded(sv, sweep_cases)
    guarded(sv, checkpoint_cases, ck)
    guarded(sv, api_cases)
    guarded(sv, image_mode_cases, imgs)
    if ref is not None:
      guarded(sv, predict_cases, w0, imgs, ck)
      guarded(sv, report_cases, w0)
    guarded(sv, prepare_sweep_cases, ck)
    guarded(sv, folder_cases, folders)
    if ref is not None:
      guarded(sv, workdir_cases, w0, folders)
    guarded(sv, kill_sequence, ref)
    if ref is not None:
      guarded(sv, killed_run_keeps_outputs, w0)
      guarded(sv, cache_cases, w0, ref)
    guarded(sv, override_wins_case)
  finally:
    sv.write_md()
    if not args.keep:
      shutil.rmtree(tmp, ignore_errors=True)
  counts = sv.summary()
  print(
    f"\n{len(sv.results)} cases in {time.time() - t0:.0f}s: "
    + ", ".join(f"{k} {v}" for k, v in counts.items())
  )
  for r in sv.results:
    if not r.outcome.startswith("ok-"):
      print(f"  {r.outcome}: {r.name}: {r.steps}\n      {r.detail}")
  print(f"table: {args.out}")


if __name__ == "__main__":
  main()
