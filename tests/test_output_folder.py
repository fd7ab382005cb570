"""The output folder of ``merge`` and ``demo``: one run at a time (a lock naming its holder, a stale one taken
over), committed whole (a SIGKILL anywhere in the export window leaves the previous result or the new one,
nothing of an earlier run beside the new files, usual file modes), and the helpers of
``adamerging_jax.output`` on their own.

The real runs are ``adamerging-jax merge`` processes on the tiny CLIP fixture (Ti/8, 32 px) applying given
λ (``--weights``) with layer-wise AdaMerging: no training, so each process is short; the model found
afterwards is rebuilt from the ``lambdas.json`` beside it, θ0 + Σ_k λ_k τ_k, tensor by tensor.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.numpy import load_file

from adamerging_jax import output as out_folder
from adamerging_jax.models import clip
from adamerging_jax.models.clip_checkpoint import coefficient_tensor_names, load_hf_clip, save_hf_vision_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "clip" / "ti8"
TASKS = {"cats": ["tabby", "siamese"], "cars": ["sedan", "truck"]}


# ----------------------------------------------------------------------------------------- the helpers


def test_a_commit_replaces_the_whole_folder_and_keeps_state(tmp_path):
    output = tmp_path / "out"
    with out_folder.staged_output(output) as stage:
        (stage / "lambdas.json").write_text("{}")
        (stage / "model").mkdir()
        (stage / "model" / "model.safetensors").write_bytes(b"old")
    (output / "state" / "m").mkdir(parents=True)
    (output / "state" / "m" / "step").write_text("resumable")
    old_umask = os.umask(0o022)
    try:
        with out_folder.staged_output(output) as stage:
            (stage / "model").mkdir(mode=0o700)
            (stage / "model" / "model.safetensors").write_bytes(b"new")
            os.chmod(stage / "model" / "model.safetensors", 0o600)
    finally:
        os.umask(old_umask)
    assert sorted(os.listdir(output)) == ["model", "state"]  # the old λ file did not survive
    assert (output / "model" / "model.safetensors").read_bytes() == b"new"
    assert (output / "state" / "m" / "step").read_text() == "resumable"
    assert os.stat(output / "model" / "model.safetensors").st_mode & 0o777 == 0o644
    assert os.stat(output / "model").st_mode & 0o777 == 0o755
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_a_failed_build_or_swap_keeps_the_previous_output(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(out_folder, "_exchange", lambda a, b: False)
    output = tmp_path / "out"
    with out_folder.staged_output(output) as stage:
        (stage / "table.md").write_text("previous")
    with pytest.raises(RuntimeError):
        with out_folder.staged_output(output) as stage:
            (stage / "table.md").write_text("half")
            raise RuntimeError("stopped")
    assert (output / "table.md").read_text() == "previous" and os.listdir(tmp_path) == ["out"]
    with out_folder.staged_output(output) as stage:
        (stage / "table.md").write_text("next")
    assert (output / "table.md").read_text() == "next" and os.listdir(tmp_path) == ["out"]


def test_a_killed_writes_temporaries_inside_the_output_are_its_own_and_other_files_are_refused(tmp_path):
    output = tmp_path / "out"
    (output / ".model.0123abcd.tmp").mkdir(parents=True)
    (output / ".lambdas.json.x8k2.tmp").write_text("{")
    (output / ".model.4567.old").mkdir()
    out_folder.check_output_contents(output)
    (output / ".notes.tmp").write_text("mine")
    with pytest.raises(ValueError, match=r"\['.notes.tmp'\]"):
        out_folder.check_output_contents(output)


def test_recovery_restores_an_output_renamed_aside_and_its_state(tmp_path):
    output = tmp_path / "out"
    (tmp_path / ".out.old-1-a" / "state").mkdir(parents=True)
    (tmp_path / ".out.old-1-a" / "table.md").write_text("previous")
    (tmp_path / ".out.new-1-b").mkdir()
    out_folder.recover_output(output, log=lambda _: None)
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(output)) == ["state", "table.md"]
    (tmp_path / ".out.new-2-c" / "state").mkdir(parents=True)  # killed after an exchange, before the carry
    (tmp_path / ".out.new-2-c" / "state" / "s").write_text("kept")
    (output / "state").rmdir()
    out_folder.recover_output(output, log=lambda _: None)
    assert (output / "state" / "s").read_text() == "kept" and os.listdir(tmp_path) == ["out"]


def test_a_lock_is_refused_while_held_and_released_after(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom adamerging_jax.output import output_lock\n"
         "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)", str(tmp_path / "out")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(out_folder.OutputBusyError, match=f"pid {holder.pid} on host {socket.gethostname()}"):
            with out_folder.output_lock(tmp_path / "out"):
                pass
    finally:
        holder.kill()
        holder.wait()
    lines = []
    with out_folder.output_lock(tmp_path / "out", log=lines.append):
        assert json.loads((tmp_path / ".out.lock").read_text())["pid"] == os.getpid()
    assert f"pid {holder.pid}" in lines[0] and "no longer running" in lines[0]
    assert not (tmp_path / ".out.lock").exists()


def test_a_lock_held_by_a_leftover_of_a_dead_run_is_taken_over(tmp_path):
    """A child of a killed run may still hold the lock's file open; the recorded pid is gone, so it is stale."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, sys.argv[2].encode())\nprint('held', flush=True)\n"
         "time.sleep(60)", str(tmp_path / ".out.lock"),
         json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"})],
        stdout=subprocess.PIPE, text=True)
    try:
        assert leftover.stdout.readline().strip() == "held"
        lines = []
        with out_folder.output_lock(tmp_path / "out", log=lines.append):
            assert json.loads((tmp_path / ".out.lock").read_text())["pid"] == os.getpid()
        assert f"pid {dead.pid}" in lines[0]
    finally:
        leftover.kill()
        leftover.wait()


