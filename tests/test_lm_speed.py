"""benchmarks/lm_speed.py at the tiny size with 2 steps: it runs from the command line, prints the Markdown table
and writes a JSON record with the fields the report needs (speed is not asserted)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "lm_speed.py"

pytestmark = pytest.mark.slow


def test_tiny_run_writes_the_record(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)  # one CPU device, as the benchmark is run
    flags = ["--sizes", "tiny", "--steps", "2", "--warmup", "1", "--k", "2", "--batch", "2", "--out", "lm.json"]
    done = subprocess.run([sys.executable, str(SCRIPT), *flags], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| tiny |" in done.stdout and "step / floor" in done.stdout
    report = json.loads((tmp_path / "lm.json").read_text())
    assert report["bench"] == "lm_layerwise_adamerging_step" and report["k"] == 2 and report["batch_per_task"] == 2
    assert report["command"] == "python benchmarks/lm_speed.py " + " ".join(flags)
    assert report["sizes"]["tiny"]["hidden_size"] == 64 and report["machine"]["platform"] == "cpu"
    step, floor = report["rows"]
    assert (step["impl"], floor["impl"]) == ("adamerging-step", "forward-backward")
    for row in (step, floor):
        assert row["size"] == "tiny" and row["steps"] == 2 and row["tokens_per_step"] == 2 * 2 * 32
        assert row["ms_per_step_median"] > 0 and row["compile_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["ms_per_step_median"] * 1e3, rel=1e-3)
    assert step["step_over_floor"] == pytest.approx(step["ms_per_step_median"] / floor["ms_per_step_median"], rel=1e-2)
    assert step["n_coefficients"] == 2 * (3 + 9 * 2)  # K × (embed, norm, head + 9 tensors in each of 2 layers)
    assert 0 < step["loss_first"] <= 2 * math.log(256)  # Σ over K = 2 tasks of an entropy ≤ ln(vocabulary)
