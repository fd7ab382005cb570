"""The LM memory report (benchmarks/lm_memory.py) at a tiny size: it compiles every case from abstract shapes
on 8 simulated devices, writes its JSON and prints the Markdown table; θ0 + τ per device is 1/fsdp of their
bytes (bf16), the factored LoRA τ holds less than the dense one, and the fits column follows the peak."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lm_memory.py"


def load_script():
    spec = importlib.util.spec_from_file_location("lm_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_report(tmp_path):
    out = tmp_path / "lm_memory_tiny.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--devices", "8", "--batch", "2",
                           "--length", "16", "--cases", "full4,lora8", "--remat", "yes", "--accumulate", "per_task",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {row["task_vectors"]: row for row in report["rows"]}
    assert set(rows) == {"full", "lora"} and all(row["data"] * row["fsdp"] == 8 for row in rows.values())
    c = report["model"]
    # θ0 in bf16: every leaf of the tiny model has an axis 8 divides, so a device holds an eighth of it
    layer = c["hidden_size"] * (2 * c["num_heads"] * c["head_dim"] + 2 * c["num_kv_heads"] * c["head_dim"]
                                + 3 * c["intermediate_size"] + 2)
    theta = c["num_layers"] * layer + 2 * c["vocab_size"] * c["hidden_size"] + c["hidden_size"]
    assert rows["full"]["frozen_bytes_per_device"] == (1 + 4) * theta * 2 // 8
    assert rows["lora"]["frozen_bytes_per_device"] < 8 * theta * 2 // 8
    for row in rows.values():
        peak = row["xla"]["peak_estimate_bytes"]
        assert peak >= row["frozen_bytes_per_device"] > 0
    assert "| 8 (1 × 8) | LoRA r=16 | 8 | yes | per_task |" in done.stdout


def test_fits_and_table():
    lm_memory = load_script()
    gib = 2**30
    assert lm_memory.fits(int(14 * gib)) == [16, 32, 80]
    assert lm_memory.fits(int(20 * gib)) == [32, 80]
    assert lm_memory.fits(int(75 * gib)) == []  # 75 GiB is over 90 % of 80 GiB
    row = dict(devices=64, data=8, fsdp=8, k=8, task_vectors="full", rank=None, remat=True, accumulate="fused",
               frozen_bytes_per_device=int(18 * gib), xla=dict(peak_estimate_bytes=int(np.float64(30) * gib)))
    assert lm_memory.markdown([row]).splitlines()[-1] == "| 64 (8 × 8) | full | 8 | yes | fused | 18.00 | 30.00 | 80 |"
