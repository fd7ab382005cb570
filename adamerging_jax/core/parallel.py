"""Data parallelism for the AdaMerging step: a 1-D device mesh, the batch sharded on its leading axis.

The step is an ordinary `jax.jit` function; placing its inputs with `NamedSharding`s is all it takes for XLA
to partition it (the mean over a sharded batch becomes a cross-device reduction). λ, θ0 and τ are replicated,
or θ0 and τ are sharded along one parameter axis to divide their memory by the device count (FSDP-style:
XLA gathers each merged tensor where the forward needs it).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adamerging_jax.core.trees import PyTree, named_leaves

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named "data" over `devices` (default: every device of every process)."""
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicated_copy(tree: PyTree, mesh: Mesh) -> PyTree:
    """`tree` replicated over the mesh in new buffers, never aliasing the caller's arrays: safe to donate."""
    return jax.device_put(tree, replicated(mesh), may_alias=False)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def parameter_sharding(mesh: Mesh, shape: tuple[int, ...], skip_leading: int = 0) -> NamedSharding:
    """Shard the largest axis (after the first `skip_leading`) that the device count divides; else replicate."""
    count = mesh.devices.size
    candidates = [(size, axis) for axis, size in enumerate(shape) if axis >= skip_leading and size % count == 0]
    if count == 1 or not candidates:
        return replicated(mesh)
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = DATA_AXIS
    return NamedSharding(mesh, P(*spec))


def place_tree(tree: PyTree, mesh: Mesh, shard: bool, skip_leading: int = 0) -> PyTree:
    """Put every leaf on the mesh, replicated or sharded along one parameter axis."""
    if not shard:
        return jax.device_put(tree, replicated(mesh))
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, parameter_sharding(mesh, x.shape, skip_leading)), tree)


def shard_batches(batches: Sequence[Any], mesh: Mesh) -> list[Any]:
    """Put each task's batch on the mesh, split along its leading (example) axis.

    Raises a ValueError naming the task whose batch size the device count does not divide.
    """
    count = mesh.devices.size
    sharding = batch_sharding(mesh)
    placed = []
    for task, batch in enumerate(batches):
        for name, leaf in named_leaves(batch):
            if np.shape(leaf)[0] % count:
                where = f" (leaf {name!r})" if name else ""
                raise ValueError(
                    f"task {task}: batch of {np.shape(leaf)[0]} examples{where} cannot be split over the mesh's "
                    f"{count} devices; use a batch size divisible by {count} or pass a smaller mesh"
                )
        placed.append(jax.device_put(batch, sharding))
    return placed
