"""Multi-host AdaMerging: every process feeds its own rows of each task's batch into one global step.

Under `jax.distributed.initialize(...)` (TPU pods, multi-node GPU, or several CPU processes), `jax.devices()`
lists the devices of every process and `data_mesh()` or `make_mesh(data=, fsdp=)` spans them all, so
`adamerging(..., mesh=mesh)` runs one SPMD program across processes. θ0, τ and λ are either host-identical
(every process loads the same checkpoints) and `jax.device_put` places each process's share of them (on a
data × fsdp mesh, its fsdp shards), or, for a causal LM, global arrays built by `models.sharded_reads`, each
process reading from disk only the slices its devices hold. The batches are where processes differ: each process reads only the rows that its own
devices hold, and `jax.make_array_from_process_local_data` assembles the global batch without moving data
between hosts.

With the mesh in `jax.devices()` order (process-major), process p holds rows [p·n/P, (p+1)·n/P) of a global
batch of n on a 1-D mesh; on a data × fsdp mesh the batch is split over "data" only, so the processes of one
data row hold the same rows (all of them when data = 1). `local_rows` gives that slice for any mesh, and
`global_batch_source` turns a process-local batch source into the global batches `adamerging` consumes. The
result equals the single-process run on the whole batch (tests/test_multihost.py, tests/test_lm_multihost.py).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from adamerging_jax.core.parallel import batch_sharding, data_size
from adamerging_jax.core.trees import named_leaves

LocalBatches = Callable[[int], Sequence[Any]]


def local_rows(mesh: Mesh, global_size: int) -> slice:
    """The rows of a global batch of `global_size` examples that this process's devices hold.

    Raises a ValueError when the size of the mesh's "data" axis does not divide `global_size`, or when this
    process's devices hold rows that are not one contiguous block (a mesh not in process-major order).
    """
    count = data_size(mesh)
    if global_size % count:
        raise ValueError(f"a global batch of {global_size} examples cannot be split over the mesh's data axis of "
                         f"{count} devices")
    indices = batch_sharding(mesh).addressable_devices_indices_map((global_size,)).values()
    starts = sorted({index[0].start or 0 for index in indices})
    per_device = global_size // count
    if starts != list(range(starts[0], starts[0] + per_device * len(starts), per_device)):
        raise ValueError(
            f"process {jax.process_index()} holds non-contiguous rows {starts} (step {per_device}) of the batch; "
            "build the mesh with devices in process order (data_mesh() and make_mesh() do)"
        )
    return slice(starts[0], starts[0] + per_device * len(starts))


def global_batches(local_batches: Sequence[Any], mesh: Mesh) -> list[Any]:
    """Assemble per-task global batches from this process's rows (`make_array_from_process_local_data`).

    Every process calls this with its own rows of each task's batch (the same row count in every process);
    the returned arrays have the global shape and are sharded over the mesh's data axis.
    """
    sharding = batch_sharding(mesh)
    result = []
    for task, batch in enumerate(local_batches):
        for name, leaf in named_leaves(batch):
            if not np.shape(leaf):
                raise ValueError(f"task {task}: leaf {name!r} of the process-local batch has no example axis")
        result.append(
            jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
        )
    return result


def global_batch_source(local_source: LocalBatches, mesh: Mesh) -> Callable[[int], list[Any]]:
    """`step -> global batches` from `step -> this process's rows of each task's batch`, for `adamerging`."""
    return lambda step: global_batches(local_source(step), mesh)
