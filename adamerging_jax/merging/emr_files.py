"""EMR-Merging's export: the unified model θ_uni = θ0 + τ_uni is the HF folder (``model.safetensors``), and
``emr.safetensors`` beside it holds what makes each task's model from it (`core.emr`):

    mask/<task>/<HF tensor name>   uint8 m_t in the tensor's torch layout (1 where task t keeps τ_uni)
    rescalers                      [K] s_t, in the order of the metadata's "tasks" (a JSON list of task names)

Task t's image tower is θ_t = θ0 + s_t · m_t ⊙ τ_uni with τ_uni = θ_uni − θ0 (`load_emr_task`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from adamerging_jax.core.checkpoint import write_atomic
from adamerging_jax.core.emr import EmrModels
from adamerging_jax.models.clip_checkpoint import hf_state_dict, load_hf_clip, params_from_hf_state_dict

EMR_FILE = "emr.safetensors"

Params = dict[str, Any]


def write_emr_file(folder: str | os.PathLike, models: EmrModels, tasks: Sequence[str]) -> None:
    """``folder/emr.safetensors``: every task's mask by HF tensor name and the rescalers (module docstring)."""
    from safetensors.numpy import save

    parts = jax.device_get(models.parts)
    arrays = {"rescalers": np.asarray(parts.rescalers)}
    for t, task in enumerate(tasks):
        mask = jax.tree_util.tree_map(lambda m, t=t: np.asarray(m[t]), parts.masks)
        arrays.update({f"mask/{task}/{name}": tensor
                       for name, tensor in hf_state_dict(mask, None, "vision", dtype=np.uint8).items()})
    metadata = {"content": "adamerging_jax EMR-Merging masks and rescalers", "tasks": json.dumps(list(tasks))}
    write_atomic(os.path.join(folder, EMR_FILE), save(arrays, metadata=metadata))


def load_emr_task(folder: str | os.PathLike, pretrained: Params, task: int | str) -> Params:
    """Task `task`'s image tower (by index or name) from an EMR export `folder` and θ0's image tower
    `pretrained` (e.g. ``load_hf_clip(θ0's folder)[1]["vision"]``): θ_t = θ0 + s_t · m_t ⊙ (θ_uni − θ0)."""
    from safetensors import safe_open

    path = os.path.join(folder, EMR_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(folder)!r} holds no {EMR_FILE}: not an EMR-Merging export")
    with safe_open(path, framework="numpy") as file:
        tasks = json.loads(file.metadata()["tasks"])
        index = _task_index(task, tasks)
        prefix = f"mask/{tasks[index]}/"
        masks = {name.removeprefix(prefix): file.get_tensor(name).astype(np.float32)  # 0 / 1, read as weights
                 for name in file.keys() if name.startswith(prefix)}
        rescaler = float(file.get_tensor("rescalers")[index])
    mask = params_from_hf_state_dict(masks, source=path, dtype=None)["vision"]
    unified = load_hf_clip(os.fspath(folder))[1]["vision"]

    def rebuild(theta0: np.ndarray, theta_uni: np.ndarray, kept: np.ndarray) -> np.ndarray:
        theta0 = np.asarray(theta0)
        return (theta0 + rescaler * np.where(kept > 0, np.asarray(theta_uni) - theta0, 0)).astype(theta0.dtype)

    return jax.tree_util.tree_map(rebuild, pretrained, unified, mask)


def _task_index(task: int | str, tasks: Sequence[str]) -> int:
    if isinstance(task, str):
        if task not in tasks:
            raise ValueError(f"no task {task!r} in this EMR export; its tasks: {list(tasks)}")
        return list(tasks).index(task)
    if not 0 <= task < len(tasks):
        raise ValueError(f"task {task} is out of range: this EMR export has {len(tasks)} tasks {list(tasks)}")
    return task
