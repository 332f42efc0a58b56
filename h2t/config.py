"""The config's schema: every field's type and allowed values, checked once before any loading.

    config = configs.vtab.get_config()
    h2t.config.validate(config)        # raises ConfigError naming the key, the value and what is allowed

`validate` checks the base config and every grid point of `config.sweep`
(`h2t.grid.points`), so a bad value anywhere fails before a backbone is
loaded or a feature extracted. `FEATURE_FIELDS` are the fields that change the
pooled features: grid points that differ in one of them get their own
backbone and features (`h2t.grid.plan`). `resolve_cli_overrides` settles a
value given on the command line that the sweep also sets, and
`explain_unknown_key` helps with a mistyped `--config.KEY`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ml_collections

from h2t import normalize, probe, selection


class ConfigError(ValueError):
  """A config value h2t cannot run with; the message names the key, the value and what is allowed."""


Check = Callable[[Any], str | None]  # value -> what is wrong (None: fine)


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its check and whether it changes the pooled features."""

  check: Check
  features: bool = False


def _number(kind: type, low: float | None = None, high: float | None = None, *, low_open=False) -> Check:
  def check(v):
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
      return f"expected {'a number' if kind is float else 'an integer'}"
    if kind is float and not math.isfinite(v):
      return "expected a finite number"
    if low is not None and (v <= low if low_open else v < low):
      return f"expected a value {'>' if low_open else '>='} {low}" + (
        f" and <= {high}" if high is not None else ""
      )
    if high is not None and v > high:
      return f"expected a value <= {high}"
    return None

  return check


def _choice(options: Iterable[str]) -> Check:
  options = tuple(options)
  return lambda v: None if v in options else f"expected one of {', '.join(repr(o) for o in options)}"


def _boolean(v) -> str | None:
  return None if isinstance(v, bool) else "expected True or False"


def _string(v) -> str | None:
  return None if isinstance(v, str) else "expected a string"


def _raises(fn: Callable[[Any], Any]) -> Check:
  def check(v):
    try:
      fn(v)
    except (ValueError, TypeError) as e:
      return str(e)
    return None

  return check


def _norm_order(v) -> str | None:
  try:
    order = probe.norm_order(v)
  except ValueError as e:
    return str(e)
  return None if order > 0 and not math.isnan(order) else "expected a positive number or 'inf'"


def _task(v) -> str | None:
  from h2t import data

  return None if v in data.task_names() else f"expected one of {', '.join(data.task_names())}"


def _optional_task(v) -> str | None:
  return None if v == "" else _task(v)


def _backbone_name(v) -> str | None:
  from h2t import backbones

  return _raises(backbones.check_name)(v)


def _sizes(v) -> str | None:
  parts = [p.strip() for p in str(v).split(",") if p.strip()]
  ok = all(p.isdigit() and int(p) > 0 for p in parts)
  return None if ok else "expected positive integers, comma-separated (e.g. '1024,8192'), or ''"


def _methods(v) -> str | None:
  from h2t import methods

  names = tuple(v) if isinstance(v, (tuple, list)) else ()
  bad = [m for m in names if m not in methods.NAMES]
  if bad or not names:
    return f"expected a non-empty subset of {', '.join(methods.NAMES)}"
  return None


