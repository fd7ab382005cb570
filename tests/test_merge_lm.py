"""``adamerging-jax merge`` for causal language models, end to end on the tiny Llama fixture: θ0 with a word-level
tokenizer, one full fine-tuned model (θ0 + noise, written with ``save_hf_causal_lm``) and one PEFT LoRA adapter,
prompt files, a few steps.

The export is checked against numpy: θ0 + Σ_k clamp(λ_k) τ_k per HF tensor with λ read back from the written
``lambdas.json`` and τ recomputed from the files (θ_k − θ0, s · B A for the adapter); against transformers
(torch) loading it with no missing or unexpected key and giving our logits; ``--weights`` against the trained
run bit for bit; a changed prompt file against the resumable state. ``--dry-run`` failures are a table.
"""
import json
import os

import jax
import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file
from test_lora import write_adapter
from test_text_data import WORDS, write_tokenizer

from adamerging_jax import coefficient_formats as formats
from adamerging_jax.cli import main
from adamerging_jax.merging.config import ConfigError, parse_config
from adamerging_jax.models import llama
from adamerging_jax.models.hf_files import read_checkpoint_dir, read_safetensors
from adamerging_jax.models.llama_checkpoint import coefficient_tensor_names, load_hf_causal_lm, save_hf_causal_lm
from bad_inputs import Case, assert_no_traceback, fill_world
from hf_loading import load_checked

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = os.path.join(ROOT, "tests", "fixtures", "llama", "llama")
QWEN2 = os.path.join(ROOT, "tests", "fixtures", "llama", "qwen2")
ADAPTED = [(i, n, 4) for i in (0, 1) for n in ("q_proj", "v_proj", "down_proj")]
STEPS = 3


def prompts(rng, count):
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(count)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_lm")
    config, params = load_hf_causal_lm(LLAMA)
    save_hf_causal_lm(root / "base", params, config, tokenizer_dir=write_tokenizer(root / "tokenizer"))
    rng = np.random.default_rng(0)
    finetuned = jax.tree_util.tree_map(
        lambda a: np.asarray(a) + 0.5 * np.std(a) * rng.standard_normal(np.shape(a)).astype(np.float32), params)
    save_hf_causal_lm(root / "math", finetuned, config)
    write_adapter(root / "code", ADAPTED, seed=3)
    write_adapter(root / "chat", [(1, "q_proj", 2), (0, "up_proj", 2), ("lm_head", None, 2)], seed=4, r=2)
    (root / "math.txt").write_text("\n".join(prompts(rng, 10)) + "\n", encoding="utf-8")
    (root / "code.jsonl").write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n"
                                             for i, p in enumerate(prompts(rng, 10))), encoding="utf-8")
    (root / "empty.txt").write_text("\n\n", encoding="utf-8")
    # an adapter of the Qwen2 fixture (hidden 32): its q_proj factors do not fit the Llama's 48 × 64 kernel
    other = root / "other_adapter"
    other.mkdir()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((4, 32), np.float32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((32, 4), np.float32)},
              str(other / "adapter_model.safetensors"))
    (other / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                           "target_modules": ["q_proj"]}))
    _, tensors = write_adapter(root / "nan_adapter", ADAPTED, seed=5)
    tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"][3, 1] = np.nan
    save_file(tensors, str(root / "nan_adapter" / "adapter_model.safetensors"))
    (root / "latin1.txt").write_bytes("a prompt\nun caf\u00e9\n".encode("latin-1"))
    (root / "invisible.txt").write_text("a prompt\n\n\u200b\u2060\n", encoding="utf-8")
    # the fine-tuned model in shards, one of which is gone; and with one tensor of another shape
    save_hf_causal_lm(root / "missing_shard", finetuned, config, max_shard_bytes=40_000)
    (root / "missing_shard" / "model-00002-of-00006.safetensors").unlink()
    (root / "other_shape").mkdir()
    state = read_checkpoint_dir(str(root / "math"))
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:, :40].copy()
    save_file(state, str(root / "other_shape" / "model.safetensors"))
    (root / "other_shape" / "config.json").write_bytes((root / "math" / "config.json").read_bytes())
    return root


def document(world, **changes):
    tasks = [{"name": "math", "finetuned": str(world / "math"), "prompts": {"file": str(world / "math.txt")}},
             {"name": "code", "adapter": str(world / "code"),
              "prompts": {"jsonl": str(world / "code.jsonl"), "field": "prompt"}}]
    for task, update in zip(tasks, changes.pop("tasks", [{}, {}])):
        task.update(update)
    return {"model": "causal_lm", "pretrained": str(world / "base"), "tasks": tasks,
            "methods": ["layer_wise_adamerging", "task_arithmetic"], "max_length": 16, "mesh": {"data": 1, "fsdp": 1},
            "adamerging": {"steps": STEPS, "lr": 0.05, "batch_size": 4, "batches_per_task": 1,
                           "checkpoint_every": 1}, **changes}


