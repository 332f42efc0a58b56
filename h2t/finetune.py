"""Full fine-tuning, the baseline Head2Toe is measured against.

    bb_params, head, losses = h2t.finetune.fit(backbone, images, labels, config.learning,
                                               seed=8, num_classes=task.num_classes)
    acc = h2t.finetune.evaluate(backbone, bb_params, head, task, split="test")

A fresh linear head on the unit-normalised `pre_logits` tap and every
parameter of the backbone are trained together on images, with softmax
cross-entropy and the probe's optimiser choices (Adam or SGD with momentum
0.9, cosine decay to 0, optional gradient clipping, the head's L1/L2/group
penalties). As in the reference (`finetune_backbones=True`), the learning
rate and step count of `config.learning` are multiplied by
`finetune_lr_multiplier` and `finetune_steps_multiplier`; with
`train_backbone=False` the same program trains the head alone (the reference's
linear probe through the backbone) and the multipliers do not apply.

Differences from the reference, deliberate:
* BatchNorm runs in inference mode with its running statistics frozen (the
  parameters named 'mean' and 'var', which get no gradient and no optimiser
  state). The reference's TF-Hub layer with `trainable=True` ran BatchNorm in
  training mode, normalising with minibatch statistics and updating the
  running averages. With 1000 images and batches of 128, frozen statistics
  are what one would usually choose for a checkpoint; the scale and shift of
  each BatchNorm are trained.
* Minibatches are drawn from a fresh permutation every epoch and are always
  full, as in `h2t.probe`.
* The loop is a jitted step called from Python rather than one `lax.scan`: a
  step is a full forward and backward pass through the backbone, so Python's
  overhead is negligible, and one compiled step serves every step count and
  learning rate.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from h2t import normalize, optim, probe
from h2t.data import base

# Parameter names of BatchNorm's running statistics (h2t.models.common.FrozenBatchNorm,
# which ResNet-50 uses too). They stay fixed during fine-tuning.
BN_STATISTICS = ("mean", "var")
NORMALIZATIONS = ("unit_vector", "")
Params = Any


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Settings that shape the compiled training step (static under `jit`).

  Attributes:
    optimizer: 'adam' or 'sgd' (momentum 0.9).
    use_cosine_decay: cosine decay of the learning rate to 0 over the run.
    grad_clip_value: clip each gradient entry to [-v, v] when v > 0.
    group_r, group_p: norm orders of the head's group penalty.
    tap: the 2-D tap `[n, d]` the head reads.
    normalization: 'unit_vector' (each feature vector scaled to unit L2 norm)
      or '' (none).
    train_backbone: train the backbone too, or only the head.
  """

  optimizer: str = "adam"
  use_cosine_decay: bool = True
  grad_clip_value: float = -1.0
  group_r: float = 2.0
  group_p: float = 1.0
  tap: str = "pre_logits"
  normalization: str = "unit_vector"
  train_backbone: bool = True

  def __post_init__(self):
    if self.optimizer not in probe.OPTIMIZERS:
      raise ValueError(f"optimizer={self.optimizer!r}; expected one of {', '.join(probe.OPTIMIZERS)}")
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(
        f"feature_normalization={self.normalization!r} for fine-tuning; expected one of {NORMALIZATIONS} "
        "('per_feature' would standardise with each minibatch's statistics)"
      )


