"""The ``merge`` config schema and ``--dry-run``: every failure one line naming its culprit, before compute."""
import contextlib
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.numpy import load_file, save_file

from adamerging_jax.cli import main
from adamerging_jax.merging.config import ConfigError, parse_config
from adamerging_jax.models import clip
from adamerging_jax.models.clip_checkpoint import (
    coefficient_tensor_names,
    load_hf_clip,
    official_coefficient_rows,
    save_hf_vision_model,
)
from adamerging_jax.output import output_lock
from bad_inputs import Case, assert_no_traceback, fill_world
from test_torch_file import write_zip

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
    shutil.copytree(root / "images", root / "linked")
    (root / "linked" / "1.png").symlink_to(root / "gone.png")
    write_strict_input_files(root, config, params)
    return root


TWICE_YAML = """pretrained: {fixture}
devices: 1
methods: [layer_wise_adamerging]
tasks:
  - name: cats
    finetuned: {world}/finetuned
    classes: [tabby, siamese]
    unlabeled: {{folder: {world}/images}}
    classes: [persian, sphynx]
"""


def write_strict_input_files(root, config, params):
    """Files for the strict-input rows: YAML and class files that are not UTF-8 or repeat a key or class, λ
    files with NaN or an absurd value, an official λ file with a trained text-side row, a fine-tuned tower
    with a layer config.json does not have and one whose weights overflow any merge with λ of a few hundred."""
    twice = TWICE_YAML.format(fixture=FIXTURE, world=root)
    (root / "twice.yaml").write_text(twice)
    once = twice.replace("    classes: [persian, sphynx]\n", "")
    (root / "latin1.yaml").write_bytes("# caf\u00e9\n".encode("latin-1") + once.encode())
    (root / "classes_latin1.txt").write_bytes("tabby\nsiam\u00e9se\n".encode("latin-1"))
    (root / "classes_twice.txt").write_text("tabby\nsiamese\n\ntabby\n")
    order = coefficient_tensor_names(config).order
    (root / "nan.json").write_text(json.dumps({name: [0.3] for name in order}).replace(
        f'"{order[4]}": [0.3]', f'"{order[4]}": [NaN]'))
    (root / "absurd.json").write_text(json.dumps({**{name: [0.3] for name in order}, order[9]: [5000.0]}))
    (root / "overflow.json").write_text(json.dumps({name: [900.0] for name in order}))
    rows = official_coefficient_rows(config).names
    official = np.array([[1.0, 0.3]] * len(rows), np.float32)
    official[rows.index("model.logit_scale"), 1] = 0.25
    np.save(root / "official_trained_text.npy", official)
    shutil.copytree(root / "finetuned", root / "extra_layer")
    state = load_file(str(root / "finetuned" / "model.safetensors"))
    prefix = "vision_model.encoder.layers."
    state.update({name.replace(f"{prefix}1.", f"{prefix}2."): value for name, value in list(state.items())
                  if name.startswith(f"{prefix}1.")})
    save_file(state, str(root / "extra_layer" / "model.safetensors"))
    huge = __import__("jax").tree_util.tree_map(lambda a: np.sign(a) * 1e36 + a, params["vision"])
    save_hf_vision_model(str(root / "huge"), huge, config)
    write_output_placement_files(root)


def write_output_placement_files(root):
    """A symbolic link to the unlabeled folder, a user's folder with a file of its own, and a λ ``.pt`` whose
    pickle would call ``eval`` when unpickled by torch."""
    (root / "images_link").symlink_to(root / "images")
    (root / "user_folder").mkdir()
    (root / "user_folder" / "notes.txt").write_text("mine")
    write_zip(root / "evil.pt", b"\x80\x02cbuiltins\neval\nX\x07\x00\x00\x001 + 1 #\x85R.", {})


