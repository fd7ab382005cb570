"""Bad CLIP checkpoints are refused with the culprit named: one row per case (``CASES``), one test over them.

Each case copies the committed tiny HF CLIP (tests/fixtures/clip/ti8) with one thing broken, or builds the
open_clip layout of the same weights, and states the exception and the part of its message that names the
tensor or the config.json key at fault.
"""
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from adamerging_jax.models import clip
from adamerging_jax.models import clip_checkpoint as ck
from bad_inputs import Case

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "clip", "ti8")


def fixture_state() -> dict[str, np.ndarray]:
    return load_file(os.path.join(FIXTURE, "model.safetensors"))


def with_tensors(change: Callable[[dict[str, np.ndarray]], None]) -> Callable[[Path], Any]:
    """Load a copy of the fixture whose tensors ``change`` edited in place."""
    def run(tmp: Path) -> Any:
        state = fixture_state()
        change(state)
        save_file(state, str(tmp / "model.safetensors"))
        shutil.copy(os.path.join(FIXTURE, "config.json"), tmp)
        return ck.load_hf_clip(str(tmp))
    return run


def with_config(section: str, key: str, value: Any) -> Callable[[Path], Any]:
    """Load a copy of the fixture whose config.json has ``section[key] = value`` (deleted when value is None)."""
    def run(tmp: Path) -> Any:
        with open(os.path.join(FIXTURE, "config.json")) as f:
            config = json.load(f)
        if value is None:
            del config[section][key]
        else:
            config[section][key] = value
        (tmp / "config.json").write_text(json.dumps(config))
        shutil.copy(os.path.join(FIXTURE, "model.safetensors"), tmp)
        return ck.load_hf_clip(str(tmp))
    return run