def write_config(world, name, **changes):
    path = world / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document(world, **changes)))
    return path


def merge(*argv):
    assert main(["merge", *map(str, argv)]) == 0


def expected_state(world, lam, clamp=(0.0, 1.0)):
    """θ0 + Σ_k clamp(λ_k) τ_k per HF tensor in numpy (float64): τ_math = θ_math − θ0, τ_code = s B A on the
    adapted weights ([out, in], s = α / r = 2) and 0 elsewhere; ``lam(name)`` gives the K = 2 values."""
    base = read_checkpoint_dir(str(world / "base"))
    math = read_checkpoint_dir(str(world / "math"))
    adapter = read_safetensors(str(world / "code" / "adapter_model.safetensors"))
    out = {}
    for name, theta0 in base.items():
        theta0 = theta0.astype(np.float64)
        module = "base_model.model." + name.removesuffix(".weight")
        code = np.zeros_like(theta0)
        if f"{module}.lora_A.weight" in adapter:
            code = 2.0 * adapter[f"{module}.lora_B.weight"].astype(np.float64) @ adapter[f"{module}.lora_A.weight"]
        weights = np.clip(np.asarray(lam(name), np.float64), *clamp)
        out[name] = theta0 + weights[0] * (math[name] - theta0) + weights[1] * code
    return out


@pytest.fixture(scope="module")
def layer_wise(world):
    config = write_config(world, "layer")
    out = world / "out_layer"
    merge(config, "--output", out)
    return config, out


def test_layer_wise_output_folder(layer_wise):
    _, out = layer_wise
    for name in ["model/config.json", "model/model.safetensors", "model/tokenizer.json", "model/README.md",
                 "lambdas.json", "lambdas.safetensors", "results.json", "table.md", "entropy.png",
                 "lambda_layer_wise_adamerging.png"]:
        assert (out / name).is_file(), name
    result = json.loads((out / "results.json").read_text())
    record = result["methods"]["layer_wise_adamerging"]
    assert len(record["entropy"]) == STEPS and record["accuracy"] == {}
    entropy = result["entropy"]
    assert set(entropy) == {"pretrained", "layer_wise_adamerging", "task_arithmetic"}
    assert entropy["layer_wise_adamerging"]["initial"] == pytest.approx(record["probe_entropy"][0])
    assert entropy["layer_wise_adamerging"]["sum"] == pytest.approx(record["probe_entropy"][1], rel=1e-5)
    named = formats.read_named_json(out / "lambdas.json")
    order = coefficient_tensor_names(load_hf_causal_lm(LLAMA)[0]).order
    assert sorted(named) == sorted(order) and all(len(v) == 2 for v in named.values())
    lam = np.asarray(record["coefficients"]["layers/attn/q/kernel"])
    assert named["model.layers.1.self_attn.q_proj.weight"] == lam[:, 1].tolist()
    assert np.abs(lam - 0.3).max() > 1e-4  # λ moved
    assert formats.read_named_safetensors(out / "lambdas.safetensors") == named
    assert "| Layer-wise AdaMerging |" in (out / "table.md").read_text()
    card = (out / "model" / "README.md").read_text()
    assert "Layer-wise AdaMerging of 2 fine-tuned language models" in card and "| code |" in card
    assert os.listdir(out / "state" / "layer_wise_adamerging")


def test_layer_wise_export_is_theta0_plus_clamped_lambda_tau(layer_wise, world):
    _, out = layer_wise
    named = formats.read_named_json(out / "lambdas.json")
    expected = expected_state(world, named.__getitem__)
    written = read_checkpoint_dir(str(out / "model"))
    assert sorted(written) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(written[name], value, atol=2e-6, rtol=1e-5, err_msg=name)
    config, params = load_hf_causal_lm(str(out / "model"))  # our loader reads it back
    assert config == load_hf_causal_lm(LLAMA)[0]


def test_an_fsdp_mesh_reads_by_shards_and_learns_the_single_device_lambda(layer_wise, world, capsys):
    out = world / "out_fsdp"
    merge(write_config(world, "fsdp", mesh={"data": 1, "fsdp": 8}), "--output", out)
    assert "MB of checkpoint slices in this process" in capsys.readouterr().out  # θ0 and τ read by shards
    sharded, single = (formats.read_named_json(folder / "lambdas.json") for folder in (out, layer_wise[1]))
    assert sorted(sharded) == sorted(single)
    for name, values in single.items():
        np.testing.assert_allclose(sharded[name], values, atol=1e-5, err_msg=name)


