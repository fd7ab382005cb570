"""Data-free CLIP merges streamed tensor by tensor from disk (``adamerging-jax merge`` with no test folders and no
``--weights``, on the tiny CLIP towers of test_merge_command): the export equals the in-memory run's of the same
config file for file, ``model.safetensors`` byte for byte. The streamed merge calls the registry method as the
in-memory run does, on τ laid out as in the model's tree (`merging.streaming.merge_program`), so the arithmetic
is the same and so is every bit, for the SVD methods too. The in-memory run of the same config is forced by
`merging.clip_run.streamable` answering no for every checkpoint, as it does for an open_clip or lone
``.safetensors`` file.
"""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file
from test_merge_command import FIXTURE, merge, world, write_config  # noqa: F401 (world: the fixture)

from adamerging_jax.cli import main
from adamerging_jax.merging import clip_run
from adamerging_jax.models.safetensors_stream import CheckpointFiles

pytestmark = pytest.mark.slow

STREAMED = "(streamed tensor by tensor from disk, nothing loaded)"
TEXT = ["text_model.embeddings.token_embedding.weight", "text_projection.weight", "logit_scale"]


def tensors(folder):
    files = CheckpointFiles(folder)
    return {name: files.read(name) for name in files.names}


def files_of(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("method, export, passes", [
    ("task_arithmetic", "vision_with_projection", 1),
    ({"name": "ties", "density": 0.2}, "clip", (3, 4)),  # thresholds (1-2 passes), majority sign, merge
    ("tsv_m", "vision_with_projection", 1),
    ("iso_cts", "vision_with_projection", 1),
    ({"name": "wudi", "solver": "exact"}, "vision_with_projection", 1),
    ("magmax", "vision_with_projection", 1),
], ids=["task_arithmetic", "ties", "tsv_m", "iso_cts", "wudi_exact", "magmax"])
def test_the_streamed_export_is_the_in_memory_one_byte_for_byte(world, monkeypatch, capsys, method, export, passes):
    name = method if isinstance(method, str) else method["name"]
    config = write_config(world, f"stream_{name}", [method], unlabeled=False, tests=False, export=export)
    streamed, in_memory = world / f"streamed_{name}", world / f"in_memory_{name}"
    merge(config, "--output", streamed)
    log = capsys.readouterr().out
    assert f"export: {name} as {export} to {streamed / 'model'} {STREAMED}" in log
    assert f"[merge] wrote {streamed / 'model'} ({name}, streamed in " in log
    monkeypatch.setattr(clip_run, "streamable", lambda location: False)
    merge(config, "--output", in_memory)
    assert "(built in memory)" in capsys.readouterr().out

    assert sorted(os.listdir(streamed)) == sorted(os.listdir(in_memory)) == ["model", "results.json", "table.md"]
    ours, theirs = files_of(streamed / "model"), files_of(in_memory / "model")
    assert list(ours) == list(theirs)
    for file in theirs:
        assert ours[file] == theirs[file], file
    result = json.loads((streamed / "results.json").read_text())
    assert result["streamed"]["passes"] in np.atleast_1d(passes) and "streamed" not in json.loads(
        (in_memory / "results.json").read_text())
    merged, pretrained = tensors(streamed / "model"), tensors(FIXTURE)
    kept = sorted(tensor for tensor in merged if not tensor.startswith("vision_model."))
    if export == "clip":  # the pretrained CLIP's text tower, projections and logit scale
        assert kept == sorted(tensor for tensor in pretrained if not tensor.startswith("vision_model."))
        assert set(TEXT) <= set(kept)
    else:
        assert kept == ["visual_projection.weight"]
    for tensor in kept:
        np.testing.assert_array_equal(merged[tensor], pretrained[tensor], err_msg=tensor)
    vision = [tensor for tensor in merged if tensor.startswith("vision_model.")]
    assert len(vision) == 39 and sum(not np.array_equal(merged[t], pretrained[t]) for t in vision) > 30


def with_altered_tower(world, tmp_path, method, task, change):
    """A streamed config whose task ``task`` reads a copy of its fine-tuned tower with ``change(tensors)``
    applied."""
    tower = tensors(world / "finetuned" / task)
    change(tower)
    folder = tmp_path / f"{task}_altered"
    folder.mkdir()
    save_file(tower, str(folder / "model.safetensors"), {"format": "pt"})
    (folder / "config.json").write_bytes((world / "finetuned" / task / "config.json").read_bytes())
    config = write_config(world, f"altered_{task}", [method], unlabeled=False, tests=False)
    config.write_text(config.read_text().replace(str(world / "finetuned" / task), str(folder)))
    return config, folder


def error_line(*argv):
    with pytest.raises(SystemExit) as error:
        main(["merge", *map(str, argv)])
    message = str(error.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_a_nan_in_a_fine_tuned_tower_is_named_and_nothing_is_exported(world, tmp_path):
    tensor = "vision_model.encoder.layers.1.mlp.fc2.weight"
    config, folder = with_altered_tower(world, tmp_path, "task_arithmetic", "cats",
                                        lambda tower: tower[tensor].__setitem__((3, 4), np.nan))
    out = tmp_path / "out"
    message = error_line(config, "--output", out)
    assert f"task 'cats' fine-tuned tower {folder}: tensor {tensor!r} holds NaN or inf values" in message
    assert not (out / "model").exists()


def test_a_missing_tensor_is_named_by_the_dry_run(world, tmp_path):
    tensor = "vision_model.encoder.layers.0.self_attn.k_proj.bias"
    config, folder = with_altered_tower(world, tmp_path, "tsv_m", "cars", lambda tower: tower.pop(tensor))
    message = error_line(config, "--output", tmp_path / "out", "--dry-run")
    assert f"task 'cars' fine-tuned tower: cannot load {str(folder)!r}" in message
    assert f"tensor {tensor!r} is missing" in message


@pytest.mark.parametrize("change", ["tests", "lone_file", "data"])
def test_what_does_not_stream_is_built_in_memory(world, tmp_path, capsys, change):
    """Test folders (scored on the merged model), a checkpoint given as a lone file, or a method that learns
    from data keep the run in memory."""
    methods = ["layer_wise_adamerging"] if change == "data" else ["task_arithmetic"]
    config = write_config(world, f"memory_{change}", methods, unlabeled=change == "data", tests=change == "tests")
    if change == "lone_file":
        folder = world / "finetuned" / "cats"
        config.write_text(config.read_text().replace(str(folder), str(folder / "model.safetensors")))
    assert main(["merge", str(config), "--output", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "(built in memory)" in out and STREAMED not in out
