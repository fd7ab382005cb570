"""The reference fixtures of tests/fixtures/methods/ (made by scripts/make_method_fixtures.py with FusionBench's
and mergekit's code) as our trees, in float64: θ0 and the stacked τ of a tiny random CLIP image tower, and the
reference's merged tensors by HF name, so a test compares a method's output with the reference's."""

from __future__ import annotations

import os

import numpy as np

import adamerging_jax as am
from adamerging_jax.models import clip, clip_checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "methods")
VIEW = clip.matrix_view


def read(name: str) -> dict[str, np.ndarray]:
    """The arrays of ``NAME.npz``."""
    with np.load(os.path.join(FIXTURES, f"{name}.npz")) as data:
        return {key: data[key] for key in data.files}


def _section(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {key[len(prefix) + 1:]: value for key, value in arrays.items() if key.startswith(prefix + "/")}


def tower(state: dict[str, np.ndarray]) -> dict:
    """Our image-tower tree (float64) from HF tensors by name."""
    return clip_checkpoint.params_from_hf_state_dict(state, dtype=np.float64)["vision"]


def models() -> tuple[dict, dict, int]:
    """(θ0, stacked τ, K) in float64 (enable x64 first: `jax.experimental.enable_x64`)."""
    arrays = read("models")
    pretrained = tower(_section(arrays, "pretrained"))
    finetuned = []
    while any(key.startswith(f"task{len(finetuned)}/") for key in arrays):
        finetuned.append(tower(_section(arrays, f"task{len(finetuned)}")))
    return pretrained, am.task_vectors(pretrained, finetuned), len(finetuned)


def hf_tensors(vision_tree: dict) -> dict[str, np.ndarray]:
    """Our image-tower tree as HF tensors by name (the names of the reference's state dict)."""
    state = clip_checkpoint.hf_state_dict(vision_tree, None, "vision", dtype=np.float64)
    return {name.removeprefix(clip_checkpoint.VISION_PREFIX): value for name, value in state.items()}


def max_difference(vision_tree: dict, reference: dict[str, np.ndarray]) -> float:
    """max |ours − reference| over every tensor, matched by name (the two must name the same tensors)."""
    ours = hf_tensors(vision_tree)
    theirs = {name.removeprefix(clip_checkpoint.VISION_PREFIX): value for name, value in reference.items()}
    if set(ours) != set(theirs):
        raise AssertionError(f"tensor names differ: only ours {sorted(set(ours) - set(theirs))[:5]}, "
                             f"only the reference's {sorted(set(theirs) - set(ours))[:5]}")
    return max(float(np.max(np.abs(ours[n] - theirs[n]))) for n in ours)


def merged(name: str, key: str = "merged") -> dict[str, np.ndarray]:
    """The reference's merged state dict of fixture `name` (the ``key/NAME`` arrays)."""
    return _section(read(name), key)