def test_transformers_loads_the_export_with_our_logits(layer_wise):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = layer_wise
    model = load_checked(AutoModelForCausalLM, out / "model")
    ids = AutoTokenizer.from_pretrained(str(out / "model"))("the cat sat on the mat")["input_ids"]
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()
    config, params = load_hf_causal_lm(str(out / "model"))
    ours = np.asarray(llama.forward(params, np.asarray([ids], np.int32), None, config))
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_weights_reproduce_the_trained_merge_bit_for_bit(layer_wise, world):
    config, out = layer_wise
    again = world / "out_weights"
    merge(config, "--output", again, "--weights", out / "lambdas.json")
    assert (again / "model" / "model.safetensors").read_bytes() == (out / "model" / "model.safetensors").read_bytes()


def test_resume_refuses_changed_prompts(layer_wise, world, tmp_path):
    _, out = layer_wise
    changed = tmp_path / "math.txt"
    changed.write_text((world / "math.txt").read_text() + "the red dog ran fast\n", encoding="utf-8")
    config = write_config(world, "changed", tasks=[{"prompts": {"file": str(changed)}}, {}])
    with pytest.raises(SystemExit) as error:
        main(["merge", str(config), "--output", str(out)])
    assert "data" in str(error.value.code) and "\n" not in str(error.value.code)


def test_task_arithmetic_export(world):
    config = write_config(world, "ta", methods=["task_arithmetic"])
    out = world / "out_ta"
    merge(config, "--output", out)
    expected = expected_state(world, lambda _: [0.3, 0.3], clamp=(-np.inf, np.inf))
    written = read_checkpoint_dir(str(out / "model"))
    for name, value in expected.items():
        np.testing.assert_allclose(written[name], value, atol=2e-6, rtol=1e-5, err_msg=name)
    assert not (out / "lambdas.json").exists()
    entropy = json.loads((out / "results.json").read_text())["entropy"]
    assert entropy["task_arithmetic"]["initial"] is None
    assert entropy["task_arithmetic"]["sum"] == pytest.approx(sum(entropy["task_arithmetic"]["per_task"].values()))
    assert "| θ0 (pretrained) |" in (out / "table.md").read_text()


def test_factored_adapters_give_the_dense_run(world):
    """Two adapters, B·A kept factored inside the step or made dense τ first: the same λ and the same model."""
    runs = {}
    for factored in (False, True):
        document_ = document(world, methods=["layer_wise_adamerging"])
        for task, adapter in zip(document_["tasks"], ("code", "chat")):
            task.pop("finetuned", None)
            task.update(adapter=str(world / adapter), factored=factored)
        config, out = world / f"factored_{factored}.yaml", world / f"out_factored_{factored}"
        config.write_text(yaml.safe_dump(document_))
        merge(config, "--output", out)
        runs[factored] = formats.read_named_json(out / "lambdas.json"), read_checkpoint_dir(str(out / "model"))
    (dense_lam, dense_model), (factored_lam, factored_model) = runs[False], runs[True]
    for name, values in dense_lam.items():
        np.testing.assert_allclose(factored_lam[name], values, atol=1e-5, err_msg=name)
    assert max(abs(v - 0.3) for values in dense_lam.values() for v in values) > 1e-4
    for name, value in dense_model.items():
        # λ agree to ~3e-5 and these τ entries reach ~5 (s B A with unit-normal factors), so θ agrees to ~1e-4
        np.testing.assert_allclose(factored_model[name], value, atol=5e-5, rtol=1e-4, err_msg=name)


# ------------------------------------------------------------------------------------------------ --dry-run