_RATE = _number(float, 0.0)
LEARNING_FIELDS: dict[str, Field] = {
  "optimizer": Field(_choice(probe.OPTIMIZERS)),
  "learning_rate": Field(_RATE),
  "grad_clip_value": Field(_number(float)),
  "l1_regularizer": Field(_RATE),
  "l2_regularizer": Field(_RATE),
  "group_lrp_regularizer_coef": Field(_RATE),
  "group_lrp_regularizer_r": Field(_norm_order),
  "group_lrp_regularizer_p": Field(_norm_order),
  "group_lrp_is_embedding": Field(_boolean),
  "training_steps": Field(_number(int, 1)),
  "use_cosine_decay": Field(_boolean),
  "train_batch_size": Field(_number(int, 1)),
  "eval_batch_size": Field(_number(int, 1)),
  "feature_normalization": Field(_choice(normalize.NORMALIZATIONS)),
  "output_head_zeroinit": Field(_boolean),
  "output_head_type": Field(_raises(lambda v: probe.parse_output_head_type(v, 1))),
  "finetune_lr_multiplier": Field(_number(float, 0.0, low_open=True)),
  "finetune_steps_multiplier": Field(_number(float, 0.0, low_open=True)),
  "data_fraction": Field(_number(float, 0.0, 1.0, low_open=True)),
  "precision": Field(_choice(("highest", "high", "default"))),
  "class_buckets": Field(_boolean),
  "feature_dtype": Field(_choice(("float32", "bfloat16"))),
  "feature_selection.type": Field(_choice(selection.TYPES)),
  "feature_selection.keep_fraction": Field(_number(float, 0.0, 1.0, low_open=True)),
  "feature_selection.keep_fraction_offset": Field(_number(int, 0)),
  "feature_selection.mean_interpolation_coef": Field(_number(float, 0.0, 1.0)),
  "feature_selection.average_over_k": Field(_number(int, 1)),
  "feature_selection.fs_dataset": Field(_optional_task),
  "feature_selection.is_overwrite": Field(_boolean),
}

FIELDS: dict[str, Field] = {
  "dataset": Field(_task),
  "data_dir": Field(_string),
  "fashion_mnist_dir": Field(_string),
  "eval_mode": Field(_choice(("test", "valid"))),
  "seed": Field(_number(int, 0, 2**31 - 1)),
  "sweep": Field(_string),
  "cache_dir": Field(_string),
  "compilation_cache_dir": Field(_string),
  "methods": Field(_methods),
  "backbone.name": Field(_backbone_name, features=True),
  "backbone.checkpoint": Field(_string, features=True),
  "backbone.input_size": Field(_number(int, 0, 4096), features=True),
  "backbone.additional_features": Field(_string, features=True),
  "backbone.include_input": Field(_boolean, features=True),
  "backbone.additional_features_target_size": Field(_number(int, 0), features=True),
  "backbone.additional_features_pool_size": Field(_number(int, 0), features=True),
  "backbone.additional_features_multi_target_sizes": Field(_sizes, features=True),
  "backbone.cls_token_pool": Field(_choice(("normal", "only_cls", "nopool_cls")), features=True),
  "backbone.batch_size": Field(_number(int, 0)),
  "backbone.dtype": Field(_choice(("float32", "bfloat16")), features=True),
  **{f"learning.{k}": f for k, f in LEARNING_FIELDS.items()},
}
FEATURE_FIELDS = tuple(k for k, f in FIELDS.items() if f.features)
OVERWRITE = "learning.feature_selection.learning_config_overwrite"


def get(config: ml_collections.ConfigDict, path: str, default: Any = None) -> Any:
  node = config
  for part in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return default
    node = node[part]
  return node


