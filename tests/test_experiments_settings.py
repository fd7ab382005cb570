"""The experiments' library pieces without a model run: tasks, published numbers, settings, checkpoint and data
errors, padded head encoding, paper-shaped tables."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from adamerging_jax.core import registry
from adamerging_jax.heads import zero_shot
from adamerging_jax.merging.errors import MergeError
from adamerging_jax.models.clip_checkpoint import load_hf_clip, save_hf_vision_model
from adamerging_jax.paper import cli, published
from adamerging_jax.paper.experiments import run_robustness
from adamerging_jax.heads.zero_shot import padded_rows
from adamerging_jax.paper.models import checkpoint_location, load_models
from adamerging_jax.paper.settings import (
    METHODS,
    Checkpoints,
    DataConfig,
    ExperimentConfig,
    merge_settings,
)
from adamerging_jax.paper.sources import task_test_set
from adamerging_jax.report import markdown_table
from adamerging_jax.paper.tasks import (
    ALL_TASKS,
    GENERALIZATION_SPLITS,
    canonical,
    paper_task,
)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "clip", "ti8")


def test_every_name_of_a_task_resolves_and_duplicates_are_refused():
    assert [paper_task(n).name for n in ["stanford-cars", "Cars", "cars", "SUN397", "dtd"]] == [
        "cars", "cars", "cars", "sun397", "dtd"]
    assert {t.head for t in map(paper_task, ALL_TASKS)} == set(zero_shot.task_names())
    with pytest.raises(ValueError, match="'imagenet'"):
        paper_task("imagenet")
    with pytest.raises(ValueError, match="twice"):
        canonical(["cars", "stanford-cars"])


def test_generalization_splits_partition_the_8_tasks():
    for seen, unseen in GENERALIZATION_SPLITS.values():
        assert len(seen) == 6 and len(unseen) == 2 and sorted(seen + unseen) == sorted(ALL_TASKS)


@pytest.mark.parametrize("table", [published.TABLE1_VIT_B32, published.TABLE2_VIT_L14])
def test_published_per_task_numbers_average_to_the_published_mean(table):
    """A transcription check: the paper's Avg. column is the mean of its task columns (to its rounding)."""
    for method, row in table.items():
        assert method in METHODS
        per_task = [row[t] for t in ALL_TASKS if t in row]
        if per_task:
            assert len(per_task) == 8
            assert abs(np.mean(per_task) - row["mean"]) <= 0.1, method


def test_published_generalization_means():
    for split, table in published.GENERALIZATION.items():
        unseen = GENERALIZATION_SPLITS[split][1]
        for row in table.values():
            assert set(row) - {"mean"} == set(unseen)
            if "mean" in row:
                assert abs(np.mean([row[t] for t in unseen]) - row["mean"]) <= 0.1


def test_presets_hold_the_two_reference_settings():
    official, fusionbench = merge_settings("official").adamerging, merge_settings("fusionbench").adamerging
    assert (official.steps, official.batches_per_task, official.batch_size, official.clamp, official.entropy_eps,
            official.lr) == (500, 2, 16, (0.0, 1.0), None, 1e-3)
    assert (fusionbench.steps, fusionbench.batches_per_task, fusionbench.clamp, fusionbench.entropy_eps) == (
        1000, 1, None, 1e-8)
    merge = merge_settings()
    assert [s.name for s in merge.methods] == list(METHODS)
    specs = {s.name: s for s in merge.methods}
    assert dict(specs["task_wise_adamerging++"].method.fixed) == {"granularity": "task", "task_vectors": "ties"}
    assert dict(specs["layer_wise_adamerging"].method.fixed)["granularity"] == "layer"
    assert merge.adamerging.stacked("layers/attn/q/kernel")
    assert specs["task_arithmetic"].params == {"scale": 0.3}
    assert {k: specs["ties"].params[k] for k in ("density", "reduce", "scale")} == {
        "density": 0.2, "reduce": "sum", "scale": 0.3}
    with pytest.raises(ValueError, match="unknown merge method 'fisher'"):
        merge_settings(methods=("fisher",))
    with pytest.raises(ValueError, match="preset"):
        merge_settings("paper")


def test_experiment_config_checks_its_tasks_and_records_its_settings():
    with pytest.raises(ValueError, match="must start with the merged tasks"):
        ExperimentConfig("x", ("cars", "dtd"), ("dtd", "cars", "mnist"))
    with pytest.raises(ValueError, match="at least 2"):
        ExperimentConfig("x", ("cars",), ("cars",))
    settings = ExperimentConfig("x", ("cars", "dtd"), ("cars", "dtd", "mnist")).settings()
    assert json.loads(json.dumps(settings))["merge"]["adamerging"]["stacked"] == "stacked"
    assert settings["checkpoints"]["finetuned"] == "tanganke/clip-vit-base-patch32_{task}"
    assert Checkpoints.fusionbench("L/14").pretrained == "openai/clip-vit-large-patch14"


