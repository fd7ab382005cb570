"""What every model family's ``merge`` run shares once its models are built: λ given by ``--weights`` applied
through the optimiser's own merge (`spec_with_coefficients`), the exported model checked finite (`check_exported_finite`),
the named λ and the report written (`write_coefficients`, `write_report`); and a streamed run's whole output
(`write_streamed`).
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
from adamerging_jax.core.protocol import MethodRecord, records_json
from adamerging_jax.core.registry import Merged, MergeMethod, MethodSpec
from adamerging_jax.core.task_vector_transforms import transform_task_vectors
from adamerging_jax.core.trees import named_leaves
from adamerging_jax.merging.card import coefficient_summary
from adamerging_jax.merging.checked_run import CheckedRun
from adamerging_jax.merging.errors import MergeError
from adamerging_jax.merging.streaming import TensorStream, stream_merge


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


def spec_with_coefficients(spec: MethodSpec, coefficients: Coefficients, plan: CheckedRun, mesh: Any) -> MethodSpec:
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


def write_coefficients(plan: Any, merged: Merged, run: dict[str, Any], folder: Path | None = None) -> None:
    """``lambdas.json`` / ``lambdas.safetensors`` by checkpoint tensor name in ``folder`` (default: the output)
    when the model has λ, and their per-task summary in ``run["lambda_summary"]`` (None without λ)."""
    summary = None
    folder = plan.output if folder is None else folder
    if merged.coefficients is not None:
        named = formats.named_coefficients(jax.device_get(merged.coefficients), plan.binding.tensor_names)
        formats.write_named_json(folder / "lambdas.json", named)
        formats.write_named_safetensors(folder / "lambdas.safetensors", named)
        summary = coefficient_summary(named, run["tasks"])
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


def write_streamed(plan: CheckedRun, stream: TensorStream, dtypes: Mapping[str, Any], fields: Mapping[str, Any],
                   model_files: Callable[[Path, dict[str, Any]], None], markdown: str, *, max_shard_bytes: int,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """A streamed run's output, for every model family: the exported method merged tensor by tensor from disk
    into ``OUT/model`` (`streaming.stream_merge`; only it is built: without data the others would have no
    output), the family's other files of the model folder written by ``model_files(folder, run)`` (config,
    tokenizer files, card), then ``results.json`` (the family's own ``fields``, the method's record, what the
    stream read and wrote) and ``table.md`` (``markdown``); all built in a sibling folder and swapped in at once
    (`adamerging_jax.output.staged_output`). Returns ``results.json``'s content."""
    from adamerging_jax import report
    from adamerging_jax.output import committed_paths, staged_output

    config, output, spec = plan.config, plan.output, plan.export_spec
    if skipped := [other.name for other in plan.settings.methods if other.name != spec.name]:
        log(f"[merge] methods {skipped} are not built: without data only the exported model is an output")
    names = [task.name for task in config.tasks]
    with staged_output(output) as stage:
        folder = stage / "model"
        folder.mkdir()
        try:
            done = stream_merge(spec, stream, folder, dtypes, view=plan.binding.matrix_view,
                                max_shard_bytes=max_shard_bytes, log=log)
        except ValueError as error:
            raise MergeError(str(error)) from None
        record = MethodRecord(spec.name, spec.label, spec.describe()["params"], {}, seconds={"build": done["seconds"]})
        run = {**fields, "tasks": names, "merged_tasks": names, "methods": records_json({spec.name: record}),
               "export": config.exported, "weights": None,
               "settings": plan.settings.with_changes(quiet=True).describe(), "config": config.source,
               "lambda_summary": None,
               "streamed": {key: done[key] for key in ("passes", "bytes_read", "bytes_written")}}
        model_files(folder, run)
        report.check_finite([run])
        files = report.write_report(stage, run, markdown)
    log(f"[merge] wrote {output / 'model'} ({config.exported}, streamed in {done['passes']} passes, "
        f"{done['bytes_read'] / 1e6:.1f} MB read), " + ", ".join(
            map(str, committed_paths(files, stage, output).values())))
    return run
