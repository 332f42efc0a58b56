"""The streamed test: every chosen head classifies the test split, batch by batch (phase 5 of h2t.evaluate).

accuracy = h2t.streaming.stream_test(backbone, task, {"head2toe": head}, batch_size=64)
"""

from __future__ import annotations

from h2t import backbones, features, multihost, platform
from h2t.head import Head
from h2t.methods import is_linear_tap


def stream_test(networks, task, heads: dict[str, Head], batch_size: int) -> dict[str, float]:
  """Phase 5: test accuracy of each head, batch by batch: images -> taps -> kept features -> logits.

  `networks`: the backbone, or several (a grid over backbone settings); each
  head is run on the one named by its meta.

  Heads are grouped by network and pooling settings (`head.meta`); each group
  reads the test set once, pools only the taps its heads kept, and no batch
  outlives its step, so memory does not grow with the test set. With several
  processes each reads and runs only its share of the batches
  (`multihost.share`) and the correct counts are summed over the processes.
  """
  groups: dict[tuple, dict[str, Head]] = {}
  for name, head in heads.items():
    m = head.meta
    network = (m.backbone, m.checkpoint_id, m.input_size, m.dtype)
    settings = (network, m.target_size, m.pool_size, m.cls_token_pool)
    if all(is_linear_tap(t) for t in head.kept):  # 2-D taps: pooling settings do not matter
      settings = next((g for g in groups if g[0] == network), settings)
    groups.setdefault(settings, {})[name] = head
  networks = [networks] if isinstance(networks, backbones.Backbone) else list(networks)
  by_identity = {(b.name, b.checkpoint_id, b.input_size): b for b in networks}
  correct, n = dict.fromkeys(heads, 0), 0
  batch_size = platform.resolve_batch_size(batch_size)
  mine = multihost.share()
  own_images = sum(rows for _, rows in mine.positions(task.size("test"), batch_size))
  for ((*identity, dtype), target_size, pool_size, cls_pool), members in groups.items():
    backbone = by_identity[tuple(identity)]
    taps = list(dict.fromkeys(t for h in members.values() for t in h.kept))
    n = 0
    for feats, labels in features.extract_batches(
      backbone,
      task.batches("test", batch_size, image_size=backbone.input_size, share=mine),
      taps=taps,
      target_size=target_size,
      batch_size=batch_size,
      cls_token_pool=cls_pool,
      pool_size=pool_size,
      total=own_images,
      dtype=dtype,
    ):
      for name, head in members.items():
        correct[name] += int((head.predict(feats).argmax(-1) == labels).sum())
      n += len(labels)
  counted = multihost.sum_counts({**correct, "__images__": n})
  n = counted.pop("__images__")
  return {name: c / n for name, c in counted.items()}
