"""Top-1 accuracy of one or many (merged) models on each task's full test set, in ONE pass over each set.

Reading and decoding a test image can cost more than a forward pass, and a table has many methods; so each
task's test set is read once and every model classifies each batch. Accuracy_t = correct / examples of task
t; the mean is unweighted over tasks, as the paper reports it.

A model is a parameter tree (the same on every task) or `PerTask`: ``task index -> params`` (None where it
has no model, e.g. an individual fine-tuned model on an unseen task). With a `SharedBackbone` apply_fn the
backbone is compiled once for every task and model and only the small head once per task; batches are padded
to one shape (`pad_batch`), so one compiled function serves the last, shorter batch too.

Refused with an error naming the task (and model): duplicate task names, labels that are not 1-D integers of
the batch's length in [0, C), non-finite logits, an empty test set.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from adamerging_jax.core.objective import ApplyFn, SharedBackbone
from adamerging_jax.core.trees import PyTree, check_array_leaves, check_int


@dataclasses.dataclass(frozen=True)
class Accuracy:
    """Top-1 accuracy per task (in [0, 1]) and their unweighted mean, as the paper reports it."""

    per_task: dict[str, float]

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.per_task.values())))


@dataclasses.dataclass(frozen=True)
class PerTask:
    """A model given per task: ``params_for(task) -> params`` or None where it is not evaluated."""

    params_for: Callable[[int], PyTree | None]


Model = Any
"""A parameter tree, or `PerTask`."""


def pad_batch(inputs: Any, size: int) -> Any:
    """Every leaf of `inputs` padded with zeros along axis 0 to `size` rows (unchanged when it has them)."""

    def pad(x: Any) -> Any:
        x = np.asarray(x)
        if len(x) >= size:
            return x
        return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])

    return jax.tree_util.tree_map(pad, inputs)


def _check_pair(inputs: Any, labels: Any, where: str) -> None:
    """``inputs`` an array (or a dict / tuple of arrays) and ``labels`` an array: TypeError naming ``where``
    for Python lists of examples or labels."""
    for name, value in (("inputs", inputs), ("labels", labels)):
        if isinstance(value, list):
            raise TypeError(f"{where}: the {name} are a Python list of {len(value)} items; give one numpy array "
                            "(np.asarray / np.stack of the examples)")
    check_array_leaves(f"{where}: the inputs", inputs)
    check_array_leaves(f"{where}: the labels", labels)


def _batches(test_set: Any, batch_size: int, task: str) -> Iterable[tuple[Any, Any]]:
    """(images, labels) arrays are cut into batches; anything else is taken as an iterable of batches, each
    an (images, labels) pair of arrays."""
    where = f"test set of task {task!r}"
    if isinstance(test_set, tuple) and len(test_set) == 2 and (hasattr(test_set[1], "shape")
                                                               or isinstance(test_set[1], list)):
        images, labels = test_set
        _check_pair(images, labels, where)
        count = len(jax.tree_util.tree_leaves(images)[0])
        if count != len(labels):
            raise ValueError(f"test set has {count} inputs but {len(labels)} labels")
        for start in range(0, count, batch_size):
            yield jax.tree_util.tree_map(lambda x: x[start : start + batch_size], images), labels[start : start + batch_size]
        return
    if not isinstance(test_set, Iterable) or isinstance(test_set, (str, bytes)):
        raise TypeError(f"{where}: expected an (inputs, labels) pair of arrays or an iterable of such batches, got "
                        f"{type(test_set).__name__}")
    for i, batch in enumerate(test_set):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(f"{where}: batch {i} is not an (inputs, labels) pair (got {type(batch).__name__})")
        _check_pair(*batch, f"{where}, batch {i}")
        yield batch


def _summarise(logits: jax.Array, count: jax.Array, task: int) -> tuple[jax.Array, jax.Array, int]:
    """(argmax over classes, whether the first `count` rows' logits are all finite, the number of classes)."""
    if logits.ndim != 2 or not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"task {task}: apply_fn must return floating logits [N, C], got {logits.dtype} {logits.shape}")
    valid = jnp.arange(logits.shape[0]) < count
    finite = jnp.all(jnp.where(valid[:, None], jnp.isfinite(logits), True))
    return jnp.argmax(logits, axis=-1), finite, logits.shape[-1]


def _predictor(apply_fn: ApplyFn) -> Callable[[PyTree, Any, int, int], tuple[jax.Array, jax.Array, int]]:
    """``(params, inputs, task, count) -> (predicted classes, logits finite, number of classes)``, jitted and
    kept across calls (when `apply_fn` is hashable). A `SharedBackbone` compiles its backbone once for all
    tasks."""
    try:
        return _cached_predictor(apply_fn)
    except TypeError:  # an unhashable apply_fn: compiled for this call only
        return _cached_predictor.__wrapped__(apply_fn)


@functools.lru_cache(maxsize=16)
def _cached_predictor(apply_fn: ApplyFn) -> Callable[[PyTree, Any, int, int], tuple[jax.Array, jax.Array, int]]:
    if isinstance(apply_fn, SharedBackbone):
        features = jax.jit(apply_fn.features)
        head = jax.jit(lambda f, count, task: _summarise(apply_fn.head(f, task), count, task), static_argnums=2)
        return lambda params, inputs, task, count: head(features(params, inputs), count, task)
    whole = jax.jit(lambda p, x, count, task: _summarise(apply_fn(p, x, task), count, task), static_argnums=3)
    return lambda params, inputs, task, count: whole(params, inputs, count, task)