def test_checkpoint_templates():
    assert checkpoint_location("tanganke/clip-vit-base-patch32_{task}", "cars") == (
        "tanganke/clip-vit-base-patch32_stanford-cars")
    assert checkpoint_location("/ckpt/ViT-B-32/{dataset}/finetuned.pt", "sun397") == (
        "/ckpt/ViT-B-32/SUN397/finetuned.pt")
    with pytest.raises(ValueError, match="unknown placeholders"):
        checkpoint_location("/ckpt/{name}", "cars")


def test_missing_checkpoints_name_the_task(tmp_path):
    checkpoints = Checkpoints(pretrained=FIXTURE, finetuned=str(tmp_path / "{task}"), allow_download=False)
    with pytest.raises(FileNotFoundError, match="task 'cars'.*stanford-cars"):
        load_models(checkpoints, ["cars", "dtd"], ["cars", "dtd"], None, log=lambda _: None)
    config, params = load_hf_clip(FIXTURE)
    save_hf_vision_model(str(tmp_path / "tower"), params["vision"], config)
    vision_only = Checkpoints(pretrained=str(tmp_path / "tower"), finetuned=str(tmp_path / "tower"))
    with pytest.raises(ValueError, match="no text tower"):
        load_models(vision_only, ["cars", "dtd"], ["cars", "dtd"], None, log=lambda _: None)


def test_test_sources_name_the_task_folder_and_missing_data(tmp_path):
    with pytest.raises(ValueError, match="task 'mnist': no test data"):
        task_test_set("mnist", DataConfig())
    with pytest.raises(FileNotFoundError, match="'mnist'.*not prepared"):
        task_test_set("mnist", DataConfig(tfds_dir=str(tmp_path / "tfds")))
    split = tmp_path / "mnist" / "test"
    for c in range(9):  # MNIST's head has 10 classes
        (split / str(c)).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), c, np.uint8)).save(split / str(c) / "a.png")
    with pytest.raises(ValueError, match="task 'mnist'.*9 class folders.*10 classes"):
        task_test_set("mnist", DataConfig(folders={"mnist": str(split)}))
    (split / "9").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(split / "9" / f"{i}.png")
    source = task_test_set("mnist", DataConfig(folders={"mnist": str(split)}))
    assert len(source) == 12 and source[11][1] == 9
    assert len(task_test_set("mnist", DataConfig(folders={"mnist": str(split)}, max_test_images=5))) == 5


def test_padded_text_encoding_gives_the_same_head():
    config, params = load_hf_clip(FIXTURE)
    tokenizer = zero_shot.load_tokenizer(FIXTURE)
    classnames, templates = ["cat", "dog", "a long class name"], ["a {c}.", "photo of {c}", "{c}!"]
    expected = zero_shot.clip_zero_shot_head(params, config, tokenizer, classnames, templates)
    calls = []

    def encode(ids):
        calls.append(ids.shape)
        return zero_shot.clip_text_encoder(params, config)(ids)

    head = zero_shot.zero_shot_head(padded_rows(encode, 8), tokenizer, classnames, templates,
                                    float(params["logit_scale"]), config.text.context_length)
    np.testing.assert_allclose(head, expected, rtol=1e-6, atol=1e-6)
    assert set(calls) == {(8, config.text.context_length)}


def test_markdown_table_with_published_numbers_and_missing_cells():
    run = {"tasks": ["cars", "dtd"], "methods": {
        "task_arithmetic": {"accuracy": {"cars": 0.5, "dtd": 0.25}},
        "individual": {"accuracy": {"cars": 1.0}}}}
    table = markdown_table([run], reference={"task_arithmetic": {"cars": 54.9, "mean": 69.1}},
                           task_labels={"cars": "Cars", "dtd": "DTD"}).splitlines()
    assert table[0] == "| Method | Cars | DTD | Avg. |"
    assert table[2] == "| Task arithmetic | 50.0 (54.9) | 25.0 | 37.5 (69.1) |"
    assert table[3] == "| Individual (fine-tuned) | 100.0 | – | – |"
    assert markdown_table([run], ["cars"]).splitlines()[3] == "| Individual (fine-tuned) | 100.0 | 100.0 |"


def test_command_line_errors(tmp_path):
    with pytest.raises(MergeError, match="individual"):
        cli.generalization(["--output", str(tmp_path), "--methods", "individual,task_arithmetic"])
    with pytest.raises(MergeError, match="TASK=PATH"):
        cli.table1(["--output", str(tmp_path), "--folder", "cars"])



