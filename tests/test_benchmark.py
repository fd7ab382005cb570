"""benchmarks/step_benchmark.py in its tiny CPU mode: it runs, and its JSON has the fields the report needs.

Speed is not asserted. The FusionBench peer is replaced by a stand-in peer script that prints a fixed
JSON line, so the side-by-side plumbing (command, parsing, speed-up column) is exercised without the peer's
venv; `--no-peer` is covered by the memory-report test, and where the peer script comes from (flag,
environment, or nowhere: rows skipped with one line) by in-process tests of the benchmark's functions.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "step_benchmark.py"
PEER_ENV = ("ADAMERGING_JAX_PEER_SCRIPT", "ADAMERGING_JAX_PEER_PYTHON")

FAKE_PEER = """
import json, sys
floor = "--floor" in sys.argv
print("peer log line")
print(json.dumps({"bench": "torch_floor" if floor else "fusion_bench_layerwise_adamerging",
                  "ms_per_step_median": 50.0 if floor else 500.0, "ms_per_step_min": 40.0, "steps": 2,
                  "argv": sys.argv[1:]}))
"""


def run_script(*flags: str, cwd: Path, **extra_env: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in PEER_ENV}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **extra_env)
    done = subprocess.run([sys.executable, str(SCRIPT), *flags], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_tiny_cpu_mode_writes_the_table_and_json(tmp_path):
    peer = tmp_path / "peer_torch.py"
    peer.write_text(FAKE_PEER)
    out = tmp_path / "bench.json"
    done = run_script("--sizes", "tiny", "--k", "2", "--batch", "4", "--steps", "2", "--warmup", "1",
                      "--variants", "fp32", "--rounds", "2", "--profile", str(tmp_path / "trace"), "--out", str(out),
                      cwd=tmp_path, ADAMERGING_JAX_PEER_SCRIPT=str(peer))  # the peer's python: this interpreter
    report = json.loads(out.read_text())
    assert sorted(p.name for p in tmp_path.glob("*bench.json*")) == ["bench.json"]  # no temporary left behind
    assert report["bench"] == "adamerging_layerwise_step"
    assert report["k"] == 2 and report["batch_per_task"] == 4 and report["steps"] == 2
    assert report["machine"]["platform"] == "cpu" and report["machine"]["jax"]
    rows = {(r["impl"], r["variant"]): r for r in report["rows"]}
    assert set(rows) == {("project", "fp32"), ("jax-floor", "fp32"), ("fusion-bench", "fp32"), ("torch-floor", "fp32")}

    project = rows["project", "fp32"]
    assert project["size"] == "tiny" and project["mode"] == "shared" and project["accumulate"] == "fused"
    assert project["param_dtype"] == "float32"
    assert project["steps"] == 2 and 0 < project["ms_per_step_min"] <= project["ms_per_step_median"]
    assert project["compile_s"] > 0 and project["peak_rss_gb"] > 0
    # two interleaved rounds: the row's median is the median of the rounds' medians
    assert report["rounds"] == 2 and len(project["rounds_ms"]) == 2 and len(report["round_rows"]) == 2 * len(rows)
    assert project["ms_per_step_median"] == round(sum(project["rounds_ms"]) / 2, 3)
    # one λ per tensor per layer: 2 layers × 16 tensors + 7 unstacked leaves (the peer's 39 HF tensors) × K
    assert project["n_coefficients"] == 2 * 39
    assert project["xla_memory"]["peak_estimate_bytes"] > 0 and project["cost"]["gflops"] > 0
    assert project["loss_first"] > 0
    profile = project["profile"]
    assert Path(profile["trace"]).is_file() and profile["top_ops"]
    assert all(op["self_ms_per_step"] >= 0 for op in profile["top_ops"]) and profile["busy_ms_per_step"] > 0
    assert any(op["source"].startswith("jit(step)") for op in profile["top_ops"])  # HLO ops traced to JAX ops

    # the peer ran with the benchmark's sizes and its JSON line was parsed; speed-ups divide by its median
    fusion_bench, floor = rows["fusion-bench", "fp32"], rows["torch-floor", "fp32"]
    assert fusion_bench["peer"]["argv"][:7] == ["--tiny", "--k", "2", "--batch", "4", "--steps", "2"]
    assert "--floor" in floor["peer"]["argv"] and "--floor" not in fusion_bench["peer"]["argv"]
    assert fusion_bench["ms_per_step_median"] == 500.0 and floor["ms_per_step_median"] == 50.0
    assert fusion_bench["rounds_ms"] == [500.0, 500.0]
    assert floor["speedup_vs_fusion_bench"] == 10.0
    assert project["speedup_vs_fusion_bench"] == round(500.0 / project["ms_per_step_median"], 2)
    assert "fusion-bench" in done.stdout and "project" in done.stdout  # the printed table


def test_memory_report_compiles_without_running(tmp_path):
    out = tmp_path / "memory.json"
    run_script("--memory-report", "--memory-size", "tiny", "--memory-tasks", "2", "--batch", "4",
               "--simulate-devices", "2", "--out", str(out), cwd=tmp_path)
    report = json.loads(out.read_text())
    assert report["bench"] == "adamerging_memory_report" and report["size"] == "tiny"
    modes = {(r["precision"], r["mode"], r["shard_task_vectors"]): r for r in report["rows"]}
    assert set(modes) == {("fp32", "shared", False), ("bf16", "shared", False), ("bf16", "per_task", False),
                          ("bf16", "per_task", True)}
    fp32, bf16 = modes["fp32", "shared", False], modes["bf16", "shared", False]
    n = fp32["analytic"]["n_params"]
    assert fp32["analytic"]["task_vectors_bytes"] == 2 * n * 4 and bf16["analytic"]["task_vectors_bytes"] == 2 * n * 2
    # XLA's arguments of the step hold θ0 and τ (plus λ, Adam's state and the images)
    assert fp32["xla_memory_per_device"]["argument_bytes"] > 3 * n * 4
    assert modes["bf16", "per_task", True]["devices"] == 2
    # sharding θ0/τ over 2 devices shrinks each device's arguments below the replicated step's
    sharded = modes["bf16", "per_task", True]["xla_memory_per_device"]["argument_bytes"]
    replicated = modes["bf16", "per_task", False]["xla_memory_per_device"]["argument_bytes"]
    assert 0 < sharded < replicated


@pytest.fixture(scope="module")
def bench():
    """benchmarks/step_benchmark.py as a module (it imports jax only inside its functions)."""
    spec = importlib.util.spec_from_file_location("step_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_peer_script_comes_from_the_flag_or_the_environment_and_has_no_default(bench, tmp_path):
    env = {"ADAMERGING_JAX_PEER_SCRIPT": "env.py", "ADAMERGING_JAX_PEER_PYTHON": "env-python"}
    assert bench.peer_paths("flag.py", "flag-python", env) == ("flag.py", "flag-python")
    assert bench.peer_paths(None, None, env) == ("env.py", "env-python")
    assert bench.peer_paths(None, None, {}) == (None, sys.executable)
    assert bench.peer_paths(None, None, {"ADAMERGING_JAX_PEER_SCRIPT": ""}) == (None, sys.executable)
    with pytest.raises(SystemExit):  # a given script that is not there is an error, not a silent skip
        bench.parse_args(["--peer-script", str(tmp_path / "missing.py")])


def test_without_a_peer_script_the_peer_rows_are_skipped_with_one_line(bench, capsys):
    modes = ["fp32", "floor-fp32"]
    assert bench.peer_modes_to_run(argparse.Namespace(no_peer=False, peer_script=None), modes) == []
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "--peer-script" in lines[0] and "ADAMERGING_JAX_PEER_SCRIPT" in lines[0]
    assert bench.peer_modes_to_run(argparse.Namespace(no_peer=False, peer_script="p.py"), modes) == modes
    assert bench.peer_modes_to_run(argparse.Namespace(no_peer=True, peer_script="p.py"), modes) == []
    assert capsys.readouterr().err == ""


LAUNCHED_PEER = """
import json, sys
def vision_config(tiny):
    raise AssertionError("the launcher replaces vision_config")
def main(argv):
    config = vision_config(False)
    print(json.dumps({"bench": "x", "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
                      "argv": argv}))
"""


def test_a_size_the_peer_lacks_is_launched_with_only_its_vision_config_patched(bench, tmp_path):
    pytest.importorskip("transformers")
    peer = tmp_path / "any_name.py"  # the launcher loads the script by path, whatever its name
    peer.write_text(LAUNCHED_PEER)
    args = argparse.Namespace(k=2, batch=4, steps=1, warmup=0, seed=0, peer_python=sys.executable,
                              peer_script=str(peer))
    command = bench.peer_command(args, "small", "floor-fp32")
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    line = json.loads(done.stdout.splitlines()[-1])
    small = bench.SIZES["small"]
    assert (line["hidden_size"], line["layers"]) == (small.width, small.layers)
    assert line["argv"] == ["--k", "2", "--batch", "4", "--steps", "1", "--warmup", "0", "--seed", "0", "--floor"]
