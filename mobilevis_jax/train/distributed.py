"""Processes, devices and the 1-D data mesh.

The trainer runs one program over a mesh with a single axis, `data`, holding every device of every
process. Training state is replicated (`P()`), batches are global `jax.Array`s sharded along `data`
and assembled from each process's own slice with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'

_ENV_PREFIX = 'MOBILEVIS_'


def initialize_distributed(dist_cfg: ml_collections.ConfigDict) -> bool:
  """Calls jax.distributed.initialize when the config or environment asks for several processes.

  Sources, in order: config fields, then MOBILEVIS_COORDINATOR_ADDRESS / MOBILEVIS_NUM_PROCESSES /
  MOBILEVIS_PROCESS_ID, then (with `auto`) JAX's own cluster detection. Returns True if initialised.
  Must run before anything touches a device.
  """
  address = dist_cfg.coordinator_address or os.environ.get(_ENV_PREFIX + 'COORDINATOR_ADDRESS', '')
  num = dist_cfg.num_processes or int(os.environ.get(_ENV_PREFIX + 'NUM_PROCESSES', '0'))
  pid = (dist_cfg.process_id if dist_cfg.process_id >= 0
         else int(os.environ.get(_ENV_PREFIX + 'PROCESS_ID', '-1')))
  if address:
    if num <= 0 or pid < 0:
      raise ValueError('a coordinator address needs num_processes > 0 and process_id >= 0 '
                       f'(got num_processes={num}, process_id={pid})')
    # CPU-only runs (tests, laptops) need a cross-process collective implementation; GPU/TPU
    # backends bring their own and ignore this flag.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    return True
  if dist_cfg.auto:
    jax.distributed.initialize()
    return True
  return False


def make_data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def local_device_count(mesh: Mesh) -> int:
  """Devices of this process that belong to `mesh`."""
  return sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of a batch -> global arrays sharded along `data`."""
  n_local = local_device_count(mesh)
  sharding = batch_sharded(mesh)
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.shape[0] % n_local:
      raise ValueError(f'local batch of {value.shape[0]} ({key!r}) is not divisible by the '
                       f'{n_local} local devices')
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host/device tree on every device of the mesh (identical values on every process)."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if isinstance(x, jax.Array) and x.is_fully_addressable is False:
      return x
    return jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x))

  return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
  """Replicated global arrays -> numpy, reading this process's own shard (no cross-host gather)."""
  def get(x):
    if isinstance(x, jax.Array):
      return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)
  return jax.tree.map(get, tree)
