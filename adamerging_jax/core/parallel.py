"""Device meshes for the AdaMerging step: data parallel (1-D "data") or data × fsdp (2-D, the TPU-pod path).

The step is an ordinary `jax.jit` function; placing its inputs with `NamedSharding`s is all it takes for XLA
to partition it (the mean over a sharded batch becomes a cross-device reduction).

- `data_mesh()`: a 1-D "data" mesh over every device (the default). Each task's batch is split on its
  example axis; λ, θ0 and τ are replicated, or with ``shard_task_vectors`` θ0 and τ are split along one
  parameter axis over all devices.
- `make_mesh(data=, fsdp=)`: a 2-D ("data", "fsdp") mesh, data × fsdp devices. Batches are split along
  "data" (and replicated along "fsdp"); θ0 and τ are always split along "fsdp" on their largest axis that
  fsdp divides (τ's leading task axis K never; a leaf with no such axis is replicated), so the frozen
  parameters cost 1/fsdp of their size per device (FSDP, Zhao et al., 2023; ZeRO-3, Rajbhandari et al.,
  2020); λ and the optimiser state are replicated. The merged θ(λ) is constrained to θ0's sharding
  (`constrain_like`), so it is never replicated: XLA gathers each merged tensor along "fsdp" where the forward
  uses it and reduce-scatters its gradient.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adamerging_jax.core.trees import PyTree, named_leaves

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named "data" over `devices` (default: every device of every process)."""
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def make_mesh(data: int | None = None, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 2-D ("data", "fsdp") mesh of `data` × `fsdp` devices (default: every device of every process, in
    `jax.devices()` order, i.e. process-major; `data` defaults to the device count / `fsdp`).

    Devices are laid out row-major: the `fsdp` devices of one data row are consecutive, so on a pod an
    fsdp group stays inside one host (or slice) when `fsdp` divides the devices per host.
    Raises a ValueError when data × fsdp is not the device count.
    """
    devices = list(devices) if devices is not None else jax.devices()
    if not isinstance(fsdp, int) or fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"make_mesh: fsdp={fsdp!r} must be a positive divisor of the {len(devices)} devices")
    data = len(devices) // fsdp if data is None else data
    if not isinstance(data, int) or data < 1 or data * fsdp != len(devices):
        raise ValueError(f"make_mesh: data={data!r} × fsdp={fsdp} must equal the {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), (DATA_AXIS, FSDP_AXIS))


def data_size(mesh: Mesh) -> int:
    """How many ways a batch is split: the size of the mesh's "data" axis."""
    return int(mesh.shape[DATA_AXIS])


def shards_parameters(mesh: Mesh) -> bool:
    """True on a mesh with an "fsdp" axis of more than one device (θ0 and τ are then always sharded)."""
    return mesh.shape.get(FSDP_AXIS, 1) > 1


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicated_copy(tree: PyTree, mesh: Mesh) -> PyTree:
    """`tree` replicated over the mesh in new buffers, never aliasing the caller's arrays: safe to donate."""
    return jax.device_put(tree, replicated(mesh), may_alias=False)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def parameter_sharding(mesh: Mesh, shape: tuple[int, ...], skip_leading: int = 0) -> NamedSharding:
    """Shard the largest axis (after the first `skip_leading`) that the parameter axis divides; else replicate.

    The parameter axis is "fsdp" on a mesh that has one, else "data" (every device of a 1-D mesh).
    """
    axis_name = FSDP_AXIS if FSDP_AXIS in mesh.axis_names else DATA_AXIS
    count = int(mesh.shape[axis_name])
    candidates = [(size, axis) for axis, size in enumerate(shape) if axis >= skip_leading and size % count == 0]
    if count == 1 or not candidates:
        return replicated(mesh)
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = axis_name
    return NamedSharding(mesh, P(*spec))


def tree_shardings(tree: PyTree, mesh: Mesh, shard: bool, skip_leading: int = 0) -> PyTree:
    """The sharding of every leaf of `tree` (arrays or shape structs): replicated, or `parameter_sharding`."""
    if not shard:
        return jax.tree_util.tree_map(lambda _: replicated(mesh), tree)
    return jax.tree_util.tree_map(lambda x: parameter_sharding(mesh, np.shape(x), skip_leading), tree)


def place_tree(tree: PyTree, mesh: Mesh, shard: bool, skip_leading: int = 0) -> PyTree:
    """Put every leaf on the mesh, replicated or sharded along one parameter axis (`tree_shardings`)."""
    return jax.device_put(tree, tree_shardings(tree, mesh, shard, skip_leading))


def constrain_like(tree: PyTree, mesh: Mesh, shard: bool) -> PyTree:
    """Inside `jit`: `tree` (e.g. the merged θ) laid out as `place_tree` lays out θ0, by
    `jax.lax.with_sharding_constraint`; unchanged when nothing is sharded."""
    if not shard:
        return tree
    return jax.lax.with_sharding_constraint(tree, tree_shardings(tree, mesh, shard))


def shard_batches(batches: Sequence[Any], mesh: Mesh) -> list[Any]:
    """Put each task's batch on the mesh, split along its leading (example) axis over the "data" axis.

    Raises a ValueError naming the task whose batch size the data-axis size does not divide.
    """
    count = data_size(mesh)
    sharding = batch_sharding(mesh)
    placed = []
    for task, batch in enumerate(batches):
        for name, leaf in named_leaves(batch):
            if np.shape(leaf)[0] % count:
                where = f" (leaf {name!r})" if name else ""
                raise ValueError(
                    f"task {task}: batch of {np.shape(leaf)[0]} examples{where} cannot be split over the mesh's "
                    f"data axis of {count} devices; use a batch size divisible by {count} or pass a smaller mesh"
                )
        placed.append(jax.device_put(batch, sharding))
    return placed
