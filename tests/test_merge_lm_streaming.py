"""Data-free LM merges streamed tensor by tensor from disk (``adamerging-jax merge``, ``model: causal_lm``, no
prompts): equal to the registry methods run in memory, the input dtype kept (or the config's), the model
folder whole or absent after a SIGKILL while writing or on a full disk (the table ``CASES``, rows of
docs/bad-inputs.md), the exact streaming selection of TIES's thresholds.

The tiny Llama fixture's weights are put on a grid of 2⁻⁸ and the fine-tunes move them by multiples of 2⁻⁸,
so τ is exact, sums of τ cancel exactly at some entries and TIES's majority sign decides them. Comparisons
that must be bit for bit use power-of-two scales: XLA:CPU contracts θ0 + s·Σ into a fused multiply-add for
some tensor shapes and not for others, which moves a non-power-of-two s by one float32 ulp (checked too).
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import yaml
from bad_inputs import Case
from test_lora import write_adapter
from test_text_data import write_tokenizer

import adamerging_jax as am
from adamerging_jax.cli import main
from adamerging_jax.core import methods as core_methods
from adamerging_jax.core.registry import method_spec
from adamerging_jax.core.transforms import _kth_largest_magnitude
from adamerging_jax.merging.config import parse_config
from adamerging_jax.merging.lm import load_language_models
from adamerging_jax.merging.streaming import KthLargest
from adamerging_jax.models import llama
from adamerging_jax.models.llama_checkpoint import hf_state_dict, load_hf_causal_lm, save_hf_causal_lm
from adamerging_jax.models.safetensors_stream import CheckpointFiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = os.path.join(ROOT, "tests", "fixtures", "llama", "llama")
K = 3


def on_grid(array):
    return (np.round(np.asarray(array, np.float64) * 256) / 256).astype(np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """θ0, K = 3 full fine-tunes (the second one sharded) and a LoRA adapter, in float32 and in bf16."""
    root = tmp_path_factory.mktemp("streaming")
    config, params = load_hf_causal_lm(LLAMA)
    base = jax.tree_util.tree_map(on_grid, params)
    tokenizer = write_tokenizer(root / "tokenizer")
    rng = np.random.default_rng(0)
    finetuned = [jax.tree_util.tree_map(lambda a: a + np.round(rng.standard_normal(a.shape) * 3) / 256, base)
                 for _ in range(K)]
    for suffix, dtype in (("", None), ("_bf16", ml_dtypes.bfloat16)):
        save_hf_causal_lm(root / f"base{suffix}", base, config, tokenizer_dir=tokenizer, dtype=dtype)
        for k, tree in enumerate(finetuned):
            save_hf_causal_lm(root / f"ft{k}{suffix}", tree, config, dtype=dtype,
                              max_shard_bytes=40_000 if k == 1 else 2**30)
    write_adapter(root / "adapter", [(0, "q_proj", 4), (1, "down_proj", 4)], seed=3)
    return root


def run_streamed(world, tmp_path, methods, suffix="", tasks=None, **changes):
    """A streamed merge (no prompts) of θ0 and ``tasks`` (default the K fine-tunes); the output folder."""
    tasks = tasks or [{"name": f"t{k}", "finetuned": str(world / f"ft{k}{suffix}")} for k in range(K)]
    document = {"model": "causal_lm", "pretrained": str(world / f"base{suffix}"), "tasks": tasks,
                "methods": methods, **changes}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    out = tmp_path / "out"
    assert main(["merge", str(path), "--output", str(out)]) == 0
    return out


def written(out):
    files = CheckpointFiles(out / "model")
    return {name: files.read(name) for name in files.names}


def in_memory(world, spec, suffix="", tree=None):
    """The registry method run in memory on the whole model (or on ``tree(params)``), as HF tensors."""
    config, pretrained = load_hf_causal_lm(str(world / f"base{suffix}"))
    finetuned = [load_hf_causal_lm(str(world / f"ft{k}{suffix}"))[1] for k in range(K)]
    if tree is not None:
        pretrained, finetuned = tree(pretrained, config), [tree(p, config) for p in finetuned]
    merged = spec.build(pretrained, am.task_vectors(pretrained, finetuned), None, llama.matrix_view).params
    merged = jax.device_get(merged)
    return merged if tree is not None else hf_state_dict(merged, config)


def assert_same(ours, expected):
    assert sorted(ours) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(np.asarray(ours[name], np.float64), np.asarray(value, np.float64), err_msg=name)


@pytest.mark.parametrize("params", [{"scale": 0.5}, {"density": 0.5, "reduce": "mean", "scale": 1.0}],
                         ids=["default", "mean"])
def test_global_ties_streamed_equals_in_memory_bit_for_bit(world, tmp_path, params):
    out = run_streamed(world, tmp_path, [{"name": "ties", **params}])
    spec = method_spec("ties", **params)
    expected = in_memory(world, spec)
    assert_same(written(out), expected)
    # the majority sign decides entries of this model: the other sign gives another model
    config, pretrained = load_hf_causal_lm(str(world / "base"))
    tau = am.task_vectors(pretrained, [load_hf_causal_lm(str(world / f"ft{k}"))[1] for k in range(K)])
    density = params.get("density", 0.2)
    flipped = core_methods.ties_merging(pretrained, tau, density=density, reduce=params.get("reduce", "sum"),
                                        scale=params["scale"], majority=-elected_majority(tau, density))
    flipped = hf_state_dict(jax.device_get(flipped), config)
    assert any(np.any(flipped[name] != value) for name, value in expected.items())
    result = json.loads((out / "results.json").read_text())
    assert 3 <= result["streamed"]["passes"] <= 4  # thresholds (1-2 passes for float32), majority, merge


def elected_majority(tau, density):
    from adamerging_jax.core.transforms import elect_sign, trim

    signs = elect_sign(trim(tau, density), "sum", jnp.zeros(()))
    return jnp.sign(sum(jnp.sum(s) for s in jax.tree_util.tree_leaves(signs)))


def checkpoint_tree(params, config):
    """The model as the tree of its checkpoint tensors, name → tensor (torch layout): each tensor a leaf."""
    return hf_state_dict(params, config)


def test_per_tensor_ties_is_the_method_on_the_tree_of_checkpoint_tensors(world, tmp_path):
    """Streamed per-tensor TIES equals the method in memory on the tree of checkpoint tensors and on the model's
    own tree, whose stacked leaves (the layers' q_proj, ..., down_proj) it trims layer by layer."""
    params = {"scope": "leaf", "density": 0.3, "reduce": "mean", "scale": 0.5}
    out = run_streamed(world, tmp_path, [{"name": "ties", **params}])
    spec = method_spec("ties", **params)
    assert_same(written(out), in_memory(world, spec, tree=checkpoint_tree))
    assert_same(written(out), in_memory(world, spec))
    # the stacked leaves trimmed as one tensor each (no view: no leaf stacks layers) give another model
    config, pretrained = load_hf_causal_lm(str(world / "base"))
    tau = am.task_vectors(pretrained, [load_hf_causal_lm(str(world / f"ft{k}"))[1] for k in range(K)])
    whole_leaves = hf_state_dict(jax.device_get(spec.build(pretrained, tau).params), config)
    assert any(np.any(whole_leaves[name] != value) for name, value in written(out).items())
    assert json.loads((out / "results.json").read_text())["streamed"]["passes"] == 2  # majority, merge


def test_task_arithmetic_and_weight_average_equal_in_memory(world, tmp_path):
    out = run_streamed(world, tmp_path / "exact", [{"name": "task_arithmetic", "scale": 0.5}])
    assert_same(written(out), in_memory(world, method_spec("task_arithmetic", scale=0.5)))
    result = json.loads((out / "results.json").read_text())
    data = sum(os.path.getsize(folder / name) for folder in [world / "base", *(world / f"ft{k}" for k in range(K))]
               for name in os.listdir(folder) if name.endswith(".safetensors"))
    assert result["streamed"]["passes"] == 1 and 0.99 * data < result["streamed"]["bytes_read"] < data
    for name in ("task_arithmetic", "weight_average"):  # s = 0.3, 1/K: one float32 rounding of s·Σ apart at most
        out = run_streamed(world, tmp_path / name, [name])
        expected = in_memory(world, method_spec(name))
        for tensor, value in written(out).items():
            bound = np.spacing(np.float32(np.abs(expected[tensor]).max()))
            np.testing.assert_allclose(value, expected[tensor], rtol=0, atol=bound, err_msg=tensor)


def test_dare_streamed_is_the_method_on_each_tensor_with_its_own_key(world, tmp_path):
    out = run_streamed(world, tmp_path, [{"name": "dare", "p": 0.5, "seed": 7, "scale": 0.5}])
    ours = written(out)
    base = CheckpointFiles(world / "base")
    finetuned = [CheckpointFiles(world / f"ft{k}") for k in range(K)]
    spec = method_spec("dare", p=0.5, seed=7, scale=0.5)
    for index, name in enumerate(base.names):
        theta0 = base.read(name)
        tau = np.stack([files.read(name) - theta0 for files in finetuned])
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), index), 0)  # one part: small tensors
        expected = spec.method.build({"tensor": theta0.reshape(-1)}, {"tensor": tau.reshape(K, -1)}, p=0.5, seed=key,
                                     scale=0.5).params["tensor"]
        np.testing.assert_array_equal(ours[name], np.asarray(expected).reshape(theta0.shape), err_msg=name)
    same_shape = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    kept = [ours[n] != base.read(n) for n in same_shape]
    assert np.any(kept[0] != kept[1])  # each tensor draws its own mask


