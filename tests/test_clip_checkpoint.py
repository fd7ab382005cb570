"""CLIP checkpoint paths: HF prefix / no prefix, fp16 / bf16, open_clip layout, HF export, clear errors."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from adamerging_jax.models import clip
from adamerging_jax.models import clip_checkpoint as ck
from hf_loading import load_checked

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "clip", "ti8")


@pytest.fixture(scope="module")
def hf_state():
    return load_file(os.path.join(FIXTURE, "model.safetensors"))


@pytest.fixture(scope="module")
def reference():
    return ck.load_hf_clip(FIXTURE)


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(os.path.join(FIXTURE, "expected.npz")))


def leaves_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def write_vision_model(directory, tensors, config):
    """An HF CLIPVisionModel directory holding ``tensors`` (names as given) and the vision config."""
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), {"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(ck.hf_vision_config(config.vision), f)
    return str(directory)


@pytest.mark.parametrize("prefix", ["vision_model.", ""])
def test_vision_model_with_and_without_prefix(tmp_path, hf_state, reference, prefix):
    config, params = reference
    tensors = {prefix + k[len("vision_model."):]: v for k, v in hf_state.items() if k.startswith("vision_model.")}
    loaded_config, loaded = ck.load_hf_clip(write_vision_model(tmp_path / "m", tensors, config))
    assert loaded_config.vision == config.vision and loaded_config.text is None
    assert set(loaded) == {"vision"}
    leaves_equal(loaded["vision"], params["vision"])


def test_full_model_tree_and_safetensors_file_path(reference):
    config, params = reference
    assert set(params) == {"vision", "visual_projection", "text", "text_projection", "logit_scale"}
    _, from_file = ck.load_hf_clip(os.path.join(FIXTURE, "model.safetensors"))
    leaves_equal(from_file, params)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_files(tmp_path, hf_state, reference, expected, half):
    """fp16 / bf16 files load to the exactly rounded fp32 values (or kept in fp16 with dtype=None)."""
    from safetensors.flax import save_file as save_flax

    config, params = reference
    half_state = {k: jnp.asarray(v, dtype=half) for k, v in hf_state.items()}
    directory = tmp_path / half
    directory.mkdir()
    save_flax(half_state, str(directory / "model.safetensors"))
    shutil.copy(os.path.join(FIXTURE, "config.json"), directory)
    _, loaded = ck.load_hf_clip(str(directory))
    rounded = jax.tree_util.tree_map(lambda a: np.asarray(jnp.asarray(a, dtype=half), np.float32), params)
    leaves_equal(loaded, rounded)
    assert all(a.dtype == np.float32 for a in jax.tree_util.tree_leaves(loaded))
    if half == "float16":
        _, kept = ck.load_hf_clip(str(directory), dtype=None)
        assert all(a.dtype == np.float16 for a in jax.tree_util.tree_leaves(kept))
    pooled = clip.vision_forward(loaded["vision"], expected["pixel_values_nchw"].transpose(0, 2, 3, 1), config)[1]
    np.testing.assert_allclose(pooled, expected["vision_pooled"], atol=0.1)


def open_clip_state(hf_state):
    """The open_clip ``visual.*`` names of the same weights (fused q;k;v in_proj, proj as [W, D])."""
    v = {k[len("vision_model."):]: a for k, a in hf_state.items() if k.startswith("vision_model.")}
    state = {"visual.class_embedding": v["embeddings.class_embedding"],
             "visual.conv1.weight": v["embeddings.patch_embedding.weight"],
             "visual.positional_embedding": v["embeddings.position_embedding.weight"],
             "visual.ln_pre.weight": v["pre_layrnorm.weight"], "visual.ln_pre.bias": v["pre_layrnorm.bias"],
             "visual.ln_post.weight": v["post_layernorm.weight"], "visual.ln_post.bias": v["post_layernorm.bias"],
             "visual.proj": hf_state["visual_projection.weight"].T.copy()}
    for i in range(2):
        hf, oc = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        state[oc + "attn.in_proj_weight"] = np.concatenate([v[hf + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        state[oc + "attn.in_proj_bias"] = np.concatenate([v[hf + f"self_attn.{p}_proj.bias"] for p in "qkv"])
        for ours, theirs in [("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]:
            for leaf in ["weight", "bias"]:
                state[f"{oc}{ours}.{leaf}"] = v[f"{hf}{theirs}.{leaf}"]
    state["token_embedding.weight"] = hf_state["text_model.embeddings.token_embedding.weight"]  # ignored
    return state


@pytest.mark.parametrize("prefix", ["", "model."])
def test_open_clip_layout_gives_identical_outputs(hf_state, reference, expected, prefix):
    config, params = reference
    state = {prefix + k: a for k, a in open_clip_state(hf_state).items()}
    oc_config, oc_params = ck.params_from_open_clip(state, head_width=16)
    assert oc_config.vision == config.vision
    leaves_equal(oc_params["vision"], params["vision"])
    leaves_equal(oc_params["visual_projection"], params["visual_projection"])
    x = expected["pixel_values_nchw"].transpose(0, 2, 3, 1)
    ours = clip.image_encoder(oc_config, oc_params["visual_projection"]["kernel"])(oc_params["vision"], x)
    np.testing.assert_array_equal(ours, clip.encode_image(params, x, config))


def test_open_clip_torch_file_safe_by_default(tmp_path, hf_state, reference):
    torch = pytest.importorskip("torch")
    config, params = reference
    path = tmp_path / "state_dict.pt"
    torch.save({k: torch.from_numpy(np.array(a)) for k, a in open_clip_state(hf_state).items()}, path)
    _, loaded = ck.load_open_clip_checkpoint(str(path), head_width=16)
    leaves_equal(loaded["vision"], params["vision"])
    module_path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), module_path)
    with pytest.raises(ValueError, match="trust_pickle=True"):
        ck.load_open_clip_checkpoint(str(module_path))


def test_hf_export_round_trip_without_torch(tmp_path, reference):
    config, params = reference
    ck.save_hf_vision_model(str(tmp_path / "out"), params["vision"], config)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    loaded_config, loaded = ck.load_hf_clip(str(tmp_path / "out"))
    assert loaded_config.vision == config.vision
    leaves_equal(loaded["vision"], params["vision"])


def test_hf_export_loads_in_transformers_without_warnings(tmp_path, reference, expected):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, params = reference
    merged = jax.tree_util.tree_map(lambda a: a * 1.01, params["vision"])  # any tower, not just the fixture's
    ck.save_hf_vision_model(str(tmp_path / "out"), merged, config)
    model = load_checked(transformers.CLIPVisionModel, tmp_path / "out", python_warnings_are_errors=True)
    with torch.no_grad():
        torch_pooled = model(pixel_values=torch.from_numpy(expected["pixel_values_nchw"])).pooler_output.numpy()
    ours = clip.vision_forward(merged, expected["pixel_values_nchw"].transpose(0, 2, 3, 1), config)[1]
    np.testing.assert_allclose(ours, torch_pooled, rtol=0, atol=1e-5)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ck.load_hf_clip(str(tmp_path / "nowhere"))


def test_hub_id_offline_says_where_it_looked():
    with pytest.raises(FileNotFoundError, match=r"not-a-user-zz/no-such-clip.*Hugging Face cache"):
        ck.load_hf_clip("not-a-user-zz/no-such-clip", allow_download=False)


def test_directory_without_weights_lists_contents(tmp_path):
    shutil.copy(os.path.join(FIXTURE, "config.json"), tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"model.safetensors.*pytorch_model.bin"):
        ck.load_hf_clip(str(tmp_path))


def test_missing_config_is_named(tmp_path):
    shutil.copy(os.path.join(FIXTURE, "model.safetensors"), tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ck.load_hf_clip(str(tmp_path))


def test_corrupt_file_is_named(tmp_path):
    shutil.copy(os.path.join(FIXTURE, "config.json"), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match="model.safetensors"):
        ck.load_hf_clip(str(tmp_path))


def test_missing_tensor_is_named(tmp_path, hf_state):
    shutil.copy(os.path.join(FIXTURE, "config.json"), tmp_path)
    name = "vision_model.encoder.layers.1.mlp.fc2.bias"
    save_file({k: v for k, v in hf_state.items() if k != name}, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        ck.load_hf_clip(str(tmp_path))


def test_config_disagreeing_with_weights_is_named(tmp_path, hf_state, reference):
    config, _ = reference
    tensors = {k: v for k, v in hf_state.items() if k.startswith("vision_model.")}
    directory = write_vision_model(tmp_path, tensors, config)
    with open(os.path.join(directory, "config.json")) as f:
        hf_config = json.load(f)
    hf_config["patch_size"] = 16
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f)
    with pytest.raises(ValueError, match="patch_embed"):
        ck.load_hf_clip(directory)


def test_not_a_clip_config_names_the_file(tmp_path):
    shutil.copy(os.path.join(FIXTURE, "model.safetensors"), tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match=r"config\.json.*bert"):
        ck.load_hf_clip(str(tmp_path))