def _check_labels(labels: Any, count: int, num_classes: int, task: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != count or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"task {task!r}: labels must be 1-D integers, one per input ({count}); got "
                         f"{labels.dtype} of shape {labels.shape}")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.min() if labels.min() < 0 else labels.max())
        raise ValueError(f"task {task!r}: label {bad} outside [0, {num_classes}) of the model's {num_classes} classes")
    return labels


def _check_arguments(models: Any, test_sets: Any, task_names: Any, batch_size: Any) -> None:
    """The types of `evaluate_models`' arguments, each error naming the argument."""
    if not isinstance(models, Mapping):
        raise TypeError(f"evaluate_models: models must be a mapping name -> params, got {type(models).__name__}")
    if not models:
        raise ValueError("evaluate_models: models is empty: no model to evaluate")
    if isinstance(test_sets, (str, bytes, Mapping)) or not isinstance(test_sets, Sequence):
        raise TypeError(f"evaluate: test_sets must be a sequence (one test set per task), got "
                        f"{type(test_sets).__name__}")
    if not test_sets:
        raise ValueError("evaluate: test_sets is empty: no task to evaluate")
    if task_names is not None and (isinstance(task_names, (str, bytes)) or not isinstance(task_names, Sequence)):
        raise TypeError(f"evaluate: task_names must be a sequence of names, got {task_names!r}")
    check_int("evaluate: batch_size", batch_size, minimum=1)


def evaluate_models(
    apply_fn: ApplyFn,
    models: Mapping[str, Model],
    test_sets: Sequence[Any],
    task_names: Sequence[str] | None = None,
    batch_size: int = 256,
    *,
    forwards: Mapping[str, ApplyFn] | None = None,
    quiet: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Accuracy]:
    """Accuracy of every model on every task, reading each test set once: ``{model name: Accuracy}``.

    Args:
      apply_fn: ``apply_fn(params, inputs, task) -> logits [N, C]``.
      models: name → parameter tree or `PerTask`.
      forwards: model name → the ``apply_fn`` of a model that runs with its own forward (e.g. Representation
        Surgery's); every other model runs with `apply_fn`. All are scored in the same pass.
      test_sets: per task, ``(inputs, labels)`` arrays or an iterable of ``(inputs, labels)`` batches.
      task_names: names for the result (default "0", "1", ...); must be distinct.
      batch_size: array test sets are cut into batches of this size; every shorter batch is padded to it.
      quiet, log: a progress bar per task; a summary line per task through `log`.

    Raises:
      TypeError naming the argument: models not a mapping, test sets or task names not sequences, a batch size
      that is not an integer, Python lists where arrays of examples or labels belong. ValueError: no model or
      no task, batch_size < 1, and the checks of the module docstring.
    """
    _check_arguments(models, test_sets, task_names, batch_size)
    names = list(task_names) if task_names is not None else [str(t) for t in range(len(test_sets))]
    if len(names) != len(test_sets):
        raise ValueError(f"{len(names)} task names for {len(test_sets)} test sets")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"task names must be distinct; repeated: {duplicates}")
    unknown = sorted(set(forwards or {}) - set(models))
    if unknown:
        raise ValueError(f"evaluate_models: forwards for models {unknown} that are not among the models")
    predictors = {name: _predictor((forwards or {}).get(name, apply_fn)) for name in models}
    device = jax.local_devices()[0]
    results: dict[str, dict[str, float]] = {name: {} for name in models}
    placed: dict[int, tuple[Any, Any]] = {}  # id(params) -> (params, params on `device`), kept across tasks
    for task, (task_name, test_set) in enumerate(zip(names, test_sets)):
        chosen = {m: model.params_for(task) if isinstance(model, PerTask) else model for m, model in models.items()}
        chosen = {m: p for m, p in chosen.items() if p is not None}
        placed = {id(p): placed.get(id(p)) or (p, jax.device_put(p, device)) for p in chosen.values()}
        on_device = {m: placed[id(p)][1] for m, p in chosen.items()}
        correct, seen = dict.fromkeys(on_device, 0), 0
        progress = tqdm(desc=f"eval {task_name}", unit="example", disable=quiet)
        for inputs, labels in _batches(test_set, batch_size, task_name):
            count = len(jax.tree_util.tree_leaves(inputs)[0])
            batch = pad_batch(inputs, batch_size)
            for method, params in on_device.items():
                predicted, finite, num_classes = predictors[method](params, batch, task, count)
                if not bool(finite):
                    raise ValueError(f"model {method!r} gives NaN or inf logits on task {task_name!r}; "
                                     "its accuracy would be meaningless")
                checked = _check_labels(labels, count, int(num_classes), task_name)
                correct[method] += int(np.sum(np.asarray(predicted)[:count] == checked))
            seen += count
            progress.update(count)
        progress.close()
        if seen == 0:
            raise ValueError(f"test set of task {task_name!r} is empty")
        for method in on_device:
            results[method][task_name] = correct[method] / seen
        if log is not None:
            log(f"[eval] {task_name}: {seen} examples, {len(on_device)} models; "
                + ", ".join(f"{m} {100 * correct[m] / seen:.1f}" for m in on_device))
    return {name: Accuracy(per_task) for name, per_task in results.items()}


def evaluate(
    apply_fn: ApplyFn,
    params: PyTree,
    test_sets: Sequence[Any],
    task_names: Sequence[str] | None = None,
    batch_size: int = 256,
) -> Accuracy:
    """Accuracy of ``apply_fn(params, x, t)`` on task t's test set, for every task (`evaluate_models` with
    one model)."""
    return evaluate_models(apply_fn, {"model": params}, test_sets, task_names, batch_size)["model"]
