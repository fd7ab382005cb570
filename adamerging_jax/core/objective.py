"""The AdaMerging objective: Shannon entropy of the merged model's predictions on unlabeled test batches.

AdaMerging (Yang et al., ICLR 2024, eq. 5) minimises Σ_t E_{x ∈ B_t} H(softmax(f_θ(x) head_t)), the entropy
being a surrogate of the prediction loss on test data (the paper, §3.2, shows the two are correlated).

The `apply_fn` contract: `apply_fn(params, inputs, t)` returns task t's floating logits `[N, C]`, N the
task's batch size and C ≥ 2 classes, or, for models that make several predictions per example (next-token
prediction), `Predictions(logits [N, T, C], weights [N, T])` whose weights say which predictions count
(e.g. 1 on real tokens, 0 on padding). The contract is checked on shapes and dtypes only, so under `jit` it
costs nothing: it runs once, when the step is traced, and a violation raises a ValueError naming the task
and the shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.trees import PyTree, accumulation_dtype, is_float_dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Predictions:
    """Several weighted predictions per example: what an `apply_fn` returns for a sequence model.

    Attributes:
      logits: `[N, T, C]` floating logits, T predictions per example (or `[N, C]`, one per example).
      weights: `logits.shape[:-1]`, how much each prediction counts in the task's mean entropy
        (0 / 1 masks such as an attention mask shifted for next-token prediction, or any non-negative reals).
    """

    logits: jax.Array
    weights: jax.Array


Output = Union[jax.Array, Predictions]  # what an apply_fn returns for one task
ApplyFn = Callable[[PyTree, Any, int], Output]

_CONTRACT = "expected floating logits [N, C] or Predictions(logits [N, T, C], weights [N, T])"


@dataclasses.dataclass(frozen=True)
class SharedBackbone:
    """An `apply_fn` for models whose tasks share one backbone and differ only in their heads.

    `SharedBackbone(features, head)(params, x, t) = head(features(params, x), t)`. Given one, the objective
    sends the K task batches through the backbone as ONE batch of Σ_t B_t examples (one forward and one
    backward, the work of a plain training step, and one compiled backbone instead of K), then gives each
    head its slice. The result is the same as K separate forwards for any per-example backbone (BatchNorm
    in inference mode included). Each head's output obeys the `apply_fn` contract for its slice.
    """

    features: Callable[[PyTree, jax.Array], jax.Array]
    head: Callable[[jax.Array, int], Output]

    def __call__(self, params: PyTree, inputs: jax.Array, task: int) -> Output:
        return self.head(self.features(params, inputs), task)


def entropy(logits: jax.Array, eps: float | None = None, axis: int = -1) -> jax.Array:
    """Per-example Shannon entropy H(p) = −Σ_c p_c log p_c of p = softmax(logits), in float32 or wider.

    eps = None computes log p with `log_softmax` (stable; the official AdaMerging code); a float computes
    −Σ p log(p + eps) (FusionBench, eps = 1e-8).
    """
    logits = logits.astype(accumulation_dtype(logits.dtype))
    if eps is None:
        log_p = jax.nn.log_softmax(logits, axis=axis)
        return -jnp.sum(jnp.exp(log_p) * log_p, axis=axis)
    p = jax.nn.softmax(logits, axis=axis)
    return -jnp.sum(p * jnp.log(p + eps), axis=axis)


def batch_size(inputs: Any) -> int | None:
    """N, the leading axis shared by every array in a task's inputs (a pytree); None when they disagree
    (inputs that mix per-example arrays with shared ones), and then the N check of the contract is skipped."""
    sizes = {np.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(inputs) if np.ndim(leaf) >= 1}
    return sizes.pop() if len(sizes) == 1 else None


def check_predictions(output: Any, task: int, size: int | None) -> None:
    """Raise a ValueError naming `task` and the shape when `output` breaks the `apply_fn` contract.

    Accepted: floating logits `[N, C]`, or `Predictions` with floating logits `[N, T, C]` (or `[N, C]`) and
    weights of shape `logits.shape[:-1]`; N = `size` (unchecked when None) and C ≥ 2 (a one-class task's
    entropy is identically 0, so it would train nothing and hide a wrong head).
    """
    logits = output.logits if isinstance(output, Predictions) else output
    what = "Predictions.logits" if isinstance(output, Predictions) else "logits"
    if not hasattr(logits, "shape") or not hasattr(logits, "dtype"):
        raise ValueError(f"task {task}: apply_fn returned a {type(logits).__name__}, {_CONTRACT}")
    shape = tuple(logits.shape)
    if not is_float_dtype(logits.dtype):
        raise ValueError(f"task {task}: {what} of shape {shape} have dtype {logits.dtype}; {_CONTRACT}")
    ranks = (2, 3) if isinstance(output, Predictions) else (2,)
    if len(shape) not in ranks:
        raise ValueError(f"task {task}: {what} have shape {shape}, {_CONTRACT}")
    if size is not None and shape[0] != size:
        raise ValueError(f"task {task}: {what} have shape {shape}, N = {shape[0]} rows for a batch of N = {size} examples")
    if shape[-1] < 2:
        raise ValueError(
            f"task {task}: {what} have shape {shape}, C = {shape[-1]} class; the entropy of a one-class "
            "prediction is always 0 (C ≥ 2 needed)"
        )
    if isinstance(output, Predictions) and tuple(np.shape(output.weights)) != shape[:-1]:
        raise ValueError(
            f"task {task}: Predictions.weights have shape {tuple(np.shape(output.weights))}, expected "
            f"logits.shape[:-1] = {shape[:-1]} for logits of shape {shape}"
        )


def mean_entropy(output: Output, eps: float | None = None) -> jax.Array:
    """The mean prediction entropy of one task's output.

    Logits `[N, C]`: (1/N) Σ_i H(p_i). `Predictions(z, w)`: Σ_i w_i H(p_i) / Σ_i w_i over every prediction i
    (every example and position), the weighted mean; 0 when Σ_i w_i = 0 (nothing to count).
    """
    if not isinstance(output, Predictions):
        return jnp.mean(entropy(output, eps))
    h = entropy(output.logits, eps)
    w = output.weights.astype(h.dtype)
    total = jnp.sum(w)
    safe_total = jnp.where(total > 0, total, 1)
    return jnp.where(total > 0, jnp.sum(w * h) / safe_total, 0)


def task_entropy(
    apply_fn: ApplyFn, params: PyTree, inputs: Any, task: int, eps: float | None = None, batches_per_task: int = 1
) -> jax.Array:
    """L_t = n · Σ_i w_i H(p_i) / Σ_i w_i over the predictions of `apply_fn(θ, inputs, t)` on task t's `n · B`
    inputs (w_i = 1 for plain logits `[N, C]`: L_t = n · mean_x H(softmax(apply_fn(θ, x, t)))).

    With n equal batches of B examples this equals Σ_b mean_{x ∈ b} H, the official code's sum over its two
    batches per task and step. The output is checked by `check_predictions`.
    """
    output = apply_fn(params, inputs, task)
    check_predictions(output, task, batch_size(inputs))
    return batches_per_task * mean_entropy(output, eps)


def entropy_objective(
    apply_fn: ApplyFn,
    params: PyTree,
    batches: Sequence[Any],
    eps: float | None = None,
    batches_per_task: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Σ_t L_t (summed over tasks, as in the paper) and the vector of per-task L_t (see `task_entropy`)."""
    if isinstance(apply_fn, SharedBackbone):
        sizes = [len(x) for x in batches]
        features = apply_fn.features(params, jnp.concatenate(batches))
        offsets = np.cumsum([0] + sizes)
        per_task = []
        for t in range(len(batches)):
            output = apply_fn.head(features[offsets[t] : offsets[t + 1]], t)
            check_predictions(output, t, sizes[t])
            per_task.append(batches_per_task * mean_entropy(output, eps))
        per_task = jnp.stack(per_task)
    else:
        per_task = jnp.stack([task_entropy(apply_fn, params, x, t, eps, batches_per_task) for t, x in enumerate(batches)])
    return jnp.sum(per_task), per_task
