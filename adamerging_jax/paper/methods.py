"""The rows of the paper's tables as models: each method gives ``task index -> image-tower params``.

- pretrained: θ0 on every task;  individual: θ_t = θ0 + τ_t on its own task t (not on unseen tasks);
- weight averaging θ0 + (1/K) Σ τ_k;  task arithmetic θ0 + 0.3 Σ τ_k;  TIES (trim 20% over the model, elect,
  disjoint sum, × 0.3);
- task-/layer-wise AdaMerging: λ learned by entropy minimisation on the merged tasks' unlabeled test batches
  (``adamerging_jax.adamerging``); ++: the same on TIES-preprocessed task vectors (``ties_task_vectors``).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

import adamerging_jax as am
from adamerging_jax.core.objective import ApplyFn
from adamerging_jax.core.task_vectors import num_tasks
from adamerging_jax.data.pipeline import AdaptationBatches, Source, clip_preprocess
from adamerging_jax.paper.evaluation import ModelForTask
from adamerging_jax.paper.settings import ADAMERGING_METHODS, MergeConfig


@dataclasses.dataclass
class AdaMergingRun:
    """What an AdaMerging run learned: λ per leaf and the summed entropy per step."""

    coefficients: dict[str, list]
    entropy: list[float]


def _everywhere(params: Any) -> ModelForTask:
    return lambda task: params


def _individual(pretrained: Any, task_vectors: Any, num_merged: int) -> ModelForTask:
    """θ_t = θ0 + τ_t for a merged task t, None (not evaluated) for an unseen one."""
    add = jax.jit(lambda p, tv, t: jax.tree_util.tree_map(lambda a, b: a + b[t], p, tv))
    return lambda task: add(pretrained, task_vectors, task) if task < num_merged else None


def data_free_model(method: str, pretrained: Any, task_vectors: Any, merge: MergeConfig) -> ModelForTask:
    """The model of a method that needs no data (every method but AdaMerging)."""
    if method == "pretrained":
        return _everywhere(pretrained)
    if method == "individual":
        return _individual(pretrained, task_vectors, num_tasks(task_vectors))
    if method == "weight_average":
        return _everywhere(am.weight_average(pretrained, task_vectors))
    if method == "task_arithmetic":
        return _everywhere(am.task_arithmetic(pretrained, task_vectors, merge.task_arithmetic_scale))
    if method == "ties":
        return _everywhere(am.ties_merging(pretrained, task_vectors, merge.ties_density, merge.ties_reduce,
                                           merge.ties_scale, total_size=merge.ties_total_size))
    raise ValueError(f"{method!r} is not a data-free method")


def adamerging_model(
    method: str,
    apply_fn: ApplyFn,
    pretrained: Any,
    task_vectors: Any,
    adaptation_sources: Sequence[Source],
    merge: MergeConfig,
    *,
    image_size: int,
    seed: int,
    num_threads: int,
    checkpoint_dir: str | None,
    quiet: bool,
    devices: int | None = None,
    log: Callable[[str], None] = print,
) -> tuple[ModelForTask, AdaMergingRun]:
    """Run task-/layer-wise AdaMerging(++) on the merged tasks' test images; the merged model and its record."""
    if method not in ADAMERGING_METHODS:
        raise ValueError(f"{method!r} is not an AdaMerging method; those are {ADAMERGING_METHODS}")
    if method.endswith("++"):
        task_vectors = am.ties_task_vectors(task_vectors, merge.ties_density, total_size=merge.ties_total_size)
    config = merge.adamerging_for(
        method, seed=seed, quiet=quiet,
        checkpoint_dir=os.path.join(checkpoint_dir, method.replace("+", "p")) if checkpoint_dir else None)
    batches = AdaptationBatches(
        adaptation_sources, batch_size=config.batch_size, n_batches=config.batches_per_task, seed=seed,
        preprocess=functools.partial(clip_preprocess, size=image_size), num_threads=num_threads)
    log(f"[{method}] {config.steps} steps, {config.batches_per_task} x {config.batch_size} images per task per "
        f"step, lr {config.lr}, clamp {config.clamp}")
    started = time.perf_counter()
    mesh = am.data_mesh(jax.devices()[:devices] if devices else None)
    result = am.adamerging(apply_fn, pretrained, task_vectors, batches, config, mesh=mesh)
    seconds = time.perf_counter() - started
    entropy = np.asarray(result.history["loss"]).sum(axis=1)
    log(f"[{method}] done in {seconds:.0f} s; summed entropy {entropy[0]:.4f} -> {entropy[-1]:.4f}"
        if len(entropy) else f"[{method}] 0 steps")
    coefficients = {path: np.asarray(value).tolist() for path, value in result.coefficients.per_leaf().items()}
    return _everywhere(result.params), AdaMergingRun(coefficients, entropy.tolist())
