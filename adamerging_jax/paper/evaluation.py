"""Top-1 accuracy of several models on several tasks in ONE pass over each test set.

Decoding and resizing a test image costs more than a ViT-B/32 forward on an accelerator, and Table 1 has 9
methods; so each task's test set is read once and every method's parameters classify each batch.  A model is
given as ``task index -> params`` (None: not evaluated on that task), e.g. ``individual`` gives θ_t on task
t only.  The model is a :class:`~adamerging_jax.SharedBackbone`: its image tower is compiled once for all
tasks and methods (batches padded to ``batch_size``, parameters placed on one device), only the small head
step once per task.
Accuracy = correct / examples per task; the mean is unweighted over tasks, as in the paper.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from adamerging_jax.core.objective import SharedBackbone
from adamerging_jax.data.pipeline import Source, clip_preprocess, evaluation_batches

ModelForTask = Callable[[int], Any]
"""A model as ``task index -> params`` (None where it is not evaluated)."""


def _pad(images: np.ndarray, batch_size: int) -> np.ndarray:
    if len(images) == batch_size:
        return images
    return np.concatenate([images, np.zeros((batch_size - len(images), *images.shape[1:]), images.dtype)])


@functools.lru_cache(maxsize=8)
def _compiled(backbone: SharedBackbone) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The jitted image tower and the jitted head + argmax of ``backbone`` (kept across calls)."""
    features = jax.jit(backbone.features)
    predict = jax.jit(lambda f, task: jnp.argmax(backbone.head(f, task), axis=-1), static_argnums=1)
    return features, predict


def accuracies(
    backbone: SharedBackbone,
    models: Mapping[str, ModelForTask],
    sources: Sequence[Source],
    task_names: Sequence[str],
    num_classes: Sequence[int],
    *,
    image_size: int,
    batch_size: int = 256,
    num_threads: int = 8,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    """``{model: {task: accuracy in [0, 1]}}`` over the full test sets ``sources`` (task order as ``task_names``).

    A label outside ``[0, num_classes[t])`` raises ``ValueError`` naming the task: the data and the head disagree.
    """
    features, predict = _compiled(backbone)
    device = jax.devices()[0]
    preprocess = functools.partial(clip_preprocess, size=image_size)
    results: dict[str, dict[str, float]] = {method: {} for method in models}
    placed: dict[int, tuple[Any, Any]] = {}  # id(params) -> (params, params on `device`), kept across tasks
    for task, (name, source) in enumerate(zip(task_names, sources)):
        params = {method: for_task(task) for method, for_task in models.items()}
        params = {method: p for method, p in params.items() if p is not None}
        placed = {id(p): placed.get(id(p)) or (p, jax.device_put(p, device)) for p in params.values()}
        params = {method: placed[id(p)][1] for method, p in params.items()}
        correct = dict.fromkeys(params, 0)
        seen, started = 0, time.perf_counter()
        progress = tqdm(total=len(source), desc=f"eval {name}", unit="img", disable=quiet)
        for images, labels in evaluation_batches(source, batch_size, preprocess, num_threads=num_threads):
            labels = np.asarray(labels)
            if labels.min() < 0 or labels.max() >= num_classes[task]:
                raise ValueError(f"task {name!r}: label {int(labels.max())} in its test set, but its head has "
                                 f"{num_classes[task]} classes")
            batch = jax.device_put(_pad(np.asarray(images), batch_size), device)
            for method, p in params.items():
                predicted = np.asarray(predict(features(p, batch), task))[: len(labels)]
                correct[method] += int(np.sum(predicted == labels))
            seen += len(labels)
            progress.update(len(labels))
        progress.close()
        for method in params:
            results[method][name] = correct[method] / seen
        log(f"[eval] {name}: {seen} images, {len(params)} models, {time.perf_counter() - started:.0f} s; "
            + ", ".join(f"{method} {100 * correct[method] / seen:.1f}" for method in params))
    return results
