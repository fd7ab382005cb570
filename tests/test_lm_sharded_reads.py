"""θ0 and τ read from safetensors into their shards (`models.sharded_reads`): the placed arrays equal the whole
load (`load_hf_causal_lm`, `task_vectors`, `lora_task_vector`, `factored_task_vectors`) with `place_tree`'s
shardings, each distinct slice is read once (the byte counter against the files' tensor sizes), a NaN is named;
and 2 CPU processes under `jax.distributed` (4 devices each, one 1 × 8 fsdp mesh) each read exactly their
devices' slices, half of every checkpoint, and learn the single-process λ.

The tiny Llama (θ0, two fine-tuned models, one float32 and one bfloat16 in two shards, and a LoRA adapter) is
written here with safetensors. Run as a script, this file is one worker process:
`python test_lm_sharded_reads.py ADDRESS PROCESS_ID OUT`.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from multihost_launcher import run_workers

PROCESSES, DEVICES_PER_PROCESS, STEPS = 2, 4, 3
TIMEOUT_S = 240
ADAPTED = (("self_attn", "q_proj", 32, 32), ("mlp", "down_proj", 64, 32))  # (parent, module, in, out)


def write_world(root: Path) -> dict[str, str]:
    """θ0 (float32, one file), ft0 (float32), ft1 (bfloat16, sharded with an index) and a rank-4 adapter on
    q and down of both layers; the folders by name."""
    import jax
    from safetensors.numpy import save_file
    from test_lm_adamerging import CONFIG

    from adamerging_jax.models import llama
    from adamerging_jax.models.llama_checkpoint import hf_config, hf_state_dict, save_hf_causal_lm

    base = jax.tree_util.tree_map(np.asarray, llama.init_params(CONFIG, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    folders = {name: root / name for name in ("base", "ft0", "ft1", "adapter")}
    for folder in folders.values():
        folder.mkdir()
    save_file(hf_state_dict(base, CONFIG), str(folders["base"] / "model.safetensors"), {"format": "pt"})
    (folders["base"] / "config.json").write_text(json.dumps(hf_config(CONFIG, [np.float32])))
    for k in range(2):
        tuned = jax.tree_util.tree_map(lambda x: x + rng.normal(0, 0.05, x.shape).astype(np.float32), base)
        if k == 0:
            save_file(hf_state_dict(tuned, CONFIG), str(folders["ft0"] / "model.safetensors"), {"format": "pt"})
            (folders["ft0"] / "config.json").write_text(json.dumps(hf_config(CONFIG, [np.float32])))
        else:
            folders["ft1"].rmdir()
            save_hf_causal_lm(folders["ft1"], tuned, CONFIG, dtype=jax.numpy.bfloat16, max_shard_bytes=20_000)
    factors = {}
    for layer in range(CONFIG.num_layers):
        for parent, module, d_in, d_out in ADAPTED:
            key = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            factors[f"{key}.lora_A.weight"] = rng.normal(0, 0.3, (4, d_in)).astype(np.float32)
            factors[f"{key}.lora_B.weight"] = rng.normal(0, 0.3, (d_out, 4)).astype(np.float32)
    save_file(factors, str(folders["adapter"] / "adapter_model.safetensors"), {"format": "pt"})
    (folders["adapter"] / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}))
    return {name: str(folder) for name, folder in folders.items()}


def tensor_bytes(folder: str) -> int:
    """The bytes of every tensor stored in a checkpoint folder, from safetensors' own headers."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as opened:
            for name in opened.keys():
                view = opened.get_slice(name)
                itemsize = {"F32": 4, "BF16": 2}[view.get_dtype()]
                total += int(np.prod(view.get_shape())) * itemsize
    return total


def own_slice_bytes(array, itemsize: int) -> int:
    """Bytes of the distinct slices of ``array`` that this process's devices hold, elements × ``itemsize``."""
    indices = {tuple(part.indices(n)[:2] for part, n in zip(index, array.shape))
               for index in array.sharding.addressable_devices_indices_map(array.shape).values()}
    return sum(int(np.prod([stop - start for start, stop in index])) * itemsize for index in indices)


# ------------------------------------------------------------------------------------ one process, 8 devices


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("sharded_reads"))


def whole_load(world):
    """θ0 and the dense τ of (ft0, ft1, adapter) loaded whole by the existing readers."""
    import jax

    import adamerging_jax as am
    from adamerging_jax.models.llama_checkpoint import load_hf_causal_lm
    from adamerging_jax.models.lora import lora_task_vector, read_lora_adapter

    _, base = load_hf_causal_lm(world["base"])
    tuned = [load_hf_causal_lm(world[name])[1] for name in ("ft0", "ft1")]
    dense = am.task_vectors(base, tuned)
    adapter = lora_task_vector(read_lora_adapter(world["adapter"]), base)
    return base, jax.tree_util.tree_map(lambda d, a: np.concatenate([d, np.asarray(a)[None]]), dense, adapter)