def open_clip_state() -> dict[str, np.ndarray]:
    """The open_clip ``visual.*`` layout of the fixture's image tower (fused q;k;v ``in_proj``)."""
    state = fixture_state()
    v = {k.removeprefix("vision_model."): a for k, a in state.items() if k.startswith("vision_model.")}
    out = {"visual.class_embedding": v["embeddings.class_embedding"],
           "visual.conv1.weight": v["embeddings.patch_embedding.weight"],
           "visual.positional_embedding": v["embeddings.position_embedding.weight"],
           "visual.ln_pre.weight": v["pre_layrnorm.weight"], "visual.ln_pre.bias": v["pre_layrnorm.bias"],
           "visual.ln_post.weight": v["post_layernorm.weight"], "visual.ln_post.bias": v["post_layernorm.bias"]}
    for i in range(2):
        hf, oc = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for leaf in ["weight", "bias"]:
            out[f"{oc}attn.in_proj_{leaf}"] = np.concatenate([v[f"{hf}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for ours, theirs in [("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]:
                out[f"{oc}{ours}.{leaf}"] = v[f"{hf}{theirs}.{leaf}"]
    return out


def open_clip(change: Callable[[dict[str, np.ndarray]], None]) -> Callable[[Path], Any]:
    def run(tmp: Path) -> Any:
        state = open_clip_state()
        change(state)
        return ck.params_from_open_clip(state, head_width=16)
    return run


def set_value(name: str, value: float) -> Callable[[dict[str, np.ndarray]], None]:
    def change(state: dict[str, np.ndarray]) -> None:
        state[name] = state[name].copy()
        state[name].flat[3] = value
    return change


def reshape(name: str, shape: tuple[int, ...]) -> Callable[[dict[str, np.ndarray]], None]:
    def change(state: dict[str, np.ndarray]) -> None:
        state[name] = np.zeros(shape, state[name].dtype)
    return change


def retype(name: str, dtype: Any) -> Callable[[dict[str, np.ndarray]], None]:
    def change(state: dict[str, np.ndarray]) -> None:
        state[name] = state[name].astype(dtype)
    return change


def extra_layer(state: dict[str, np.ndarray]) -> None:
    """A third block's tensors (copies of layer 1's) beside config.json's two layers."""
    prefix = "vision_model.encoder.layers."
    state.update({name.replace(f"{prefix}1.", f"{prefix}2."): value for name, value in list(state.items())
                  if name.startswith(f"{prefix}1.")})


def with_config_text(text: str | bytes) -> Callable[[Path], Any]:
    """Load a copy of the fixture whose config.json is ``text`` (bytes written as they are)."""
    def run(tmp: Path) -> Any:
        (tmp / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        shutil.copy(os.path.join(FIXTURE, "model.safetensors"), tmp)
        return ck.load_hf_clip(str(tmp))
    return run


def sharded(weight_map: Callable[[list[str]], dict[str, Any]] | None = None, extra_shard: bool = False
            ) -> Callable[[Path], Any]:
    """Load a copy of the fixture cut into two shards with an index whose weight_map is ``weight_map(names)``
    (the true map when None; absent when it returns {}). ``extra_shard`` copies a tensor into the other shard."""
    def run(tmp: Path) -> Any:
        state = fixture_state()
        names = sorted(state)
        halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for shard, part in halves.items():
            tensors = {name: state[name] for name in part}
            if extra_shard and shard.startswith("model-00002"):
                tensors[names[0]] = state[names[0]]
            save_file(tensors, str(tmp / shard))
        true_map = {name: shard for shard, part in halves.items() for name in part}
        index = {"metadata": {}, "weight_map": weight_map(names) if weight_map else true_map}
        if not index["weight_map"]:
            del index["weight_map"]
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index))
        shutil.copy(os.path.join(FIXTURE, "config.json"), tmp)
        return ck.load_hf_clip(str(tmp))
    return run


def drop_blocks(state: dict[str, np.ndarray]) -> None:
    for name in [n for n in state if ".resblocks." in n]:
        del state[name]


FC1 = "vision_model.encoder.layers.1.mlp.fc1.weight"
CASES = [
    Case("hf-shape-one-layer", "a safetensors tensor of the wrong shape in one layer", ValueError,
         f"tensor {FC1!r} has shape (48, 31), config.json implies (48, 32)", with_tensors(reshape(FC1, (48, 31)))),
    Case("hf-shape-text", "a text-tower tensor of the wrong shape", ValueError,
         "'text_model.embeddings.token_embedding.weight' has shape (500, 40)",
         with_tensors(reshape("text_model.embeddings.token_embedding.weight", (500, 40)))),
    Case("hf-nan", "a NaN weight (refused unless allow_nonfinite=True)", ValueError,
         "tensor 'vision_model.encoder.layers.0.self_attn.k_proj.weight' holds 1 NaN and 0 inf",
         with_tensors(set_value("vision_model.encoder.layers.0.self_attn.k_proj.weight", np.nan))),
    Case("hf-inf", "an inf weight", ValueError, "tensor 'text_projection.weight' holds 0 NaN and 1 inf",
         with_tensors(set_value("text_projection.weight", np.inf))),
    Case("config-patch-zero", "config.json patch_size 0", ValueError,
         "vision_config.patch_size: VisionConfig.patch_size = 0: must be a positive integer",
         with_config("vision_config", "patch_size", 0)),
    Case("config-patch-divides", "config.json patch_size that does not divide image_size", ValueError,
         "vision_config.image_size: VisionConfig.image_size = 32: must be a multiple of patch_size = 7",
         with_config("vision_config", "patch_size", 7)),
    Case("config-heads-zero", "config.json num_attention_heads 0", ValueError,
         "vision_config.num_attention_heads: VisionConfig.heads = 0",
         with_config("vision_config", "num_attention_heads", 0)),
    Case("config-heads-divide", "config.json heads that do not divide the width", ValueError,
         "text_config.hidden_size: TextConfig.width = 40: must be a multiple of heads = 3",
         with_config("text_config", "num_attention_heads", 3)),
    Case("config-activation", "config.json unknown hidden_act", ValueError,
         "vision_config.hidden_act: VisionConfig.activation = 'swish7': unknown",
         with_config("vision_config", "hidden_act", "swish7")),
    Case("config-eps", "config.json layer_norm_eps ≤ 0", ValueError,
         "text_config.layer_norm_eps: TextConfig.layer_norm_eps = 0.0: must be a finite number > 0",
         with_config("text_config", "layer_norm_eps", 0.0)),
    Case("config-layers", "config.json num_hidden_layers 0", ValueError,
         "vision_config.num_hidden_layers: VisionConfig.layers = 0",
         with_config("vision_config", "num_hidden_layers", 0)),
    Case("config-eos", "config.json eos_token_id outside the vocabulary", ValueError,
         "text_config.eos_token_id: TextConfig.eos_token_id = 600", with_config("text_config", "eos_token_id", 600)),
    Case("config-missing-key", "config.json without patch_size", ValueError, "missing key 'patch_size'",
         with_config("vision_config", "patch_size", None)),
    Case("open-clip-no-blocks", "an open_clip state dict without transformer.resblocks", KeyError,
         "no transformer blocks (no tensors named visual.transformer.resblocks.N.*)", open_clip(drop_blocks)),
    Case("open-clip-shape-one-layer", "an open_clip tensor of the wrong shape in one layer", ValueError,
         "tensor 'visual.transformer.resblocks.1.mlp.c_fc.weight' (48, 31) differs in shape from the other "
         "layers' (48, 32)", open_clip(reshape("visual.transformer.resblocks.1.mlp.c_fc.weight", (48, 31)))),
    Case("open-clip-nan", "an open_clip NaN weight", ValueError,
         "tensor 'visual.ln_post.bias' holds 1 NaN", open_clip(set_value("visual.ln_post.bias", np.nan))),
    Case("hf-integer", "an integer tensor where the model has float weights", ValueError,
         f"tensor {FC1!r} has dtype int32, the model's weight there is floating point",
         with_tensors(retype(FC1, np.int32))),
    Case("open-clip-integer", "an open_clip integer tensor where the model has float weights", ValueError,
         "tensor 'visual.ln_pre.weight' has dtype int64", open_clip(retype("visual.ln_pre.weight", np.int64))),
    Case("hf-extra-layer", "tensors of a third layer beside config.json's two (refused at the dry run)",
         ValueError, "tensor 'vision_model.encoder.layers.2.layer_norm1.bias' is in layer 2, but config.json has 2 "
         "layers", with_tensors(extra_layer)),
    Case("config-not-object", "a config.json that is a JSON list, not an object", ValueError,
         "config.json: expected a JSON object {...}, got list", with_config_text("[1, 2]")),
    Case("config-not-json", "a config.json cut short", ValueError, "config.json: not valid JSON",
         with_config_text('{"model_type": "clip", ')),
    Case("config-duplicate-key", "a config.json giving one key twice", ValueError,
         "config.json: key(s) ['model_type'] given more than once",
         with_config_text('{"model_type": "clip", "model_type": "clip_vision_model"}')),
    Case("config-not-utf8", "a config.json in Latin-1, not UTF-8", ValueError,
         "config.json: not UTF-8 text: byte 0xe9 at byte offset 13",
         with_config_text('{"name": "caf\u00e9"}'.encode("latin-1"))),
    Case("index-outside-folder", "a sharded index naming a shard outside the model folder (../)", ValueError,
         "is mapped to '../elsewhere.safetensors', a file outside the model folder",
         sharded(lambda names: {name: "../elsewhere.safetensors" for name in names})),
    Case("index-absolute-path", "a sharded index naming a shard by absolute path", ValueError,
         "is mapped to '/etc/passwd', a file outside the model folder",
         sharded(lambda names: {name: "/etc/passwd" for name in names})),
    Case("index-two-shards", "a sharded checkpoint holding one tensor in two shards", ValueError,
         "is in two shards, 'model-00001-of-00002.safetensors' and 'model-00002-of-00002.safetensors'",
         sharded(extra_shard=True)),
    Case("index-no-weight-map", "a sharded index without weight_map", ValueError,
         "model.safetensors.index.json: no 'weight_map' object", sharded(lambda names: {})),
    Case("index-missing-tensor", "a sharded index naming a tensor no shard holds", ValueError,
         "tensors ['vision_model.ghost'] (1 in all) are in no shard",
         sharded(lambda names: {**{n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)},
                                "vision_model.ghost": "model-00001-of-00002.safetensors"})),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_naming_the_culprit(case, tmp_path):
    with pytest.raises(case.expected, match=re.escape(case.fragment)):
        case.run(tmp_path)


def test_cases_are_well_formed():
    assert len({c.id for c in CASES}) == len(CASES)
    assert all(c.description and "\n" not in c.description for c in CASES)


def test_nonfinite_weights_load_when_allowed(tmp_path):
    name = "vision_model.encoder.layers.0.self_attn.k_proj.weight"
    state = fixture_state()
    state[name] = state[name].copy()
    state[name][2, 5] = np.inf
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(FIXTURE, "config.json"), tmp_path)
    _, params = ck.load_hf_clip(str(tmp_path), allow_nonfinite=True)
    assert params["vision"]["layers"]["attn"]["k"]["kernel"][0, 5, 2] == np.inf  # transposed to [in, out]


def test_config_classes_validate_directly():
    """Every construction path validates, not only config.json: the field is named."""
    with pytest.raises(ValueError, match=r"VisionConfig\.width = 30: must be a multiple of heads = 4"):
        clip.VisionConfig(image_size=32, patch_size=8, width=30, layers=2, heads=4, mlp_dim=48)
    with pytest.raises(ValueError, match=r"ClipConfig\.embed_dim = -1"):
        clip.ClipConfig(clip.get_config("Ti/8").vision, embed_dim=-1)
    assert clip.VisionConfig(image_size=np.int64(32), patch_size=8, width=32, layers=2, heads=2, mlp_dim=48)
