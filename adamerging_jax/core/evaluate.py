"""Top-1 accuracy of a (merged) model on each task's full test set, batched and jitted."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.objective import ApplyFn
from adamerging_jax.core.trees import PyTree


@dataclasses.dataclass(frozen=True)
class Accuracy:
    """Top-1 accuracy per task (in [0, 1]) and their unweighted mean, as the paper reports it."""

    per_task: dict[str, float]

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.per_task.values())))


@partial(jax.jit, static_argnums=(0, 3))
def _predict(apply_fn: ApplyFn, params: PyTree, images: Any, task: int) -> jax.Array:
    """Predicted classes; compiled once per (apply_fn, task, batch shape) and reused across calls."""
    return jnp.argmax(apply_fn(params, images, task), axis=-1)


def _batches(test_set: Any, batch_size: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) arrays are cut into batches; anything else is taken as an iterable of batches."""
    if isinstance(test_set, tuple) and len(test_set) == 2 and hasattr(test_set[0], "shape"):
        images, labels = test_set
        if len(images) != len(labels):
            raise ValueError(f"test set has {len(images)} images but {len(labels)} labels")
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size], labels[start : start + batch_size]
    else:
        yield from test_set


def evaluate(
    apply_fn: ApplyFn,
    params: PyTree,
    test_sets: Sequence[Any],
    task_names: Sequence[str] | None = None,
    batch_size: int = 256,
) -> Accuracy:
    """Accuracy of `apply_fn(params, x, t)` on task t's test set, for every task.

    Args:
      test_sets: per task, `(images, labels)` arrays or an iterable of `(images, labels)` batches.
      task_names: names for the result (default "0", "1", ...).
      batch_size: for array test sets; the last batch is padded so one compiled function serves all.
    """
    names = list(task_names) if task_names is not None else [str(t) for t in range(len(test_sets))]
    if len(names) != len(test_sets):
        raise ValueError(f"{len(names)} task names for {len(test_sets)} test sets")
    per_task = {}
    for task, (name, test_set) in enumerate(zip(names, test_sets)):
        correct = total = 0
        for images, labels in _batches(test_set, batch_size):
            count = len(labels)
            if count < batch_size and isinstance(images, np.ndarray):
                pad = np.zeros((batch_size - count, *images.shape[1:]), images.dtype)
                images = np.concatenate([images, pad])
            predictions = np.asarray(_predict(apply_fn, params, images, task))[:count]
            correct += int(np.sum(predictions == np.asarray(labels)))
            total += count
        if total == 0:
            raise ValueError(f"test set of task {name!r} is empty")
        per_task[name] = correct / total
    return Accuracy(per_task)