@pytest.mark.parametrize("layout", [(1, 8), (2, 4)])
def test_slices_place_the_whole_load_reading_each_slice_once(world, layout):
    from adamerging_jax.core.parallel import make_mesh, tree_shardings
    from adamerging_jax.core.trees import named_leaves
    from adamerging_jax.models.lora import read_lora_adapter
    from adamerging_jax.models.sharded_reads import SliceReader, read_pretrained, read_task_vectors

    mesh = make_mesh(*layout)
    base, tau = whole_load(world)
    reader = SliceReader(world["base"])
    tuned = [SliceReader(world[name], reader.config) for name in ("ft0", "ft1")]
    pretrained = read_pretrained(reader, mesh, True)
    assert reader.bytes_read == tensor_bytes(world["base"])  # 8 slices per leaf, each read once on (2, 4) too
    task_vectors = read_task_vectors(reader, [*tuned, read_lora_adapter(world["adapter"])], mesh, True)
    assert reader.bytes_read == 2 * tensor_bytes(world["base"])  # θ0's slices once more, for τ
    assert [t.bytes_read for t in tuned] == [tensor_bytes(world["ft0"]), tensor_bytes(world["ft1"])]
    for placed, whole, skip in ((pretrained, base, 0), (task_vectors, tau, 1)):
        expected = dict(named_leaves(tree_shardings(whole, mesh, True, skip)))
        for path, leaf in named_leaves(whole):
            got = dict(named_leaves(placed))[path]
            assert got.sharding == expected[path], path
            np.testing.assert_allclose(np.asarray(got), leaf, rtol=0, atol=1e-6, err_msg=path)


def test_factored_adapters_keep_their_factors_placed(world):
    import jax

    from adamerging_jax.core.low_rank import is_factors
    from adamerging_jax.core.parallel import make_mesh, tree_shardings
    from adamerging_jax.core.trees import named_leaves
    from adamerging_jax.models.llama_checkpoint import load_hf_causal_lm
    from adamerging_jax.models.lora import factored_task_vectors, read_lora_adapter
    from adamerging_jax.models.sharded_reads import place_factored

    mesh = make_mesh(1, 8)
    adapters = [read_lora_adapter(world["adapter"])] * 2
    config, base = load_hf_causal_lm(world["base"])
    whole = factored_task_vectors(adapters, base)
    placed = place_factored(adapters, config, mesh, True)
    assert jax.tree_util.tree_structure(placed, is_leaf=is_factors) == jax.tree_util.tree_structure(
        whole, is_leaf=is_factors)
    shardings = dict(named_leaves(tree_shardings(whole, mesh, True, 1)))
    for path, leaf in named_leaves(whole):
        got = dict(named_leaves(placed))[path]
        assert got.sharding == shardings[path], path
        np.testing.assert_array_equal(np.asarray(got), np.asarray(leaf), err_msg=path)


