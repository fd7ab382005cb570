"""WEMoE's export (`core.we_moe`): a plain HF folder cannot hold the routed model, so the folder's
``model.safetensors`` is its dense part and ``we_moe.safetensors`` beside it the rest:

- the HF image tower: task arithmetic θ0 + λ Σ_k τ_k, except the MLPs of the top k (upscaled) blocks, which hold
  W_0, the pretrained MLP (run alone it is neither the merged model nor a WEMoE one);
- ``we_moe.safetensors``: the routers (``router/<leaf path>``, [k, ...] over the upscaled blocks, Dense kernels
  [in, out]) and the upscaled MLPs' task vectors (``expert/<leaf path>``, [k, K, ...]), with metadata ``tasks``
  and ``upscaled_layers``.

`load_we_moe` rebuilds ``(frozen, routers)`` for `models.clip.moe_vision_forward` / `expert_mixture`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from adamerging_jax.core.checkpoint import write_atomic
from adamerging_jax.core.trees import named_leaves
from adamerging_jax.models import clip

WE_MOE_FILE = "we_moe.safetensors"


def dense_tower(frozen: dict[str, Any]) -> dict[str, Any]:
    """The routed tower's dense part as a plain image-tower tree: its blocks stacked back into ``layers`` (the
    upscaled blocks' MLPs at W_0, their routers and task vectors left out)."""
    routed = frozen[clip.ROUTED_LAYERS]
    mlp = {name: {leaf: value for leaf, value in leaves.items() if not leaf.startswith("expert_")}
           for name, leaves in routed["mlp"].items()}
    top = {**routed, "mlp": mlp}
    tree = {name: value for name, value in frozen.items() if name != clip.ROUTED_LAYERS}
    tree["layers"] = top if "layers" not in frozen else jax.tree_util.tree_map(
        lambda low, high: np.concatenate([low, high]), frozen["layers"], top)
    return tree


def write_we_moe_file(folder: str | os.PathLike, frozen: dict[str, Any], routers: dict[str, Any],
                      tasks: Sequence[str]) -> list[str]:
    """``folder/we_moe.safetensors`` (module docstring); returns the tensor names."""
    from safetensors.numpy import save

    arrays = {f"router/{path}": np.ascontiguousarray(value) for path, value in named_leaves(jax.device_get(routers))}
    arrays.update({f"expert/{path}": np.ascontiguousarray(np.asarray(value, np.float32))
                   for path, value in clip.moe_expert_leaves(jax.device_get(frozen)).items()})
    layers = int(frozen[clip.ROUTED_LAYERS]["ln1"]["scale"].shape[0])
    metadata = {"content": "adamerging_jax WEMoE routers and task vectors", "tasks": json.dumps(list(tasks)),
                "upscaled_layers": str(layers)}
    write_atomic(os.path.join(folder, WE_MOE_FILE), save(arrays, metadata=metadata))
    return sorted(arrays)


def _nested(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def load_we_moe(folder: str | os.PathLike, vision: dict[str, Any]) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """(task names, frozen, routers) of a WEMoE export `folder`, given its HF image tower ``vision`` (e.g.
    ``clip_checkpoint.load_hf_clip(folder)[1]["vision"]``)."""
    from safetensors import safe_open

    path = os.path.join(folder, WE_MOE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(folder)!r} holds no {WE_MOE_FILE}: not a WEMoE export")
    with safe_open(path, framework="numpy") as file:
        metadata = file.metadata()
        arrays = {name: file.get_tensor(name) for name in file.keys()}
    layers = int(metadata["upscaled_layers"])
    cut = vision["layers"]["ln1"]["scale"].shape[0] - layers
    frozen = {name: value for name, value in vision.items() if name != "layers"}
    if cut:
        frozen["layers"] = jax.tree_util.tree_map(lambda x: x[:cut], vision["layers"])
    top = jax.tree_util.tree_map(lambda x: x[cut:], vision["layers"])
    experts = _nested({name.removeprefix("expert/"): value for name, value in arrays.items()
                       if name.startswith("expert/")})[clip.ROUTED_LAYERS]["mlp"]
    top["mlp"] = {name: {**top["mlp"][name], **experts[name]} for name in top["mlp"]}
    frozen[clip.ROUTED_LAYERS] = top
    routers = _nested({name.removeprefix("router/"): value for name, value in arrays.items()
                       if name.startswith("router/")})
    return json.loads(metadata["tasks"]), frozen, routers