def _errors(config: ml_collections.ConfigDict) -> list[str]:
  """What is wrong with one config (a base config or a grid point): `key=value: problem` lines."""
  out = []
  missing = object()
  for path, field in FIELDS.items():
    value = get(config, path, missing)
    if value is missing:
      continue  # older configs may lack newer options; their defaults apply
    problem = field.check(value)
    if problem:
      out.append(f"config.{path}={value!r}: {problem}")
  for key, value in (get(config, OVERWRITE) or {}).items():
    field = LEARNING_FIELDS.get(key)
    if field is None:
      out.append(f"config.{OVERWRITE}.{key}: learning has no option {key!r}")
    elif problem := field.check(value):
      out.append(f"config.{OVERWRITE}.{key}={value!r}: {problem}")
  if "finetune" in tuple(get(config, "methods", ())) and "+" in str(get(config, "backbone.name", "")):
    out.append(
      f"config.methods includes 'finetune', which fine-tunes one backbone, but config.backbone.name="
      f"{get(config, 'backbone.name')!r} names several: drop 'finetune' or use a single backbone"
    )
  if "head2toe_plus" in tuple(get(config, "methods", ())):
    head_type = get(config, "learning.output_head_type", "nohidden")
    if head_type != "nohidden":
      out.append(
        f"config.methods includes 'head2toe_plus', which builds one linear head, but "
        f"config.learning.output_head_type={head_type!r}: use 'nohidden' or drop 'head2toe_plus'"
      )
    if get(config, "learning.feature_selection.fs_dataset", ""):
      out.append(
        "config.methods includes 'head2toe_plus', which selects on the task's own features, but "
        "config.learning.feature_selection.fs_dataset is set: drop one of them"
      )
    if get(config, "learning.feature_selection.type", "") == "none":
      out.append(
        "config.methods includes 'head2toe_plus', which selects features, but "
        "config.learning.feature_selection.type='none': choose a selection type or drop 'head2toe_plus'"
      )
  return out


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the config and every grid point of `config.sweep`; raises `ConfigError` on the first problem."""
  from h2t import grid

  errors = _errors(config)
  if errors:
    raise ConfigError(errors[0])
  try:
    points = grid.points(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for overrides, point in points:
    errors = _errors(point)
    if errors:
      where = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
      raise ConfigError(f"config.sweep point ({where}): {errors[0]}")


def check_learning(learning: ml_collections.ConfigDict) -> None:
  """Checks a `config.learning` alone (the Python API's entry, e.g. `h2t.head2toe.fit`)."""
  wrapper = ml_collections.ConfigDict({"learning": learning.to_dict()})
  errors = [e for e in _errors(wrapper) if e.startswith("config.learning.")]
  if errors:
    raise ConfigError(errors[0])


def selection_learning(learning: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The learning config of the stage-1 (selection) run: base + `learning_config_overwrite`."""
  fs = learning.feature_selection
  sel = ml_collections.ConfigDict(learning.to_dict())
  if fs.is_overwrite:
    for k, v in fs.learning_config_overwrite.items():
      if k not in sel:
        raise ConfigError(f"learning_config_overwrite.{k}: learning has no option {k!r}")
      sel[k] = v
  return sel


def cli_keys(argv: Sequence[str]) -> list[str]:
  """The config keys set on a command line: `--config.a.b=v` or `--config.a.b v` -> 'a.b'."""
  return [a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def resolve_cli_overrides(config: ml_collections.ConfigDict, keys: Sequence[str]) -> list[str]:
  """Lets a field given on the command line win over the sweep, which drops that field.

  Returns the dropped sweep items (for the log). Both `--config.sweep` and a
  field it sweeps on one command line is a contradiction: `ConfigError`.
  """
  from h2t import grid

  items = grid.parse_sweep(config.get("sweep", ""), config)
  clash = [path for path, _ in items if path in keys]
  if not clash:
    return []
  if "sweep" in keys:
    raise ConfigError(
      f"config.{clash[0]} is given on the command line and also swept by --config.sweep; "
      "give it once: as a single value, or as sweep values"
    )
  config.sweep = ";".join(f"{p}={','.join(map(str, vs))}" for p, vs in items if p not in clash)
  return clash


def flat(d: dict, prefix: str = "") -> dict[str, Any]:
  """`{'a': {'b': 1}}` -> `{'a.b': 1}`."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def explain_unknown_key(key: str, known: Iterable[str]) -> str:
  """A message for a `--config.KEY` the config lacks, with the valid keys and near misses."""
  known = list(known)
  parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
  siblings = sorted({k[len(parent) :].split(".")[0] for k in known if k.startswith(parent)})
  close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
  close += [k for k in known if k.endswith("." + key.rsplit(".", 1)[-1]) and k not in close]
  msg = f"unknown config key {key!r}"
  if siblings:
    msg += f"; the keys under {parent.rstrip('.') or 'config'!r} are: {', '.join(siblings)}"
  if close:
    msg += f". Did you mean {' or '.join(repr(c) for c in close)}?"
  return msg


def load_file(spec: str) -> ml_collections.ConfigDict:
  """Calls `get_config` of a config file given as `path[:arg]` (as `--config=` names it)."""
  import importlib.util

  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_h2t_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def unknown_key_message(argv: Sequence[str]) -> str | None:
  """`explain_unknown_key` for the first `--config.KEY` of `argv` that its `--config=` file lacks."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  try:
    known = flat(load_file(spec).to_dict())
  except Exception:  # noqa: BLE001 -- the caller reports the original error instead.
    return None
  unknown = [k for k in cli_keys(argv) if k not in known]
  return explain_unknown_key(unknown[0], known) if unknown else None