def test_a_nan_in_a_slice_is_named(world, tmp_path):
    from safetensors.numpy import load_file, save_file

    from adamerging_jax.core.parallel import make_mesh
    from adamerging_jax.models.sharded_reads import SliceReader, read_pretrained

    state = load_file(os.path.join(world["base"], "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"][3, 50] = np.nan
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(Path(world["base"], "config.json").read_text())
    with pytest.raises(ValueError, match=r"tensor 'model.layers.1.mlp.down_proj.weight' holds NaN or inf .* leaf "
                                         r"'layers/mlp/down/kernel'"):
        read_pretrained(SliceReader(str(tmp_path)), make_mesh(1, 8), True)


@pytest.mark.parametrize("factored", [False, True])
def test_the_merge_loader_reads_by_shards_what_it_loads_whole(world, factored, tmp_path):
    """`merging.lm.load_language_models` on a sharded mesh gives the whole load's θ0 and τ, and logs the bytes."""
    import jax

    from adamerging_jax.core.parallel import make_mesh
    from adamerging_jax.core.trees import named_leaves
    from adamerging_jax.merging.config import parse_config
    from adamerging_jax.merging.lm import load_language_models

    (tmp_path / "prompts.txt").write_text("a prompt\n")  # factors need AdaMerging, which needs prompts
    prompts = {"prompts": {"file": str(tmp_path / "prompts.txt")}}
    adapter = {"name": "lora", "adapter": world["adapter"], "factored": factored, **prompts}
    tasks = [adapter, {**adapter, "name": "again"}] if factored else [
        {"name": "full", "finetuned": world["ft1"], **prompts}, adapter]
    config = parse_config({"model": "causal_lm", "pretrained": world["base"], "tasks": tasks,
                           "methods": ["adamerging"]})
    logged = []
    whole = load_language_models(config, log=lambda _: None)
    sharded = load_language_models(config, logged.append, make_mesh(1, 8), shard=True)
    # θ0 once for θ0; without factors once more for τ, with θ_1's slices
    expected = tensor_bytes(world["base"]) if factored else 2 * tensor_bytes(world["base"]) + tensor_bytes(world["ft1"])
    assert logged[-1] == f"[models] read {expected / 1e6:.1f} MB of checkpoint slices in this process"
    for tree in ("pretrained", "task_vectors"):
        leaves = dict(named_leaves(getattr(whole, tree)))
        for path, leaf in named_leaves(getattr(sharded, tree)):
            assert len(leaf.sharding.device_set) == 8, path
            np.testing.assert_allclose(np.asarray(leaf), np.asarray(jax.device_get(leaves[path])), rtol=0, atol=1e-6,
                                       err_msg=path)
    assert [a is None for a in sharded.adapters] == [a is None for a in whole.adapters]


# ------------------------------------------------------------------------------------ two processes


def worker(address: str, process_id: int, out: str) -> None:
    """One process: θ0 and τ read by slices onto a 1 × 8 fsdp mesh spanning both processes, `STEPS`
    AdaMerging steps; this process's bytes read and the expected bytes of its slices, and λ, go to
    ``OUT.<process>.npz``."""
    import jax

    jax.distributed.initialize(coordinator_address=address, num_processes=PROCESSES, process_id=process_id,
                               initialization_timeout=60)
    from test_lm_adamerging import BATCH, CONFIG, LmProblem, lm_config

    import adamerging_jax as am
    from adamerging_jax.core.multihost import global_batch_source, local_rows
    from adamerging_jax.core.parallel import make_mesh
    from adamerging_jax.core.trees import named_leaves
    from adamerging_jax.merging.lm_binding import causal_lm_binding
    from adamerging_jax.models.lora import read_lora_adapter
    from adamerging_jax.models.sharded_reads import SliceReader, read_pretrained, read_task_vectors

    assert len(jax.devices()) == PROCESSES * DEVICES_PER_PROCESS and jax.local_device_count() == DEVICES_PER_PROCESS
    world = json.loads(Path(out + ".world.json").read_text())
    mesh = make_mesh(data=1, fsdp=PROCESSES * DEVICES_PER_PROCESS)
    reader = SliceReader(world["base"])
    tuned = [SliceReader(world[name], reader.config) for name in ("ft0", "ft1")]
    pretrained = read_pretrained(reader, mesh, True)
    task_vectors = read_task_vectors(reader, [*tuned, read_lora_adapter(world["adapter"])], mesh, True)
    own = sum(own_slice_bytes(leaf, 4) for _, leaf in named_leaves(pretrained))  # θ0 is stored in float32
    values = {"read/base": reader.bytes_read, "read/ft0": tuned[0].bytes_read, "read/ft1": tuned[1].bytes_read,
              "own/theta0": own}
    rows = local_rows(mesh, BATCH)
    local = lambda step: [{name: x[rows] for name, x in batch.items()} for batch in LmProblem.batches(step)]  # noqa: E731
    result = am.adamerging(causal_lm_binding(CONFIG).apply_fn, pretrained, task_vectors,
                           global_batch_source(local, mesh), lm_config(steps=STEPS), mesh=mesh)
    values.update({f"lambda:{k}": np.asarray(v) for k, v in result.coefficients.values.items()})
    tmp = f"{out}.{process_id}.tmp.npz"
    np.savez(tmp, **values)
    os.replace(tmp, f"{out}.{process_id}.npz")
    jax.distributed.shutdown()


def test_two_processes_read_only_their_slices_and_learn_the_single_process_lambda(world, tmp_path):
    import jax
    from test_lm_adamerging import CONFIG, LmProblem, lm_config

    import adamerging_jax as am
    from adamerging_jax.merging.lm_binding import causal_lm_binding

    out = tmp_path / "distributed"
    Path(f"{out}.world.json").write_text(json.dumps(world))
    run_workers(__file__, out, PROCESSES, DEVICES_PER_PROCESS, TIMEOUT_S)
    base, tau = whole_load(world)
    single = am.adamerging(causal_lm_binding(CONFIG).apply_fn, base, tau, LmProblem.batches, lm_config(steps=STEPS),
                           mesh=am.data_mesh(jax.devices()[:1]))
    assert max(float(np.abs(np.asarray(v) - 0.3).max()) for v in single.coefficients.values.values()) > 1e-3
    sizes = {name: tensor_bytes(world[name]) for name in ("base", "ft0", "ft1")}
    for process in range(PROCESSES):
        with np.load(f"{out}.{process}.npz") as got:
            # its devices' slices of θ0, once for θ0 and once more for τ; half of each fine-tuned checkpoint
            assert int(got["read/base"]) == 2 * int(got["own/theta0"]) == sizes["base"], process
            assert [int(got["read/ft0"]), int(got["read/ft1"])] == [sizes["ft0"] // 2, sizes["ft1"] // 2], process
            for group, value in single.coefficients.values.items():
                np.testing.assert_allclose(got[f"lambda:{group}"], value, atol=1e-5, err_msg=f"{process} {group}")


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