def test_robustness_refuses_an_unknown_condition_before_loading_anything():
    config = ExperimentConfig("robustness", ("cars", "dtd"), ("cars", "dtd"))
    with pytest.raises(ValueError, match=r"unknown test conditions \['fog'\]"):
        run_robustness(config, ["clean", "fog"])


def test_flags_land_in_the_config(tmp_path):
    args = cli.parser("t", "L/14", METHODS).parse_args([
        "--output", str(tmp_path), "--preset", "fusionbench", "--steps", "7", "--accumulate", "fused",
        "--folder", "stanford-cars=/data/cars/test", "--file-list", "resisc45=/lists/resisc45-test.txt",
        "--methods", "ties,layer_wise_adamerging", "--devices", "2", "--offline", "--ties-total-size", "99"])
    config = cli.config_from_args(args, "t", ["cars", "resisc45"], ["cars", "resisc45", "dtd"])
    assert config.checkpoints.pretrained == "openai/clip-vit-large-patch14" and not config.checkpoints.allow_download
    assert config.data.folders == {"cars": "/data/cars/test"}
    assert config.data.file_lists == {"resisc45": "/lists/resisc45-test.txt"}
    ada = config.merge.adamerging
    assert (ada.steps, ada.accumulate, ada.clamp, ada.entropy_eps, ada.batches_per_task) == (7, "fused", None, 1e-8, 1)
    assert [s.name for s in config.merge.methods] == ["ties", "layer_wise_adamerging"]
    assert [s.params["total_size"] for s in config.merge.methods] == [99, 99]
    assert config.devices == 2 and config.checkpoint_runs


def test_task_vectors_data_location_serves_its_class_folder_tasks(tmp_path):
    """--task-vectors-data: EuroSAT's test split from task_vectors' EuroSAT_splits/test class folders."""
    split = tmp_path / "EuroSAT_splits" / "test"
    for c in range(10):
        (split / f"class{c}").mkdir(parents=True)
        Image.fromarray(np.full((4, 4, 3), c, np.uint8)).save(split / f"class{c}" / "0.png")
    source = task_test_set("eurosat", DataConfig(task_vectors_dir=str(tmp_path)))
    assert len(source) == 10 and [source[i][1] for i in range(10)] == list(range(10))
    (split / "class9" / "0.png").rename(split / "class8" / "1.png")
    (split / "class9").rmdir()
    with pytest.raises(ValueError, match="has 9 class folders, its head has 10 classes"):
        task_test_set("eurosat", DataConfig(task_vectors_dir=str(tmp_path)))



def test_generalization_refuses_per_task_methods_named_through_a_group(tmp_path):
    """A group (data_free) that holds per-task methods is expanded before the check, so they are named, not
    silently left without a result on the unseen tasks."""
    per_task = [n for n in registry.group_members("data_free") if registry.REGISTRY[n].per_task_models]
    assert per_task, "the data_free group has per-task methods (TALL masks, EMR)"
    with pytest.raises(MergeError, match=rf"^\['{per_task[0]}'.*have no model for the unseen tasks"):
        cli.generalization(["--methods", "task_arithmetic,data_free", "--output", str(tmp_path)])


def test_a_report_replaces_the_output_whole_and_keeps_the_resumable_state(tmp_path):
    """An earlier run's files and a killed write's temporary do not survive the commit; the AdaMerging state
    folders (``adamerging_state``, ``split*/``) do; files get the usual mode."""
    out = tmp_path / "out"
    (out / "adamerging_state" / "layer_wise_adamerging").mkdir(parents=True)
    (out / "split1" / "adamerging_state").mkdir(parents=True)
    (out / "split1" / "adamerging_state" / "step").write_text("resumable")
    (out / "table.md").write_text("earlier")
    (out / ".results.json.x1y2.tmp").write_text("{")
    cli.check_paper_output(out, [])  # the temporary is the run's own: not refused
    old_umask = os.umask(0o022)
    try:
        files = cli.commit_report(out, {"experiment": "table1"}, "| new |\n")
    finally:
        os.umask(old_umask)
    assert sorted(os.listdir(out)) == ["adamerging_state", "results.json", "split1", "table.md"]
    assert files == {"json": out / "results.json", "table": out / "table.md"}
    assert (out / "table.md").read_text() == "| new |\n"
    assert (out / "split1" / "adamerging_state" / "step").read_text() == "resumable"
    assert os.stat(out / "results.json").st_mode & 0o777 == 0o644
    assert sorted(os.listdir(tmp_path)) == ["out"]
