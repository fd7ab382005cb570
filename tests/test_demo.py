"""The offline real benchmark end to end (`adamerging-jax demo --quick`) on real packaged data and weights."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from PIL import Image

import adamerging_jax as am
from adamerging_jax.cli import main
from adamerging_jax.core import registry
from adamerging_jax.data import packaged
from adamerging_jax.demo import pipeline
from adamerging_jax.demo.finetune import FinetuneConfig
from adamerging_jax.demo.pipeline import METHODS, DemoConfig, finetune_cache_key

DEMO_METHODS = [m if isinstance(m, str) else m["name"] for m in METHODS]


def _user_method(name, scale):
    """A method of one's own: every task vector scaled by `scale` (NaN to poison the model)."""
    build = lambda p, tv: am.Merged(params=jax.tree_util.tree_map(lambda a, t: a + scale * t.sum(0), p, tv))  # noqa: E731
    return am.MergeMethod(name, f"User method ({name})", "a test", build)


@pytest.fixture(scope="module")
def user_methods():
    """A user-registered method, and one whose model gives NaN logits."""
    methods = [am.register(_user_method("half_sum", 0.5)), am.register(_user_method("nan_sum", float("nan")))]
    yield methods
    for method in methods:
        del registry.REGISTRY[method.name]


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


def cache_of(out):
    """The quick run's cache of fine-tuned backbones, beside its output (never inside: a run replaces it)."""
    return out.with_name(f"{out.name}-cache")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, user_folder, user_methods):
    out = tmp_path_factory.mktemp("demo")
    code = main(
        ["demo", "--quick", "--tasks", "mnist,digits", "--task-folder", f"squares={user_folder}",
         "--methods", ",".join(DEMO_METHODS + ["half_sum"]),
         "--output", str(out), "--cache", str(cache_of(out)), "--quiet"]
    )
    assert code == 0
    return out


def test_quick_demo_writes_the_table_json_and_plots(quick_run):
    table = (quick_run / "table.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| Method"))
    assert header == "| Method | mnist | digits | squares | Avg. |"
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| Method")]
    assert len(rows) == len(METHODS) + 1
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 5
        values = [float(c) for c in cells[1:]]
        assert all(0.0 <= v <= 100.0 for v in values)
        assert abs(np.mean(values[:3]) - values[3]) < 0.06  # the average column is the mean of the tasks
    run = json.loads((quick_run / "results.json").read_text())["runs"][0]
    assert run["tasks"] == ["mnist", "digits", "squares"]
    assert set(run["methods"]) == set(DEMO_METHODS + ["half_sum"])
    assert run["methods"]["ties"]["params"]["reduce"] == "mean"  # the demo's TIES settings kept
    assert any(row.startswith("| User method (half_sum) |") for row in rows)
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
    cached = sorted(p.name for p in cache_of(quick_run).glob("finetuned-*.npz"))
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


def test_a_user_method_is_scored_like_a_built_in(quick_run):
    """A registered user method gets a record like a built-in data-free one: every task scored, its label."""
    run = json.loads((quick_run / "results.json").read_text())["runs"][0]
    record = run["methods"]["half_sum"]
    assert set(record["accuracy"]) == set(run["tasks"]) and record["label"] == "User method (half_sum)"
    assert record["coefficients"] is None and record["entropy"] is None


def test_nan_results_write_no_table(quick_run, user_methods, tmp_path):
    """A model with NaN logits stops the run before any table is written (the fine-tuned backbones come
    from the first run's cache)."""
    out = tmp_path / "nan"
    with pytest.raises(ValueError, match="model 'nan_sum' gives NaN or inf logits"):
        main(["demo", "--quick", "--tasks", "mnist,digits", "--methods", "pretrained,nan_sum",
              "--output", str(out), "--cache", str(cache_of(quick_run)), "--quiet", "--no-plots"])
    assert not (out / "table.md").exists() and not (out / "results.json").exists()


def test_each_seed_is_written_before_the_next_starts(tmp_path, monkeypatch):
    """An interrupt during seed 1 keeps seed 0's results."""
    def fake_run_demo(config, **_):
        if config.seed == 1:
            raise KeyboardInterrupt
        accuracy = {"mnist": 0.5, "digits": 0.75}
        return dict(settings=config.describe(), tasks=list(accuracy), seconds={"total": 0.0},
                    methods={"pretrained": {"accuracy": accuracy, "mean": 0.625, "label": "Pretrained"}})

    monkeypatch.setattr(pipeline, "run_demo", fake_run_demo)
    assert main(["demo", "--quick", "--tasks", "mnist,digits", "--seeds", "0", "1", "--output", str(tmp_path),
                 "--no-plots", "--quiet"]) == 130
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [run["settings"]["seed"] for run in runs] == [0]
    assert "| Pretrained | 50.0 | 75.0 | 62.5 |" in (tmp_path / "table.md").read_text()


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown merge method 'magic'"):
        dataclasses.replace(DemoConfig(), merge=DemoConfig().merge.with_changes(["task_arithmetic", "magic"]))
    with pytest.raises(ValueError, match="DemoConfig.n_test must be >= 1, got -5"):
        DemoConfig(n_test=-5)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"resolutoin": 32}))
    with pytest.raises(SystemExit, match="resolutoin"):
        main(["demo", "--config", str(config)])
