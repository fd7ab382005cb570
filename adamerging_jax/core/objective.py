"""The AdaMerging objective: Shannon entropy of the merged model's predictions on unlabeled test batches.

AdaMerging (Yang et al., ICLR 2024, eq. 5) minimises Σ_t E_{x ∈ B_t} H(softmax(f_θ(x) head_t)), the entropy
being a surrogate of the prediction loss on test data (the paper, §3.2, shows the two are correlated).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.trees import PyTree

ApplyFn = Callable[[PyTree, Any, int], jax.Array]


@dataclasses.dataclass(frozen=True)
class SharedBackbone:
    """An `apply_fn` for models whose tasks share one backbone and differ only in their heads.

    `SharedBackbone(features, head)(params, x, t) = head(features(params, x), t)`. Given one, the objective
    sends the K task batches through the backbone as ONE batch of Σ_t B_t examples (one forward and one
    backward, the work of a plain training step, and one compiled backbone instead of K), then gives each
    head its slice. The result is the same as K separate forwards for any per-example backbone (BatchNorm
    in inference mode included).
    """

    features: Callable[[PyTree, jax.Array], jax.Array]
    head: Callable[[jax.Array, int], jax.Array]

    def __call__(self, params: PyTree, inputs: jax.Array, task: int) -> jax.Array:
        return self.head(self.features(params, inputs), task)


def entropy(logits: jax.Array, eps: float | None = None, axis: int = -1) -> jax.Array:
    """Per-example Shannon entropy H(p) = −Σ_c p_c log p_c of p = softmax(logits), in float32 or wider.

    eps = None computes log p with `log_softmax` (stable; the official AdaMerging code); a float computes
    −Σ p log(p + eps) (FusionBench, eps = 1e-8).
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if eps is None:
        log_p = jax.nn.log_softmax(logits, axis=axis)
        return -jnp.sum(jnp.exp(log_p) * log_p, axis=axis)
    p = jax.nn.softmax(logits, axis=axis)
    return -jnp.sum(p * jnp.log(p + eps), axis=axis)


def task_entropy(
    apply_fn: ApplyFn, params: PyTree, inputs: Any, task: int, eps: float | None = None, batches_per_task: int = 1
) -> jax.Array:
    """L_t = n · mean_x H(softmax(apply_fn(θ, x, t))) over the `n · B` inputs of task t.

    With n equal batches of B examples this equals Σ_b mean_{x ∈ b} H, the official code's sum over its two
    batches per task and step.
    """
    return batches_per_task * jnp.mean(entropy(apply_fn(params, inputs, task), eps))


def entropy_objective(
    apply_fn: ApplyFn,
    params: PyTree,
    batches: Sequence[Any],
    eps: float | None = None,
    batches_per_task: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Σ_t L_t (summed over tasks, as in the paper) and the vector of per-task L_t."""
    if isinstance(apply_fn, SharedBackbone):
        sizes = [len(x) for x in batches]
        features = apply_fn.features(params, jnp.concatenate(batches))
        offsets = np.cumsum([0] + sizes)
        logits = [apply_fn.head(features[offsets[t] : offsets[t + 1]], t) for t in range(len(batches))]
        per_task = jnp.stack([batches_per_task * jnp.mean(entropy(z, eps)) for z in logits])
    else:
        per_task = jnp.stack([task_entropy(apply_fn, params, x, t, eps, batches_per_task) for t, x in enumerate(batches)])
    return jnp.sum(per_task), per_task
