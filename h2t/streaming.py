"""The streamed test: every chosen head classifies the test split, batch by batch (phase 5 of h2t.evaluate).

accuracy = h2t.streaming.stream_test(backbone, task, {"head2toe": head}, batch_size=64)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from h2t import backbones, features, multihost, platform
from h2t.head import Head
from h2t.methods import is_linear_tap


def _kept_union(members: dict[str, Head]) -> tuple[dict[str, np.ndarray], dict[str, Head]]:
  """The features any of `members` keeps, `{tap: sorted indices}`, and each head with its `kept`
  renumbered into those (so it reads the gathered `{tap: [b, len(union[tap])]}` features)."""
  union: dict[str, np.ndarray] = {}
  for head in members.values():
    for tap, idx in head.kept.items():
      union[tap] = np.union1d(union.get(tap, np.zeros(0, np.int64)), np.asarray(idx, np.int64))
  local = {
    name: dataclasses.replace(head, kept={t: np.searchsorted(union[t], idx) for t, idx in head.kept.items()})
    for name, head in members.items()
  }
  return union, local


def stream_test(
  networks, task, heads: dict[str, Head], batch_size: int, taps: Mapping[str, Sequence[str]] | None = None
) -> dict[str, float]:
  """Phase 5: test accuracy of each head, batch by batch: images -> taps -> kept features -> logits.

  `networks`: the backbone, or several (a grid over backbone settings); each
  head is run on the one named by its meta. `taps`: `{head name: the taps its
  training features were extracted with}` (h2t.evaluate passes them): the test
  pass then extracts those taps, running the program the training pass
  compiled; a head not named extracts only the taps it kept.

  Heads are grouped by network and pooling settings (`head.meta`); each group
  reads the test set once; only the features its heads kept leave the device
  (`features.extract_batches(keep=...)`), and no batch outlives its step, so
  memory does not grow with the test set. Heads classify whole batches (the
  last one padded), so their programs are built for one batch shape. With
  several processes each reads and runs only its share of the batches
  (`multihost.share`) and the correct counts are summed over the processes.
  """
  taps = taps or {}
  groups: dict[tuple, dict[str, Head]] = {}
  extracted: dict[tuple, dict[str, None]] = {}
  for name, head in heads.items():
    m = head.meta
    network = (m.backbone, m.checkpoint_id, m.input_size, m.dtype)
    own = settings = (network, m.target_size, m.pool_size, m.cls_token_pool)
    if all(is_linear_tap(t) for t in head.kept):  # 2-D taps: pooling settings do not matter
      settings = next((g for g in groups if g[0] == network), settings)
    groups.setdefault(settings, {})[name] = head
    extracted.setdefault(settings, {}).update(dict.fromkeys(taps.get(name, ()) if settings == own else ()))
  networks = [networks] if isinstance(networks, backbones.Backbone) else list(networks)
  by_identity = {(b.name, b.checkpoint_id, b.input_size): b for b in networks}
  correct, n = dict.fromkeys(heads, 0), 0
  batch_size = platform.resolve_batch_size(batch_size)
  mine = multihost.share()
  own_images = sum(rows for _, rows in mine.positions(task.size("test"), batch_size))
  for settings, members in groups.items():
    (*identity, dtype), target_size, pool_size, cls_pool = settings
    backbone = by_identity[tuple(identity)]
    union, local = _kept_union(members)
    group_taps = list({**extracted[settings], **dict.fromkeys(union)})
    n = 0
    for feats, labels in features.extract_batches(
      backbone,
      task.batches("test", batch_size, image_size=backbone.input_size, share=mine),
      taps=group_taps,
      target_size=target_size,
      batch_size=batch_size,
      cls_token_pool=cls_pool,
      pool_size=pool_size,
      total=own_images,
      dtype=dtype,
      keep=union,
    ):
      b = len(labels)
      if b < batch_size:  # zero rows (finite under every normalisation), dropped from the logits
        feats = {t: np.pad(v, ((0, batch_size - b), (0, 0))) for t, v in feats.items()}
      for name, head in local.items():
        correct[name] += int((head.predict(feats)[:b].argmax(-1) == labels).sum())
      n += b
  counted = multihost.sum_counts({**correct, "__images__": n})
  n = counted.pop("__images__")
  return {name: c / n for name, c in counted.items()}
