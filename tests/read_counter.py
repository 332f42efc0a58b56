"""`python -m tests.read_counter OUT.json FLAGS...`: `h2t.main` with FLAGS, listing what it decodes and trains.

OUT.json gets `{"decoded": [[path, size], ...], "trained": [[point, fold], ...]}`,
written when the process exits normally:

* decoded: every call of `h2t.data.folder.load_image` (the one decoder of
  folder tasks, the test split's check included);
* trained: every head `h2t.head2toe.run_grid` trains, as the SHA-256 (16 hex
  digits) of its learning config and its fold id (0..4 for the CV folds,
  `head2toe.FINAL_FOLD` for a fit on all training images).

The multihost test runs each process through this to see which process
decoded which image and trained which head.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import sys

from absl import app

from h2t import head2toe
from h2t import main as h2t_main
from h2t.data import folder


def point_id(learning) -> str:
  """A learning config's identity: the SHA-256 of its JSON, 16 hex digits."""
  text = json.dumps(learning.to_dict(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def run() -> None:
  out = sys.argv.pop(1)
  decoded: list[list] = []  # list.append is atomic: the reader's threads may call it at once
  trained: list[list] = []
  real_load, real_run_grid = folder.load_image, head2toe.run_grid

  def load_image(path: str, image_size: int):
    decoded.append([path, int(image_size)])
    return real_load(path, image_size)

  def run_grid(prep, labels, learnings, folds, fold_ids, **kwargs):
    trained.extend([point_id(lr), int(f)] for f in fold_ids for lr in learnings)
    return real_run_grid(prep, labels, learnings, folds, fold_ids, **kwargs)

  def write() -> None:
    with open(out, "w") as f:
      json.dump({"decoded": decoded, "trained": trained}, f)

  folder.load_image = load_image
  head2toe.run_grid = run_grid  # head2toe.cross_validate and fit look it up at each call
  atexit.register(write)
  app.run(h2t_main.main, flags_parser=h2t_main.parse_flags)


if __name__ == "__main__":
  run()
