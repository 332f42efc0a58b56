"""What the benchmark scripts share: output that is printed and saved, the default config."""

from __future__ import annotations

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config():
  """`configs/vtab.py`'s default config (the offline default)."""
  spec = importlib.util.spec_from_file_location("vtab_config", os.path.join(REPO, "configs", "vtab.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


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
