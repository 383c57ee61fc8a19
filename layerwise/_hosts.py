"""Arrays that span several processes (``jax.distributed``): reading them on
every process, and values every process must agree on.

On several hosts a state vector is one global array whose shards live on the
devices of different processes. A process can read its own shards only, so
an array split across processes is first made whole on every device (a
collective: every process runs it, as every process runs the train step);
a replicated one is read from the process's own copy. Values a process
writes into such an array must be equal on every process, or its copies
disagree: :func:`check_same_on_every_process` says so.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["check_same_on_every_process", "host_array", "readable",
           "replicated_like"]


def replicated_like(sharding: Any) -> Any:
  """A sharding that replicates an array on every device of ``sharding``
  (on its mesh, for a ``NamedSharding``)."""
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec())
  devices = sorted(sharding.device_set, key=lambda d: (d.process_index, d.id))
  return NamedSharding(Mesh(np.array(devices), ("devices",)), PartitionSpec())


@functools.lru_cache(maxsize=64)
def _replicate_to(sharding: Any) -> Any:
  return jax.jit(lambda x: x, out_shardings=sharding)


def readable(x: Any) -> Any:
  """``x``, readable on this process: as it is if this process holds all of
  it (one process, or a replicated array), else replicated on its devices.

  Only a concrete array that this process holds part of is replicated, by a
  jitted identity with replicated output: a collective, which every process
  must run (as it runs the step that made ``x``).
  """
  if (not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer)
      or x.is_fully_addressable or x.is_fully_replicated):
    return x
  return _replicate_to(replicated_like(x.sharding))(x)


def host_array(x: Any) -> np.ndarray:
  """``x``'s values as a NumPy array on this process, whatever its
  placement (see :func:`readable`)."""
  return np.asarray(jax.device_get(readable(x)))


def check_same_on_every_process(fn: str, value: Any) -> None:
  """Raises if the number ``value`` differs between the processes of a
  ``jax.distributed`` run; does nothing on one process or for a traced
  value (inside ``jit`` every process runs the same program).

  A collective on several processes: every process must call it.
  """
  if jax.process_count() == 1 or isinstance(value, jax.core.Tracer):
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mine = np.asarray(value, np.float32)
  seen = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)
  if not np.all((seen == seen[0]) | (np.isnan(seen) & np.isnan(seen[0]))):
    shown = ", ".join(f"process {i}: {v:g}" for i, v in enumerate(seen))
    raise ValueError(
        f"{fn}: the value differs between processes ({shown}). The optimizer "
        "state is one global array on every process, and each process "
        "writes its own copy of it: a value that differs would leave the "
        "copies disagreeing. Values must be the same on every process: "
        "compute the value from what every process has (the step, a "
        "schedule, the config), or send process 0's to all with "
        "jax.experimental.multihost_utils.broadcast_one_to_all(value).")
