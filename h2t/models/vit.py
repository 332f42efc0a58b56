"""Placeholder: filled in by issue 3."""

from __future__ import annotations

from h2t.models import common


def load(checkpoint: str | None, *, input_size: int | None = None) -> common.LoadedModel:
  raise NotImplementedError("vit")
