"""Llama / Qwen2 checkpoints in and out: HF safetensors folders ↔ the tree of ``adamerging_jax.models.llama``.

Our leaf paths ↔ HF tensor names (:func:`hf_name`, :func:`tree_path`):

    embed                          model.embed_tokens.weight                       [V, D]
    layers/<block>[i]              model.layers.i.<block>                          stacked on axis 0 over i
    norm/scale                     model.norm.weight
    lm_head/kernel                 lm_head.weight        [D, V] ↔ [V, D]           (absent when tied)

with <block> = attn_norm/scale ↔ input_layernorm.weight, attn/{q,k,v,o}/{kernel,bias} ↔
self_attn.{q,k,v,o}_proj.{weight,bias}, mlp_norm/scale ↔ post_attention_layernorm.weight,
mlp/{gate,up,down}/{kernel,bias} ↔ mlp.{gate,up,down}_proj.{weight,bias}. Linear weights are transposed
([out, in] in torch, [in, out] here). A stacked leaf of L layers is L HF tensors, so a layer-wise λ of shape
[K, L] reads as one coefficient per task per HF tensor (:func:`coefficient_tensor_names`).

Input: a folder with ``config.json`` and ``model.safetensors`` or a sharded ``model.safetensors.index.json``,
tensors in fp32, fp16 or bf16. A tied model (``tie_word_embeddings``) needs no ``lm_head.weight`` (one that is
present is ignored, as transformers ignores it). Output: ``config.json``, the weights (sharded with an index
above ``max_shard_bytes``) and the tokenizer files, a folder that ``AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load with no missing or unexpected keys.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from adamerging_jax.coefficient_formats import TensorNames
from adamerging_jax.core.checkpoint import atomic_directory, write_json_atomic
from adamerging_jax.core.trees import named_leaves
from adamerging_jax.models.hf_files import (
    CONFIG,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    TOKENIZER_FILES,
    check_float_dtype,
    check_float_tensor,
    read_checkpoint_dir,
    tokenizer_files,
)
from adamerging_jax.data.strict_text import read_json_object
from adamerging_jax.models.llama import LlamaConfig, LlamaForCausalLM, Params, stacked
from adamerging_jax.models.safetensors_stream import CheckpointFiles, ShardedWriter

StateDict = Mapping[str, np.ndarray]

# (our path inside "layers/", HF name inside "model.layers.i.")
_BLOCK = [
    ("attn_norm/scale", "input_layernorm.weight"),
    *[(f"attn/{p}/{leaf}", f"self_attn.{p}_proj.{name}") for p in "qkvo"
      for leaf, name in [("kernel", "weight"), ("bias", "bias")]],
    ("mlp_norm/scale", "post_attention_layernorm.weight"),
    *[(f"mlp/{p}/{leaf}", f"mlp.{p}_proj.{name}") for p in ["gate", "up", "down"]
      for leaf, name in [("kernel", "weight"), ("bias", "bias")]],
]
_TOP = [("embed", "model.embed_tokens.weight"), ("norm/scale", "model.norm.weight"),
        ("lm_head/kernel", "lm_head.weight")]
_BLOCK_TO_HF = dict(_BLOCK)
_TOP_TO_HF = dict(_TOP)
_HF_TO_BLOCK = {hf: ours for ours, hf in _BLOCK}
_HF_TO_TOP = {hf: ours for ours, hf in _TOP}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")  # a buffer some older checkpoints saved
# CLIP's tokenizer files plus sentencepiece's (Llama 2) and a chat template
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


# ------------------------------------------------------------------------------------- names and shapes


def hf_name(path: str, layer: int | None = None) -> str:
    """The HF tensor name of our leaf ``path`` (of its layer ``layer`` when the leaf is stacked)."""
    if stacked(path):
        inner = path[len("layers/"):]
        if inner not in _BLOCK_TO_HF:
            raise KeyError(f"leaf {path!r} is not a Llama block tensor")
        if layer is None:
            raise ValueError(f"leaf {path!r} stacks layers: give the layer index")
        return f"model.layers.{layer}.{_BLOCK_TO_HF[inner]}"
    if path not in _TOP_TO_HF:
        raise KeyError(f"leaf {path!r} is not a Llama tensor")
    if layer is not None:
        raise ValueError(f"leaf {path!r} does not stack layers, got layer {layer}")
    return _TOP_TO_HF[path]


def tree_path(name: str) -> tuple[str, int | None]:
    """(our leaf path, layer index or None) of the HF tensor ``name``; the inverse of :func:`hf_name`."""
    match = _LAYER_NAME.fullmatch(name)
    if match and match.group(2) in _HF_TO_BLOCK:
        return "layers/" + _HF_TO_BLOCK[match.group(2)], int(match.group(1))
    if name in _HF_TO_TOP:
        return _HF_TO_TOP[name], None
    raise KeyError(f"tensor {name!r} is not a Llama / Qwen2 tensor")


@functools.lru_cache(maxsize=16)
def leaf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Our leaf paths and shapes for ``config`` (traced from the model, nothing allocated; do not mutate)."""
    ids = jax.ShapeDtypeStruct((1, 1), np.int32)
    init = lambda key, *inputs: LlamaForCausalLM(config).init(key, *inputs)["params"]
    shapes = jax.eval_shape(init, jax.random.key(0), ids, ids, ids)
    return {path: tuple(leaf.shape) for path, leaf in named_leaves(shapes)}


