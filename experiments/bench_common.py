"""What the benchmark scripts share: output that is printed and saved, the config, child
processes, backbones with random weights."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(variant: str | None = None):
  """`configs/vtab.py`'s config: the offline default, or `variant` (e.g. 'paper')."""
  spec = importlib.util.spec_from_file_location("vtab_config", os.path.join(REPO, "configs", "vtab.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def run_child(script: str, args: Sequence[str]) -> dict:
  """Runs `python script *args` in a fresh process (the repository on its path) and returns the JSON
  object its last output line holds; a failed child raises with the end of its stderr."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
    [sys.executable, os.path.abspath(script), *args], capture_output=True, text=True, env=env, check=False
  )
  if proc.returncode:
    raise RuntimeError(f"child process failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def random_backbone(name: str, input_size: int):
  """'resnet50' or 'vit_b16' with `module.init` weights, as an `h2t.backbones.Backbone` (the taps and
  normalisation `h2t.backbones.create` gives them from a checkpoint): for costs, which do not depend
  on the weights."""
  import jax
  import jax.numpy as jnp

  from h2t import backbones
  from h2t.models import common, resnet, vit

  if name == "resnet50":
    module, normalization, taps = resnet.ResNet(), common.IMAGENET, resnet.tap_names()
  elif name == "vit_b16":
    module = vit.ViT()  # B/16: patch 16, width 768, 12 blocks, 12 heads, MLP 3072
    normalization, taps = common.MINUS_ONE_ONE, vit.tap_names(module.depth)
  else:
    raise ValueError(f"backbone {name!r}: expected 'resnet50' or 'vit_b16'")
  params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, input_size, input_size, 3)))["params"]
  return backbones.Backbone(
    name=name,
    module=module,
    params=params,
    input_size=input_size,
    normalization=normalization,
    tap_names=taps,
    checkpoint_id="random-init:0",
  )


class Printer:
  """Prints lines as they come and keeps them for `--out`."""

  def __init__(self):
    self.lines: list[str] = []

  def __call__(self, line: str = "") -> None:
    print(line, flush=True)
    self.lines.append(line)

  def write(self, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      f.write("\n".join(self.lines) + "\n")
