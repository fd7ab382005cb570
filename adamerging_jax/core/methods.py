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
from adamerging_jax.core.matrix_view import MatrixView
from adamerging_jax.core.transforms import (apply_masks, disjoint_reduce, drop, elect_sign, keep_agreeing,
                                            match_l1_norm, rank_keep_probabilities, sample_masks, trim, trim_outliers)
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


@partial(jax.jit, static_argnames=("density", "scope", "total_size", "sign_method", "view"))
def ties_task_vectors(
    task_vectors: PyTree,
    density: float = 0.2,
    scope: Literal["model", "leaf"] = "model",
    total_size: int | None = None,
    sign_method: Literal["sum", "count"] = "sum",
    thresholds: jax.Array | None = None,
    majority: jax.Array | None = None,
    view: MatrixView | None = None,
) -> PyTree:
    """TIES preprocessing: per-task trimmed, sign-agreeing task vectors τ̂_k, still stacked `[K, ...]`.

    τ̂_k = keep_agreeing(trim(τ)_k, γ) with γ = elect_sign(trim(τ)). AdaMerging++ learns λ on these
    (θ = θ0 + Σ_k λ_k τ̂_k) instead of on the raw τ. `thresholds` and `majority`: the model-wide statistics
    when this tree is one part of the model (`trim`, `elect_sign`). `view`: the binding's matrix view, whose
    stacked leaves ``scope="leaf"`` trims layer by layer (`trim`).
    """
    trimmed = trim(task_vectors, density, scope, total_size, thresholds, view)
    return keep_agreeing(trimmed, elect_sign(trimmed, sign_method, majority))


@partial(jax.jit, static_argnames=("density", "reduce", "scope", "total_size", "view"))
def ties_merging(
    pretrained: PyTree,
    task_vectors: PyTree,
    density: float = 0.2,
    reduce: Literal["mean", "sum"] = "sum",
    scale: float = 0.3,
    scope: Literal["model", "leaf"] = "model",
    total_size: int | None = None,
    thresholds: jax.Array | None = None,
    majority: jax.Array | None = None,
    view: MatrixView | None = None,
) -> PyTree:
    """TIES-merging: θ = θ0 + s · reduce_k τ̂_k with τ̂ from `ties_task_vectors`.

    The defaults are the AdaMerging repository's TIES baseline (top 20% over the whole model, "dis-sum",
    s = 0.3); the TIES paper's own setting is ``reduce="mean", scale=1.0``. ``scope="leaf"`` trims each
    checkpoint tensor on its own (mergekit), a stacked leaf of `view` layer by layer. `thresholds` and
    `majority`: the model-wide statistics when the trees are one part of the model (`ties_task_vectors`).
    """
    check_stacked(pretrained, task_vectors)
    selected = ties_task_vectors(task_vectors, density, scope, total_size, thresholds=thresholds, majority=majority,
                                 view=view)
    return add_to_pretrained(pretrained, jax.tree_util.tree_map(lambda d: scale * d, disjoint_reduce(selected, reduce)))


def dare(task_vectors: PyTree, p: float = 0.9, seed: int | jax.Array = 0) -> PyTree:
    """DARE task vectors: each entry dropped with probability p, survivors rescaled by 1/(1 − p).

    τ̃_k = m_k ⊙ τ_k / (1 − p) with m_k ~ Bernoulli(1 − p) per entry (Yu et al., ICML 2024), in τ's dtype.
    """
    return drop(task_vectors, p, seed, rescale=True)


def dare_task_arithmetic(pretrained: PyTree, task_vectors: PyTree, p: float = 0.9, seed: int = 0, scale: float = 0.3) -> PyTree:
    """Task arithmetic on DARE task vectors."""
    return task_arithmetic(pretrained, dare(task_vectors, p, seed), scale)