STREAMED = {"methods": ["task_arithmetic"]}  # no prompts either: merged tensor by tensor from disk, nothing loaded
CASES = [
    Case("missing_prompts", "a prompt file that does not exist", {"tasks": [{"prompts": {"file": "{world}/no.txt"}}]},
         "task 'math' prompts {world}/no.txt"),
    Case("empty_prompts", "a prompt file with only blank lines",
         {"tasks": [{"prompts": {"file": "{world}/empty.txt"}}]}, "no prompts"),
    Case("other_adapter", "an adapter of another model (Qwen2, hidden 32)",
         {"tasks": [{}, {"adapter": "{world}/other_adapter"}]}, "task 'code' adapter"),
    Case("other_architecture", "a fine-tuned model of another architecture", {"tasks": [{"finetuned": QWEN2}]},
         "config.json differs from the pretrained model's"),
    Case("unknown_method", "a method the registry does not know", {"methods": ["adamergin"]}, "'adamergin'"),
    Case("two_token_answer", "a candidate answer that is two tokens",
         {"tasks": [{"candidates": ["red", "big dog"]}, {"candidates": ["red", "blue"]}]}, "'big dog' is 2 tokens"),
    Case("candidates_for_one_task", "candidates on one task only", {"tasks": [{"candidates": ["red", "blue"]}]},
         "give candidates to every task or none"),
    Case("factored_full_model", "factored on a full fine-tuned model", {"tasks": [{"factored": True}]},
         "tasks[0].factored applies to an adapter"),
    Case("factored_task_arithmetic", "factored adapters with a method that needs dense τ",
         {"tasks": [{"adapter": "{world}/code", "factored": True}, {"factored": True}],
          "methods": ["task_arithmetic"]}, "need dense task vectors"),
    Case("clip_key", "a CLIP-only key in a causal-LM config", {"export": "clip"}, "['export'] do not apply"),
    Case("surgery_no_representation", "Surgery on the causal-LM binding, which exposes no representation",
         {"methods": ["task_arithmetic", "surgery"]},
         "method 'surgery' needs the binding's representation: its features_fn and head_fn"),
    Case("mesh_too_big", "a mesh larger than the devices", {"mesh": {"data": 4, "fsdp": 4}}, "asks for 16 devices"),
    Case("adapter_nan", "an adapter holding a NaN (refused like a full checkpoint)",
         {"tasks": [{}, {"adapter": "{world}/nan_adapter"}]},
         "tensor 'base_model.model.model.layers.1.mlp.down_proj.lora_B.weight' holds 1 NaN and 0 inf values"),
    Case("prompts_not_utf8", "a prompt file in Latin-1, not UTF-8",
         {"tasks": [{"prompts": {"file": "{world}/latin1.txt"}}]},
         "latin1.txt: not UTF-8 text: byte 0xe9 at byte offset 15"),
    Case("prompts_invisible", "a prompt of zero-width characters only",
         {"tasks": [{"prompts": {"file": "{world}/invisible.txt"}}]}, "invisible.txt:3: the prompt"),
    Case("missing_shard", "a shard named in a fine-tuned model's index but missing (streamed merge)",
         {**STREAMED, "tasks": [{"finetuned": "{world}/missing_shard", "prompts": None}, {"prompts": None}]},
         "task 'math' finetuned {world}/missing_shard: {world}/missing_shard/model.safetensors.index.json: shard "
         "'model-00002-of-00006.safetensors'"),
    Case("shape_differs", "a tensor whose shape differs between θ0 and a fine-tuned model (streamed merge)",
         {**STREAMED, "tasks": [{"finetuned": "{world}/other_shape", "prompts": None}, {"prompts": None}]},
         "tensor 'model.layers.1.mlp.up_proj.weight' has shape (80, 40), config.json implies (80, 48)"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_dry_run_names_the_culprit_in_one_line(case, world, tmp_path, capfd):
    changes = fill_world(case.expected, world)
    tasks = document(world)["tasks"]
    for task, update in zip(tasks, changes.pop("tasks", [])):
        if "adapter" in update:  # the task switches from a full model to an adapter
            task.pop("finetuned", None)
        task.update(update)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**document(world), **changes, "tasks": tasks}))
    with pytest.raises(SystemExit) as error:
        main(["merge", str(path), "--output", str(tmp_path / "out"), "--dry-run"])
    message = str(error.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert fill_world(case.fragment, world) in message, message
    assert not (tmp_path / "out").exists()
    assert_no_traceback(capfd)


def test_dry_run_prints_the_plan(world, tmp_path, capsys):
    path = write_config(world, "candidates", tasks=[{"candidates": ["red", "blue"]}, {"candidates": ["big", "small"]}])
    assert main(["merge", str(path), "--output", str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    layers = load_hf_causal_lm(LLAMA)[0].num_layers
    per_layer = 2 + 7 + 4 + 3  # norms; q, k, v, o, gate, up, down weights; the fixture's attention and mlp biases
    assert f"{3 + per_layer * layers} λ per task" in text  # embedding, final norm, untied head
    ids = [4 + WORDS.index(w) for w in ("red", "blue")]
    assert f"answers ['red', 'blue'] → ids {ids}" in text and "LoRA adapter" in text and "10 prompts" in text
    assert not (tmp_path / "out").exists()


def test_example_config_is_valid():
    path = os.path.join(ROOT, "examples", "merge_llm.yaml")
    with open(path, encoding="utf-8") as file:
        config = parse_config(yaml.safe_load(file), path, os.path.dirname(path))
    assert config.model == "causal_lm" and [task.name for task in config.tasks] == ["math", "code"]
    assert config.tasks[1].adapter and config.tasks[1].prompts.field == "prompt" and config.mesh == (1, 1)


def test_schema_defaults_to_clip_and_refuses_lm_keys_there():
    with pytest.raises(ConfigError, match=r"\['max_length'\] do not apply to model: clip"):
        parse_config({"pretrained": "a/b", "tasks": [{"name": "t", "finetuned": "c/d", "classes": ["x", "y"]}],
                      "methods": ["task_arithmetic"], "max_length": 8})
