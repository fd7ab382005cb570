"""What every model family's ``merge`` run shares once its models are built: λ given by ``--weights`` applied
through the optimiser's own merge (`given_lambdas`), the exported model checked finite (`check_exported_finite`),
the named λ and the report written (`write_lambdas`, `write_report`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from adamerging_jax import coefficient_formats as formats
from adamerging_jax.core.coefficients import Coefficients
from adamerging_jax.core.optimize import adamerging
from adamerging_jax.core.registry import Merged, MergeMethod, MethodSpec
from adamerging_jax.core.task_vector_transforms import transform_task_vectors
from adamerging_jax.core.trees import named_leaves
from adamerging_jax.merging.card import lambda_summary
from adamerging_jax.merging.checked_run import CheckedRun
from adamerging_jax.merging.errors import MergeError


def check_exported_finite(params: Any, tensor_names: Mapping[tuple[str, int | None], str]) -> None:
    """Every tensor of the model about to be exported is finite: one line naming the first that is not (a
    merge of finite inputs can still overflow, e.g. a large λ on a large τ), and nothing of it is written."""
    for path, leaf in named_leaves(params):
        finite = np.isfinite(np.asarray(leaf))
        if not finite.all():
            layer = None if (path, None) in tensor_names else int(np.argwhere(~finite)[0][0])
            name = tensor_names.get((path, layer), path)
            raise MergeError(f"the merged model's tensor {name!r} holds {int((~finite).sum())} NaN or inf values; the "
                       "model is not exported")


def given_lambdas(spec: MethodSpec, coefficients: Coefficients, plan: CheckedRun, mesh: Any) -> MethodSpec:
    """``spec`` as a data-free method that applies ``coefficients`` (its τ, or τ̂ for AdaMerging++) through
    the optimiser's own merge with zero steps, so the model is bit-identical to a trained run's at those λ."""
    params = spec.describe()["params"]
    config = dataclasses.replace(plan.settings.adamerging, steps=0, granularity=params["granularity"],
                                 checkpoint_dir=None, quiet=True)

    def build(pretrained: Any, task_vectors: Any) -> Merged:
        task_vectors = transform_task_vectors(params["task_vectors"], task_vectors, plan.binding.matrix_view, params)
        result = adamerging(plan.binding.apply_fn, pretrained, task_vectors, [], config, coefficients=coefficients,
                            mesh=mesh)
        return Merged(params=result.params, coefficients=result.coefficients)

    method = MergeMethod(spec.name, f"{spec.label} (given λ)", spec.method.paper, build)
    return MethodSpec(method, ())


def write_lambdas(plan: Any, merged: Merged, run: dict[str, Any], folder: Path | None = None) -> None:
    """``lambdas.json`` / ``lambdas.safetensors`` by checkpoint tensor name in ``folder`` (default: the output)
    when the model has λ, and their per-task summary in ``run["lambda_summary"]`` (None without λ)."""
    summary = None
    folder = plan.output if folder is None else folder
    if merged.coefficients is not None:
        named = formats.named_lambdas(jax.device_get(merged.coefficients), plan.binding.tensor_names)
        formats.write_named_json(folder / "lambdas.json", named)
        formats.write_named_safetensors(folder / "lambdas.safetensors", named)
        summary = lambda_summary(named, run["tasks"])
    run["lambda_summary"] = summary


def write_report(plan: Any, run: dict[str, Any], markdown: str, log: Callable[[str], None],
                 folder: Path | None = None) -> dict[str, Path]:
    """``results.json``, ``table.md`` and the plots (when matplotlib is installed) in ``folder`` (default: the
    output); refuses non-finite results."""
    from adamerging_jax import report

    report.check_finite([run])
    try:
        import matplotlib  # noqa: F401
        plot_run = run
    except ImportError:
        log('[merge] matplotlib is missing: no plots (pip install "adamerging-jax[demo]")')
        plot_run = None
    return report.write_report(plan.output if folder is None else folder, run, markdown, plot_run=plot_run,
                               clamp=plan.settings.adamerging.clamp)