# ------------------------------------------------------------------------------------- real merge runs


def image(rng):
    return rng.integers(0, 255, (24, 28, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Fine-tuned towers, unlabeled folders, a config and two λ files (A and B) of random values in (0, 1)."""
    root = tmp_path_factory.mktemp("output_folder")
    config, params = load_hf_clip(str(FIXTURE))
    rng = np.random.default_rng(0)
    tasks = []
    for task, classes in TASKS.items():
        tower = jax.tree_util.tree_map(
            lambda a: np.asarray(a) + 0.5 * np.std(a) * rng.standard_normal(np.shape(a)).astype(np.float32),
            params["vision"])
        save_hf_vision_model(str(root / "finetuned" / task), tower, config)
        (root / "unlabeled" / task).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(image(rng)).save(root / "unlabeled" / task / f"{i}.png")
        tasks.append({"name": task, "finetuned": str(root / "finetuned" / task), "classes": classes,
                      "unlabeled": {"folder": str(root / "unlabeled" / task)}})
    document = {"pretrained": str(FIXTURE), "tasks": tasks, "methods": ["layer_wise_adamerging"],
                "preset": "official", "devices": 1, "adamerging": {"batch_size": 2, "batches_per_task": 1}}
    (root / "merge.yaml").write_text(yaml.safe_dump(document))
    order = coefficient_tensor_names(clip.get_config("Ti/8")).order
    for name in ("a", "b"):
        values = {tensor: [round(float(v), 6) for v in rng.uniform(0.05, 0.95, len(TASKS))] for tensor in order}
        (root / f"lambdas_{name}.json").write_text(json.dumps(values))
    return root


def merge_command(world, output, weights):
    env = {**os.environ, "ADAMERGING_JAX_CACHE": str(world / "cache"), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    argv = [sys.executable, "-m", "adamerging_jax.cli", "merge", str(world / "merge.yaml"), "--output", str(output),
            "--weights", str(world / f"lambdas_{weights}.json")]
    return argv, env


def start_merge(world, output, weights):
    argv, env = merge_command(world, output, weights)
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_merge(world, output, weights):
    argv, env = merge_command(world, output, weights)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def tensors(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def same_lambdas(given, found):
    """λ equal as float32 (how they are stored)."""
    return sorted(given) == sorted(found) and all(
        np.array_equal(np.float32(given[name]), np.float32(found[name])) for name in given)


def which_result(world, output):
    """'a' or 'b': the λ file found in ``output``, after checking that ``model/`` is θ0 + Σ_k λ_k τ_k at
    those λ, tensor by tensor, and that the folder holds one complete result."""
    present = set(os.listdir(output))
    assert {"lambdas.json", "lambdas.safetensors", "model", "results.json", "table.md"} <= present, present
    assert not present - {"lambdas.json", "lambdas.safetensors", "model", "results.json", "table.md", "state"} - {
        name for name in present if name.endswith(".png")}, present
    found = json.loads((output / "lambdas.json").read_text())
    names = [name for name in ("a", "b")
             if same_lambdas(json.loads((world / f"lambdas_{name}.json").read_text()), found)]
    assert len(names) == 1, "lambdas.json is neither run's λ"
    merged, theta0 = tensors(output / "model"), tensors(FIXTURE)
    finetuned = [tensors(world / "finetuned" / task) for task in TASKS]
    for tensor, lam in found.items():
        rebuilt = theta0[tensor] + sum(np.float32(l) * (ft[tensor] - theta0[tensor]) for l, ft in zip(lam, finetuned))
        np.testing.assert_allclose(merged[tensor], rebuilt, atol=1e-5, err_msg=tensor)
    results = json.loads((output / "results.json").read_text())
    assert results["weights"].endswith(f"lambdas_{names[0]}.json")
    return names[0]


def siblings(output):
    return sorted(name for name in os.listdir(output.parent) if name.startswith(f".{output.name}."))


@pytest.mark.slow
def test_two_merges_into_one_output_one_runs_and_the_other_is_refused(world):
    output = world / "concurrent"
    first = start_merge(world, output, "a")
    try:
        lock = world / ".concurrent.lock"
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.stat().st_size) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        second = run_merge(world, output, "b")
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), second.stderr
        assert f"pid {first.pid} on host {socket.gethostname()}" in lines[0] and "another run" in lines[0]
    finally:
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert which_result(world, output) == "a" and siblings(output) == []


def stage_of(output, process):
    """``process``'s staging folder beside ``output`` (one left by a killed run does not count), or None."""
    return next((output.parent / name for name in siblings(output) if f".new-{process.pid}-" in name), None)


def staged(*parts):
    def written(output, process):
        stage = stage_of(output, process)
        return stage is not None and stage.joinpath(*parts).exists()

    return written


def swapped(output, _):
    try:
        return json.loads((output / "results.json").read_text())["weights"].endswith("lambdas_b.json")
    except (OSError, ValueError):
        return False


KILL_POINTS = [  # (when, the result it must leave: None for either)
    (lambda output, process: stage_of(output, process) is not None, "a"),  # the staging folder made
    (staged("lambdas.json"), "a"),
    (staged("table.md"), "a"),
    (staged("model", "model.safetensors"), "a"),
    (staged("model", "README.md"), None),  # the last write: the fsyncs and the swap follow at once
    (swapped, "b"),  # the old result is being removed
]


@pytest.mark.slow
def test_sigkill_in_the_export_window_leaves_the_previous_result_or_the_new_one(world):
    """Run A completes; runs B are SIGKILLed at successive points of the export window (the staging folder
    made, λ written, the report, the model, the card, the swap done); each time the output holds A or B
    complete and consistent. The next run takes over the stale lock the killed one left and finishes or
    undoes its half-done commit; a last run completes B and no leftover remains."""
    output = world / "killed"
    first = run_merge(world, output, "a")
    assert first.returncode == 0, first.stderr
    assert which_result(world, output) == "a"
    for point, expected in KILL_POINTS:
        process = start_merge(world, output, "b")
        deadline = time.monotonic() + 180
        while process.poll() is None and not point(output, process) and time.monotonic() < deadline:
            time.sleep(0.0005)
        process.send_signal(signal.SIGKILL)
        process.communicate()
        found = which_result(world, output)
        assert expected in (None, found), (KILL_POINTS.index((point, expected)), found)
    last = run_merge(world, output, "b")
    assert last.returncode == 0, last.stderr
    assert which_result(world, output) == "b" and siblings(output) == []


@pytest.mark.slow
@pytest.mark.parametrize("point", [0, 3, 4], ids=["staging-made", "model-written", "card-written"])
def test_ctrl_c_in_the_export_window_exits_130_and_commits_nothing(world, point):
    output = world / f"interrupted_{point}"
    first = run_merge(world, output, "a")
    assert first.returncode == 0, first.stderr
    process = start_merge(world, output, "b")
    when = KILL_POINTS[point][0]
    deadline = time.monotonic() + 180
    while process.poll() is None and not when(output, process) and time.monotonic() < deadline:
        time.sleep(0.0005)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("[merge] interrupted: nothing half written"), stderr
    assert which_result(world, output) in (("a", "b") if point == 4 else ("a",)) and siblings(output) == []


SLOW_IMAGES_RUN = """
import sys, time
from adamerging_jax.data import unlabeled
read = unlabeled.ImagePaths.__getitem__

def slow_read(self, index):  # each image takes 1 s to read, as a huge one does
    time.sleep(1.0)
    return read(self, index)

unlabeled.ImagePaths.__getitem__ = slow_read
from adamerging_jax.cli import main
sys.exit(main(["merge", sys.argv[1], "--output", sys.argv[2], "--steps", "2"]))
"""


@pytest.mark.slow
def test_a_merge_exits_promptly_after_its_last_line(world):
    """A layer-wise AdaMerging run (2 steps) whose unlabeled images take 1 s each to read: once the methods are
    built the images read ahead for later steps are dropped, so the process ends within seconds of
    ``[merge] wrote`` (reading 4 steps' worth ahead at 2 threads would take 8 s more; Python joins a thread
    pool's threads at exit after their queued work)."""
    _, env = merge_command(world, world / "prompt_exit", "a")
    process = subprocess.Popen([sys.executable, "-c", SLOW_IMAGES_RUN, str(world / "merge.yaml"),
                                str(world / "prompt_exit")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    last_line, lines = None, []
    for line in process.stdout:
        last_line = time.monotonic()
        lines.append(line)
    process.wait(timeout=60)
    assert process.returncode == 0, process.stderr.read()
    assert lines[-1].startswith("[merge] wrote"), lines[-1]
    assert time.monotonic() - last_line < 5.0, "the process went on working after its last line"


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_keeps_the_previous_result(world, small_tmpfs):
    output = small_tmpfs / "out"
    first = run_merge(world, output, "a")
    assert first.returncode == 0, first.stderr
    free = os.statvfs(small_tmpfs)
    (small_tmpfs / "filler").write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 100_000))
    full = run_merge(world, output, "b")
    lines = full.stderr.strip().splitlines()
    assert full.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: no space left"), full.stderr
    assert which_result(world, output) == "a" and siblings(output) == []
    (small_tmpfs / "filler").unlink()
    again = run_merge(world, output, "b")
    assert again.returncode == 0, again.stderr
    assert which_result(world, output) == "b"
