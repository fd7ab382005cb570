"""Hugging Face checkpoint files, shared by every model's converter: safetensors reading (one file or a sharded
index), the tokenizer files of a model folder, and the checks every converter applies to what it reads.

A sharded index (``model.safetensors.index.json``) must be a JSON object with a ``weight_map`` object,
tensor name → shard file; every shard a file name inside the model folder (no absolute path, no ``..``);
no tensor named twice in the index or present in two shards; every shard holding exactly the tensors the
index maps to it. A weight the model uses must be floating point (:func:`check_float_tensor`).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from adamerging_jax.core.trees import is_float_dtype
from adamerging_jax.data.strict_text import read_json_object

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "chat_template.jinja")
"""The tokenizer files a model folder may hold: the BPE layout (vocab.json + merges.txt), transformers 5's
(tokenizer.json + tokenizer_config.json), SentencePiece's tokenizer.model, and the optional extras."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as numpy arrays; bf16 comes back as float32 (numpy has no bf16)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {path!r}")
    try:
        with safe_open(path, framework="flax") as f:
            return {name: _to_numpy(f.get_tensor(name)) for name in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError on a corrupt header
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path!r} is not a readable safetensors file: {err}") from err


def _to_numpy(array: Any) -> np.ndarray:
    array = np.asarray(array)
    return array.astype(np.float32) if array.dtype.name == "bfloat16" else array


def check_float_tensor(name: str, array: Any, source: str) -> None:
    """ValueError naming the tensor when a weight the model uses is not floating point (an integer or boolean
    tensor would be cast silently into a meaningless weight)."""
    check_float_dtype(name, np.asarray(array).dtype, source)


def check_float_dtype(name: str, dtype: Any, source: str) -> None:
    """`check_float_tensor` of a tensor not read yet, from its stored ``dtype`` (a safetensors header's)."""
    if not is_float_dtype(dtype):
        raise ValueError(f"{source}: tensor {name!r} has dtype {dtype}, the model's weight there is floating point")


def read_weight_map(index: str) -> dict[str, str]:
    """The index's ``weight_map`` (tensor → shard file), every shard a file name inside the model folder."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no 'weight_map' object (tensor name → shard file)")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise ValueError(f"{index}: tensor {tensor!r} is mapped to {shard!r}, not a shard file name")
        if os.path.isabs(shard) or os.path.normpath(shard).split(os.sep)[0] == os.pardir:
            raise ValueError(f"{index}: tensor {tensor!r} is mapped to {shard!r}, a file outside the model folder")
    return weight_map


def _read_shards(directory: str, index: str) -> dict[str, np.ndarray]:
    """The tensors of the shards the index names, each found in the one shard the index maps it to."""
    weight_map = read_weight_map(index)
    tensors: dict[str, np.ndarray] = {}
    found_in: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        for name, array in read_safetensors(os.path.join(directory, shard)).items():
            if name in found_in:
                raise ValueError(f"{index}: tensor {name!r} is in two shards, {found_in[name]!r} and {shard!r}")
            if weight_map.get(name) != shard:
                raise ValueError(f"{index}: shard {shard!r} holds tensor {name!r}, which the index maps to "
                                 f"{weight_map.get(name)!r}")
            found_in[name], tensors[name] = shard, array
    if missing := sorted(set(weight_map) - set(tensors)):
        raise ValueError(f"{index}: tensors {missing[:5]} ({len(missing)} in all) are in no shard")
    return tensors


def read_checkpoint_dir(directory: str) -> dict[str, np.ndarray]:
    """Every tensor of the model folder ``directory``: ``model.safetensors`` or the shards its index names
    (checked as the module docstring says)."""
    single = os.path.join(directory, SAFETENSORS)
    index = os.path.join(directory, SAFETENSORS_INDEX)
    if os.path.isfile(single):
        return read_safetensors(single)
    if os.path.isfile(index):
        return _read_shards(directory, index)
    present = sorted(os.listdir(directory))
    hint = " (pytorch_model.bin is not read: re-save it with safe_serialization=True)" if (
        "pytorch_model.bin" in present) else ""
    raise FileNotFoundError(f"no {SAFETENSORS} or {SAFETENSORS_INDEX} in {directory!r}; it holds {present}{hint}")


def tokenizer_files(directory: str) -> list[str]:
    """The tokenizer files present in ``directory``; one complete layout must be there."""
    present = [os.path.join(directory, name) for name in TOKENIZER_FILES
               if os.path.isfile(os.path.join(directory, name))]
    names = {os.path.basename(path) for path in present}
    if not ({"vocab.json", "merges.txt"} <= names or "tokenizer.json" in names or "tokenizer.model" in names):
        raise FileNotFoundError(f"tokenizer_dir {directory!r} holds neither vocab.json + merges.txt, tokenizer.json "
                                f"nor tokenizer.model")
    return present
