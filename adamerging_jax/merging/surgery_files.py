"""Representation Surgery's export: the base model is the HF folder (``model.safetensors``), and
``surgery.safetensors`` beside it holds every task's module (`core.surgery`) under FusionBench's
``SurgeryModelWrapper`` names, in torch's ``Linear.weight`` layout:

    feature_mapping_to_head_down_proj_<task>.weight   W_down,t [r, d]
    feature_mapping_to_head_up_proj_<task>.weight     W_up,t   [d, r]

(<task>: the task name with "-" and "." as "_", as the wrapper names it). Task t's prediction is head t applied
to z − W_up,t ReLU(W_down,t z), z the base model's representation (CLIP: its normalised image embedding).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np

from adamerging_jax.core.checkpoint import write_atomic
from adamerging_jax.core.surgery import SurgeryModels, SurgeryModules

SURGERY_FILE = "surgery.safetensors"


def module_names(task: str) -> tuple[str, str]:
    """The names of task `task`'s W_down and W_up in FusionBench's ``SurgeryModelWrapper`` state dict."""
    regular = task.replace("-", "_").replace(".", "_")
    return (f"feature_mapping_to_head_down_proj_{regular}.weight", f"feature_mapping_to_head_up_proj_{regular}.weight")


def write_surgery_file(folder: str | os.PathLike, models: SurgeryModels, tasks: Sequence[str]) -> list[str]:
    """``folder/surgery.safetensors``: every task's module by name (module docstring); returns the names."""
    from safetensors.numpy import save

    modules = jax.device_get(models.modules)
    names = [module_names(task) for task in tasks]
    if len({name for pair in names for name in pair}) != 2 * len(tasks):
        raise ValueError(f"task names {list(tasks)} collide once '-' and '.' are written '_' (FusionBench's names)")
    arrays = {}
    for t, (down, up) in enumerate(names):
        arrays[down] = np.ascontiguousarray(modules.down[t])
        arrays[up] = np.ascontiguousarray(modules.up[t])
    metadata = {"content": "adamerging_jax Representation Surgery modules", "tasks": json.dumps(list(tasks))}
    write_atomic(os.path.join(folder, SURGERY_FILE), save(arrays, metadata=metadata))
    return sorted(arrays)


def load_surgery_modules(folder: str | os.PathLike) -> tuple[list[str], SurgeryModules]:
    """(task names, the stacked modules) of a Surgery export `folder`."""
    from safetensors import safe_open

    path = os.path.join(folder, SURGERY_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(folder)!r} holds no {SURGERY_FILE}: not a Representation Surgery export")
    with safe_open(path, framework="numpy") as file:
        tasks = json.loads(file.metadata()["tasks"])
        pairs = [tuple(file.get_tensor(name) for name in module_names(task)) for task in tasks]
    return tasks, SurgeryModules(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
