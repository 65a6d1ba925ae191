"""Data parallelism: one mesh over every device, the batch split along its `data` axis, the
state replicated. Multi-host through `jax.distributed`."""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"


def make_mesh(devices: Optional[list] = None) -> Mesh:
    """A 1-D mesh named `data` over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA,), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Place a batch on the mesh, split along its first axis.

    Single process: `batch` is the global batch. Several processes: `batch` is this process's
    share (its contiguous slice of the global batch), assembled into global arrays.
    """
    sharding = batch_sharding(mesh)

    def put(a):
        a = np.asarray(a)
        if jax.process_count() == 1:
            return jax.device_put(a, sharding)
        return jax.make_array_from_process_local_data(sharding, a)

    return {k: put(v) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of `tree` on every device of the mesh."""
    import equinox as eqx

    return eqx.filter_shard(tree, replicated(mesh))


def initialize_distributed(
    coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
    process_id: Optional[int] = None, *, cpu_collectives: Optional[str] = None,
) -> None:
    """Start `jax.distributed` for a multi-host run.

    With no arguments, the cluster is auto-detected (TPU pods, SLURM, ...); otherwise the
    coordinator `host:port`, process count and this process's id are used. On CPU, collectives
    across processes need `cpu_collectives="gloo"`. Call once, before any other JAX work.
    """
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs = {}
    if coordinator_address is not None:
        kwargs = dict(
            coordinator_address=coordinator_address, num_processes=num_processes,
            process_id=process_id,
        )
    jax.distributed.initialize(**kwargs)


def is_main_process() -> bool:
    """Only process 0 writes files (checkpoints, metrics, images)."""
    return jax.process_index() == 0
