"""What a training run steps through, shared by the probe trainer and fine-tuning.

Minibatch indices (`batch_indices`), the learning-rate schedule
(`cosine_schedule`) and the optimiser's update direction (`update_direction`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def batch_indices(key: jax.Array, n: int, steps: int, batch_size: int) -> jax.Array:
  """`[steps, batch_size]` example indices: epochs of fresh permutations, concatenated."""
  epochs = -(-steps * batch_size // n)
  perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, epochs))
  return perms.reshape(-1)[: steps * batch_size].reshape(steps, batch_size)


def cosine_schedule(step: jax.Array, base_lr: jax.Array, total: jax.Array | int, cosine: bool) -> jax.Array:
  """The learning rate at `step` (0-based): `base_lr`, or Keras' CosineDecay(base_lr, total) to 0."""
  if not cosine:
    return jnp.asarray(base_lr, jnp.float32)
  frac = jnp.minimum(step, total) / total
  return base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


def update_direction(optimizer: str, grad_clip_value: float) -> optax.GradientTransformation:
  """The optimiser's update direction, before the learning rate is applied.

  'adam' (Keras' epsilon 1e-7) or 'sgd' (momentum 0.9), with entries clipped to
  [-v, v] first when `grad_clip_value` v > 0, as the reference's options.
  """
  parts = []
  if grad_clip_value > 0:
    parts.append(optax.clip(grad_clip_value))
  if optimizer == "adam":
    parts.append(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-7))
  else:
    parts.append(optax.trace(decay=0.9))
  return optax.chain(*parts)