def finetune_learning(learning: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `learning` with the fine-tuning multipliers applied, as the reference.

  `learning_rate *= finetune_lr_multiplier`;
  `training_steps = int(training_steps * finetune_steps_multiplier)`.
  Missing multipliers count as 1.
  """
  out = ml_collections.ConfigDict(learning.to_dict())
  lr_mult = float(learning.get("finetune_lr_multiplier", 1.0))
  steps_mult = float(learning.get("finetune_steps_multiplier", 1.0))
  out.learning_rate = float(learning.learning_rate) * lr_mult
  out.training_steps = int(int(learning.training_steps) * steps_mult)
  if out.training_steps < 1:
    raise ValueError(
      f"training_steps={learning.training_steps} x finetune_steps_multiplier={steps_mult} "
      "leaves no step; raise either"
    )
  return out


def _flat(tree: Params) -> dict[str, jax.Array]:
  return traverse_util.flatten_dict(tree, sep="/")


def _unflat(flat: Mapping[str, jax.Array]) -> Params:
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def is_trainable(path: str, *, train_backbone: bool = True) -> bool:
  """Whether the backbone parameter at `path` ('a/b/leaf') is trained."""
  return train_backbone and path.rsplit("/", 1)[-1] not in BN_STATISTICS


def _optimizer(spec: StepSpec) -> optax.GradientTransformation:
  """The update direction before the learning rate: the choices of `h2t.probe`."""
  return optim.update_direction(spec.optimizer, spec.grad_clip_value)


def features(backbone, backbone_params: Params, images: jax.Array, spec: StepSpec) -> jax.Array:
  """Images `[n, h, w, 3]` pixels in [0, 255] -> normalised tap features `[n, d]`."""
  _, taps = backbone.apply(backbone_params, backbone.preprocess(images))
  x = taps[spec.tap]
  if x.ndim != 2:
    raise ValueError(
      f"tap {spec.tap!r} has shape {x.shape}; fine-tuning reads a pooled [n, d] tap such as pre_logits"
    )
  return normalize.unit_vector(x) if spec.normalization == "unit_vector" else x


@functools.partial(jax.jit, static_argnames=("backbone", "spec"), donate_argnums=(0, 1))
def _train_step(
  trainable: dict[str, Any],
  opt_state: optax.OptState,
  frozen: dict[str, jax.Array],
  images: jax.Array,
  labels: jax.Array,
  batch: jax.Array,
  step: jax.Array,
  total_steps: jax.Array,
  hp: probe.HParams,
  *,
  backbone,
  spec: StepSpec,
) -> tuple[dict[str, Any], optax.OptState, jax.Array]:
  """One update of `trainable = {'head': ..., 'backbone': {path: leaf}}`.

  `frozen` holds the other backbone leaves (`{path: leaf}`); gradients are
  taken only with respect to `trainable`, so frozen statistics (and, with
  `train_backbone=False`, the whole backbone) cost no backward pass.
  `images [N, h, w, 3]` and `labels [N]` are the whole training set on the
  device; `batch [b]` indexes this step's examples.
  """

  head_spec = probe.TrainSpec(num_classes=1, group_r=spec.group_r, group_p=spec.group_p)

  def loss_fn(tr):
    params = _unflat({**frozen, **tr["backbone"]})
    x = features(backbone, params, images[batch], spec)
    return probe.loss(tr["head"], hp, x, labels[batch], head_spec)

  loss, grads = jax.value_and_grad(loss_fn)(trainable)
  updates, opt_state = _optimizer(spec).update(grads, opt_state, trainable)
  lr = optim.cosine_schedule(step, hp.learning_rate, total_steps, spec.use_cosine_decay)
  trainable = jax.tree_util.tree_map(lambda p, u: p - lr * u, trainable, updates)
  return trainable, opt_state, loss


def step_spec(learning: ml_collections.ConfigDict, *, tap: str, train_backbone: bool) -> StepSpec:
  """The static step settings of a `config.learning`."""
  return StepSpec(
    optimizer=learning.optimizer,
    use_cosine_decay=bool(learning.use_cosine_decay),
    grad_clip_value=float(learning.grad_clip_value),
    group_r=probe.norm_order(learning.group_lrp_regularizer_r),
    group_p=probe.norm_order(learning.group_lrp_regularizer_p),
    tap=tap,
    normalization=learning.feature_normalization,
    train_backbone=train_backbone,
  )


def fit(
  backbone,
  images: np.ndarray,
  labels: np.ndarray,
  learning: ml_collections.ConfigDict,
  *,
  seed: int,
  num_classes: int,
  tap: str = "pre_logits",
  train_backbone: bool = True,
) -> tuple[Params, dict[str, jax.Array], np.ndarray]:
  """Fine-tunes `backbone` with a fresh linear head on `tap`.

  Args:
    backbone: an `h2t.backbones.Backbone`; its `params` are the starting point
      and are not modified.
    images: `[n, h, w, 3]` (or grey `[n, h, w]`) pixels in [0, 255], uint8 or
      float; resized and normalised on the device by `backbone.preprocess`.
    labels: `[n]` int labels in [0, num_classes).
    learning: `config.learning`: learning_rate, training_steps,
      train_batch_size, optimizer, use_cosine_decay, grad_clip_value,
      l1/l2/group_lrp regularizers of the head, feature_normalization,
      output_head_zeroinit, finetune_lr_multiplier, finetune_steps_multiplier.
    seed: head initialisation and minibatch order.
    num_classes: output width.
    tap: a 2-D tap of the backbone.
    train_backbone: False trains the head only (no multipliers), leaving the
      backbone exactly as it was.

  Returns:
    `(backbone_params, head_params {'w': [d, classes], 'b': [classes]},
    losses [steps] float32)`, the minibatch loss of each step.
  """
  if tap not in backbone.tap_names:
    raise ValueError(f"tap {tap!r} is not a tap of {backbone.name}; expected one of {backbone.tap_names}")
  head_type = learning.get("output_head_type", "nohidden")
  if head_type != "nohidden":
    raise ValueError(
      f"output_head_type={head_type!r}: fine-tuning trains a linear head only; "
      "set learning.output_head_type='nohidden' for the finetune method"
    )
  if train_backbone:
    learning = finetune_learning(learning)
  spec = step_spec(learning, tap=tap, train_backbone=train_backbone)
  steps, batch_size = int(learning.training_steps), int(learning.train_batch_size)
  labels = base.check_labels(labels, num_classes, where="finetune.fit(labels)")
  if len(labels) != len(images):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")

  flat = _flat(backbone.params)
  frozen = {k: v for k, v in flat.items() if not is_trainable(k, train_backbone=train_backbone)}
  dim = jax.eval_shape(lambda p, x: features(backbone, p, x, spec), backbone.params, images[:1]).shape[1]
  k_init, k_data = jax.random.split(jax.random.key(seed))
  head_spec = probe.TrainSpec(num_classes=num_classes, zero_init=bool(learning.output_head_zeroinit))
  trainable = {
    "head": probe.init_head(k_init, dim, head_spec),
    # Copies: the step donates its trainable buffers, which must not be the backbone's own.
    "backbone": {k: jnp.array(v, copy=True) for k, v in flat.items() if k not in frozen},
  }
  opt_state = _optimizer(spec).init(trainable)
  batches = optim.batch_indices(k_data, len(labels), steps, batch_size)
  images_dev, labels_dev = jnp.asarray(images), jnp.asarray(labels)
  hp = probe.HParams(
    learning_rate=jnp.float32(learning.learning_rate),
    l1=jnp.float32(learning.l1_regularizer),
    l2=jnp.float32(learning.l2_regularizer),
    group_coef=jnp.float32(learning.group_lrp_regularizer_coef),
  )
  total = jnp.float32(steps)
  losses = []
  for i in range(steps):
    trainable, opt_state, loss = _train_step(
      trainable,
      opt_state,
      frozen,
      images_dev,
      labels_dev,
      batches[i],
      jnp.float32(i),
      total,
      hp,
      backbone=backbone,
      spec=spec,
    )
    losses.append(loss)
  backbone_params = _unflat({**frozen, **trainable["backbone"]})
  return backbone_params, trainable["head"], np.asarray(jnp.stack(losses), np.float32)


@functools.partial(jax.jit, static_argnames=("backbone", "spec"))
def predict(
  backbone, backbone_params: Params, head_params: dict[str, jax.Array], images: jax.Array, spec: StepSpec
):
  """Logits `[n, classes]` of a fine-tuned backbone and head on images `[n, h, w, 3]`."""
  return probe.logits_fn(head_params, features(backbone, backbone_params, images, spec))


def evaluate(
  backbone,
  backbone_params: Params,
  head_params: dict[str, jax.Array],
  task_or_batches: base.Task | Iterable[base.Batch],
  *,
  split: str = "test",
  batch_size: int = 50,
  tap: str = "pre_logits",
  normalization: str = "unit_vector",
) -> float:
  """Accuracy of a fine-tuned model, streaming batches through it.

  Args:
    backbone: the `Backbone` that was fine-tuned (its module and preprocessing).
    backbone_params, head_params: from `fit`.
    task_or_batches: an `h2t.data.base.Task` (its `split` is read in batches
      of `batch_size`) or any iterable of `(images [b, h, w, 3], labels [b])`.
    split: the task's split to evaluate.
    batch_size: images per forward pass (the reference's eval batch is 50).
    tap, normalization: as in training.

  Returns:
    The fraction of correctly classified images.
  """
  spec = StepSpec(tap=tap, normalization=normalization)
  if isinstance(task_or_batches, base.Task):
    batches = task_or_batches.batches(split, batch_size, image_size=backbone.input_size)
  else:
    batches = task_or_batches
  correct, n, width = 0, 0, None
  for images, labels in batches:
    images, b = np.asarray(images), len(labels)
    width = width or b
    if b < width:  # pad the short last batch: one compiled shape for the whole stream
      images = np.concatenate([images, np.zeros((width - b,) + images.shape[1:], images.dtype)])
    logits = predict(backbone, backbone_params, head_params, images, spec)
    correct += int((np.asarray(logits[:b]).argmax(-1) == np.asarray(labels)).sum())
    n += b
  if n == 0:
    raise ValueError("evaluate got no examples")
  return correct / n