def test_bf16_in_bf16_out_within_one_ulp_of_the_float64_formula(world, tmp_path):
    out = run_streamed(world, tmp_path, ["task_arithmetic"], suffix="_bf16")
    ours = written(out)
    assert {value.dtype for value in ours.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    assert "weights stored as `bfloat16` (θ0's)" in (out / "model" / "README.md").read_text()
    base = CheckpointFiles(world / "base_bf16")
    finetuned = [CheckpointFiles(world / f"ft{k}_bf16") for k in range(K)]
    for name, value in ours.items():
        theta0 = base.read(name).astype(np.float64)
        update = 0.3 * sum(files.read(name).astype(np.float64) - theta0 for files in finetuned)
        formula = theta0 + update
        # one bf16 ulp of the formula, beyond the float32 arithmetic's rounding (where θ0 and s·Σ τ cancel)
        bound = bf16_ulp(formula) + 2.0**-22 * (np.abs(theta0) + np.abs(update))
        assert np.all(np.abs(value.astype(np.float64) - formula) <= bound), name


def bf16_ulp(values):
    """The spacing of bf16 numbers at |values| (8 significant bits)."""
    exponent = np.floor(np.log2(np.maximum(np.abs(values), np.finfo(ml_dtypes.bfloat16).tiny)))
    return 2.0 ** (exponent - 7)


def test_dtype_override(world, tmp_path):
    out = run_streamed(world, tmp_path / "wide", [{"name": "task_arithmetic", "scale": 0.5}], suffix="_bf16",
                       dtype="float32")
    assert_same(written(out), in_memory(world, method_spec("task_arithmetic", scale=0.5), suffix="_bf16"))
    assert {v.dtype for v in written(out).values()} == {np.dtype(np.float32)}
    assert "weights stored as `float32` (the config's dtype)" in (out / "model" / "README.md").read_text()
    out = run_streamed(world, tmp_path / "narrow", [{"name": "task_arithmetic", "scale": 0.5}], dtype="bfloat16")
    expected = in_memory(world, method_spec("task_arithmetic", scale=0.5))
    for name, value in written(out).items():
        assert value.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(value, expected[name].astype(ml_dtypes.bfloat16), err_msg=name)


def test_float64_in_float64_out(world, tmp_path):
    """float64 checkpoints merge in float64 (the stream turns x64 on for them), to numpy's float64 rounding."""
    config, params = load_hf_causal_lm(str(world / "base"))
    rng = np.random.default_rng(5)
    save_hf_causal_lm(tmp_path / "base", params, config, tokenizer_dir=world / "base", dtype=np.float64)
    for k in range(2):
        tree = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64) + 1e-9 * rng.standard_normal(a.shape), params)
        save_hf_causal_lm(tmp_path / f"ft{k}", tree, config, dtype=np.float64)
    tasks = [{"name": f"t{k}", "finetuned": str(tmp_path / f"ft{k}")} for k in range(2)]
    out = run_streamed(tmp_path, tmp_path / "run", ["task_arithmetic"], tasks=tasks)
    base, finetuned = CheckpointFiles(tmp_path / "base"), [CheckpointFiles(tmp_path / f"ft{k}") for k in range(2)]
    for name, value in written(out).items():
        theta0 = base.read(name)
        assert value.dtype == np.float64
        np.testing.assert_allclose(value, theta0 + 0.3 * sum(f.read(name) - theta0 for f in finetuned), rtol=0,
                                   atol=4e-16 * np.abs(theta0).max(), err_msg=name)


