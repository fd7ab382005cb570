"""CLIP checkpoints in and out: Hugging Face safetensors, open_clip state dicts, and whole HF model folders
(``CLIPVisionModelWithProjection``, ``CLIPModel``, ``CLIPVisionModel``) written for ``from_pretrained``.

Our tree (``adamerging_jax.models.clip``) ↔ HF names, per tensor:

    vision/class_embedding          embeddings.class_embedding
    vision/patch_embed/kernel       embeddings.patch_embedding.weight   [kh, kw, I, O] ↔ [O, I, kh, kw]
    vision/pos_embedding            embeddings.position_embedding.weight
    vision/pre_ln/{scale,bias}      pre_layrnorm.{weight,bias}          (sic: "layrnorm")
    vision/layers/<block>[i]        encoder.layers.i.<block>            stacked on axis 0 over i
    vision/post_ln/{scale,bias}     post_layernorm.{weight,bias}
    text/token_embedding            embeddings.token_embedding.weight
    text/pos_embedding              embeddings.position_embedding.weight
    text/final_ln/{scale,bias}      final_layer_norm.{weight,bias}
    {visual,text}_projection/kernel {visual,text}_projection.weight      [in, out] ↔ [out, in]
    logit_scale                     logit_scale

with <block> = ln1 ↔ layer_norm1, attn/{q,k,v,out} ↔ self_attn.{q,k,v,out}_proj, ln2 ↔ layer_norm2,
mlp/fc1 ↔ mlp.fc1, mlp/fc2 ↔ mlp.fc2; Linear weights are transposed ([out, in] in torch, [in, out] here).
The vision names carry a ``vision_model.`` prefix in ``CLIPModel`` files and in transformers 4.x
``CLIPVisionModel`` files; the prefix is optional on input. Files are read with safetensors (fp32, fp16, bf16),
whole (`load_hf_clip`, `load_clip_towers`) or, for a merge streamed from disk, from their headers with each
tensor read when it is merged (`open_hf_clip`, `open_clip_towers`: the same checks, nothing loaded).

open_clip's ``visual.*`` names (the official AdaMerging / task_vectors checkpoints) differ in that q, k, v are
one fused ``attn.in_proj_weight`` [3W, W] (rows q; k; v), ``proj`` is already [W, D], and blocks are named
``transformer.resblocks.i.{ln_1, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``.
"""
from __future__ import annotations

import dataclasses
import functools
import contextlib
import os
import re
import shutil
import sys
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np

from adamerging_jax.coefficient_formats import OfficialRows, TensorNames
from adamerging_jax.core.checkpoint import atomic_directory, write_json_atomic
from adamerging_jax.models.hf_files import (
    CONFIG,
    SAFETENSORS,
    TOKENIZER_FILES,
    check_float_dtype,
    check_float_tensor,
    read_checkpoint_dir,
    read_safetensors,
    tokenizer_files,
)
from adamerging_jax.data.strict_text import read_json_object
from adamerging_jax.models.clip import ClipConfig, ConfigError, TextConfig, VisionConfig, init_params
from adamerging_jax.models.safetensors_stream import CheckpointFiles, RenamedTensors

Params = dict[str, Any]
StateDict = Mapping[str, np.ndarray]

VISION_PREFIX = "vision_model."

# (our path inside a block, HF name inside "encoder.layers.i.", is a torch Linear weight)
_BLOCK = [
    ("ln1/scale", "layer_norm1.weight", False), ("ln1/bias", "layer_norm1.bias", False),
    *[(f"attn/{ours}/{leaf}", f"self_attn.{hf}_proj.{name}", leaf == "kernel")
      for ours, hf in [("q", "q"), ("k", "k"), ("v", "v"), ("out", "out")]
      for leaf, name in [("kernel", "weight"), ("bias", "bias")]],
    ("ln2/scale", "layer_norm2.weight", False), ("ln2/bias", "layer_norm2.bias", False),
    *[(f"mlp/{fc}/{leaf}", f"mlp.{fc}.{name}", leaf == "kernel")
      for fc in ["fc1", "fc2"] for leaf, name in [("kernel", "weight"), ("bias", "bias")]],
]
# (our path, HF name, layout: "copy" | "linear" | "conv")
_VISION = [
    ("class_embedding", "embeddings.class_embedding", "copy"),
    ("patch_embed/kernel", "embeddings.patch_embedding.weight", "conv"),
    ("pos_embedding", "embeddings.position_embedding.weight", "copy"),
    ("pre_ln/scale", "pre_layrnorm.weight", "copy"), ("pre_ln/bias", "pre_layrnorm.bias", "copy"),
    ("post_ln/scale", "post_layernorm.weight", "copy"), ("post_ln/bias", "post_layernorm.bias", "copy"),
]
_TEXT = [
    ("token_embedding", "embeddings.token_embedding.weight", "copy"),
    ("pos_embedding", "embeddings.position_embedding.weight", "copy"),
    ("final_ln/scale", "final_layer_norm.weight", "copy"), ("final_ln/bias", "final_layer_norm.bias", "copy"),
]

# torch layout -> ours, and back
_TO_OURS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda a: a, "linear": lambda a: a.T, "conv": lambda a: a.transpose(2, 3, 1, 0)}
_TO_TORCH: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda a: a, "linear": lambda a: a.T, "conv": lambda a: a.transpose(3, 2, 0, 1)}


# ------------------------------------------------------------------------------------------- file reading


