"""Multi-host AdaMerging of a tiny Llama on a data × fsdp mesh: 2 CPU processes under `jax.distributed` (2 devices
each, one global 4-device mesh) give the single-process λ trajectory, on a 2 × 2 mesh (each process one data row,
its fsdp group inside the process, reading only its rows) and on a 1 × 4 mesh (θ0 and τ sharded across the two
processes, each process feeding every row). The launcher is tests/multihost_launcher.py.

Run as a script, this file is one worker process: `python test_lm_multihost.py ADDRESS PROCESS_ID OUT.npz`.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from multihost_launcher import run_workers

PROCESSES, DEVICES_PER_PROCESS, STEPS = 2, 2, 3
LAYOUTS = ((2, 2), (1, 4))  # (data, fsdp)
TIMEOUT_S = 240


def worker(address: str, process_id: int, out: str) -> None:
    """One process of the distributed runs: per layout λ, the losses, this process's rows and how many elements
    of each merged leaf it holds go to `out` (written by process 0)."""
    import jax

    jax.distributed.initialize(coordinator_address=address, num_processes=PROCESSES, process_id=process_id,
                               initialization_timeout=60)
    from test_lm_adamerging import BATCH, CONFIG, lm_config, lm_problem

    import adamerging_jax as am
    from adamerging_jax.core.multihost import global_batch_source, local_rows
    from adamerging_jax.core.parallel import make_mesh
    from adamerging_jax.core.trees import named_leaves
    from adamerging_jax.merging.lm_binding import causal_lm_binding

    assert len(jax.devices()) == PROCESSES * DEVICES_PER_PROCESS, jax.devices()
    lm = lm_problem()
    values = {}
    for data, fsdp in LAYOUTS:
        mesh = make_mesh(data=data, fsdp=fsdp)
        rows = local_rows(mesh, BATCH)
        local = lambda step, rows=rows: [  # noqa: E731 - this process reads only its rows
            {name: x[rows] for name, x in batch.items()} for batch in lm.batches(step)]
        result = am.adamerging(causal_lm_binding(CONFIG).apply_fn, lm.pretrained, lm.dense,
                               global_batch_source(local, mesh), lm_config(steps=STEPS), mesh=mesh)
        tag = f"{data}x{fsdp}"
        values[f"{tag}/loss"] = result.history["loss"]
        values[f"{tag}/rows"] = np.asarray([rows.start, rows.stop])
        values[f"{tag}/held"] = np.asarray([sum(s.data.size for s in leaf.addressable_shards) / leaf.size
                                            for _, leaf in named_leaves(result.params)])
        values.update({f"{tag}/lambda:{k}": np.asarray(v) for k, v in result.coefficients.values.items()})
    if jax.process_index() == 0:
        tmp = out + ".tmp.npz"
        np.savez(tmp, **values)
        os.replace(tmp, out)
    jax.distributed.shutdown()


def test_two_processes_on_a_data_by_fsdp_mesh_give_the_single_process_result(tmp_path):
    import jax
    from test_lm_adamerging import BATCH, CONFIG, lm_config, lm_problem

    import adamerging_jax as am
    from adamerging_jax.merging.lm_binding import causal_lm_binding

    out = tmp_path / "distributed.npz"
    run_workers(__file__, out, PROCESSES, DEVICES_PER_PROCESS, TIMEOUT_S)
    lm = lm_problem()
    single = am.adamerging(causal_lm_binding(CONFIG).apply_fn, lm.pretrained, lm.dense, lm.batches,
                           lm_config(steps=STEPS), mesh=am.data_mesh(jax.devices()[:1]))
    moved = max(float(np.abs(np.asarray(v) - 0.3).max()) for v in single.coefficients.values.values())
    assert moved > 1e-3  # agreement is not agreement of two no-ops
    with np.load(out) as distributed:
        for data, fsdp in LAYOUTS:
            tag = f"{data}x{fsdp}"
            # process 0 read only its data row's share of every batch
            assert distributed[f"{tag}/rows"].tolist() == [0, BATCH // data]
            # and holds 1/fsdp of every merged leaf per device (2 devices: 2/fsdp of the leaf)
            np.testing.assert_allclose(distributed[f"{tag}/held"], DEVICES_PER_PROCESS / fsdp)
            np.testing.assert_allclose(distributed[f"{tag}/loss"], single.history["loss"], atol=1e-5, rtol=1e-5)
            for group, value in single.coefficients.values.items():
                np.testing.assert_allclose(distributed[f"{tag}/lambda:{group}"], value, atol=1e-5, err_msg=group)


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
