"""Multi-host AdaMerging: 2 CPU processes under `jax.distributed` (2 devices each, one global 4-device mesh),
each feeding only its own rows of every task's batch, give the single-process λ trajectory.

Run as a script, this file is one worker process: `python test_multihost.py ADDRESS PROCESS_ID OUT.npz`.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from multihost_launcher import run_workers

PROCESSES, DEVICES_PER_PROCESS, STEPS, BATCH = 2, 2, 8, 16
TIMEOUT_S = 150


def _config():
    import adamerging_jax as am

    return am.AdaMergingConfig(steps=STEPS, lr=0.02, batches_per_task=1, batch_size=BATCH, quiet=True)


def _problem_and_vectors():
    import adamerging_jax as am
    from tiny_problem import make_problem

    problem = make_problem()
    return problem, am.task_vectors(problem.pretrained, problem.finetuned)


def worker(address: str, process_id: int, out: str) -> None:
    """One process of the distributed run: λ and the loss history go to `out` (written by process 0)."""
    import jax

    jax.distributed.initialize(coordinator_address=address, num_processes=PROCESSES, process_id=process_id,
                               initialization_timeout=60)
    import adamerging_jax as am
    from adamerging_jax.core.multihost import global_batch_source, local_rows
    from tiny_problem import batch_source

    assert len(jax.devices()) == PROCESSES * DEVICES_PER_PROCESS, jax.devices()
    problem, tv = _problem_and_vectors()
    mesh = am.data_mesh()  # every device of every process
    rows = local_rows(mesh, BATCH)
    full = batch_source(problem, batch=BATCH)
    local = lambda step: [x[rows] for x in full(step)]  # noqa: E731 - this process reads only its rows
    result = am.adamerging(problem.apply, problem.pretrained, tv, global_batch_source(local, mesh), _config(), mesh=mesh)
    if jax.process_index() == 0:
        values = {f"lambda:{k}": np.asarray(v) for k, v in result.coefficients.values.items()}
        tmp = out + ".tmp.npz"
        np.savez(tmp, loss=result.history["loss"], rows=np.asarray([rows.start, rows.stop]), **values)
        os.replace(tmp, out)
    jax.distributed.shutdown()


def test_two_processes_give_the_single_process_result(tmp_path):
    pytest.importorskip("jax")
    import jax

    import adamerging_jax as am
    from tiny_problem import batch_source

    out = tmp_path / "distributed.npz"
    run_workers(__file__, out, PROCESSES, DEVICES_PER_PROCESS, TIMEOUT_S)

    problem, tv = _problem_and_vectors()
    single = am.adamerging(problem.apply, problem.pretrained, tv, batch_source(problem, batch=BATCH), _config(),
                           mesh=am.data_mesh(jax.devices()[:1]))
    with np.load(out) as distributed:
        # process 0 read only the first half of every batch: the global batch was really assembled from parts
        assert distributed["rows"].tolist() == [0, BATCH // PROCESSES]
        np.testing.assert_allclose(distributed["loss"], single.history["loss"], atol=1e-5)
        assert distributed["loss"].shape == (STEPS, 4)
        for group, value in single.coefficients.values.items():
            np.testing.assert_allclose(distributed[f"lambda:{group}"], value, atol=1e-5, err_msg=group)
    # the run moved λ away from its start, so agreement is not agreement of two no-ops
    moved = max(float(np.abs(np.asarray(v) - 0.3).max()) for v in single.coefficients.values.values())
    assert moved > 1e-3


def test_local_rows_need_a_divisible_batch():
    import adamerging_jax as am
    from adamerging_jax.core.multihost import local_rows

    mesh = am.data_mesh()
    assert local_rows(mesh, 8 * mesh.devices.size) == slice(0, 8 * mesh.devices.size)  # one process: all rows
    if mesh.devices.size > 1:
        with pytest.raises(ValueError, match="cannot be split"):
            local_rows(mesh, mesh.devices.size + 1)


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
