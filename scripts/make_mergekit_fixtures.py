"""Make the mergekit reference fixtures of tests/fixtures/methods/ (Model Breadcrumbs, DELLA) with mergekit's code.

    python scripts/make_mergekit_fixtures.py [--out tests/fixtures/methods]

mergekit pins other packages than FusionBench, so it runs in an environment of its own (the tests need neither
torch nor mergekit; they read what this writes):

    python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5

The models are those of scripts/make_method_fixtures.py (its `tiny_clip_vision` and `finetuned_copies`: a tiny
random float64 CLIP image tower θ0 and K fine-tuned copies). Every floating tensor is merged by mergekit's own
``merge_tensors`` (the method's ``merge_group``: sparsify each τ_k, sign consensus, weights, normalisation, λ),
once per variant of `VARIANTS` (our method name and parameter names; ``scale`` is mergekit's ``weight``, given to
every model). What mergekit computes on the way is recorded from its own calls: each task's sparsified τ_k (the
output of ``sparsify``), and for DELLA the keep probabilities it passes to ``torch.bernoulli`` and the mask drawn.

    breadcrumbs.npz, della.npz:
      "settings"                  JSON {variant: {"method": name, parameter: value, ...}}
      "defaults"                  JSON {method: {parameter: mergekit's default}}
      "merged/VARIANT/NAME"       the merged tensor
      "sparse/VARIANT/task{k}/NAME"   mergekit's sparsified (and rescaled) τ_k, for the `RECORD_SPARSE` variants
      "keep_probability/VARIANT/task{k}/NAME", "mask/VARIANT/task{k}/NAME"   DELLA only (the mask bool)

On CPU mergekit's ``della_magprune`` works in float32 (its ``work_dtype``) and elsewhere in the tensor's own dtype;
to get a float64 reference each τ_k reaches ``sparsify`` as a tensor that reports a non-CPU device
(`_ReportsAccelerator`), so mergekit takes its tensor-dtype path while the arithmetic still runs on the CPU.
Breadcrumbs' ``magnitude_outliers`` computes in the tensor's dtype on CPU too (it only sorts float32 magnitudes,
which orders the same as float64 for the distinct magnitudes of these random models).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
from typing import Any, Iterator

import numpy as np
import torch
from mergekit import merge_methods
from mergekit.merge_methods import generalized_task_arithmetic
from mergekit.merge_methods.api import merge_tensors

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE_SEED = 0  # torch's seed for DELLA's Bernoulli draws

VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "breadcrumbs": {
        "breadcrumbs": dict(method="breadcrumbs", density=0.3, gamma=0.05, scale=0.5, **{"lambda": 0.8}),
        "breadcrumbs_ties": dict(method="breadcrumbs_ties", density=0.3, gamma=0.05, scale=0.5, **{"lambda": 0.8}),
        # ρ + γ > 1: fewer outliers dropped so that ⌊ρ n⌋ entries stay; normalised and L1-rescaled
        "breadcrumbs_wide": dict(method="breadcrumbs", density=0.85, gamma=0.25, scale=0.5, normalize=True,
                                 rescale=True, **{"lambda": 1.0}),
        "breadcrumbs_ties_normalized": dict(method="breadcrumbs_ties", density=0.5, gamma=0.1, scale=0.7,
                                            normalize=True, rescale=True, **{"lambda": 1.3}),
    },
    "della": {
        "della": dict(method="della", density=0.4, epsilon=0.15, scale=0.5, **{"lambda": 0.8}),
        "della_linear": dict(method="della_linear", density=0.6, epsilon=0.2, scale=0.5, **{"lambda": 1.2}),
        "della_unscaled": dict(method="della", density=0.5, epsilon=0.3, scale=0.7, normalize=False, rescale=False,
                               **{"lambda": 1.0}),
    },
}


RECORD_SPARSE = ("breadcrumbs", "della")
"""The variants whose sparsified τ_k are saved (the others' only enter their merged tensors)."""


def _method_fixtures_module():
    """scripts/make_method_fixtures.py as a module (the models are built there)."""
    spec = importlib.util.spec_from_file_location("make_method_fixtures", os.path.join(HERE, "make_method_fixtures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _ReportsAccelerator(torch.Tensor):
    """A CPU tensor whose ``.device`` says "cuda": mergekit's DELLA then computes in the tensor's dtype."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda")


@contextlib.contextmanager
def _recorded(records: list[dict[str, torch.Tensor]], tensor_dtype_path: bool) -> Iterator[None]:
    """Record every ``sparsify`` call of mergekit's generalized task arithmetic (its output) and the probabilities
    and mask of every ``torch.bernoulli`` call inside it; one dict per call, in call order (task 0, 1, ...)."""
    sparsify, bernoulli = generalized_task_arithmetic.sparsify, torch.bernoulli

    def recording_bernoulli(probabilities: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        mask = bernoulli(probabilities, *args, **kwargs)
        records[-1].update(keep_probability=probabilities.as_subclass(torch.Tensor).clone(),
                           mask=mask.as_subclass(torch.Tensor).clone())
        return mask

    def recording_sparsify(tensor: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        records.append({})
        given = tensor.as_subclass(_ReportsAccelerator) if tensor_dtype_path else tensor
        sparse = sparsify(given, **kwargs).as_subclass(torch.Tensor)
        records[-1]["sparse"] = sparse.clone()
        return sparse

    generalized_task_arithmetic.sparsify, torch.bernoulli = recording_sparsify, recording_bernoulli
    try:
        yield
    finally:
        generalized_task_arithmetic.sparsify, torch.bernoulli = sparsify, bernoulli


def _mergekit_parameters(setting: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(mergekit's method name, its parameters) for one of our settings (``scale`` → every model's ``weight``)."""
    parameters = {("weight" if key == "scale" else key): value for key, value in setting.items() if key != "method"}
    return setting["method"], parameters


def _defaults(methods: set[str]) -> dict[str, dict[str, Any]]:
    """mergekit's default of every parameter that has one (``weight`` has none), per method."""
    return {name: {p.name: p.default for p in merge_methods.get(name).spec.parameters
                   if isinstance(p.default, (bool, int, float))} for name in sorted(methods)}


def merge_variant(variant: str, setting: dict[str, Any], pretrained: dict[str, torch.Tensor],
                  finetuned: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Every floating tensor merged by mergekit with `setting`, and what was recorded on the way."""
    method, parameters = _mergekit_parameters(setting)
    arrays = {}
    for name, base in pretrained.items():
        if not base.is_floating_point():
            continue
        records: list[dict[str, torch.Tensor]] = []
        with _recorded(records, tensor_dtype_path=method.startswith("della")):
            merged = merge_tensors([base] + [model[name] for model in finetuned], method, parameters=parameters,
                                   base_index=0)
        arrays[f"merged/{variant}/{name}"] = merged.numpy().copy()
        for task, record in enumerate(records):
            for key, value in record.items():
                if key != "sparse" or variant in RECORD_SPARSE:
                    dtype = torch.bool if key == "mask" else torch.float64
                    arrays[f"{key}/{variant}/task{task}/{name}"] = value.to(dtype).reshape(base.shape).numpy().copy()
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "..", "tests", "fixtures", "methods"))
    args = parser.parse_args()
    models = _method_fixtures_module()
    torch.set_default_dtype(torch.float64)
    pretrained_model = models.tiny_clip_vision()
    pretrained = pretrained_model.state_dict()
    finetuned = [model.state_dict() for model in models.finetuned_copies(pretrained_model)]
    for fixture, variants in VARIANTS.items():
        torch.manual_seed(FIXTURE_SEED)
        arrays: dict[str, np.ndarray] = {
            "settings": np.asarray(json.dumps(variants)),
            "defaults": np.asarray(json.dumps(_defaults({s["method"] for s in variants.values()}))),
        }
        for variant, setting in variants.items():
            arrays.update(merge_variant(variant, setting, pretrained, finetuned))
        np.savez_compressed(os.path.join(args.out, f"{fixture}.npz"), **arrays)
        print(f"wrote {fixture}.npz ({len(arrays)} arrays)")


if __name__ == "__main__":
    main()