def coefficient_tensor_names(config: LlamaConfig) -> TensorNames:
    """The HF tensor name of every (leaf path, layer) of our tree, e.g. ("layers/attn/q/kernel", 3) →
    "model.layers.3.self_attn.q_proj.weight", ("embed", None) → "model.embed_tokens.weight", with ``order``
    transformers' ``named_parameters()`` order (embedding; per layer q, k, v, o, gate, up, down (weight then
    bias), input and post-attention norms; final norm; untied head). λ of a stacked leaf, [K, L], is then
    reported per tensor (``adamerging_jax.coefficient_formats.named_coefficients``)."""
    paths = leaf_shapes(config)
    names = {(path, i if stacked(path) else None): name for path in paths
             for i, name in enumerate(_names_of(path, config))}
    block = [f"{p}/{leaf}" for p in ["attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down"]
             for leaf in ["kernel", "bias"]] + ["attn_norm/scale", "mlp_norm/scale"]
    order = [hf_name("embed")]
    for i in range(config.num_layers):
        order += [hf_name("layers/" + inner, i) for inner in block if "layers/" + inner in paths]
    order += [hf_name(path) for path in ["norm/scale", "lm_head/kernel"] if path in paths]
    return TensorNames(names, tuple(order))


def _torch_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one HF tensor of our leaf (the layer axis dropped, Linear weights transposed)."""
    shape = shape[1:] if stacked(path) else shape
    return shape[::-1] if path.endswith("kernel") else shape


def hf_tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of the model ``config`` describes, by name, with its (torch layout) shape."""
    return {name: _torch_shape(path, shape) for path, shape in leaf_shapes(config).items()
            for name in _names_of(path, config)}


# ----------------------------------------------------------------------------------------------- reading


