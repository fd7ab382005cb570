"""Data-free merge methods as pure functions `(θ0, τ, ...) -> θ` (the registry, `core.registry`, names them).

Each method takes the pretrained tree and stacked task vectors (`task_vectors`), checks that they are stacked
for it (`check_stacked`, at trace time) and returns merged params. Sums over tasks run in at least float32
and in float64 for float64 inputs (`trees.accumulation_dtype`); the result has θ0's dtypes.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp

from adamerging_jax.core.task_vectors import add_to_pretrained, check_stacked
from adamerging_jax.core.transforms import disjoint_reduce, drop, elect_sign, keep_agreeing, trim
from adamerging_jax.core.trees import PyTree, accumulation_dtype


@jax.jit
def task_arithmetic(pretrained: PyTree, task_vectors: PyTree, scale: float = 0.3) -> PyTree:
    """θ = θ0 + s Σ_k τ_k (Ilharco et al., ICLR 2023); s = 0.3 is the AdaMerging paper's baseline."""
    check_stacked(pretrained, task_vectors)
    return add_to_pretrained(pretrained, jax.tree_util.tree_map(lambda d: scale * d, disjoint_reduce(task_vectors, "sum")))


@jax.jit
def weight_average(pretrained: PyTree, task_vectors: PyTree) -> PyTree:
    """θ = (1/K) Σ_k θ_k = θ0 + (1/K) Σ_k τ_k (Wortsman et al., "Model soups", ICML 2022)."""
    check_stacked(pretrained, task_vectors)
    mean = lambda tau: jnp.mean(tau.astype(accumulation_dtype(tau.dtype)), axis=0)  # noqa: E731
    return add_to_pretrained(pretrained, jax.tree_util.tree_map(mean, task_vectors))


@partial(jax.jit, static_argnames=("density", "scope", "total_size", "sign_method"))
def ties_task_vectors(
    task_vectors: PyTree,
    density: float = 0.2,
    scope: Literal["model", "leaf"] = "model",
    total_size: int | None = None,
    sign_method: Literal["sum", "count"] = "sum",
) -> PyTree:
    """TIES preprocessing: per-task trimmed, sign-agreeing task vectors τ̂_k, still stacked `[K, ...]`.

    τ̂_k = keep_agreeing(trim(τ)_k, γ) with γ = elect_sign(trim(τ)). AdaMerging++ learns λ on these
    (θ = θ0 + Σ_k λ_k τ̂_k) instead of on the raw τ.
    """
    trimmed = trim(task_vectors, density, scope, total_size)
    return keep_agreeing(trimmed, elect_sign(trimmed, sign_method))


@partial(jax.jit, static_argnames=("density", "reduce", "scope", "total_size"))
def ties_merging(
    pretrained: PyTree,
    task_vectors: PyTree,
    density: float = 0.2,
    reduce: Literal["mean", "sum"] = "sum",
    scale: float = 0.3,
    scope: Literal["model", "leaf"] = "model",
    total_size: int | None = None,
) -> PyTree:
    """TIES-merging: θ = θ0 + s · reduce_k τ̂_k with τ̂ from `ties_task_vectors`.

    The defaults are the AdaMerging repository's TIES baseline (top 20% over the whole model, "dis-sum",
    s = 0.3); the TIES paper's own setting is ``reduce="mean", scale=1.0``.
    """
    check_stacked(pretrained, task_vectors)
    selected = ties_task_vectors(task_vectors, density, scope, total_size)
    return add_to_pretrained(pretrained, jax.tree_util.tree_map(lambda d: scale * d, disjoint_reduce(selected, reduce)))


def dare(task_vectors: PyTree, p: float = 0.9, seed: int | jax.Array = 0) -> PyTree:
    """DARE task vectors: each entry dropped with probability p, survivors rescaled by 1/(1 − p).

    τ̃_k = m_k ⊙ τ_k / (1 − p) with m_k ~ Bernoulli(1 − p) per entry (Yu et al., ICML 2024), in τ's dtype.
    """
    return drop(task_vectors, p, seed, rescale=True)


def dare_task_arithmetic(pretrained: PyTree, task_vectors: PyTree, p: float = 0.9, seed: int = 0, scale: float = 0.3) -> PyTree:
    """Task arithmetic on DARE task vectors."""
    return task_arithmetic(pretrained, dare(task_vectors, p, seed), scale)
