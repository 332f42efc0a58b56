r"""Issue #15's spatial direction: do finer-pooled taps help the structured tasks?

    .venv/bin/python experiments/beyond_paper_spatial.py [--tasks=shapes_count,shapes_location]

Head2Toe pools every tap to at most `target_size` features, so at 112 px
EfficientNet-Lite0's late taps (4x4 and 7x7 maps, 192-1280 channels) keep
little or no spatial layout at the default 1024. This script extracts the
training and test images of each task once per feature set and fits ridge on
all taps but the 1000 ImageNet logits (`h2t.ridge`, its l2 chosen by its own 5-fold CV on the training
images), the cheapest probe that can use every feature:

  * `1024`: the offline default (every tap pooled to <= 1024 features);
  * `1024+2x2`: the same, plus every tap with more than 256 channels and a map
    of at least 2x2 also pooled to a 2x2 grid (4 x channels features) as extra
    candidates, as the issue suggests;
  * `4096`: every tap pooled to <= 4096 features (a finer grid everywhere).

It prints, per task and feature set, the feature count, the chosen l2, the CV
and the test accuracy, and the best single tap's CV accuracy (which tap carries
the most). Nothing here looks at test labels to choose anything.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

from h2t import backbones, data, features, ridge

FLAGS = flags.FLAGS
flags.DEFINE_list("tasks", ["shapes_count", "shapes_location"], "Offline tasks (rendered, 112 px).")
flags.DEFINE_list("sets", ["1024", "1024+2x2", "4096"], "Feature sets (see the docstring).")
flags.DEFINE_integer("input_size", 112, "Backbone input size.")


def tap_specs(backbone, feature_set: str) -> list[str]:
  """`feature_set` -> the `tap@target` specs `h2t.features.extract` pools."""
  x = np.zeros((1, FLAGS.input_size, FLAGS.input_size, 3), np.float32)
  shapes = jax.eval_shape(lambda p, x: backbone.apply(p, backbone.preprocess(x))[1], backbone.params, x)
  taps = [t for t in backbone.tap_names if t != "logits"]
  target = int(feature_set.split("+")[0])
  specs = [f"{t}@{target}" for t in taps]
  if feature_set.endswith("+2x2"):
    for t in taps:
      shape = shapes[t].shape
      if len(shape) == 4 and shape[3] > 256 and min(shape[1], shape[2]) >= 2:
        specs.append(f"{t}@{4 * shape[3]}")
  return specs


def evaluate(backbone, task, feature_set: str) -> str:
  specs = tap_specs(backbone, feature_set)
  start = time.time()
  feats = {}
  for split in ("train800val200", "test"):
    images, labels = task.arrays(split, image_size=FLAGS.input_size)
    out = features.extract(backbone, images, taps=specs, target_size=1024, batch_size=64)
    feats[split] = (np.concatenate([out[s] for s in specs], axis=1), labels, out)
  (x, y, per_tap), (x_test, y_test, _) = feats["train800val200"], feats["test"]
  l2, cv = ridge.select_l2_reg(x, y, num_classes=task.num_classes)
  params = ridge.fit(x, y, num_classes=task.num_classes, l2_reg=l2)
  test = float(np.mean((x_test @ params["w"] + params["b"]).argmax(1) == y_test))
  best_tap = max(
    (float(ridge.select_l2_reg(v, y, num_classes=task.num_classes, l2_regs=ridge.L2_REGS[::2])[1].max()), s)
    for s, v in per_tap.items()
  )
  return (
    f"| {task.name} | {feature_set} | {x.shape[1]} | {l2:g} | {100 * cv.max():.2f} | {100 * test:.2f} | "
    f"{best_tap[1]} {100 * best_tap[0]:.1f} | {time.time() - start:.0f} |"
  )


def main(argv) -> None:
  del argv
  backbone = backbones.create("efficientnet_lite0", input_size=FLAGS.input_size)
  print(
    "| task | features | D | l2 | ridge CV acc. (%) | ridge test acc. (%) | best single tap, CV (%) | s |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for name in FLAGS.tasks:
    task = data.get_task(name)
    for feature_set in FLAGS.sets:
      print(evaluate(backbone, task, feature_set), flush=True)


if __name__ == "__main__":
  app.run(main)
