"""TALL masks and Consensus merging (Wang, Dimitriadis, Ortiz-Jiménez, Fleuret and Frossard, "Localizing Task
Information for Improved Model Merging and Compression", ICML 2024), elementwise on stacked task vectors.

With the multi-task vector τ_MTL = Σ_k τ_k (task arithmetic's sum), task t's TALL mask keeps the entries where
τ_t weighs more than what the other tasks add:

    m_t = [|τ_t| > λ |τ_MTL − τ_t|]          (|θ0 − θ_t| > λ |θ_MTL − θ_t| with θ_MTL = θ0 + τ_MTL)

- TALL masks give one model per task, θ_t = θ0 + m_t ⊙ τ_MTL (`tall_mask_model`): τ_MTL compressed by K masks.
- Consensus merging keeps the entries at least k tasks use (k = 2 drops the "selfish" entries of one task and
  the "catastrophic" ones of none) and merges one model, θ = θ0 + α (c ⊙ τ_MTL), c = [Σ_t m_t ≥ k]
  (`consensus_merging`).

Sums over tasks run in `trees.accumulation_dtype` of τ; merged models have θ0's dtypes.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from adamerging_jax.core.parameters import Parameter
from adamerging_jax.core.task_vectors import add_to_pretrained, check_stacked, num_tasks
from adamerging_jax.core.transforms import disjoint_reduce
from adamerging_jax.core.trees import PyTree

PAPER = "Wang et al., Localizing Task Information for Improved Model Merging and Compression, ICML 2024"
TALL_MASK_LAMBDA = Parameter("tall_mask_lambda", 0.6, "λ of the TALL masks m_t = [|τ_t| > λ |τ_MTL − τ_t|]",
                             minimum=0.0)
"""FusionBench's default λ (its tall_mask/task_arithmetic.yaml); the paper picks λ_t per task on validation data."""


@jax.jit
def multi_task_vector(task_vectors: PyTree) -> PyTree:
    """τ_MTL = Σ_k τ_k per leaf, in the accumulation dtype of τ."""
    return disjoint_reduce(task_vectors, "sum")


@jax.jit
def tall_masks(task_vectors: PyTree, tall_mask_lambda: float = 0.6) -> PyTree:
    """The TALL masks m_t = [|τ_t| > λ |τ_MTL − τ_t|], stacked bool leaves ``[K, ...]`` (module docstring)."""
    num_tasks(task_vectors)

    def masks(tau: jax.Array, total: jax.Array) -> jax.Array:
        tau = tau.astype(total.dtype)
        return jnp.abs(tau) > jnp.abs(total - tau) * tall_mask_lambda

    return jax.tree_util.tree_map(masks, task_vectors, multi_task_vector(task_vectors))


@jax.jit
def tall_mask_model(pretrained: PyTree, multi_task: PyTree, masks: PyTree, task: int | jax.Array) -> PyTree:
    """Task t's model θ_t = θ0 + m_t ⊙ τ_MTL from τ_MTL (`multi_task_vector`) and the masks (`tall_masks`)."""
    return add_to_pretrained(pretrained, jax.tree_util.tree_map(lambda total, m: jnp.where(m[task], total, 0),
                                                                multi_task, masks))


def tall_mask_models(pretrained: PyTree, task_vectors: PyTree, tall_mask_lambda: float = 0.6
                     ) -> Callable[[int], PyTree | None]:
    """TALL masks' per-task models: ``models(t)`` is θ_t = θ0 + m_t ⊙ τ_MTL, built when asked for from τ_MTL and
    the bool masks (None for a task it did not merge)."""
    count = check_stacked(pretrained, task_vectors)
    multi_task, masks = multi_task_vector(task_vectors), tall_masks(task_vectors, tall_mask_lambda)
    return lambda task: tall_mask_model(pretrained, multi_task, masks, task) if task < count else None


@jax.jit
def consensus_mask(task_vectors: PyTree, k: int = 2, tall_mask_lambda: float = 0.6) -> PyTree:
    """c = [Σ_t m_t ≥ k]: the entries that at least k tasks' TALL masks keep, bool leaves of θ0's shapes."""
    return jax.tree_util.tree_map(lambda m: jnp.sum(m, axis=0) >= k, tall_masks(task_vectors, tall_mask_lambda))


@jax.jit
def consensus_merging(pretrained: PyTree, task_vectors: PyTree, k: int = 2, tall_mask_lambda: float = 0.6,
                      scale: float = 0.3) -> PyTree:
    """Consensus merging over task arithmetic: θ = θ0 + α (c ⊙ Σ_k τ_k), c = `consensus_mask` (module docstring).

    k = 0 keeps every entry (task arithmetic), k > K none (θ0). The paper picks α on validation data; 0.3 is
    task arithmetic's default here.
    """
    check_stacked(pretrained, task_vectors)
    kept = consensus_mask(task_vectors, k, tall_mask_lambda)
    masked = jax.tree_util.tree_map(lambda total, c: scale * jnp.where(c, total, 0),
                                    multi_task_vector(task_vectors), kept)
    return add_to_pretrained(pretrained, masked)

