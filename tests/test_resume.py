"""Resume you can trust: an unusable newest checkpoint falls back to the previous one, and a checkpoint
written by another run (other batch size, data, task vectors, granularity, optimiser) is refused, naming
what differs.

The interrupted run: 12 steps, a checkpoint every 4, stopped by its batch source at step 10 (checkpoints at
steps 4 and 8 on disk). Each test damages a copy of its checkpoint directory and resumes.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import pytest

import adamerging_jax as am
from adamerging_jax.core.checkpoint import CorruptCheckpointError
from tiny_problem import batch_source

FAST = dict(lr=0.02, batches_per_task=1, quiet=True)
STEPS, EVERY, CRASH_AT = 12, 4, 10


def config(directory, **overrides):
    return am.AdaMergingConfig(**{**FAST, "steps": STEPS, **overrides}, checkpoint_every=EVERY, checkpoint_dir=str(directory))


@pytest.fixture(scope="module")
def interrupted(problem, tv, tmp_path_factory):
    """The checkpoint directory of a run stopped at step 10 (checkpoints 4 and 8)."""
    directory = tmp_path_factory.mktemp("interrupted") / "run"
    source = batch_source(problem)

    def crashing(step):
        if step == CRASH_AT:
            raise RuntimeError("simulated crash")
        return source(step)

    with pytest.raises(RuntimeError, match="simulated crash"):
        am.adamerging(problem.apply, problem.pretrained, tv, crashing, config(directory))
    assert sorted(p.name for p in directory.iterdir() if p.name.isdigit()) == ["4", "8"]
    return directory


@pytest.fixture(scope="module")
def straight(problem, tv):
    """The uninterrupted run without checkpoints."""
    return am.adamerging(problem.apply, problem.pretrained, tv, batch_source(problem), am.AdaMergingConfig(**FAST, steps=STEPS))


@pytest.fixture
def copy(interrupted, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(interrupted, target)
    return target


def array_files(step_folder: Path) -> list[Path]:
    """The data files of the step's saved arrays (λ and Adam's moments: orbax's OCDBT chunks in `d/` folders)."""
    files = [p for p in (step_folder / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no array data files under {step_folder}"
    return files


def flip_byte(*paths: Path) -> None:
    for path in paths:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


def truncate(*paths: Path) -> None:
    for path in paths:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty_newer_step(directory: Path) -> None:
    shutil.rmtree(directory / "8")
    (directory / "8").mkdir()


def missing_metadata(directory: Path) -> None:
    shutil.rmtree(directory / "8" / "metadata")


DAMAGE = {
    "byte_flipped_arrays": (lambda d: flip_byte(*array_files(d / "8")), "arrays"),
    "byte_flipped_metadata": (lambda d: flip_byte(d / "8" / "metadata" / "metadata"), "metadata"),
    "truncated_arrays": (lambda d: truncate(*array_files(d / "8")), "arrays"),
    "empty_step_folder": (empty_newer_step, "the step folder is empty"),
    "missing_files": (missing_metadata, "metadata cannot be read"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_unusable_newest_checkpoint_falls_back_and_ends_bit_identical(problem, tv, straight, copy, damage):
    spoil, reason = DAMAGE[damage]
    spoil(copy)
    with pytest.warns(UserWarning, match=rf"checkpoint step 8 in .* is unusable \(.*{reason}.*\); moved to corrupt_step_8, resuming from step 4"):
        resumed = am.adamerging(problem.apply, problem.pretrained, tv, batch_source(problem), config(copy))
    for group, value in straight.coefficients.values.items():
        assert np.array_equal(np.asarray(resumed.coefficients.values[group]), np.asarray(value)), group
    assert np.array_equal(resumed.history["loss"], straight.history["loss"])
    # The set-aside step did not block later saves: the run checkpointed steps 8 and 12 again.
    assert sorted(p.name for p in copy.iterdir() if p.name.isdigit()) == ["12", "8"]
    assert (copy / "corrupt_step_8").is_dir()


def test_no_usable_checkpoint_is_one_line_and_leaves_the_directory(problem, tv, copy):
    flip_byte(*array_files(copy / "8"))
    empty_newer_step_4 = copy / "4"
    shutil.rmtree(empty_newer_step_4)
    empty_newer_step_4.mkdir()
    with pytest.raises(CorruptCheckpointError) as error:
        am.adamerging(problem.apply, problem.pretrained, tv, batch_source(problem), config(copy))
    message = str(error.value)
    assert "\n" not in message
    assert "no usable checkpoint in" in message and "step 8: its arrays" in message
    assert "step 4: the step folder is empty" in message and "to start afresh, delete it or use another checkpoint_dir" in message
    assert sorted(p.name for p in copy.iterdir()) == ["4", "8"]


CHANGES = {
    "batch_size": (lambda p, tv, d: (config(d, batch_size=8), batch_source(p, batch=8), tv),
                   ["batch_size 16 → 8", "the data differ"]),
    "data": (lambda p, tv, d: (config(d), batch_source(p, seed=1), tv), ["the data differ"]),
    "task_vectors": (lambda p, tv, d: (config(d), batch_source(p), jax.tree_util.tree_map(lambda x: x * 1.01, tv)),
                     ["the task vectors differ"]),
    "granularity": (lambda p, tv, d: (config(d, granularity="task"), batch_source(p), tv),
                    ["granularity 'layer' → 'task'", "the coefficient layout differs"]),
    "learning_rate": (lambda p, tv, d: (config(d, lr=0.05), batch_source(p), tv), ["lr 0.02 → 0.05"]),
    "optimizer": (lambda p, tv, d: (config(d, optimizer=optax.sgd(0.02)), batch_source(p), tv),
                  ["optimizer None → 'custom (initial state"]),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_checkpoint_of_another_run_is_refused_naming_the_difference(problem, tv, copy, change):
    make, fragments = CHANGES[change]
    cfg, source, vectors = make(problem, tv, copy)
    with pytest.raises(ValueError, match="checkpoint step 8 in .* was written by another run: ") as error:
        am.adamerging(problem.apply, problem.pretrained, vectors, source, cfg)
    assert_refused_naming(str(error.value), copy, fragments)


def assert_refused_naming(message: str, folder: Any, fragments: list[str]) -> None:
    """A resume refused for a checkpoint of another run: one line that names each of `fragments` and nothing
    else, and ends with how to start afresh. Shared by every resumable method's tests."""
    assert "\n" not in message and message.endswith(f"to start afresh, use another checkpoint_dir or delete {folder}")
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    differences = message.split("another run: ")[1].split("; to start afresh")[0].split("; ")
    assert len(differences) == len(fragments), message  # nothing else is blamed


def test_resume_free_fields_may_change(problem, tv, straight, copy):
    """More steps to go, another checkpoint interval, quiet or not: the same run, resumed."""
    cfg = am.AdaMergingConfig(**{**FAST, "steps": STEPS, "quiet": False}, checkpoint_every=5, checkpoint_dir=str(copy))
    resumed = am.adamerging(problem.apply, problem.pretrained, tv, batch_source(problem), cfg)
    for group, value in straight.coefficients.values.items():
        assert np.array_equal(np.asarray(resumed.coefficients.values[group]), np.asarray(value)), group


def test_arrays_that_read_back_other_than_saved_are_caught(problem, tv, straight, copy):
    """Arrays that orbax reads without error but that differ from what was saved (here: the saved digest of
    step 8 replaced by another state's, the record's own digest recomputed) are unusable too."""
    import json

    from adamerging_jax.core.checkpoint import _json_digest

    path = copy / "8" / "metadata" / "metadata"
    record = json.loads(path.read_text())
    record.pop("sha256")
    record["state_sha256"] = "0" * 64
    record["sha256"] = _json_digest(record)
    path.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match=r"step 8 .* unusable \(its arrays do not match the digest saved with them\)"):
        resumed = am.adamerging(problem.apply, problem.pretrained, tv, batch_source(problem), config(copy))
    for group, value in straight.coefficients.values.items():
        assert np.array_equal(np.asarray(resumed.coefficients.values[group]), np.asarray(value)), group
