"""The methods a run can compare, as one table of small records.

    for method in h2t.methods.selected(config.methods): ...

Every method reads the same cached training features and the same 5 folds:

| name | taps | learning | searched by the CV grid | fit |
|---|---|---|---|---|
| head2toe | every tap | as configured (selection on) | yes | probe |
| linear | each backbone's `pre_logits` | selection off | yes | probe |
| all_features | every tap | selection off (its L1/L2/group penalties) | yes | probe |
| ridge | every tap | selection off; its L2 by its own CV | no | closed form |
| head2toe_plus | every tap | Head2Toe's selection over its own grid, by its own CV | no | probe, ridge or LDA on ridge |
| finetune | backbone + head on `pre_logits` | fine-tuning multipliers | no (too costly) | end to end |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np

from h2t import features as features_lib

LINEAR_TAP = "pre_logits"


@dataclasses.dataclass(frozen=True)
class Method:
  """One method of the table.

  Attributes:
    name: its name in `config.methods` and results.json.
    taps: 'all' (every tap) or 'linear' (each backbone's `pre_logits`).
    selects: whether Head2Toe's feature selection runs; otherwise the
      learning config's `feature_selection.type` is set to 'none'.
    searched: whether the CV grid scores it (otherwise its first grid
      point's config is used as is).
    fit: 'probe' (`h2t.head2toe.fit`), 'ridge', 'plus' (`h2t.plus.fit`) or 'finetune'.
  """

  name: str
  taps: str
  selects: bool
  searched: bool
  fit: str

  @property
  def pooled(self) -> bool:
    """Whether its features depend on the pooling settings (2-D `pre_logits` do not)."""
    return self.taps == "all"

  def learning(self, learning: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The learning config this method trains with."""
    if self.selects:
      return learning
    plain = ml_collections.ConfigDict(learning.to_dict())
    # Without selection the selection options do nothing: reset them, so grid
    # points that differ only there are one run (`grid.plan`).
    fs = plain.feature_selection
    fs.type, fs.keep_fraction, fs.keep_fraction_offset = "none", 1.0, 0
    fs.mean_interpolation_coef, fs.average_over_k = 0.0, 1
    if "fs_dataset" in fs:
      fs.fs_dataset = ""
    fs.learning_config_overwrite = ml_collections.ConfigDict()
    return plain

  def features(self, feats: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The taps of `feats` this method reads."""
    if self.taps == "linear":
      return {t: feats[t] for t in linear_taps(list(feats))}
    return dict(feats)


METHODS: dict[str, Method] = {
  m.name: m
  for m in (
    Method("head2toe", taps="all", selects=True, searched=True, fit="probe"),
    Method("linear", taps="linear", selects=False, searched=True, fit="probe"),
    Method("all_features", taps="all", selects=False, searched=True, fit="probe"),
    Method("ridge", taps="all", selects=False, searched=False, fit="ridge"),
    Method("head2toe_plus", taps="all", selects=True, searched=False, fit="plus"),
    Method("finetune", taps="linear", selects=False, searched=False, fit="finetune"),
  )
}
NAMES = tuple(METHODS)


def selected(names: Sequence[str]) -> list[Method]:
  return [METHODS[n] for n in names]


def is_linear_tap(name: str) -> bool:
  """Whether a tap name is a backbone's `pre_logits` ('pre_logits', 'resnet50/pre_logits@1024', ...)."""
  return features_lib.split_tap(name)[0].rpartition("/")[2] == LINEAR_TAP


def linear_taps(names: Sequence[str]) -> list[str]:
  """The Linear baseline's taps: each backbone's `pre_logits`, once (the first size)."""
  out, owners = [], set()
  for name in names:
    owner = features_lib.split_tap(name)[0].rpartition("/")[0]
    if is_linear_tap(name) and owner not in owners:
      owners.add(owner)
      out.append(name)
  return out