def resolve_checkpoint(path_or_id: str, *, allow_download: bool = True) -> str:
    """A local file or directory as given, else a hub id fetched (or found in the cache) by huggingface_hub.

    Raises FileNotFoundError naming the local path that does not exist and the hub cache that was searched.
    """
    if os.path.exists(path_or_id):
        return path_or_id
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", path_or_id):
        raise FileNotFoundError(f"CLIP checkpoint {path_or_id!r}: no such file or directory")
    from huggingface_hub import constants, snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt"]
    try:
        return snapshot_download(path_or_id, allow_patterns=patterns, local_files_only=True)
    except Exception as cached_err:
        if not allow_download:
            raise FileNotFoundError(
                f"CLIP checkpoint {path_or_id!r}: not a local path, and not in the Hugging Face cache "
                f"{constants.HF_HUB_CACHE!r} (downloads disabled). Download it where the hub is reachable "
                f"(`hf download {path_or_id}`) and pass the directory.") from cached_err
    try:
        return snapshot_download(path_or_id, allow_patterns=patterns)
    except Exception as err:
        raise FileNotFoundError(
            f"CLIP checkpoint {path_or_id!r}: not a local path, not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE!r}, and the hub could not be reached ({type(err).__name__}: {err}). "
            f"Download it where the hub is reachable (`hf download {path_or_id}`) and pass the directory.") from err


# ----------------------------------------------------------------------------------------------- configs


# Our config fields -> the HF config.json keys they come from (the rest have the same name).
_HF_KEYS = {"width": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
            "mlp_dim": "intermediate_size", "activation": "hidden_act", "context_length": "max_position_embeddings",
            "embed_dim": "projection_dim"}


def config_from_hf(hf_config: Mapping[str, Any]) -> ClipConfig:
    """Our ClipConfig from an HF config.json dict: a ``CLIPModel`` ("clip") or a ``CLIPVisionModel``.

    Values are validated by the config classes; a bad one raises ValueError naming the config.json key
    (e.g. ``vision_config.patch_size``) and the rule it breaks.
    """
    model_type = hf_config.get("model_type")
    if model_type == "clip":
        text = hf_config["text_config"]
        eos = text.get("eos_token_id", 2)
        return ClipConfig(
            vision=_vision_config_from_hf(hf_config["vision_config"], "vision_config."),
            text=_hf_checked("text_config.", lambda: TextConfig(
                vocab_size=text["vocab_size"], context_length=text.get("max_position_embeddings", 77),
                width=text["hidden_size"], layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
                mlp_dim=text["intermediate_size"],
                # Configs before transformers PR #24773 say eos 2 and mean "the largest id" (49407).
                eos_token_id=text["vocab_size"] - 1 if eos == 2 else eos,
                activation=text.get("hidden_act", "quick_gelu"), layer_norm_eps=text.get("layer_norm_eps", 1e-5))),
            embed_dim=_hf_checked("", lambda: hf_config.get("projection_dim", 512)),
            logit_scale_init=hf_config.get("logit_scale_init_value", 2.6592))
    if model_type == "clip_vision_model":
        return ClipConfig(vision=_vision_config_from_hf(hf_config, ""))
    raise ValueError(f"config model_type {model_type!r} is not a CLIP model ('clip' or 'clip_vision_model')")


def _hf_checked(section: str, build: Callable[[], Any]) -> Any:
    """``build()``, with a ConfigError re-raised naming the config.json key (``section`` + HF key)."""
    try:
        return build()
    except ConfigError as err:
        raise ValueError(f"{section}{_HF_KEYS.get(err.field, err.field)}: {err}") from err


def _vision_config_from_hf(v: Mapping[str, Any], section: str) -> VisionConfig:
    return _hf_checked(section, lambda: VisionConfig(
        image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
        layers=v["num_hidden_layers"], heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
        activation=v.get("hidden_act", "quick_gelu"), layer_norm_eps=v.get("layer_norm_eps", 1e-5)))


def hf_vision_config(config: VisionConfig) -> dict[str, Any]:
    """The config.json of an HF ``CLIPVisionModel`` with this image tower."""
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_size": config.width,
            "intermediate_size": config.mlp_dim, "num_hidden_layers": config.layers,
            "num_attention_heads": config.heads, "image_size": config.image_size, "patch_size": config.patch_size,
            "num_channels": 3, "hidden_act": config.activation, "layer_norm_eps": config.layer_norm_eps,
            "attention_dropout": 0.0, "dtype": "float32"}


# ------------------------------------------------------------------------------------- HF names <-> tree


