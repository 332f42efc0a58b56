"""VTAB-1k tasks through TFDS (issue 4 fills this in)."""

from __future__ import annotations

from h2t.data import base

# task name -> spec; empty until the VTAB table lands.
TASKS: dict = {}


def load(name: str, *, data_dir: str | None = None) -> base.Task:
  raise NotImplementedError(name)
