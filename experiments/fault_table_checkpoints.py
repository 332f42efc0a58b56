"""Runs the checkpoint fuzz cases against two checkouts and prints their outcomes as a markdown table.

    python experiments/fault_table_checkpoints.py --before=/path/to/old/checkout [--after=.]

Uses the files of tests/test_checkpoint_fuzz.py (same seeds). Each file is read by
`h2t.checkpoints.read_tensors` of the checkout in a child process; a crash is recorded and the
batch resumes after the crashing file. Outcomes: `error` (CheckpointError naming the file),
`error-unnamed` (CheckpointError without the path), `ok` (tensors whose bytes occur in the file),
`outside` (tensors with bytes that are not in the file), `other` (another exception), `crash`
(the process died, e.g. a segfault).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import test_checkpoint_fuzz as fuzz  # noqa: E402


def outcomes(paths: list[str], workdir: str, cwd: str) -> dict[str, str]:
  out: dict[str, str] = {}
  todo = list(paths)
  while todo:
    code, results, _ = fuzz.run_batch(todo, workdir, cwd=cwd)
    for r in results:
      o = r["outcome"]
      out[r["path"]] = "error-unnamed" if o == "error" and not r["names_file"] else o
    if len(results) < len(todo):
      out[todo[len(results)]] = "crash" if code < 0 or code >= 128 else f"exit{code}"
      todo = todo[len(results) + 1 :]
    else:
      todo = []
  return out


def build_cases(d: str) -> dict[str, list[str]]:
  """Case class -> files."""
  import collections as c

  import torch
  from safetensors.numpy import save_file

  cases: dict[str, list[str]] = {}
  t = fuzz.CheckpointFuzzTest()
  base = t._base_tensors()

  def write(name, content):
    path = os.path.join(d, name)
    with open(path, "wb") as f:
      f.write(content)
    return path

  def damaged(fmt, data, ext, seed0):
    cases[f"{fmt}: truncation (every offset)"] = [
      write(f"{fmt}_{k}{ext}", v) for k, v in fuzz.truncations(data).items()
    ]
    cases[f"{fmt}: 1-3 random byte changes ({fuzz.NUM_FLIPS} seeds)"] = [
      write(f"{fmt}_{k}{ext}", v) for k, v in fuzz.flips(data, seed0).items()
    ]

  sd = c.OrderedDict((k, torch.from_numpy(v.copy())) for k, v in base.items())
  b = torch.arange(12, dtype=torch.float32).reshape(4, 3)
  sd["base"], sd["rows"] = b, b[1:3]
  sd["bf16"] = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
  for layout, use_zip, seed0 in (("torch zip", True, 0), ("torch legacy", False, 10_000)):
    path = os.path.join(d, f"base_{use_zip}.pth")
    torch.save(sd, path, _use_new_zipfile_serialization=use_zip)
    cases[f"{layout}: valid file (torch.save)"] = [path]
    with open(path, "rb") as f:
      damaged(layout.replace(" ", "_"), f.read(), ".pth", seed0)
  marker = os.path.join(d, "pickle_code_ran")
  for name, (layout, payload) in fuzz._torch_crafted(marker).items():
    path = os.path.join(d, f"crafted_{name}.pth")
    fuzz._write_torch_crafted(path, layout, payload)
    kind = "torch legacy" if name.startswith("legacy") else "torch zip"
    cases[f"{kind}: crafted {name.split('_', 1)[1]}"] = [path]
  path = os.path.join(d, "base.safetensors")
  save_file(base, path)
  cases["safetensors: valid file (save_file)"] = [path]
  with open(path, "rb") as f:
    damaged("safetensors", f.read(), ".safetensors", 20_000)
  for name, content in fuzz._safetensors_crafted().items():
    cases[f"safetensors: crafted {name}"] = [write(f"crafted_{name}.safetensors", content)]
  path = os.path.join(d, "base.npz")
  np.savez(path, **base)
  cases["npz: valid file (np.savez)"] = [path]
  with open(path, "rb") as f:
    damaged("npz", f.read(), ".npz", 30_000)
  for name, content in fuzz._npz_crafted(d).items():
    cases[f"npz: crafted {name}"] = [write(f"crafted_{name}.npz", content)]
  return cases


def summary(paths: list[str], result: dict[str, str]) -> str:
  counts = collections.Counter(result[p] for p in paths)
  if len(paths) == 1:
    return next(iter(counts))
  return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--before", required=True)
  parser.add_argument("--after", default=os.getcwd())
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as d:
    cases = build_cases(d)
    paths = [p for ps in cases.values() for p in ps]
    runs = {}
    marker = os.path.join(d, "pickle_code_ran")
    for label, cwd in (("before", args.before), ("after", args.after)):
      runs[label] = outcomes([p for p in paths if "os_system" not in p], d, cwd)
      for p in paths:  # one by one, to see which file's pickled os.system call ran
        if "os_system" in p:
          runs[label].update(outcomes([p], d, cwd))
          if os.path.exists(marker):
            runs[label][p] += " (os.system ran)"
            os.remove(marker)
    print("| case | files | before | after |\n|---|---|---|---|")
    for name, ps in cases.items():
      print(f"| {name} | {len(ps)} | {summary(ps, runs['before'])} | {summary(ps, runs['after'])} |")


if __name__ == "__main__":
  main()
