"""Hugging Face checkpoint files, shared by every model's converter: safetensors reading (one file or a sharded
index), the tokenizer files of a model folder.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

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


def read_checkpoint_dir(directory: str) -> dict[str, np.ndarray]:
    """Every tensor of the model folder ``directory``: ``model.safetensors`` or the shards its index names."""
    single = os.path.join(directory, SAFETENSORS)
    index = os.path.join(directory, SAFETENSORS_INDEX)
    if os.path.isfile(single):
        return read_safetensors(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            tensors.update(read_safetensors(os.path.join(directory, shard)))
        return tensors
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
