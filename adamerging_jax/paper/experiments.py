"""The paper's three protocols on CLIP, each a function from an :class:`ExperimentConfig` to a JSON-able run.

- :func:`run_merging` -- Tables 1 and 2 and the generalization experiment: merge ``merge_tasks``, evaluate
  every method on ``eval_tasks`` (the merged tasks first; the others are unseen: AdaMerging never sees their
  images and ``individual`` has no model for them).
- :func:`run_robustness` -- merge the 4 tasks, then per test condition (clean and each corruption) adapt
  AdaMerging on the corrupted unlabeled test images, as FusionBench's robustness pools do, and evaluate on them.

AdaMerging is transductive here, as in the paper: λ is learned on the very test images it is scored on.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

import adamerging_jax as am
from adamerging_jax.core.binding import ModelBinding
from adamerging_jax.core.protocol import records_json, run_methods
from adamerging_jax.data.pipeline import AdaptationBatches, Source, clip_preprocess, evaluation_batches
from adamerging_jax.paper import sources
from adamerging_jax.paper.models import ClipModels, load_models
from adamerging_jax.paper.settings import ExperimentConfig


def conditions() -> tuple[str, ...]:
    """Test conditions of the robustness experiment: the clean test sets and the 7 corruptions.

    (The corruptions module, with its scipy/scikit-image imports, is loaded only by the robustness experiment.)
    """
    from adamerging_jax.data.corruptions import CORRUPTIONS

    return ("clean", *CORRUPTIONS)


def evaluate_methods(
    config: ExperimentConfig,
    models: ClipModels,
    task_vectors: Any,
    eval_sources: Sequence[Source],
    binding: ModelBinding,
    *,
    state_dir: str | None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every method of ``config.merge`` through the protocol (AdaMerging adapts on the merged tasks'
    ``eval_sources``), all evaluated in one pass over ``eval_sources``; the run as a dict (accuracy, λ,
    entropy, times). ``binding`` is ``models.binding()``, the merge command's CLIP binding (its ``apply_fn``,
    stacked layers, matrix view, Gram capture, representation and head, MoE form), made once per experiment so
    that its compiled steps are reused."""
    num_merged = len(config.merge_tasks)
    size = models.image_size
    adaptation = AdaptationBatches(
        sources.adaptation_view(eval_sources[:num_merged], config.data, size),
        batch_size=config.merge.adamerging.batch_size, n_batches=config.merge.adamerging.batches_per_task,
        seed=config.seed, preprocess=functools.partial(clip_preprocess, size=size),
        num_threads=config.data.num_threads)
    batch_size, threads = config.data.eval_batch_size, config.data.num_threads
    test_sets = [evaluation_batches(source, batch_size, functools.partial(clip_preprocess, size=size),
                                    num_threads=threads) for source in eval_sources]
    merge = binding.merge_settings(config.merge.with_changes(seed=config.seed, quiet=config.quiet))
    with adaptation:  # closed after the run: no image decoded ahead for steps that will not run
        records = run_methods(
            merge, models.pretrained, task_vectors, test_sets=test_sets, task_names=config.eval_tasks,
            adaptation=adaptation, state_dir=state_dir,
            mesh=am.data_mesh(jax.devices()[: config.devices] if config.devices else None),
            **binding.protocol_arguments(), eval_batch_size=batch_size, quiet=config.quiet, log=log)
    seconds = {name: record.seconds["build"] for name, record in records.items()}
    seconds["evaluation"] = next(iter(records.values())).seconds["evaluate"]
    return {"tasks": list(config.eval_tasks), "merged_tasks": list(config.merge_tasks),
            "methods": records_json(records), "seconds": seconds}


def _prepare(config: ExperimentConfig, log: Callable[[str], None]) -> tuple[ClipModels, Any, list[Source]]:
    """Test sources first (cheap, and the commonest error), then checkpoints, heads and task vectors."""
    eval_sources = sources.task_test_sets(config.eval_tasks, config.data)
    for task, source in zip(config.eval_tasks, eval_sources):
        log(f"[data] {task}: {len(source)} test images")
    models = load_models(config.checkpoints, config.merge_tasks, config.eval_tasks,
                         config.cache_dir if config.cache_dir else None, log)
    task_vectors = am.task_vectors(models.pretrained, models.finetuned)
    return models, task_vectors, eval_sources


def _environment() -> dict[str, Any]:
    return {"devices": [str(d) for d in jax.devices()], "jax": jax.__version__}


def run_merging(config: ExperimentConfig, *, output_dir: str | Path | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Table 1 / Table 2 / generalization: one run over ``config.eval_tasks``."""
    started = time.perf_counter()
    models, task_vectors, eval_sources = _prepare(config, log)
    state_dir = str(Path(output_dir) / "adamerging_state") if output_dir and config.checkpoint_runs else None
    run = evaluate_methods(config, models, task_vectors, eval_sources, models.binding(), state_dir=state_dir,
                           log=log)
    run["seconds"]["total"] = time.perf_counter() - started
    return {"experiment": config.name, "settings": config.settings(), **run, **_environment()}


def run_robustness(
    config: ExperimentConfig,
    test_conditions: Sequence[str] | None = None,
    *,
    severity: int = 5,
    corruption_size: int | None = 224,
    output_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Robustness: for each condition, the methods adapted to and evaluated on the corrupted test sets."""
    known = conditions()
    test_conditions = known if test_conditions is None else tuple(test_conditions)
    unknown = [c for c in test_conditions if c not in known]
    if unknown:
        raise ValueError(f"unknown test conditions {unknown}; known: {list(known)}")
    started = time.perf_counter()
    models, task_vectors, clean = _prepare(config, log)
    runs, binding = {}, models.binding()
    for condition in test_conditions:
        log(f"[robustness] {condition}" + ("" if condition == "clean" else f", severity {severity}"))
        eval_sources = sources.corrupted(clean, condition, severity, config.seed, corruption_size)
        state_dir = (str(Path(output_dir) / "adamerging_state" / condition)
                     if output_dir and config.checkpoint_runs else None)
        runs[condition] = evaluate_methods(config, models, task_vectors, eval_sources, binding,
                                           state_dir=state_dir, log=log)
    return {"experiment": config.name, "settings": config.settings(), "tasks": list(config.eval_tasks),
            "severity": severity, "corruption_size": corruption_size, "conditions": runs,
            "seconds": {"total": time.perf_counter() - started}, **_environment()}
