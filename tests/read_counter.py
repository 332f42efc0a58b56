"""`python -m tests.read_counter OUT.json FLAGS...`: `h2t.main` with FLAGS, listing the image files it decodes.

Every call of `h2t.data.folder.load_image` (the one decoder of folder tasks,
the test split's check included) is recorded as `[path, size]`; the list is
written to OUT.json when the process exits normally. The multihost test runs
each process through this to see which process decoded which image.
"""

from __future__ import annotations

import atexit
import json
import sys

from absl import app

from h2t import main as h2t_main
from h2t.data import folder


def run() -> None:
  out = sys.argv.pop(1)
  decoded: list[list] = []  # list.append is atomic: the reader's threads may call it at once
  real = folder.load_image

  def load_image(path: str, image_size: int):
    decoded.append([path, int(image_size)])
    return real(path, image_size)

  def write() -> None:
    with open(out, "w") as f:
      json.dump(decoded, f)

  folder.load_image = load_image
  atexit.register(write)
  app.run(h2t_main.main, flags_parser=h2t_main.parse_flags)


if __name__ == "__main__":
  run()
