"""benchmarks/methods_benchmark.py in its --quick mode on two methods: it runs, prints the table and writes the
JSON the report needs, with positive times (speed is not asserted).

The FusionBench side is a stand-in peer interpreter (a shell script) that prints fixed records, so the
side-by-side plumbing (its command, its JSON lines, the ratio, a method without a fixture) runs without the
reference environment; without a peer, the FusionBench column is empty and the table says why.
"""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "methods_benchmark.py"

FAKE_PEER = """#!/bin/sh
echo "$@" > "$(dirname "$0")/argv.txt"
echo 'a log line of the reference'
echo '{"peer": "versions", "fusion-bench": "0.0-test", "torch": "0.0-test"}'
echo '{"peer": "method", "method": "weight_average", "status": "measured", "run_s": 0.5, "runs_s": [0.5, 0.6]}'
echo '{"peer": "method", "method": "task_arithmetic", "status": "no fixture"}'
"""


@pytest.fixture(scope="module")
def bench():
    """benchmarks/methods_benchmark.py as a module (it imports jax only inside its functions)."""
    spec = importlib.util.spec_from_file_location("methods_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_quick_run_times_both_methods_and_reads_the_peer(tmp_path):
    peer = tmp_path / "peer-python"
    peer.write_text(FAKE_PEER)
    peer.chmod(peer.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "methods.json"
    env = {key: value for key, value in os.environ.items() if key != "ADAMERGING_JAX_PEER_PYTHON"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    flags = ["--quick", "--methods", "weight_average,task_arithmetic", "--peer-python", str(peer), "--out", str(out)]
    done = subprocess.run([sys.executable, str(SCRIPT), *flags], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert sorted(p.name for p in tmp_path.glob("*methods.json*")) == ["methods.json"]  # no temporary left behind
    assert report["bench"] == "data_free_methods" and report["dtype"] == "float32"
    recorded = ["PEER_PYTHON" if flag == str(peer) else flag for flag in flags]  # no path of this machine
    assert report["command"] == "python benchmarks/methods_benchmark.py " + " ".join(recorded)
    assert report["repeats"] == 2 and report["tasks"] == 4 and report["machine"]["platform"] == "cpu"
    assert report["sizes"]["tiny"]["width"] == 24 and report["sizes"]["tiny"]["n_params"] > 0
    assert report["peer"]["python_given"] and report["peer"]["fusion-bench"] == "0.0-test"

    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["weight_average", "task_arithmetic"]
    for row in rows.values():
        ours = row["ours"]
        assert row["size"] == "tiny" and row["k"] == 4 and ours["compile_measure"] == "lower + compile"
        assert ours["compile_s"] > 0 and ours["run_s"] > 0 and len(ours["runs_s"]) == 2
        assert all(t > 0 for t in ours["runs_s"]) and min(ours["runs_s"]) <= ours["run_s"] <= max(ours["runs_s"])
    measured, missing = rows["weight_average"], rows["task_arithmetic"]
    assert measured["peer_status"] == "measured" and measured["ratio"] == round(measured["ours"]["run_s"] / 0.5, 4)
    assert missing["peer_status"] == "no fixture" and missing["ratio"] is None

    # the peer got the size, both methods with their K, and the weights file (gone with its temporary folder)
    argv = (tmp_path / "argv.txt").read_text().split()
    assert argv[0] == str(SCRIPT) and argv[1] == "peer-worker"
    assert argv[argv.index("--size") + 1] == "tiny"
    assert argv[argv.index("--methods") + 1] == "weight_average:4,task_arithmetic:4"
    assert not os.path.exists(argv[argv.index("--models") + 1])
    table = done.stdout
    assert "| tiny | weight_average | 4 |" in table and "| 0.5000 |" in table
    assert "| tiny | task_arithmetic | 4 |" in table and "no fixture function" in table


def test_both_sides_read_the_same_weights(bench):
    import jax
    import numpy as np

    from method_fixtures import hf_tensors

    arrays = bench.random_models(bench.SIZES["tiny"], 2, seed=0)
    assert all(value.dtype == np.float32 for value in arrays.values())
    again = bench.random_models(bench.SIZES["tiny"], 2, seed=0)
    assert all(np.array_equal(arrays[key], again[key]) for key in arrays)  # seeded
    pretrained, task_vectors = bench.our_inputs(arrays, 2)
    ours = hf_tensors(pretrained)
    assert set(ours) == set(bench.section(arrays, "pretrained"))  # HF CLIPVisionModel's state-dict names
    assert all(np.array_equal(ours[name], value) for name, value in bench.section(arrays, "pretrained").items())
    tau_1 = hf_tensors(jax.tree_util.tree_map(lambda leaf: leaf[1], task_vectors))
    name = "encoder.layers.1.mlp.fc1.weight"
    assert np.array_equal(tau_1[name], arrays[f"task1/{name}"] - arrays[f"pretrained/{name}"])


def test_without_a_peer_the_fusion_bench_column_is_empty_and_says_why(bench, monkeypatch):
    monkeypatch.delenv("ADAMERGING_JAX_PEER_PYTHON", raising=False)
    assert bench.parse_args(["--quick"]).peer_python is None
    monkeypatch.setenv("ADAMERGING_JAX_PEER_PYTHON", "env-python")
    assert bench.parse_args([]).peer_python == "env-python"
    assert bench.parse_args(["--peer-python", "flag-python"]).peer_python == "flag-python"
    row = dict(method="ties", size="tiny", k=4, ours=dict(compile_s=1.0, run_s=0.01), fusion_bench=None,
               peer_status="no peer", ratio=None)
    table = bench.speed_table(dict(rows=[row], peer=dict(python_given=False)))
    assert "| tiny | ties | 4 | 1.000 | 0.0100 | — | — |" in table
    assert "no peer python given" in table

    float64 = dict(row, fusion_bench=dict(status="measured", run_s=0.02, dtype="float64", float32_error="E: x"),
                   peer_status="measured", ratio=0.5)
    table = bench.speed_table(dict(rows=[float64], peer=dict(python_given=True)))
    assert "| 0.0200 (float64) | 0.5 |" in table and "fails in float32 (E: x)" in table


def test_repeats_stop_at_the_time_budget_after_at_least_one_run(bench):
    calls = []
    times = bench.timed_runs(lambda x: calls.append(x), 3, 1e9, lambda: (len(calls),))
    assert len(times) == 3 and calls == [0, 1, 2]  # fresh inputs for every run
    slow = bench.timed_runs(lambda: time.sleep(0.02), 5, 0.01)
    assert len(slow) == 1 and slow[0] >= 0.02
