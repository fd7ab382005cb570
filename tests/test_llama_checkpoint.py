"""Llama / Qwen2 checkpoints: name mapping, exact round trip, shards, fp16 / bf16, errors naming the tensor, and
(with torch) transformers loading our export with no missing or unexpected keys and giving our logits."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_text_data import write_tokenizer

from adamerging_jax.coefficient_formats import named_coefficients
from adamerging_jax.core.coefficients import init_coefficients
from adamerging_jax.core.trees import named_leaves
from adamerging_jax.models import llama
from adamerging_jax.models import llama_checkpoint as ck
from hf_loading import load_checked

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "llama")
NAMES = ["llama", "qwen2"]


def fixture_dir(name):
    return os.path.join(FIXTURES, name)


def hf_tensors(name):
    return load_file(os.path.join(fixture_dir(name), "model.safetensors"))


def leaves_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def checkpoint_with(directory, name, tensors):
    """A copy of fixture ``name`` whose weights are ``tensors``."""
    os.makedirs(directory, exist_ok=True)
    shutil.copy(os.path.join(fixture_dir(name), "config.json"), directory)
    save_file(tensors, os.path.join(directory, "model.safetensors"), {"format": "pt"})
    return str(directory)


@pytest.mark.parametrize("name", NAMES)
def test_name_mapping_covers_every_tensor_once(name):
    config, params = ck.load_hf_causal_lm(fixture_dir(name))
    names = ck.coefficient_tensor_names(config)
    assert sorted(names.values()) == sorted(hf_tensors(name)) == sorted(names.order)  # tied qwen2: no lm_head
    expected_entries = {(path, i) for path, leaf in named_leaves(params)
                        for i in (range(leaf.shape[0]) if llama.stacked(path) else [None])}
    assert set(names) == expected_entries
    for (path, layer), hf in names.items():
        assert ck.tree_path(hf) == (path, layer) and ck.hf_name(path, layer) == hf
    assert ck.hf_name("layers/attn/q/kernel", 3) == "model.layers.3.self_attn.q_proj.weight"
    assert ck.hf_name("layers/mlp_norm/scale", 0) == "model.layers.0.post_attention_layernorm.weight"
    assert ck.tree_path("lm_head.weight") == ("lm_head/kernel", None)


def test_layer_wise_lambda_by_tensor_name():
    config, params = ck.load_hf_causal_lm(fixture_dir("llama"))
    lam = init_coefficients(params, 3, "layer", 0.3, llama.stacked)
    named = named_coefficients(lam, ck.coefficient_tensor_names(config))
    assert len(named) == len(hf_tensors("llama")) and named["model.layers.1.mlp.down_proj.bias"] == [
        pytest.approx(0.3)] * 3


def test_order_is_transformers_named_parameters():
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for name in NAMES:
        with open(os.path.join(fixture_dir(name), "config.json")) as f:
            hf_config = transformers.AutoConfig.for_model(**json.load(f))
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
        order = ck.coefficient_tensor_names(ck.read_config(fixture_dir(name))).order
        assert order == tuple(n for n, _ in model.named_parameters())


def test_name_mapping_errors():
    with pytest.raises(ValueError, match="layer"):
        ck.hf_name("layers/attn/q/kernel")
    with pytest.raises(KeyError, match="layers/attn/qq/kernel"):
        ck.hf_name("layers/attn/qq/kernel", 0)
    with pytest.raises(KeyError, match="model.layers.0.self_attn.rotary"):
        ck.tree_path("model.layers.0.self_attn.rotary")


@pytest.mark.parametrize("name", NAMES)
def test_read_converts_layouts(name):
    """Independent check of the layout: our kernel [i] is the transposed HF weight of layer i."""
    config, params = ck.load_hf_causal_lm(fixture_dir(name))
    state = hf_tensors(name)
    np.testing.assert_array_equal(params["layers"]["attn"]["q"]["kernel"][1],
                                  state["model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(params["layers"]["mlp_norm"]["scale"][0],
                                  state["model.layers.0.post_attention_layernorm.weight"])
    np.testing.assert_array_equal(params["embed"], state["model.embed_tokens.weight"])
    assert ("lm_head" in params) == (not config.tie_word_embeddings)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_exact(tmp_path, name):
    config, params = ck.load_hf_causal_lm(fixture_dir(name))
    ck.save_hf_causal_lm(tmp_path / "out", params, config)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    saved = load_file(tmp_path / "out" / "model.safetensors")
    original = hf_tensors(name)
    assert sorted(saved) == sorted(original)
    for key in original:
        np.testing.assert_array_equal(saved[key], original[key])
    config2, params2 = ck.load_hf_causal_lm(str(tmp_path / "out"))
    assert config2 == config
    leaves_equal(params2, params)


def test_sharded_write_and_read(tmp_path):
    config, params = ck.load_hf_causal_lm(fixture_dir("llama"))
    ck.save_hf_causal_lm(tmp_path / "out", params, config, max_shard_bytes=40_000)
    files = sorted(os.listdir(tmp_path / "out"))
    shards = [f for f in files if f.startswith("model-")]
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files and len(shards) > 2
    with open(tmp_path / "out" / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in hf_tensors("llama").values())
    _, loaded = ck.load_hf_causal_lm(str(tmp_path / "out"))
    leaves_equal(loaded, params)


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16])
def test_half_precision_files_read(tmp_path, dtype):
    state = {k: v.astype(dtype) for k, v in hf_tensors("qwen2").items()}
    _, params = ck.load_hf_causal_lm(checkpoint_with(tmp_path / "m", "qwen2", state))
    np.testing.assert_array_equal(params["layers"]["attn"]["v"]["kernel"][1],
                                  state["model.layers.1.self_attn.v_proj.weight"].astype(np.float32).T)
    assert params["embed"].dtype == np.float32
    _, bf16 = ck.load_hf_causal_lm(checkpoint_with(tmp_path / "m", "qwen2", state), dtype=jnp.bfloat16)
    assert bf16["embed"].dtype == jnp.bfloat16


def test_bf16_export(tmp_path):
    config, params = ck.load_hf_causal_lm(fixture_dir("qwen2"))
    ck.save_hf_causal_lm(tmp_path / "out", params, config, dtype=jnp.bfloat16)
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    _, loaded = ck.load_hf_causal_lm(str(tmp_path / "out"), dtype=None)
    np.testing.assert_array_equal(loaded["embed"], params["embed"].astype(jnp.bfloat16).astype(np.float32))


def test_missing_tensor_named(tmp_path):
    state = hf_tensors("llama")
    del state["lm_head.weight"]  # untied: the head is needed
    with pytest.raises(KeyError, match="lm_head.weight"):
        ck.load_hf_causal_lm(checkpoint_with(tmp_path / "m", "llama", state))


def test_wrong_shape_named(tmp_path):
    state = hf_tensors("llama")
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:-1]
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight.*\(79, 48\).*\(80, 48\)"):
        ck.load_hf_causal_lm(checkpoint_with(tmp_path / "m", "llama", state))


def test_nonfinite_refused_unless_allowed(tmp_path):
    state = hf_tensors("qwen2")
    state["model.layers.0.self_attn.k_proj.bias"][2] = np.nan
    directory = checkpoint_with(tmp_path / "m", "qwen2", state)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.k_proj.bias.*NaN"):
        ck.load_hf_causal_lm(directory)
    _, params = ck.load_hf_causal_lm(directory, allow_nonfinite=True)
    assert np.isnan(params["layers"]["attn"]["k"]["bias"][0, 2])


def test_unexpected_tensor_refused_and_tied_head_ignored(tmp_path):
    state = hf_tensors("qwen2")
    with_head = dict(state, **{"lm_head.weight": np.zeros_like(state["model.embed_tokens.weight"])})
    _, params = ck.load_hf_causal_lm(checkpoint_with(tmp_path / "a", "qwen2", with_head))
    assert "lm_head" not in params  # tied: the embedding is the head, as in transformers
    extra = dict(state, **{"model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)})
    with pytest.raises(ValueError, match="model.layers.0.self_attn.o_proj.bias"):
        ck.load_hf_causal_lm(checkpoint_with(tmp_path / "b", "qwen2", extra))


def test_params_config_mismatch_named(tmp_path):
    config, params = ck.load_hf_causal_lm(fixture_dir("llama"))
    del params["layers"]["attn"]["q"]["bias"]
    with pytest.raises(ValueError, match="layers/attn/q/bias"):
        ck.save_hf_causal_lm(tmp_path / "out", params, config)


def test_export_replaces_folder_whole_and_copies_tokenizer(tmp_path):
    config, params = ck.load_hf_causal_lm(fixture_dir("qwen2"))
    out = tmp_path / "out"
    ck.save_hf_causal_lm(out, params, config, max_shard_bytes=20_000)
    assert "model.safetensors.index.json" in os.listdir(out)
    tokenizer = write_tokenizer(tmp_path / "tok")
    ck.save_hf_causal_lm(out, params, config, tokenizer_dir=tokenizer)
    files = set(os.listdir(out))
    assert files == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no temporary folder left
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        ck.save_hf_causal_lm(out, params, config)
    assert (out / "notes.txt").exists()
    with pytest.raises(FileNotFoundError, match="holds neither vocab.json"):
        ck.save_hf_causal_lm(tmp_path / "other", params, config, tokenizer_dir=tmp_path)
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("name", NAMES)
def test_transformers_loads_our_export(tmp_path, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, params = ck.load_hf_causal_lm(fixture_dir(name))
    # Our own weights, not the fixture's: move every leaf so that a file transformers silently
    # re-initialised or a tensor it mapped elsewhere would show.
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_unflatten(treedef, [x + 0.05 * rng.normal(size=x.shape).astype(x.dtype)
                                                    for x in leaves])
    tokenizer = write_tokenizer(tmp_path / "tok")
    ck.save_hf_causal_lm(tmp_path / "out", params, config, tokenizer_dir=tokenizer)
    model = load_checked(transformers.AutoModelForCausalLM, tmp_path / "out", attn_implementation="eager")
    expected = dict(np.load(os.path.join(fixture_dir(name), "expected.npz")))
    ids, mask, positions = expected["input_ids"], expected["attention_mask"], expected["position_ids"]
    with torch.no_grad():
        theirs = model.float()(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                               position_ids=torch.from_numpy(positions).long()).logits.numpy()
    ours = np.asarray(jax.jit(llama.forward, static_argnums=3)(params, ids, mask, config))
    assert np.abs(ours - theirs)[mask == 1].max() <= 1e-5
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out")("the cat")["input_ids"]
