"""Make the reference fixtures of tests/fixtures/methods/ with FusionBench's (and mergekit's) own code.

    python scripts/make_method_fixtures.py [--out tests/fixtures/methods] [--only NAME ...]

Run it in a separate environment that has the references installed (the tests need neither torch nor
FusionBench; they read what this writes):

    python -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.13.0 transformers safetensors numpy
    /tmp/refvenv/bin/pip install --no-deps fusion-bench==0.2.33   # plus what its imports ask for

The models are a tiny random HF ``CLIPVisionModel`` in float64 (q, k, v separate; every tensor drawn at
random, so every weight matrix has distinct singular values and every SVD is unique up to signs that the
methods cancel) and K fine-tuned copies θ_k = θ0 + τ_k with random τ_k:

    models.npz            "pretrained/NAME" and "task{k}/NAME" for every tensor NAME of the state dict
    METHOD.npz            the reference's merged state dict ("merged/NAME"), and whatever else that method's
                          test reads (per-task models, masks, intermediate values), float64

Each method's fixture is one function below, registered with ``@fixture("name")``; it gets the pretrained
and fine-tuned torch modules and returns the arrays to save.
"""
from __future__ import annotations

import argparse
import copy
import os
from typing import Callable

import numpy as np
import torch
import transformers

NUM_TASKS = 4
FIXTURES: dict[str, Callable[[torch.nn.Module, list[torch.nn.Module]], dict[str, np.ndarray]]] = {}


def fixture(name: str):
    """Register a fixture function under `name` (its file is ``name.npz``)."""

    def register(function):
        FIXTURES[name] = function
        return function

    return register


def tiny_clip_vision(seed: int = 0) -> transformers.CLIPVisionModel:
    """A seeded random float64 CLIPVisionModel: width 24, 2 layers, 2 heads, MLP 40, 16×16 images, patch 8."""
    config = transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModel(config).to(torch.float64).eval()
    gains = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.copy_((1.0 if id(tensor) in gains else 0.0) + 0.2 * torch.randn_like(tensor))
    return model


def finetuned_copies(pretrained: torch.nn.Module, num_tasks: int = NUM_TASKS, seed: int = 1) -> list[torch.nn.Module]:
    """θ_k = θ0 + τ_k, τ_k ~ 0.05 · N(0, 1) per entry (every tensor moves, including biases and norms)."""
    generator = torch.Generator().manual_seed(seed)
    models = []
    for _ in range(num_tasks):
        model = copy.deepcopy(pretrained)
        with torch.no_grad():
            for tensor in model.parameters():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
        models.append(model)
    return models


def state_arrays(module: torch.nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """``{prefix/NAME: float64 array}`` for every tensor of the module's state dict."""
    return {f"{prefix}/{name}": t.detach().to(torch.float64).numpy().copy() for name, t in module.state_dict().items()}


# --- one function per method's reference (each returns the arrays of METHOD.npz) -----------------------------

# --- end of method fixtures ---


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "methods"))
    parser.add_argument("--only", nargs="*", help="make only these methods' fixtures (and models.npz)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_default_dtype(torch.float64)
    pretrained = tiny_clip_vision()
    finetuned = finetuned_copies(pretrained)
    models = state_arrays(pretrained, "pretrained")
    for k, model in enumerate(finetuned):
        models.update(state_arrays(model, f"task{k}"))
    np.savez_compressed(os.path.join(args.out, "models.npz"), **models)
    for name, make in FIXTURES.items():
        if args.only and name not in args.only:
            continue
        arrays = make(copy.deepcopy(pretrained), [copy.deepcopy(m) for m in finetuned])
        np.savez_compressed(os.path.join(args.out, f"{name}.npz"), **arrays)
        print(f"wrote {name}.npz ({len(arrays)} arrays)")


if __name__ == "__main__":
    main()