def _set(tree: Params, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _get(tree: Params, path: str) -> Any:
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _cast(array: np.ndarray, dtype: Any) -> np.ndarray:
    """``array`` in ``dtype`` (contiguous); ``dtype=None`` keeps the stored one."""
    return np.array(array, dtype=dtype, order="C")


def _take(state: StateDict, name: str, source: str) -> np.ndarray:
    """The weight ``name`` of ``state``: present and floating point, else an error naming it."""
    if name not in state:
        raise KeyError(f"{source}: tensor {name!r} is missing")
    check_float_tensor(name, state[name], source)
    return np.asarray(state[name])


def _count_layers(state: StateDict, prefix: str) -> int:
    found = {int(m.group(1)) for name in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", name))}
    if found != set(range(len(found))):
        raise ValueError(f"layers under {prefix!r} are not numbered 0..{len(found) - 1}: {sorted(found)}")
    return len(found)


def _stack_layers(per_layer: list[np.ndarray], names: list[str], source: str) -> np.ndarray:
    """The per-layer tensors stacked on a new axis 0; a layer whose shape differs from the others' is named."""
    shapes = [a.shape for a in per_layer]
    common = max(set(shapes), key=shapes.count)
    if odd := [f"{name!r} {shape}" for name, shape in zip(names, shapes) if shape != common]:
        raise ValueError(f"{source}: tensor {', '.join(odd)} differs in shape from the other layers' {common}")
    return np.stack(per_layer)


def _check_finite(state: StateDict, names: Iterable[str], source: str) -> None:
    """Refuse NaN / inf in the floating tensors ``names`` of ``state``, naming the first such tensor."""
    for name in names:
        array = np.asarray(state[name])
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
            raise ValueError(f"{source}: tensor {name!r} holds {nan} NaN and {inf} inf values "
                             f"(pass allow_nonfinite=True to load it anyway)")


def _tower_from_hf(state: StateDict, prefix: str, table: list, source: str, dtype: Any) -> Params:
    """One tower (vision or text) from HF names under ``prefix``: top-level tensors, then stacked blocks."""
    tree: Params = {}
    for ours, hf, layout in table:
        _set(tree, ours, _cast(_TO_OURS[layout](_take(state, prefix + hf, source)), dtype))
    num_layers = _count_layers(state, prefix + "encoder.layers.")
    if num_layers == 0:
        raise KeyError(f"{source}: no tensors named {prefix}encoder.layers.N.*")
    for ours, hf, is_linear in _BLOCK:
        names = [f"{prefix}encoder.layers.{i}.{hf}" for i in range(num_layers)]
        stacked = _stack_layers([_take(state, name, source) for name in names], names, source)
        _set(tree, "layers/" + ours, _cast(stacked.swapaxes(1, 2) if is_linear else stacked, dtype))
    return tree


def _tower_to_hf(tree: Params, prefix: str, table: list) -> dict[str, np.ndarray]:
    state = {prefix + hf: _TO_TORCH[layout](np.asarray(_get(tree, ours))) for ours, hf, layout in table}
    for ours, hf, is_linear in _BLOCK:
        for i, a in enumerate(np.asarray(_get(tree, "layers/" + ours))):
            state[f"{prefix}encoder.layers.{i}.{hf}"] = a.T if is_linear else a
    return state


def _vision_prefix(names: Iterable[str], source: str) -> str:
    """How a file names its image tower's tensors: under ``vision_model.`` or bare (module docstring)."""
    names = list(names)
    if any(name.startswith(VISION_PREFIX) for name in names):
        return VISION_PREFIX
    if any(name.startswith("embeddings.patch_embedding") for name in names):
        return ""
    raise KeyError(f"{source}: no CLIP vision tower (no 'vision_model.embeddings.patch_embedding.weight' "
                   f"nor 'embeddings.patch_embedding.weight'); first names: {sorted(names)[:5]}")


def params_from_hf_state_dict(state: StateDict, *, source: str = "state dict", dtype: Any = np.float32,
                              allow_nonfinite: bool = False) -> Params:
    """Our tree from HF CLIP tensors by name. Vision names with or without ``vision_model.``; text tower,
    projections and ``logit_scale`` are converted when present. ``dtype=None`` keeps the stored dtypes.
    A NaN / inf tensor is refused with its name unless ``allow_nonfinite``."""
    if not allow_nonfinite:
        _check_finite(state, state, source)
    params: Params = {"vision": _tower_from_hf(state, _vision_prefix(state, source), _VISION, source, dtype)}
    if any(name.startswith("text_model.") for name in state):
        params["text"] = _tower_from_hf(state, "text_model.", _TEXT, source, dtype)
    for projection in ["visual_projection", "text_projection"]:
        if f"{projection}.weight" in state:
            params[projection] = {"kernel": _cast(_take(state, f"{projection}.weight", source).T, dtype)}
    if "logit_scale" in state:
        params["logit_scale"] = _cast(_take(state, "logit_scale", source).reshape(()), dtype)
    return params


def load_hf_clip(path_or_id: str, *, dtype: Any = np.float32, allow_download: bool = True,
                 allow_nonfinite: bool = False) -> tuple[ClipConfig, Params]:
    """(config, params) of an HF CLIP checkpoint: a directory holding config.json and model.safetensors
    (or a sharded index), a ``.safetensors`` file (config.json read from beside it), or a hub id.

    A ``CLIPModel`` gives {"vision", "visual_projection", "text", "text_projection", "logit_scale"}; a
    ``CLIPVisionModel`` (e.g. FusionBench's tanganke/clip-vit-base-patch32_<task>) gives {"vision"}.
    Refused with the culprit named: a config.json that is not a JSON object or holds a value no CLIP can have
    (the key), a tensor whose shape config.json does not imply or of a layer config.json does not have, an
    integer tensor where a weight belongs, a NaN / inf tensor (unless ``allow_nonfinite``).
    """
    location = resolve_checkpoint(path_or_id, allow_download=allow_download)
    config = read_hf_clip_config(location)
    state = read_checkpoint_dir(location) if os.path.isdir(location) else read_safetensors(location)
    _check_shapes({name: np.shape(array) for name, array in state.items()}, config, location)
    return config, params_from_hf_state_dict(state, source=location, dtype=dtype, allow_nonfinite=allow_nonfinite)


def read_hf_clip_config(location: str) -> ClipConfig:
    """The config of the HF CLIP checkpoint at ``location`` (a folder, or a ``.safetensors`` file with
    config.json beside it); ValueError naming config.json and the key when no CLIP can have it."""
    directory = location if os.path.isdir(location) else os.path.dirname(location)
    config_path = os.path.join(directory, CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no {CONFIG} beside the CLIP checkpoint {location!r} (looked for {config_path!r})")
    hf = read_json_object(config_path)
    try:
        return config_from_hf(hf)
    except KeyError as err:
        raise ValueError(f"{config_path!r} is not a usable CLIP config: missing key {err}") from err
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{config_path!r} is not a usable CLIP config: {err}") from err


def open_hf_clip(path_or_id: str, *, allow_download: bool = True) -> tuple[ClipConfig, CheckpointFiles]:
    """(config, the folder's tensors to read one at a time) of an HF CLIP folder or hub id, nothing loaded:
    config.json read as `load_hf_clip` reads it, and every tensor's shape and layer checked against it from the
    safetensors headers as `load_hf_clip` checks the loaded tensors. Which tensors a merge reads, and their
    dtypes, are checked by whoever reads them (`open_clip_towers`)."""
    location = resolve_checkpoint(path_or_id, allow_download=allow_download)
    config = read_hf_clip_config(location)
    files = CheckpointFiles(location)
    _check_shapes({name: files.info(name).shape for name in files.names}, config, location)
    return config, files


def hf_shapes(config: ClipConfig, kind: str | None = None) -> dict[str, tuple[int, ...]]:
    """The torch-layout shape of every HF tensor of an export of ``kind`` (`save_hf_clip`'s kinds, or "vision";
    default: the whole model ``config`` describes), vision names with ``vision_model.``, read off the Flax
    model's own parameter shapes."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    zeros = jax.tree_util.tree_map(lambda s: np.broadcast_to(np.float32(0), s.shape), shapes)  # no memory
    kind = kind or ("clip" if config.text is not None else "vision")
    return {name: a.shape for name, a in _hf_tensors(zeros["vision"], zeros, kind).items()}


_LAYER_TENSOR = re.compile(r"((?:vision_model\.|text_model\.)?)encoder\.layers\.(\d+)\.")


def _check_shapes(found: Mapping[str, tuple[int, ...]], config: ClipConfig, source: str) -> None:
    """Every tensor of a checkpoint (``found``: name → shape) that the config sizes has the shape it implies
    (prefix optional), and no tensor belongs to a layer the config does not have."""
    shapes = hf_shapes(config)
    for name, shape in shapes.items():
        stored = name if name in found else name.removeprefix(VISION_PREFIX)
        if stored in found and tuple(found[stored]) != shape:
            raise ValueError(f"{source}: tensor {stored!r} has shape {tuple(found[stored])}, "
                             f"config.json implies {shape}")
    for name in sorted(found):
        if (match := _LAYER_TENSOR.match(name)) and name not in shapes and VISION_PREFIX + name not in shapes:
            tower = config.text if match.group(1) == "text_model." else config.vision
            layers = f"{tower.layers} layers (num_hidden_layers)" if tower is not None else "no text tower"
            raise ValueError(f"{source}: tensor {name!r} is in layer {match.group(2)}, but config.json has {layers}")


# ----------------------------------------------------------------------------------------- HF export

EXPORT_KINDS = ("vision_with_projection", "clip")
PREPROCESSOR_CONFIG = "preprocessor_config.json"


def hf_text_config(config: TextConfig) -> dict[str, Any]:
    """The ``text_config`` of an HF ``CLIPConfig`` with this text tower."""
    return {"model_type": "clip_text_model", "vocab_size": config.vocab_size, "hidden_size": config.width,
            "intermediate_size": config.mlp_dim, "num_hidden_layers": config.layers,
            "num_attention_heads": config.heads, "max_position_embeddings": config.context_length,
            "hidden_act": config.activation, "layer_norm_eps": config.layer_norm_eps,
            # CLIP vocabularies end with <|startoftext|>, <|endoftext|>; the tokenizer pads with the latter.
            "bos_token_id": config.eos_token_id - 1, "eos_token_id": config.eos_token_id,
            "pad_token_id": config.eos_token_id, "attention_dropout": 0.0}


def hf_config(config: ClipConfig, kind: str, dtype: Any = np.float32) -> dict[str, Any]:
    """config.json of an HF ``CLIPVisionModel`` (kind "vision"), ``CLIPVisionModelWithProjection``
    ("vision_with_projection") or ``CLIPModel`` ("clip") built from ``config``."""
    vision = dict(hf_vision_config(config.vision), dtype=np.dtype(dtype).name)
    if kind == "vision":
        return vision
    if config.embed_dim is None:
        raise ValueError(f"export kind {kind!r} needs a config with embed_dim (the projection width); got None")
    if kind == "vision_with_projection":
        return dict(vision, architectures=["CLIPVisionModelWithProjection"], projection_dim=config.embed_dim)
    if kind == "clip":
        if config.text is None:
            raise ValueError("export kind 'clip' needs a config with a text tower (config.text is None)")
        del vision["architectures"], vision["dtype"]
        return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": config.embed_dim,
                "logit_scale_init_value": config.logit_scale_init, "dtype": np.dtype(dtype).name,
                "vision_config": vision, "text_config": hf_text_config(config.text)}
    raise ValueError(f"unknown export kind {kind!r}; known: {list(EXPORT_KINDS)}")


def hf_preprocessor_config(image_size: int) -> dict[str, Any]:
    """preprocessor_config.json of CLIP's image processor for ``image_size``² inputs: resize the shorter side
    (bicubic), centre crop, rescale by 1/255, normalise with CLIP's mean and std (as openai/clip-vit-*)."""
    from adamerging_jax.data.clip_preprocess import CLIP_MEAN, CLIP_STD

    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
            "size": {"shortest_edge": image_size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": image_size, "width": image_size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [float(x) for x in CLIP_MEAN],
            "image_std": [float(x) for x in CLIP_STD], "do_convert_rgb": True}


def hf_state_dict(vision_params: Params, pretrained_full: Params | None, kind: str, *, dtype: Any = np.float32
                  ) -> dict[str, np.ndarray]:
    """The HF tensors of an export: the (merged) ``vision_params`` under ``vision_model.``, plus from the
    pretrained CLIP tree ``pretrained_full`` the ``visual_projection`` ("vision_with_projection"), or the text
    tower, both projections and ``logit_scale`` ("clip"). Linear and conv weights in torch layout, ``dtype``."""
    return {name: _cast(a, dtype) for name, a in _hf_tensors(vision_params, pretrained_full, kind).items()}


def _hf_tensors(vision_params: Params, pretrained_full: Params | None, kind: str) -> dict[str, np.ndarray]:
    """:func:`hf_state_dict` as views (transposes) of the given arrays, not cast."""
    state = {VISION_PREFIX + name: a for name, a in _tower_to_hf(vision_params, "", _VISION).items()}
    if kind != "vision":
        needed = {"vision_with_projection": ["visual_projection"],
                  "clip": ["visual_projection", "text", "text_projection", "logit_scale"]}[kind]
        if missing := [key for key in needed if key not in (pretrained_full or {})]:
            raise KeyError(f"export kind {kind!r}: the pretrained CLIP tree lacks {missing}")
        state["visual_projection.weight"] = np.asarray(pretrained_full["visual_projection"]["kernel"]).T
    if kind == "clip":
        state.update(_tower_to_hf(pretrained_full["text"], "text_model.", _TEXT))
        state["text_projection.weight"] = np.asarray(pretrained_full["text_projection"]["kernel"]).T
        state["logit_scale"] = np.asarray(pretrained_full["logit_scale"]).reshape(())
    return state


ONE_FILE = sys.maxsize
"""The shard size of a CLIP export: ``model.safetensors`` holds every tensor (a `ShardedWriter` writes one
file)."""


def write_clip_files(folder: str | os.PathLike, config: ClipConfig, kind: str, *, tokenizer_dir: str | None = None,
                     processor: bool = True, dtype: Any = np.float32) -> None:
    """Everything of an HF CLIP folder of ``kind`` but its weights, into ``folder``: config.json (`hf_config`),
    with ``processor`` CLIP's preprocessor_config.json for ``config.vision.image_size``, and the tokenizer
    files of ``tokenizer_dir`` when given."""
    copied = tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []
    write_json_atomic(os.path.join(folder, CONFIG), hf_config(config, kind, dtype))
    if processor:
        write_json_atomic(os.path.join(folder, PREPROCESSOR_CONFIG), hf_preprocessor_config(config.vision.image_size))
    for path in copied:
        shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))


def _write_hf_folder(directory: str | os.PathLike, state: Mapping[str, np.ndarray], config: ClipConfig, kind: str,
                     tokenizer_dir: str | None, processor: bool, dtype: Any) -> None:
    """model.safetensors and `write_clip_files`'s files, as one atomic folder."""
    from safetensors.numpy import save_file

    with atomic_directory(directory, [CONFIG, SAFETENSORS, PREPROCESSOR_CONFIG, *TOKENIZER_FILES]) as tmp:
        write_clip_files(tmp, config, kind, tokenizer_dir=tokenizer_dir, processor=processor, dtype=dtype)
        save_file(dict(state), os.path.join(tmp, SAFETENSORS), {"format": "pt"})


def save_hf_clip(directory: str | os.PathLike, vision_params: Params, pretrained_full: Params,
                 config: ClipConfig, *, kind: str = "vision_with_projection", tokenizer_dir: str | None = None,
                 processor: bool = True, dtype: Any = np.float32) -> None:
    """Write a merged image tower as a whole HF model folder that transformers loads.

    ``kind="vision_with_projection"``: a ``CLIPVisionModelWithProjection`` (``vision_params`` + the pretrained
    ``visual_projection``; ``image_embeds`` are our ``image_encoder(config, W)`` features).
    ``kind="clip"``: a ``CLIPModel`` (``vision_params``, and the pretrained text tower, projections and
    ``logit_scale`` from ``pretrained_full``, a tree as ``load_hf_clip`` of a ``CLIPModel`` gives).

    The folder holds config.json, model.safetensors (tensors in ``dtype``), with ``processor`` CLIP's
    preprocessor_config.json for ``config.vision.image_size``, and the tokenizer files of ``tokenizer_dir``
    when given. It is written beside ``directory`` and renamed into place (see :func:`atomic_directory`).
    """
    if kind not in EXPORT_KINDS:
        raise ValueError(f"unknown export kind {kind!r}; known: {list(EXPORT_KINDS)}")
    state = hf_state_dict(vision_params, pretrained_full, kind, dtype=dtype)
    _write_hf_folder(directory, state, config, kind, tokenizer_dir, processor, dtype)


def save_hf_vision_model(directory: str | os.PathLike, vision_params: Params, config: ClipConfig | VisionConfig,
                         *, dtype: Any = np.float32) -> None:
    """Write an image tower alone as an HF ``CLIPVisionModel`` folder (config.json + model.safetensors), the
    layout of FusionBench's fine-tuned towers; written atomically as :func:`save_hf_clip`."""
    clip_config = config if isinstance(config, ClipConfig) else ClipConfig(vision=config)
    _write_hf_folder(directory, hf_state_dict(vision_params, None, "vision", dtype=dtype), clip_config, "vision",
                     None, False, dtype)


# -------------------------------------------------------------------------------------------- open_clip


_OPEN_CLIP_BLOCK = [
    ("ln1/scale", "ln_1.weight", False), ("ln1/bias", "ln_1.bias", False),
    ("attn/out/kernel", "attn.out_proj.weight", True), ("attn/out/bias", "attn.out_proj.bias", False),
    ("ln2/scale", "ln_2.weight", False), ("ln2/bias", "ln_2.bias", False),
    ("mlp/fc1/kernel", "mlp.c_fc.weight", True), ("mlp/fc1/bias", "mlp.c_fc.bias", False),
    ("mlp/fc2/kernel", "mlp.c_proj.weight", True), ("mlp/fc2/bias", "mlp.c_proj.bias", False),
]
_OPEN_CLIP_VISION = [
    ("class_embedding", "class_embedding", "copy"), ("patch_embed/kernel", "conv1.weight", "conv"),
    ("pos_embedding", "positional_embedding", "copy"),
    ("pre_ln/scale", "ln_pre.weight", "copy"), ("pre_ln/bias", "ln_pre.bias", "copy"),
    ("post_ln/scale", "ln_post.weight", "copy"), ("post_ln/bias", "ln_post.bias", "copy"),
]


def params_from_open_clip(state: StateDict, *, head_width: int = 64, dtype: Any = np.float32,
                          source: str = "open_clip state dict", allow_nonfinite: bool = False
                          ) -> tuple[ClipConfig, Params]:
    """(config, {"vision", "visual_projection"}) from an open_clip ViT state dict's ``visual.*`` tensors.

    Names may carry a leading ``model.`` or ``module.`` (task_vectors' ImageEncoder, DataParallel). The fused
    ``attn.in_proj_weight`` [3W, W] / ``in_proj_bias`` [3W] are split into q, k, v (rows in that order).
    The config is read off the shapes; the head count, which no shape shows, is width / ``head_width``
    (64 in every OpenAI / open_clip ViT-B and ViT-L). A NaN / inf ``visual.*`` tensor is refused with its name
    unless ``allow_nonfinite``.
    """
    prefix = next((p for p in ["visual.", "model.visual.", "module.visual.", "module.model.visual."]
                   if p + "conv1.weight" in state), None)
    if prefix is None:
        raise KeyError(f"{source}: no open_clip image tower (no 'visual.conv1.weight'); "
                       f"first names: {sorted(state)[:5]}")
    if not allow_nonfinite:
        _check_finite(state, [name for name in state if name.startswith(prefix)], source)
    vision: Params = {}
    for ours, name, layout in _OPEN_CLIP_VISION:
        _set(vision, ours, _cast(_TO_OURS[layout](_take(state, prefix + name, source)), dtype))
    blocks = prefix + "transformer.resblocks."
    num_layers = _count_layers(state, blocks)
    if num_layers == 0:
        raise KeyError(f"{source}: no transformer blocks (no tensors named {blocks}N.*); first names under "
                       f"{prefix!r}: {sorted(n for n in state if n.startswith(prefix))[:5]}")

    def stack(name: str, is_linear: bool = False) -> np.ndarray:
        names = [f"{blocks}{i}.{name}" for i in range(num_layers)]
        layers = _stack_layers([_take(state, n, source) for n in names], names, source)
        return layers.swapaxes(1, 2) if is_linear else layers

    fused_w, fused_b = stack("attn.in_proj_weight"), stack("attn.in_proj_bias")
    if fused_w.shape[1] % 3:
        raise ValueError(f"{source}: {blocks}N.attn.in_proj_weight has {fused_w.shape[1]} rows, not 3 × width")
    for j, part in enumerate("qkv"):
        _set(vision, f"layers/attn/{part}/kernel", _cast(np.split(fused_w, 3, axis=1)[j].swapaxes(1, 2), dtype))
        _set(vision, f"layers/attn/{part}/bias", _cast(np.split(fused_b, 3, axis=1)[j], dtype))
    for ours, name, is_linear in _OPEN_CLIP_BLOCK:
        _set(vision, "layers/" + ours, _cast(stack(name, is_linear), dtype))
    kernel = vision["patch_embed"]["kernel"]
    width, patch = kernel.shape[-1], kernel.shape[0]
    if width % head_width:
        raise ValueError(f"{source}: width {width} is not a multiple of head_width {head_width}")
    grid = int(round((vision["pos_embedding"].shape[0] - 1) ** 0.5))
    config = ClipConfig(VisionConfig(image_size=grid * patch, patch_size=patch, width=width, layers=num_layers,
                                     heads=width // head_width, mlp_dim=vision["layers"]["mlp"]["fc1"]["kernel"].shape[-1]))
    params: Params = {"vision": vision}
    if prefix + "proj" in state:
        params["visual_projection"] = {"kernel": _cast(np.asarray(state[prefix + "proj"]), dtype)}
    return config, params


def load_open_clip_checkpoint(path: str, *, trust_pickle: bool = False, head_width: int = 64,
                              dtype: Any = np.float32, allow_nonfinite: bool = False) -> tuple[ClipConfig, Params]:
    """Read a torch-saved open_clip checkpoint (needs torch) and convert its ``visual.*`` tensors.

    By default only ``torch.load(weights_only=True)`` is used: tensors and plain containers, no code runs.
    The task_vectors files are pickled *modules* (``ImageEncoder``); loading them executes pickled code and
    needs torch, open_clip and task_vectors' ``src`` package importable. Only with ``trust_pickle=True``, for
    files you trust, is that done.
    """
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no open_clip checkpoint at {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:
        if trust_pickle:
            raise
        raise ValueError(
            f"{path!r} is not a plain state dict (torch weights_only load failed: {type(err).__name__}). A pickled "
            f"module (such as the task_vectors ImageEncoder files) runs code when loaded; if you trust the file, "
            f"pass trust_pickle=True with torch, open_clip (and task_vectors' src package) importable.") from err
    if hasattr(obj, "state_dict"):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict or a module")
    state = {name: (t.detach().float() if t.is_floating_point() else t.detach()).numpy()
             for name, t in obj.items() if hasattr(t, "detach")}
    return params_from_open_clip(state, head_width=head_width, dtype=dtype, source=path,
                                 allow_nonfinite=allow_nonfinite)


# transformers' CLIPVisionModel parameter order inside "encoder.layers.i." (its named_parameters(): the
# attention's k, v, q, out projections, then layer_norm1, mlp, layer_norm2, as the modules are created).
_HF_BLOCK_ORDER = [f"{module}.{leaf}" for module in ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj",
                                                    "self_attn.out_proj", "layer_norm1", "mlp.fc1", "mlp.fc2",
                                                    "layer_norm2"] for leaf in ["weight", "bias"]]


def coefficient_tensor_names(config: ClipConfig | VisionConfig) -> TensorNames:
    """The HF ``CLIPVisionModel`` tensor name of every (leaf path, layer) of our image tower tree, e.g.
    ("layers/attn/q/kernel", 3) → "vision_model.encoder.layers.3.self_attn.q_proj.weight" and
    ("pos_embedding", None) → "vision_model.embeddings.position_embedding.weight", with ``order`` the tower's
    ``named_parameters()`` order (199 tensors for ViT-B/32, FusionBench's columns). Leaf paths are those of
    ``params["vision"]``, the tree merging acts on."""
    layers = (config.vision if isinstance(config, ClipConfig) else config).layers
    names: dict[tuple[str, int | None], str] = {(ours, None): VISION_PREFIX + hf for ours, hf, _ in _VISION}
    for ours, hf, _ in _BLOCK:
        names.update({("layers/" + ours, i): f"{VISION_PREFIX}encoder.layers.{i}.{hf}" for i in range(layers)})
    top = [VISION_PREFIX + hf for hf in ["embeddings.class_embedding", "embeddings.patch_embedding.weight",
                                         "embeddings.position_embedding.weight", "pre_layrnorm.weight",
                                         "pre_layrnorm.bias"]]
    blocks = [f"{VISION_PREFIX}encoder.layers.{i}.{hf}" for i in range(layers) for hf in _HF_BLOCK_ORDER]
    order = (*top, *blocks, VISION_PREFIX + "post_layernorm.weight", VISION_PREFIX + "post_layernorm.bias")
    return TensorNames(names, order)


# The official AdaMerging scripts' state-dict order of the task_vectors ImageEncoder, an open_clip CLIP whose
# text transformer is deleted: the CLIP's own parameters (text side), the visual tower (its own parameters
# class_embedding, positional_embedding and proj before its modules), then the text-side modules left.
_OFFICIAL_TEXT_BEFORE = ("model.positional_embedding", "model.text_projection", "model.logit_scale")
_OFFICIAL_TEXT_AFTER = ("model.token_embedding.weight", "model.ln_final.weight", "model.ln_final.bias")
_OFFICIAL_VISUAL_BEFORE = ("class_embedding", "positional_embedding", "proj", "conv1.weight", "ln_pre.weight",
                           "ln_pre.bias")
_OFFICIAL_VISUAL_AFTER = ("ln_post.weight", "ln_post.bias")
_OFFICIAL_BLOCK = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                   "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                   "mlp.c_proj.weight", "mlp.c_proj.bias")
_FUSED_IN_PROJ = {f"attn.in_proj_{leaf}": tuple(f"attn/{part}/{ours}" for part in "qkv")
                  for leaf, ours in [("weight", "kernel"), ("bias", "bias")]}


def official_coefficient_rows(config: ClipConfig | VisionConfig) -> OfficialRows:
    """The rows of the official repository's layer-wise λ (``src/merging_cofficient.py``: 158 for ViT-B/32 and
    B/16, 302 for L/14, 6 + 8 + 12 × layers in general), in the order its scripts build them: the state dict
    of the task_vectors ``ImageEncoder``, names ``model.*``. Each row scales the HF tensors of
    :func:`coefficient_tensor_names` holding its weights: the fused ``attn.in_proj_weight`` / ``in_proj_bias`` row
    the q, k and v weights / biases; ``model.visual.proj`` none (the projection is not part of the merged
    image tower: the export keeps θ0's); the six text-side rows none, as the official run never trains them
    (checked to hold their initial λ)."""
    vision = config.vision if isinstance(config, ClipConfig) else config
    names = coefficient_tensor_names(vision)
    ours = {oc: path for path, oc, _ in (*_OPEN_CLIP_VISION, *_OPEN_CLIP_BLOCK)}
    rows: list[str] = []
    scales: dict[str, tuple[str, ...]] = {}

    def add(row: str, paths: Sequence[str], layer: int | None = None) -> None:
        rows.append(row)
        scales[row] = tuple(names[(path, layer)] for path in paths)

    for oc in _OFFICIAL_VISUAL_BEFORE:
        add(f"model.visual.{oc}", [ours[oc]] if oc in ours else [])
    for i in range(vision.layers):
        for oc in _OFFICIAL_BLOCK:
            add(f"model.visual.transformer.resblocks.{i}.{oc}",
                [f"layers/{path}" for path in _FUSED_IN_PROJ.get(oc, (ours.get(oc),))], i)
    for oc in _OFFICIAL_VISUAL_AFTER:
        add(f"model.visual.{oc}", [ours[oc]])
    untrained = _OFFICIAL_TEXT_BEFORE + _OFFICIAL_TEXT_AFTER
    return OfficialRows((*_OFFICIAL_TEXT_BEFORE, *rows, *_OFFICIAL_TEXT_AFTER), scales, frozenset(untrained))


# ------------------------------------------------------------------------------ θ0 and the fine-tuned towers

OPEN_CLIP_SUFFIXES = (".pt", ".pth", ".bin")


@dataclasses.dataclass
class ClipTowers:
    """What a merge of CLIP image towers starts from: ``full`` the pretrained CLIP tree (text tower,
    projections, logit_scale), ``pretrained`` θ0's image tower, ``finetuned`` one image tower per task, and
    ``tokenizer_dir`` the folder holding the pretrained CLIP's tokenizer files."""

    config: ClipConfig
    full: Params
    pretrained: Params
    finetuned: list[Params]
    tokenizer_dir: str


@contextlib.contextmanager
def _reading(what: str, location: str) -> Iterator[None]:
    """A file or key error while reading a checkpoint, re-raised naming `what` and the location."""
    try:
        yield
    except OSError as error:
        raise FileNotFoundError(f"{what}: cannot load {location!r}: {error}") from error
    except (KeyError, ValueError) as error:
        raise ValueError(f"{what}: cannot load {location!r}: {error}") from error


def load_image_tower(location: str, what: str, *, trust_pickle: bool = False, allow_download: bool = True
                     ) -> tuple[ClipConfig, Params]:
    """(config, {"vision", maybe "visual_projection", "text", ...}) from an HF folder / hub id or an open_clip
    state dict (``.pt``/``.pth``/``.bin``); errors name `what` and the location."""
    with _reading(what, location):
        if location.endswith(OPEN_CLIP_SUFFIXES):
            return load_open_clip_checkpoint(location, trust_pickle=trust_pickle)
        return load_hf_clip(location, allow_download=allow_download)


def streamable(location: str) -> bool:
    """Whether a checkpoint's tensors can be read one at a time: an HF folder or hub id. An open_clip file (a
    pickle) or a lone ``.safetensors`` file is loaded whole."""
    return not os.path.isfile(location)


def open_image_tower(location: str, what: str, *, allow_download: bool = True) -> tuple[ClipConfig, RenamedTensors]:
    """`load_image_tower` of an HF folder or hub id from its safetensors headers, nothing loaded (`open_hf_clip`):
    every tensor its config.json describes, by the name an export gives it (`hf_shapes`), present and floating
    point; errors name `what` and the location."""
    with _reading(what, location):
        if not streamable(location):
            raise ValueError("a lone checkpoint file is loaded whole; tensor by tensor reads an HF folder or hub id")
        config, files = open_hf_clip(location, allow_download=allow_download)
        return config, _renamed(files, hf_shapes(config), files.directory)


def _renamed(files: CheckpointFiles, names: Iterable[str], source: str) -> RenamedTensors:
    """``names`` (an export's, `hf_shapes`) as ``files`` stores them: the image tower under the file's own prefix
    (`_vision_prefix`); each present (KeyError) and floating point (ValueError), naming ``source``."""
    prefix = _vision_prefix(files.names, source)
    location = {}
    for name in names:
        stored = prefix + name.removeprefix(VISION_PREFIX) if name.startswith(VISION_PREFIX) else name
        if stored not in files.location:
            raise KeyError(f"{source}: tensor {stored!r} is missing")
        check_float_dtype(stored, files.info(stored).dtype, source)
        location[name] = (files, stored)
    return RenamedTensors(location)


def _read_towers(read: Callable[[str, str], tuple[ClipConfig, Any]], full_clip: Callable[[Any], bool],
                 pretrained: str, finetuned: Sequence[tuple[str, str]], pretrained_vision: str | None,
                 allow_download: bool, log: Callable[[str], None]) -> tuple[ClipConfig, Any, list[Any], str]:
    """The checkpoints of a merge of CLIP image towers, each read by ``read(location, what) -> (config, what it
    read)``: (θ0's config, the pretrained CLIP's, each tower's — θ0's image tower from ``pretrained_vision``
    first when given, then every task's in order —, the folder of θ0's tokenizer). The pretrained CLIP must be
    a full one (a text tower, and ``full_clip`` of what was read), every tower of θ0's config."""
    log(f"[models] pretrained CLIP {pretrained}")
    config, full = read(pretrained, "pretrained CLIP")
    if config.text is None or not full_clip(full):
        raise ValueError(f"pretrained CLIP {pretrained!r} has no text tower or visual projection: the zero-shot heads "
                         "need a full CLIPModel checkpoint (e.g. openai/clip-vit-base-patch32)")
    towers = [(None, pretrained_vision)] if pretrained_vision else []
    found_towers = []
    for task, location in [*towers, *finetuned]:
        what = "pretrained image tower" if task is None else f"task {task!r} fine-tuned tower"
        log(f"[models] {what} {location}")
        found, tower = read(location, what)
        if found.vision != config.vision:
            raise ValueError(f"{what} ({location!r}) has image tower {found.vision}, θ0 has {config.vision}")
        found_towers.append(tower)
    directory = resolve_checkpoint(pretrained, allow_download=allow_download)
    directory = directory if os.path.isdir(directory) else os.path.dirname(directory)
    return config, full, found_towers, directory


def load_clip_towers(pretrained: str, finetuned: Sequence[tuple[str, str]], *, pretrained_vision: str | None = None,
                     trust_pickle: bool = False, allow_download: bool = True,
                     log: Callable[[str], None] = print) -> ClipTowers:
    """θ0 from the full pretrained CLIP `pretrained` (or its image tower from `pretrained_vision`, e.g. an
    open_clip ``zeroshot.pt``) and each ``(task, location)`` of `finetuned`; every tower must have θ0's
    config (the error names the task and file)."""
    load = functools.partial(load_image_tower, trust_pickle=trust_pickle, allow_download=allow_download)
    config, full, towers, directory = _read_towers(
        load, lambda full: "text" in full and "visual_projection" in full, pretrained, finetuned, pretrained_vision,
        allow_download, log)
    vision = [tower["vision"] for tower in towers]
    theta0 = vision.pop(0) if pretrained_vision else full["vision"]
    return ClipTowers(config, full, theta0, vision, directory)


@dataclasses.dataclass
class StreamedTowers:
    """What a merge of CLIP image towers streamed from disk reads, checked but not loaded (`open_clip_towers`;
    `ClipTowers` loaded): ``pretrained`` θ0's image tower and, from the full pretrained CLIP, the rest of a
    ``CLIPModel`` (projections, text tower, ``logit_scale``), ``finetuned`` each task's image tower, every
    tensor by the name an export gives it (`hf_shapes`); ``tokenizer_dir`` the folder of θ0's tokenizer."""

    config: ClipConfig
    pretrained: RenamedTensors
    finetuned: list[RenamedTensors]
    tokenizer_dir: str


def open_clip_towers(pretrained: str, finetuned: Sequence[tuple[str, str]], *, pretrained_vision: str | None = None,
                     allow_download: bool = True, log: Callable[[str], None] = print) -> StreamedTowers:
    """`load_clip_towers` from the safetensors headers, nothing loaded: the same checkpoints and checks (every
    location an HF folder or hub id, `streamable`), each tensor's presence, dtype and shape read from the
    headers (`open_image_tower`)."""
    read = functools.partial(open_image_tower, allow_download=allow_download)
    config, full, towers, directory = _read_towers(
        read, lambda full: "visual_projection.weight" in full.location, pretrained, finetuned, pretrained_vision,
        allow_download, log)

    def image_tower(tower: RenamedTensors) -> dict[str, tuple[CheckpointFiles, str]]:
        return {name: where for name, where in tower.location.items() if name.startswith(VISION_PREFIX)}

    theta0 = full.location | (image_tower(towers.pop(0)) if pretrained_vision else {})
    return StreamedTowers(config, RenamedTensors(theta0), [RenamedTensors(image_tower(tower)) for tower in towers],
                          directory)
