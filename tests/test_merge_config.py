"""The ``merge`` config schema and ``--dry-run``: every failure one line naming its culprit, before compute."""
import dataclasses
import os

import numpy as np
import pytest
import yaml
from PIL import Image

from adamerging_jax.cli import main
from adamerging_jax.merging.config import ConfigError, parse_config
from adamerging_jax.models import clip
from adamerging_jax.models.clip_checkpoint import load_hf_clip, save_hf_vision_model
from bad_inputs import Case, fill_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "clip", "ti8")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_config")
    config, params = load_hf_clip(FIXTURE)
    save_hf_vision_model(str(root / "finetuned"), params["vision"], config)
    other = clip.ClipConfig(vision=dataclasses.replace(config.vision, layers=config.vision.layers + 1))
    save_hf_vision_model(str(root / "other"), clip.init_params(other, __import__("jax").random.key(0))["vision"],
                         other)
    rng = np.random.default_rng(0)
    for folder in ["images", "broken"]:
        (root / folder).mkdir()
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / folder / "0.png")
    (root / "broken" / "1.png").write_bytes(b"not a png")
    (root / "empty").mkdir()
    (root / "locked").mkdir()
    return root


def document(world, **changes):
    task = {"name": "cats", "finetuned": str(world / "finetuned"), "classes": ["tabby", "siamese"],
            "unlabeled": {"folder": str(world / "images")}}
    task.update(changes.pop("task", {}))
    return {"pretrained": FIXTURE, "tasks": [task], "methods": ["layer_wise_adamerging"], "devices": 1, **changes}


CASES = [
    Case("missing_file", "a fine-tuned checkpoint that does not exist", {"task": {"finetuned": "{world}/nowhere"}},
         "nowhere"),
    Case("mismatched_shapes", "a fine-tuned tower with another layer count", {"task": {"finetuned": "{world}/other"}},
         "task 'cats' fine"),  # 'finetuned' or 'fine-tuned tower', both name the task
    Case("empty_folder", "an unlabeled folder without images", {"task": {"unlabeled": {"folder": "{world}/empty"}}},
         "holds no images"),
    Case("unreadable_image", "an image that does not decode", {"task": {"unlabeled": {"folder": "{world}/broken"}}},
         "1.png"),
    Case("unknown_method", "a method the registry does not know", {"methods": ["adamergin"]}, "'adamergin'"),
    Case("bad_parameter", "TIES with density 2", {"methods": [{"name": "ties", "density": 2.0}]}, "'density'"),
    Case("unwritable_output", "an output inside a read-only folder", {"output": "{world}/locked/out"},
         "not writable"),
    Case("unknown_key", "a misspelt top-level key", {"method": ["ties"]}, "'method'"),
    Case("template", "a template without {}", {"task": {"templates": ["a photo"]}}, "tasks[0].templates[0]"),
    Case("too_many_devices", "more devices than the machine has", {"devices": 99}, "asks for 99 devices"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_dry_run_names_the_culprit_in_one_line(case, world, tmp_path):
    changes = fill_world(case.expected, world)
    output = changes.pop("output", str(tmp_path / "out"))
    if case.id == "unwritable_output":
        os.chmod(world / "locked", 0o500)
        if os.access(world / "locked", os.W_OK):  # root writes anyway: no one can make a folder under a file
            (world / "a_file").write_text("not a folder")
            output = str(world / "a_file" / "out")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document(world, **changes)))
    try:
        with pytest.raises(SystemExit) as error:
            main(["merge", str(path), "--output", output, "--dry-run"])
    finally:
        os.chmod(world / "locked", 0o700)
    message = str(error.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert case.fragment in message, message
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_plan_with_the_lambda_count(world, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document(world)))
    assert main(["merge", str(path), "--output", str(tmp_path / "out"), "--dry-run"]) == 0
    layers = load_hf_clip(FIXTURE)[0].vision.layers
    assert f"{7 + 16 * layers} λ per task" in capsys.readouterr().out  # 199 on ViT-B/32 (12 layers)
    assert not (tmp_path / "out").exists()


def test_example_config_is_valid():
    path = os.path.join(ROOT, "examples", "merge.yaml")
    with open(path, encoding="utf-8") as file:
        config = parse_config(yaml.safe_load(file), path, os.path.dirname(path))
    assert [task.name for task in config.tasks] == ["cars", "dtd"]
    assert config.exported == "layer_wise_adamerging" and config.settings().adamerging.steps == 500
    assert config.tasks[0].templates == ("a photo of a {}, a type of car.",)


def test_a_data_free_method_needs_no_images_and_adaptive_ones_do(world):
    bare = document(world)
    del bare["tasks"][0]["unlabeled"]
    parse_config({**bare, "methods": ["ties"]})
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.unlabeled is required"):
        parse_config(bare)
