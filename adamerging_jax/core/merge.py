"""The merge θ = θ0 + Σ_k λ_k ⊙ τ_k (task arithmetic with learnable λ; AdaMerging eq. 3/4).

A τ leaf is a dense `[K, *shape]` array or `LoraFactors` (`core.low_rank`), whose Σ_k λ_k s_k (B_k A_k)ᵀ is one
contraction over (task, rank) inside the same jitted function, so the K dense matrices are never formed.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from adamerging_jax.core.coefficients import Coefficients, check_coefficients
from adamerging_jax.core.low_rank import LoraFactors, is_factors, low_rank_weighted_sum
from adamerging_jax.core.task_vectors import check_stacked
from adamerging_jax.core.trees import PyTree, accumulation_dtype, map_with_path


def weighted_sum_by_reduction(lam: jax.Array, tau: jax.Array) -> jax.Array:
    """Σ_k λ[k] τ[k] as one reduction over k of λ ⊙ τ, in λ's dtype (λ `[K]` or `[K, L]`, τ `[K, (L,) ...]`)."""
    lam = lam.reshape(lam.shape + (1,) * (tau.ndim - lam.ndim))
    return jnp.sum(lam * tau.astype(lam.dtype), axis=0)


def weighted_sum_by_contraction(lam: jax.Array, tau: jax.Array) -> jax.Array:
    """Σ_k λ[k] τ[k] as a contraction over k (`einsum` at full fp32 precision), in λ's dtype."""
    spec = "k,k...->..." if lam.ndim == 1 else "kl,kl...->l..."
    return jnp.einsum(spec, lam, tau.astype(lam.dtype), precision=jax.lax.Precision.HIGHEST)


def cpu_weighted_sum(lam: jax.Array, tau: jax.Array) -> jax.Array:
    """The formulation `_weighted_sum` compiles for CPU: `weighted_sum_by_contraction`, because XLA:CPU lowers
    the leading-axis reduction of a broadcast product to a slow fusion (1.5 s instead of ~50 ms for 8 × 3M
    floats on 2 cores, profiled with benchmarks/step_benchmark.py --profile). The contraction holds a float32
    copy of a narrower τ while it runs; benchmarks/lm_memory.py rebinds this name to
    `weighted_sum_by_reduction` so that the step it compiles on CPU is the one accelerators run."""
    return weighted_sum_by_contraction(lam, tau)


def _weighted_sum(lam: jax.Array, tau: jax.Array) -> jax.Array:
    """Σ_k λ[k] τ[k]: on GPU/TPU one fused reduction; on CPU `cpu_weighted_sum`."""
    return jax.lax.platform_dependent(
        lam, tau, cpu=lambda *args: cpu_weighted_sum(*args), default=weighted_sum_by_reduction)


@partial(jax.checkpoint, static_argnums=(2,))
def task_vector_sum(lam: jax.Array, tau: jax.Array | LoraFactors, dtype) -> jax.Array:
    """Σ_k λ[k] τ[k] in `dtype` for a dense τ leaf `[K, ...]` or its `LoraFactors` (factors cast to `dtype`).

    Rematerialised (`jax.checkpoint`): the backward pass keeps τ in its storage dtype and converts it again,
    instead of holding the `dtype` copy of every τ leaf from the forward (for bf16 τ, 2× τ's bytes).
    """
    if is_factors(tau):
        return low_rank_weighted_sum(lam, jax.tree_util.tree_map(lambda x: x.astype(dtype), tau))
    return _weighted_sum(lam, tau)


@partial(jax.jit, static_argnames=("clamp", "dtype"))
def merge(
    pretrained: PyTree,
    task_vectors: PyTree,
    coefficients: Coefficients,
    clamp: tuple[float, float] | None = None,
    dtype=None,
) -> PyTree:
    """θ = θ0 + Σ_k clamp(λ_k) τ_k for every leaf, one fused jitted `tree_map`, differentiable in λ.

    For a leaf with per-layer coefficients λ ∈ R^{K×L} and stacked τ ∈ R^{K×L×...}:
    θ[l] = θ0[l] + Σ_k λ[k, l] τ[k, l]. The sum is accumulated in at least float32 (so bf16-stored θ0 and τ lose
    nothing in the reduction; float64 θ0 under ``jax_enable_x64`` accumulates in float64) and the result is
    cast to `dtype` (default: θ0's dtype).

    Args:
      pretrained: θ0.
      task_vectors: stacked τ, leaves `[K, *leaf.shape]` (see `task_vectors`; checked by `check_stacked`) or
        `LoraFactors` standing for them (see `core.low_rank`).
      coefficients: λ from `init_coefficients`.
      clamp: ``(lo, hi)`` clips λ inside the forward, as the official AdaMerging code does with (0, 1);
        the gradient is zero where λ lies outside. ``None`` (FusionBench's default) does not clip.
      dtype: output dtype of the merged leaves.
    """
    check_stacked(pretrained, task_vectors)
    check_coefficients(coefficients, task_vectors)

    def merge_leaf(path, theta0, tau):
        acc = accumulation_dtype(theta0.dtype, *(jnp.result_type(x) for x in jax.tree_util.tree_leaves(tau)))
        lam = coefficients.for_leaf(path).astype(acc)
        if clamp is not None:
            lam = jnp.clip(lam, clamp[0], clamp[1])
        merged = theta0.astype(acc) + task_vector_sum(lam, tau, acc)
        return merged.astype(dtype or theta0.dtype)

    return map_with_path(merge_leaf, pretrained, task_vectors)