@partial(jax.jit, static_argnames=("normalize", "consensus"))
def sparse_task_arithmetic(
    pretrained: PyTree,
    sparse_task_vectors: PyTree,
    scale: float = 0.3,
    lambda_: float = 1.0,
    normalize: bool = False,
    consensus: bool = False,
) -> PyTree:
    """mergekit's generalized task arithmetic after sparsification (its ``merge_group``), on τ̃ stacked ``[K, ...]``:

        δ_k = w τ̃_k;  m_k = [sgn δ_k = γ], γ = +1 where Σ_k δ_k ≥ 0 and −1 elsewhere (``consensus``), else m_k = 1
        Δ = Σ_k m_k δ_k,  divided (``normalize``) by Σ_k w m_k (consensus; 0 → 1) or by K w (|K w| < 1e-8 → 1)
        θ = θ0 + λ Δ

    w = `scale` is mergekit's per-model ``weight``, the same for every task. In `accumulation_dtype`.
    """
    count = check_stacked(pretrained, sparse_task_vectors)
    widened = lambda tau: tau.astype(accumulation_dtype(tau.dtype))  # noqa: E731
    weighted = jax.tree_util.tree_map(lambda tau: scale * widened(tau), sparse_task_vectors)
    if consensus:
        weighted = keep_agreeing(weighted, elect_sign(weighted, "sum", majority=jnp.ones(())))
    delta = disjoint_reduce(weighted, "sum")
    if normalize:
        if consensus:
            divisors = jax.tree_util.tree_map(lambda kept: scale * jnp.sum(kept != 0, axis=0), weighted)
            divisors = jax.tree_util.tree_map(lambda d: jnp.where(d == 0, 1, d), divisors)
        else:
            total = count * scale
            divisors = jax.tree_util.tree_map(lambda _: jnp.where(jnp.abs(total) < 1e-8, 1, total), delta)
        delta = jax.tree_util.tree_map(jnp.divide, delta, divisors)
    return add_to_pretrained(pretrained, jax.tree_util.tree_map(lambda d: lambda_ * d, delta))


def breadcrumbs_task_vectors(task_vectors: PyTree, density: float = 1.0, gamma: float = 0.01, rescale: bool = False,
                             view: MatrixView | None = None) -> PyTree:
    """Model Breadcrumbs' task vectors: `trim_outliers` per tensor and task, then `match_l1_norm` if `rescale`."""
    sparse = trim_outliers(task_vectors, density, gamma, view)
    return match_l1_norm(task_vectors, sparse, view) if rescale else sparse


def breadcrumbs(
    pretrained: PyTree,
    task_vectors: PyTree,
    density: float = 1.0,
    gamma: float = 0.01,
    scale: float = 0.3,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    consensus: bool = False,
    view: MatrixView | None = None,
) -> PyTree:
    """Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
    Masks", ECCV 2024) as mergekit's ``breadcrumbs`` (``consensus=True``: ``breadcrumbs_ties``): per tensor, drop
    the γ largest and keep the next ρ of |τ_k| (`trim_outliers`), then `sparse_task_arithmetic`. The defaults are
    mergekit's (ρ = 1 keeps everything); `view` says which leaves stack layers."""
    sparse = breadcrumbs_task_vectors(task_vectors, density, gamma, rescale, view)
    return sparse_task_arithmetic(pretrained, sparse, scale, lambda_, normalize, consensus)


def masked_task_vectors(task_vectors: PyTree, masks: PyTree, rescale: bool = True,
                        view: MatrixView | None = None) -> PyTree:
    """τ ⊙ m, then `match_l1_norm` if `rescale`: DELLA's task vectors given their keep masks."""
    sparse = apply_masks(task_vectors, masks)
    return match_l1_norm(task_vectors, sparse, view) if rescale else sparse


def della_task_vectors(task_vectors: PyTree, density: float = 1.0, epsilon: float = 0.15, seed: int | jax.Array = 0,
                       rescale: bool = True, view: MatrixView | None = None) -> PyTree:
    """DELLA's task vectors: masks m ~ B(q) with q from `rank_keep_probabilities`, then `masked_task_vectors`."""
    masks = sample_masks(rank_keep_probabilities(task_vectors, density, epsilon, view), seed)
    return masked_task_vectors(task_vectors, masks, rescale, view)


def della(
    pretrained: PyTree,
    task_vectors: PyTree,
    density: float = 1.0,
    epsilon: float = 0.15,
    seed: int | jax.Array = 0,
    scale: float = 0.3,
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: bool = True,
    consensus: bool = True,
    view: MatrixView | None = None,
) -> PyTree:
    """DELLA (Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
    Sampling", 2024) as mergekit's ``della`` (``consensus=False, normalize=False``: ``della_linear``): each entry
    dropped with a probability that falls with its magnitude rank in its row (`rank_keep_probabilities`, drawn
    from `seed`), each tensor rescaled to its L1 norm, then `sparse_task_arithmetic`. mergekit's defaults."""
    sparse = della_task_vectors(task_vectors, density, epsilon, seed, rescale, view)
    return sparse_task_arithmetic(pretrained, sparse, scale, lambda_, normalize, consensus)