def document(world, **changes):
    task = {"name": "cats", "finetuned": str(world / "finetuned"), "classes": ["tabby", "siamese"],
            "unlabeled": {"folder": str(world / "images")}}
    task.update(changes.pop("task", {}))
    task = {key: value for key, value in task.items() if value is not None}
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
    Case("surgery_hidden_zero", "Surgery with hidden_dim 0", {"methods": [{"name": "surgery", "hidden_dim": 0}]},
         "method 'surgery': parameter 'hidden_dim' must be ≥ 1, got 0"),
    Case("surgery_base_itself", "Surgery as its own base", {"methods": [{"name": "surgery", "base": "surgery"}]},
         "method 'surgery': parameter 'base': 'surgery' builds no single merged model"),
    Case("surgery_base_per_task", "Surgery on a per-task base (individual)",
         {"methods": [{"name": "surgery", "base": "individual"}]},
         "method 'surgery': parameter 'base': 'individual' builds no single merged model"),
    Case("surgery_base_unknown", "Surgery on a base the registry does not know",
         {"methods": [{"name": "surgery", "base": "adamergin"}]}, "parameter 'base': unknown merge method 'adamergin'"),
    Case("held_out_no_test", "adaptation: held_out on a task without a test folder",
         {"adaptation": "held_out", "task": {"unlabeled": None}}, "tasks[0].test is required: adaptation: held_out"),
    Case("held_out_with_unlabeled", "adaptation: held_out beside an unlabeled folder it would not read",
         {"adaptation": "held_out", "task": {"test": "{world}/images"}}, "tasks[0].unlabeled is not read"),
    Case("held_out_fraction", "held_out_fraction 1.5", {"adaptation": "held_out", "held_out_fraction": 1.5},
         "held_out_fraction must be a number in (0, 1), got 1.5"),
    Case("adaptation_unknown", "an adaptation that is neither transductive nor held_out", {"adaptation": "inductive"},
         "adaptation must be one of ['transductive', 'held_out'], got 'inductive'"),
    Case("unwritable_output", "an output inside a read-only folder", {"output": "{world}/locked/out"},
         "not writable"),
    Case("unknown_key", "a misspelt top-level key", {"method": ["ties"]}, "'method'"),
    Case("adamerging_granularity", "adamerging: {granularity: task} (the method fixes it)",
         {"adamerging": {"granularity": "task"}, "methods": ["layer_wise_adamerging"]},
         "adamerging.granularity: the method fixes the granularity of λ (methods ['layer_wise_adamerging'])"),
    Case("template", "a template without {}", {"task": {"templates": ["a photo"]}}, "tasks[0].templates[0]"),
    Case("too_many_devices", "more devices than the machine has", {"devices": 99}, "asks for 99 devices"),
    Case("yaml_duplicate_key", "a YAML config giving one key twice in a task", {"config_file": "{world}/twice.yaml"},
         "key 'classes' is given twice in one mapping, on lines 7 and 9"),
    Case("yaml_not_utf8", "a YAML config in Latin-1, not UTF-8", {"config_file": "{world}/latin1.yaml"},
         "latin1.yaml: not UTF-8 text: byte 0xe9 at byte offset 5"),
    Case("duplicate_class", "a class listed twice in one task", {"task": {"classes": ["tabby", "siamese", "tabby"]}},
         "tasks[0].classes[2]: class 'tabby' is listed twice in the task (first at"),
    Case("invisible_class", "a class name of zero-width characters only",
         {"task": {"classes": ["tabby", "\u200b\u200c"]}},
         "tasks[0].classes[1]: class name '\\u200b\\u200c' has no visible character"),
    Case("classes_file_twice", "a class file naming one class twice",
         {"task": {"classes": None, "classes_file": "{world}/classes_twice.txt"}},
         "line 4: class 'tabby' is listed twice"),
    Case("classes_file_not_utf8", "a class file in Latin-1, not UTF-8",
         {"task": {"classes": None, "classes_file": "{world}/classes_latin1.txt"}},
         "classes_latin1.txt: not UTF-8 text: byte 0xe9 at byte offset 10"),
    Case("unlabeled_broken_link", "an unlabeled folder holding a broken symbolic link",
         {"task": {"unlabeled": {"folder": "{world}/linked"}}}, "1.png' is a broken symbolic link"),
    Case("finetuned_extra_layer", "a fine-tuned tower with tensors of a layer config.json does not have",
         {"task": {"finetuned": "{world}/extra_layer"}},
         "'vision_model.encoder.layers.2.layer_norm1.bias' is in layer 2"),
    Case("clamp_reversed", "AdaMerging clamp bounds with lo > hi", {"adamerging": {"clamp": [1.0, 0.0]}},
         "AdaMergingConfig.clamp must have lo < hi, got (1.0, 0.0)"),
    Case("weights_nan", "--weights λ with a NaN", {"weights": "{world}/nan.json"},
         "λ of task 'cats' is nan"),
    Case("weights_absurd", "--weights |λ| = 5000 under the FusionBench preset (no clamp)",
         {"weights": "{world}/absurd.json", "preset": "fusionbench"}, "λ of task 'cats' is 5000.0, beyond ±1000"),
    Case("weights_official_trained_text", "--weights in the official open_clip order with a trained text-side row",
         {"weights": "{world}/official_trained_text.npy"},
         "row 'model.logit_scale', which the official code never trains, holds [0.25]"),
    Case("export_overflow", "a real run whose merge overflows float32 (λ 900 on weights of 1e36): nothing exported",
         {"task": {"finetuned": "{world}/huge"}, "weights": "{world}/overflow.json", "preset": "fusionbench",
          "real_run": True}, "the merged model's tensor 'vision_model.embeddings.class_embedding' holds"),
    Case("output_is_unlabeled", "--output is a task's unlabeled folder (plots would become training images)",
         {"output": "{world}/images"}, "/images) is the tasks[0].unlabeled.folder folder"),
    Case("output_inside_finetuned", "--output inside a fine-tuned checkpoint's folder",
         {"output": "{world}/finetuned/merged"}, "/finetuned/merged) is inside the tasks[0].finetuned folder"),
    Case("output_through_link", "--output inside the unlabeled folder through a symbolic link (resolved)",
         {"output": "{world}/images_link/plots"}, "/images/plots) is inside the tasks[0].unlabeled.folder folder"),
    Case("input_inside_output", "an input folder inside --output (a run replaces the output folder)",
         {"output": "{world}"}, "/finetuned) is inside --output"),
    Case("output_foreign_files", "--output an existing folder holding a file no run writes",
         {"output": "{world}/user_folder"}, "holds files a run does not write: ['notes.txt']"),
    Case("weights_pickle_code", "--weights a .pt whose pickle would run code (builtins.eval)",
         {"weights": "{world}/evil.pt"}, "builtins.eval"),
    Case("output_locked", "a real run into an --output another live run holds: refused before loading anything",
         {"held_lock": True, "real_run": True}, "is being written by another run (pid"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_dry_run_names_the_culprit_in_one_line(case, world, tmp_path, capfd):
    """Each row: the config (``config_file``, or the document with the row's changes), ``--weights`` when
    given, a dry run (a real run for ``real_run``); one ``error:`` line naming the culprit, no model written."""
    changes = fill_world(case.expected, world)
    output = changes.pop("output", str(tmp_path / "out"))
    config_file, weights = changes.pop("config_file", None), changes.pop("weights", None)
    run = [] if changes.pop("real_run", False) else ["--dry-run"]
    held = output_lock(output) if changes.pop("held_lock", False) else contextlib.nullcontext()
    if case.id == "unwritable_output":
        os.chmod(world / "locked", 0o500)
        if os.access(world / "locked", os.W_OK):  # root writes anyway: no one can make a folder under a file
            (world / "a_file").write_text("not a folder")
            output = str(world / "a_file" / "out")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document(world, **changes)))
    try:
        with held, pytest.raises(SystemExit) as error:
            main(["merge", config_file or str(path), "--output", output, *run,
                  *(["--weights", weights] if weights else [])])
    finally:
        os.chmod(world / "locked", 0o700)
    message = str(error.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert case.fragment in message, message
    assert not (tmp_path / "out" / "model").exists() and (run == [] or not (tmp_path / "out").exists())
    assert_no_traceback(capfd)


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
