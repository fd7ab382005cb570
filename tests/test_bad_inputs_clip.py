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
