"""The offline real benchmark end to end (`adamerging-jax demo --quick`) on real packaged data and weights."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from adamerging_jax.cli import main
from adamerging_jax.data import packaged
from adamerging_jax.demo.pipeline import METHODS, DemoConfig, finetune_cache_key
from adamerging_jax.demo.finetune import FinetuneConfig


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """A user task as a folder of class subfolders: bright vs dark squares."""
    root = tmp_path_factory.mktemp("user_task")
    rng = np.random.default_rng(0)
    for name, level in [("bright", 200), ("dark", 50)]:
        (root / name).mkdir()
        for i in range(24):
            pixels = np.clip(rng.normal(level, 30, (28, 28, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, user_folder):
    out = tmp_path_factory.mktemp("demo")
    code = main(
        ["demo", "--quick", "--tasks", "mnist,digits", "--task-folder", f"squares={user_folder}",
         "--output", str(out), "--cache", str(out / "cache"), "--quiet"]
    )
    assert code == 0
    return out


def test_quick_demo_writes_the_table_json_and_plots(quick_run):
    table = (quick_run / "table.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| Method"))
    assert header == "| Method | mnist | digits | squares | Avg. |"
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| Method")]
    assert len(rows) == len(METHODS)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 5
        values = [float(c) for c in cells[1:]]
        assert all(0.0 <= v <= 100.0 for v in values)
        assert abs(np.mean(values[:3]) - values[3]) < 0.06  # the average column is the mean of the tasks
    run = json.loads((quick_run / "results.json").read_text())["runs"][0]
    assert run["tasks"] == ["mnist", "digits", "squares"]
    assert set(run["methods"]) == set(METHODS)
    for name in ["accuracy.png", "entropy.png", "lambda_layer_wise_adamerging.png", "lambda_layer_wise_adamergingpp.png"]:
        assert (quick_run / name).stat().st_size > 1000, name


def test_adamerging_lowered_the_entropy_and_learned_per_leaf_lambdas(quick_run):
    run = json.loads((quick_run / "results.json").read_text())["runs"][0]
    for method in ["layer_wise_adamerging", "layer_wise_adamerging++", "task_wise_adamerging"]:
        before, after = run["methods"][method]["probe_entropy"]
        assert after < before, (method, before, after)
    lam = run["methods"]["layer_wise_adamerging"]["coefficients"]
    assert list(lam) == run["leaves"] and len(lam) == 147  # EfficientNet-Lite0's float tensors (BN stats frozen)
    assert {len(v) for v in lam.values()} == {3}
    assert len({tuple(np.round(v, 6)) for v in lam.values()}) > 1  # per-leaf λ differ


def test_finetuned_backbones_are_cached_under_keys_of_every_setting(quick_run):
    cached = sorted(p.name for p in (quick_run / "cache").glob("finetuned-*.npz"))
    assert [name.split("-")[1] for name in cached] == ["digits", "mnist", "squares"]
    task = packaged.load_task("digits", seed=0, n_train=64, n_test=32)
    config, finetune, weights = DemoConfig.quick(), FinetuneConfig(), {"w": np.ones(3)}
    key = finetune_cache_key(task, config, finetune, weights)
    assert key == finetune_cache_key(task, config, finetune, weights)
    changed = [
        finetune_cache_key(task, dataclasses.replace(config, resolution=48), finetune, weights),
        finetune_cache_key(task, dataclasses.replace(config, shots=2), finetune, weights),
        finetune_cache_key(task, dataclasses.replace(config, head="logistic"), finetune, weights),
        finetune_cache_key(task, config, dataclasses.replace(finetune, learning_rate=3e-4), weights),
        finetune_cache_key(task, config, finetune, {"w": np.zeros(3)}),
        finetune_cache_key(packaged.load_task("digits", seed=1, n_train=64, n_test=32), config, finetune, weights),
    ]
    assert key not in changed and len(set(changed)) == len(changed)


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        DemoConfig(methods=("task_arithmetic", "magic"))
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"resolutoin": 32}))
    with pytest.raises(SystemExit, match="resolutoin"):
        main(["demo", "--config", str(config)])