def test_a_full_model_and_an_adapter_stream_as_they_merge_in_memory(world, tmp_path):
    tasks = [{"name": "full", "finetuned": str(world / "ft0")}, {"name": "lora", "adapter": str(world / "adapter")}]
    out = run_streamed(world, tmp_path, [{"name": "task_arithmetic", "scale": 0.5}], tasks=tasks)
    document = {"model": "causal_lm", "pretrained": str(world / "base"), "tasks": tasks,
                "methods": [{"name": "task_arithmetic", "scale": 0.5}]}
    models = load_language_models(parse_config(document), log=lambda _: None)
    merged = method_spec("task_arithmetic", scale=0.5).build(models.pretrained, models.task_vectors).params
    expected = hf_state_dict(jax.device_get(merged), models.config)
    assert_same(written(out), expected)
    assert np.any(expected["model.layers.0.self_attn.q_proj.weight"] !=
                  CheckpointFiles(world / "base").read("model.layers.0.self_attn.q_proj.weight"))


def test_the_dry_run_says_streamed_and_loads_nothing(world, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": "causal_lm", "pretrained": str(world / "base_bf16"), "methods": ["ties"],
                                    "tasks": [{"name": "a", "finetuned": str(world / "ft0_bf16")}]}))
    assert main(["merge", str(path), "--output", str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "streamed tensor by tensor from disk, nothing loaded" in text and "weights `bfloat16` (θ0's)" in text


# --------------------------------------------------------------------------------- a kill while writing

KILLED_RUN = """
import os, sys, time
from adamerging_jax.models import safetensors_stream
write = safetensors_stream.ShardedWriter.write

def write_then_hang(self, name, array):
    write(self, name, array)
    self._file.flush()
    open(sys.argv[1], "w").close()  # one tensor is on disk: the test may kill us now
    time.sleep(600)

safetensors_stream.ShardedWriter.write = write_then_hang
from adamerging_jax.cli import main
main(["merge", sys.argv[2], "--output", sys.argv[3]])
"""


def killed_while_writing(config, out, tmp_path):
    """Run ``merge`` in a subprocess and SIGKILL it once it has written the first tensor of the model."""
    flag = tmp_path / "written"
    flag.unlink(missing_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(flag), str(config), str(out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not flag.exists():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the merge never started writing"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    hidden = [*out.glob(".*"), *out.parent.glob(f".{out.name}.*")]  # the run's unfinished folders
    partial = [path for folder in hidden for path in folder.rglob("*.safetensors")]  # killed mid-write
    assert partial and any(path.stat().st_size for path in partial)


def siblings(out):
    """What a run left beside ``out`` (its staging folder, an old result, the lock)."""
    return sorted(path.name for path in out.parent.glob(f".{out.name}.*"))


def complete_result(out, world, methods):
    """``out`` holds one complete result of ``methods`` (every tensor of θ0 exported), every file 0644 under
    umask 022, and nothing else; the model folder's files by name."""
    assert sorted(os.listdir(out)) == ["model", "results.json", "table.md"]
    assert json.loads((out / "results.json").read_text())["export"] == methods[0]
    assert sorted(written(out)) == sorted(CheckpointFiles(world / "base").names)
    assert {oct(path.stat().st_mode & 0o777) for path in out.rglob("*") if path.is_file()} == {"0o644"}
    return {p.name: p.read_bytes() for p in (out / "model").iterdir()}


def merge_config(world, tmp_path, methods):
    """A config merging θ0 and the K fine-tunes with ``methods`` (no prompts), written under ``tmp_path``."""
    config = tmp_path / "config.yaml"
    tasks = [{"name": f"t{k}", "finetuned": str(world / f"ft{k}")} for k in range(K)]
    config.write_text(yaml.safe_dump({"model": "causal_lm", "pretrained": str(world / "base"), "tasks": tasks,
                                      "methods": methods}))
    return config


def a_kill_keeps_the_previous_result(world, tmp_path, methods):
    """SIGKILL once the first tensor of the model is on disk: the output holds nothing (no run before) or the
    previous result, whole; the rerun into the same output removes what the killed run left and completes."""
    config, out = merge_config(world, tmp_path, methods), tmp_path / "out"
    killed_while_writing(config, out, tmp_path)
    assert not (out / "model").exists()  # no export before: none after
    assert main(["merge", str(config), "--output", str(out)]) == 0  # the killed run's leftovers do not block it
    assert siblings(out) == []
    first = complete_result(out, world, methods)
    config.write_text(config.read_text().replace(methods[0], "weight_average"))
    killed_while_writing(config, out, tmp_path)
    assert complete_result(out, world, methods) == first  # the earlier result, whole
    assert main(["merge", str(config), "--output", str(out)]) == 0
    assert siblings(out) == [] and complete_result(out, world, ["weight_average"]) != first


NO_SPACE = "error: no space left on the device"


def a_full_disk_keeps_the_previous_result(world, tmp_path, disk, capsys):
    """A streamed merge into an output on a full disk (``disk``, a small tmpfs) fails with one ``error: no space
    left ...`` line; the previous result stays whole and nothing of the failed run is left beside it; once space
    is freed the rerun completes."""
    config, out = merge_config(world, tmp_path, ["task_arithmetic"]), disk / "out"
    assert main(["merge", str(config), "--output", str(out)]) == 0
    first = complete_result(out, world, ["task_arithmetic"])
    free = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 100_000))  # less than one model
    config.write_text(config.read_text().replace("task_arithmetic", "weight_average"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # Python prints its message as the one stderr line, exit 1
        main(["merge", str(config), "--output", str(out)])
    lines = [*capsys.readouterr().err.splitlines(), *str(refused.value).splitlines()]
    assert len(lines) == 1 and lines[0].startswith(NO_SPACE), lines
    assert complete_result(out, world, ["task_arithmetic"]) == first and siblings(out) == []
    (disk / "filler").unlink()
    assert main(["merge", str(config), "--output", str(out)]) == 0
    assert siblings(out) == [] and complete_result(out, world, ["weight_average"]) != first


CASES = [
    Case("killed_writing_streamed", "SIGKILL while a streamed merge (task arithmetic) writes the model",
         "previous-kept", "", lambda world, tmp_path, request: a_kill_keeps_the_previous_result(
             world, tmp_path, ["task_arithmetic"])),
    Case("killed_writing_in_memory", "SIGKILL while an in-memory merge (consensus) writes the model",
         "previous-kept", "", lambda world, tmp_path, request: a_kill_keeps_the_previous_result(
             world, tmp_path, ["consensus"])),
    Case("full_disk", "an output folder on a full disk (a 3 MB tmpfs, filled after a first merge; streamed)",
         "no-space", NO_SPACE, lambda world, tmp_path, request: a_full_disk_keeps_the_previous_result(
             world, tmp_path, request.getfixturevalue("small_tmpfs"), request.getfixturevalue("capsys"))),
]
"""The output folder of a causal-LM merge under a kill or a full disk (rows of docs/bad-inputs.md): the
previous result stays whole (or there is none), nothing half-written is left, and the rerun completes."""


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_the_output_holds_the_previous_result_whole_and_the_rerun_completes(case, world, tmp_path, request):
    old_umask = os.umask(0o022)  # the result's files are checked 0644
    try:
        case.run(world, tmp_path, request)
    finally:
        os.umask(old_umask)


def test_an_unfinished_model_folder_left_inside_the_output_is_dropped(world, tmp_path):
    """An export killed inside the output folder (as earlier versions wrote it: ``OUT/.model.<id>.tmp``, a
    half-written shard in it) does not block the rerun and does not survive it."""
    out = run_streamed(world, tmp_path, ["task_arithmetic"])
    stale = out / ".model.0123456789abcdef.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 100)
    (out / ".results.json.k2j4.tmp").write_bytes(b"{")
    run_streamed(world, tmp_path, ["task_arithmetic"])
    assert sorted(os.listdir(out)) == ["model", "results.json", "table.md"]


# ------------------------------------------------------------------------------- the streaming selection


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kth_largest_by_streaming_radix_selection_is_exact(dtype):
    rng = np.random.default_rng(1)
    chunks = [np.abs(rng.standard_normal((2, n))).astype(dtype) for n in (1000, 1, 3000)]
    chunks.append(np.round(np.abs(rng.standard_normal((2, 500))) * 8).astype(dtype) / 8)  # ties, shared low bits
    values = np.concatenate(chunks, axis=1)
    for rank in (1, 7, 900, 2400, values.shape[1]):
        selection = KthLargest(2, rank, dtype)
        passes = 0
        while not selection.done:
            selection.start_pass()
            for chunk in chunks:
                selection.add(chunk)
            selection.end_pass()
            passes += 1
        expected = -np.sort(-values, axis=1)[:, rank - 1]
        np.testing.assert_array_equal(selection.value, expected)
        assert passes <= np.dtype(dtype).itemsize // 2


def test_kth_largest_matches_the_in_memory_bisection():
    rng = np.random.default_rng(2)
    leaves = [jnp.asarray(rng.standard_normal((3, 40, 7)), jnp.float32), jnp.asarray(rng.standard_normal((3, 9)),
                                                                                          jnp.float32)]
    selection = KthLargest(3, 77, np.float32)
    while not selection.done:
        selection.start_pass()
        for leaf in leaves:
            selection.add(np.abs(np.asarray(leaf)))
        selection.end_pass()
    np.testing.assert_array_equal(selection.value, np.asarray(_kth_largest_magnitude(leaves, 77)))