def read_config(directory: str) -> LlamaConfig:
    """The :class:`LlamaConfig` of a checkpoint folder's ``config.json``."""
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG} in {directory!r}")
    hf = read_json_object(path)
    try:
        return LlamaConfig.from_hf(hf)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def params_from_hf_state_dict(state: StateDict, config: LlamaConfig, *, source: str = "state dict",
                              dtype: Any = np.float32, allow_nonfinite: bool = False) -> Params:
    """Our tree from HF tensors by name, each checked for presence, a floating dtype, shape and (unless
    ``allow_nonfinite``) NaN/inf, errors naming the tensor; tensors the config does not use are refused.
    ``dtype=None`` keeps the stored dtype."""
    used: set[str] = set()
    params: Params = {}
    for path, shape in leaf_shapes(config).items():
        arrays = []
        for name in _names_of(path, config):
            if name not in state:
                raise KeyError(f"{source}: tensor {name!r} is missing")
            array = np.asarray(state[name])
            check_float_tensor(name, array, source)
            expected = _torch_shape(path, shape)
            if array.shape != expected:
                raise ValueError(f"{source}: tensor {name!r} has shape {array.shape}, config.json implies {expected}")
            if not allow_nonfinite and np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                raise ValueError(f"{source}: tensor {name!r} holds NaN or inf values "
                                 "(pass allow_nonfinite=True to load it anyway)")
            arrays.append(array.T if path.endswith("kernel") else array)
            used.add(name)
        value = np.stack(arrays) if stacked(path) else arrays[0]
        _set(params, path, np.array(value, dtype=dtype or value.dtype, order="C"))
    if config.tie_word_embeddings:
        used.add("lm_head.weight")
    unexpected = sorted(name for name in state if name not in used and not _IGNORED.fullmatch(name))
    if unexpected:
        raise ValueError(f"{source}: tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                         f"({len(unexpected)} in all) are not used by the model config.json describes")
    return params


def _names_of(path: str, config: LlamaConfig) -> tuple[str, ...]:
    return tuple(hf_name(path, i) for i in range(config.num_layers)) if stacked(path) else (hf_name(path),)


def _set(tree: Params, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def load_hf_causal_lm(directory: str, *, dtype: Any = np.float32, allow_nonfinite: bool = False
                      ) -> tuple[LlamaConfig, Params]:
    """(config, params) of an HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` folder (see the module docstring).

    fp16 and bf16 files are read exactly and converted to ``dtype`` (float32 by default; bf16 is read through
    float32, so ``dtype=None`` gives float32 for it).
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint folder at {directory!r}")
    config = read_config(directory)
    state = read_checkpoint_dir(directory)
    return config, params_from_hf_state_dict(state, config, source=directory, dtype=dtype,
                                             allow_nonfinite=allow_nonfinite)


def open_hf_causal_lm(directory: str, config: LlamaConfig | None = None) -> tuple[LlamaConfig, CheckpointFiles]:
    """(config, the folder's tensors to read one at a time) of an HF causal-LM folder, nothing loaded: every
    tensor ``config`` (default: the folder's own ``config.json``) describes is present with its shape and a
    floating dtype, and none else (as :func:`params_from_hf_state_dict` checks a loaded one, errors naming the
    tensor). Values are read, and checked for NaN / inf, by whoever reads them."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint folder at {directory!r}")
    config = config or read_config(directory)
    files = CheckpointFiles(directory)
    expected = hf_tensor_shapes(config)
    for name, shape in expected.items():
        if name not in files.location:
            raise KeyError(f"{directory}: tensor {name!r} is missing")
        info = files.info(name)
        if info.shape != shape:
            raise ValueError(f"{directory}: tensor {name!r} has shape {info.shape}, config.json implies {shape}")
        check_float_dtype(name, info.dtype, directory)
    used = set(expected) | ({"lm_head.weight"} if config.tie_word_embeddings else set())
    unexpected = sorted(name for name in files.names if name not in used and not _IGNORED.fullmatch(name))
    if unexpected:
        raise ValueError(f"{directory}: tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                         f"({len(unexpected)} in all) are not used by the model config.json describes")
    return config, files


# ----------------------------------------------------------------------------------------------- writing


def hf_state_dict(params: Params, config: LlamaConfig, *, dtype: Any = None) -> dict[str, np.ndarray]:
    """HF tensors by name from our tree (layers unstacked, kernels transposed), in ``dtype`` (one dtype, or a
    mapping tensor name → dtype) or the leaves' own."""
    shapes = leaf_shapes(config)
    leaves = dict(named_leaves(params))
    if set(leaves) != set(shapes):
        raise ValueError(f"params do not match the config: missing {sorted(set(shapes) - set(leaves))}, "
                         f"unexpected {sorted(set(leaves) - set(shapes))}")
    state: dict[str, np.ndarray] = {}
    for path, shape in shapes.items():
        array = np.asarray(leaves[path])
        if array.shape != shape:
            raise ValueError(f"params leaf {path!r} has shape {array.shape}, the config implies {shape}")
        per_tensor = list(array) if stacked(path) else [array]
        for name, tensor in zip(_names_of(path, config), per_tensor):
            tensor = tensor.T if path.endswith("kernel") else tensor
            wanted = dtype.get(name) if isinstance(dtype, Mapping) else dtype
            state[name] = np.ascontiguousarray(tensor, dtype=wanted or tensor.dtype)
    return state


def hf_config(config: LlamaConfig, dtypes: Iterable[Any]) -> dict[str, Any]:
    """The ``config.json`` of an export whose tensors have ``dtypes``: its ``dtype`` field is theirs when they
    share one, else float32."""
    names = {np.dtype(dtype).name for dtype in dtypes}
    return dict(config.to_hf(), dtype=names.pop() if len(names) == 1 else "float32")


def save_hf_causal_lm(directory: str | os.PathLike, params: Params, config: LlamaConfig,
                      tokenizer_dir: str | os.PathLike | None = None, *, dtype: Any = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write an HF causal-LM folder: ``config.json``, ``model.safetensors`` (or shards
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` when the tensors exceed
    ``max_shard_bytes``; tensors in name order) and the tokenizer files of ``tokenizer_dir``. The folder
    appears whole or not at all.

    ``dtype`` (e.g. ``jnp.bfloat16``, or a mapping tensor name → dtype) converts the weights; by default each
    keeps its own dtype. A tied model writes no ``lm_head.weight``, as transformers does. An existing
    ``directory`` is replaced only when it holds nothing but what an export writes; otherwise FileExistsError
    names the files that would be lost.
    """
    state = hf_state_dict(params, config, dtype=dtype)
    copied = tokenizer_files(os.fspath(tokenizer_dir)) if tokenizer_dir is not None else []
    with atomic_directory(directory, export_files(directory)) as tmp:
        write_json_atomic(os.path.join(tmp, CONFIG), hf_config(config, (a.dtype for a in state.values())))
        writer = ShardedWriter(tmp, {name: (state[name].dtype, state[name].shape) for name in sorted(state)},
                               max_shard_bytes)
        for name in sorted(state):
            writer.write(name, state[name])
        writer.close()
        for path in copied:
            shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))


def export_files(directory: str | os.PathLike) -> list[str]:
    """The names an earlier export into ``directory`` may have left: the fixed ones and its shards."""
    present = os.listdir(directory) if os.path.isdir(directory) else []
    return [CONFIG, SAFETENSORS, SAFETENSORS_INDEX, "generation_config.json", *TOKENIZER_FILES,
            *filter(_SHARD.fullmatch, present)]
