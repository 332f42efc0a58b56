"""Spreading the grid's heads over the local devices."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


class HeadSharding:
  """Spreads the grid's heads (grid points, or distinct stage-1 settings) over the local devices.

  With one device it does nothing. With several, a head axis is padded to a
  multiple of the device count (repeating its last head, whose copies are
  dropped afterwards) and placed with a `NamedSharding` along a 1-D mesh
  axis 'heads'; the features and fold indices are replicated. Under `jit`,
  XLA partitions the vmapped programs along that axis: each device trains
  its share of the heads, on the whole minibatch. A head's arithmetic does
  not depend on which device runs it.
  """

  def __init__(self, devices: Sequence[jax.Device] | None = None):
    self.devices = list(devices if devices is not None else jax.local_devices())
    self.mesh = jax.sharding.Mesh(np.asarray(self.devices), ("heads",)) if len(self.devices) > 1 else None

  @property
  def size(self) -> int:
    return len(self.devices)

  def padded(self, n: int) -> int:
    return -(-n // self.size) * self.size

  def pad(self, a, axis: int = 0):
    """Pads `a`'s head `axis` to `padded` by repeating its last entry."""
    a = jnp.asarray(a)
    n = a.shape[axis]
    extra = self.padded(n) - n
    if extra == 0:
      return a
    last = jax.lax.slice_in_dim(a, n - 1, n, axis=axis)
    return jnp.concatenate([a, jnp.repeat(last, extra, axis=axis)], axis=axis)

  def shard(self, a, axis: int = 0):
    """`a` padded along `axis` and split over the devices along it."""
    a = self.pad(a, axis)
    if self.mesh is None:
      return a
    spec = [None] * a.ndim
    spec[axis] = "heads"
    return jax.device_put(a, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec)))

  def replicate(self, a):
    if self.mesh is None:
      return a
    return jax.device_put(a, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))


def data_parallel(backbone, batch_size: int):
  """Params replicated and a batch sharding over all local devices, or (params, None) on one device.

  The batch axis is split along a 1-D mesh ('data'), so every device runs the
  backbone on its slice; pooled features come back gathered.
  """
  devices = jax.local_devices()
  if len(devices) == 1:
    return backbone.params, None
  if batch_size % len(devices):
    raise ValueError(
      f"extraction batch_size={batch_size} must be a multiple of the {len(devices)} local devices "
      "(set config.backbone.batch_size, or 0 for the platform's default)"
    )
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  return jax.device_put(backbone.params, replicated), batch
