"""How each method of `h2t.methods` fits: a probe, ridge in closed form, or fine-tuning end to end."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from h2t.methods import METHODS, Method


def fit_probe(method: Method, feats, labels, cfg, num_classes: int, meta, select_from=None):
  """head2toe / linear / all_features (`head2toe.fit`), and head2toe_plus (`plus.fit`, beyond the paper)."""
  from h2t import head2toe, plus

  if method.fit == "plus":
    if select_from is not None:
      raise ValueError(
        "method head2toe_plus selects on the task's own features; "
        "learning.feature_selection.fs_dataset is not supported with it (use head2toe)"
      )
    fit = plus.fit
  else:
    fit = functools.partial(head2toe.fit, select_from=select_from if method.selects else None)
  return fit(
    method.features(feats),
    labels,
    method.learning(cfg.learning),
    seed=int(cfg.seed),
    num_classes=num_classes,
    meta=meta,
  )


def fit_ridge(method: Method, feats, labels, cfg, num_classes: int, meta, select_from=None):
  """Ridge regression on all taps (normalised as configured), its L2 picked by its own CV."""
  from h2t import head2toe, normalize, ridge
  from h2t.head import OWN_CV, Head, HeadMeta

  taps = list(feats)
  train = head2toe.training_subset(np.arange(len(labels)), labels, cfg.learning, num_classes)
  feats, labels = {t: v[train] for t, v in feats.items()}, np.asarray(labels)[train]
  x, stats = normalize.features_matrix(feats, taps, cfg.learning.feature_normalization)
  l2_reg, acc = ridge.select_l2_reg(x, labels, num_classes=num_classes, seed=int(cfg.seed))
  params = ridge.fit(x, labels, num_classes=num_classes, l2_reg=l2_reg)
  kept = {t: np.arange(feats[t].shape[1], dtype=np.int32) for t in taps}
  own_cv = {"chosen": {"l2_reg": l2_reg}, "cv_accuracy": float(acc[ridge.L2_REGS.index(l2_reg)])}
  meta = HeadMeta.from_dict(dict(meta, num_classes=num_classes, ridge_l2_reg=l2_reg, **{OWN_CV: own_cv}))
  return Head(kept, params, cfg.learning.feature_normalization, stats, meta)


def run_finetune(backbone, task, cfg) -> dict[str, Any]:
  """Full fine-tuning: backbone + head on `pre_logits`, then its own streamed test."""
  import jax

  from h2t import finetune, head2toe, platform

  images, labels = task.arrays("train800val200", image_size=backbone.input_size)
  learning = METHODS["finetune"].learning(cfg.learning)
  train = head2toe.training_subset(np.arange(len(labels)), labels, learning, task.num_classes)
  backbone_params, head_params, losses = finetune.fit(
    backbone, images[train], labels[train], learning, seed=int(cfg.seed), num_classes=task.num_classes
  )
  acc = finetune.evaluate(
    backbone,
    backbone_params,
    head_params,
    task,
    batch_size=platform.resolve_batch_size(int(cfg.backbone.batch_size)),
    normalization=learning.feature_normalization,
  )
  n_backbone = sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(backbone_params))
  return {"test_accuracy": acc, "final_train_loss": float(losses[-1]), "trainable_parameters": n_backbone}


FITS = {"probe": fit_probe, "ridge": fit_ridge, "plus": fit_probe}
