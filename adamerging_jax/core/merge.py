"""The merge θ = θ0 + Σ_k λ_k ⊙ τ_k (task arithmetic with learnable λ; AdaMerging eq. 3/4).

A τ leaf is a dense `[K, *shape]` array or `LoraFactors` (`core.low_rank`), whose Σ_k λ_k s_k (B_k A_k)ᵀ is one
contraction over (task, rank) inside the same jitted function, so the K dense matrices are never formed.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.coefficients import Coefficients, check_coefficients
from adamerging_jax.core.low_rank import LoraFactors, is_factors, low_rank_weighted_sum
from adamerging_jax.core.task_vectors import check_stacked
from adamerging_jax.core.trees import (
    PyTree,
    accumulation_dtype,
    check_array_leaves,
    check_float_dtype,
    check_number,
    map_with_path,
)

DEFAULT_LAMBDA_BOUND = 1e3
"""|λ| above which an unclamped merge refuses given coefficients (`merge`, ``merge --weights``) and an
unclamped AdaMerging run stops (`LambdaBoundError`): far beyond any useful λ (the papers' lie in [0, 1]), so
only a diverged or corrupt value is caught."""


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


def checked_clamp(where: str, clamp: Any) -> tuple[float, float] | None:
    """``clamp`` as a hashable pair of finite floats lo < hi (a list is accepted), or None; TypeError or
    ValueError naming ``where``."""
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise TypeError(f"{where} must be None or a pair (lo, hi), got {clamp!r}")
    for bound in clamp:
        check_number(where, bound)
    if not clamp[0] < clamp[1]:
        raise ValueError(f"{where} must have lo < hi, got {tuple(clamp)!r}")
    return float(clamp[0]), float(clamp[1])


def check_given_coefficients(coefficients: Coefficients, bound: float | None, where: str = "coefficients") -> None:
    """Given λ (concrete values; traced ones are not inspected) must be finite and, when ``bound`` is set,
    |λ| ≤ bound; ValueError naming the group (the leaf path, layer-wise), the layer and the task."""
    for group, value in coefficients.values.items():
        if isinstance(value, jax.core.Tracer):
            continue
        value = np.asarray(value)
        bad = ~np.isfinite(value) if bound is None else ~(np.abs(value) <= bound)
        if bad.any():
            task, *layer = (int(i) for i in np.argwhere(bad)[0])
            found = value[(task, *layer)]
            beyond = f", beyond ±{bound:g} (lambda_bound, for an unclamped merge)" if math.isfinite(found) else ""
            at = f" layer {layer[0]}" if layer else ""
            raise ValueError(f"{where}: λ of group {group!r}{at} for task {task} is {found}{beyond}")


def merge(
    pretrained: PyTree,
    task_vectors: PyTree,
    coefficients: Coefficients,
    clamp: tuple[float, float] | None = None,
    dtype: Any = None,
    *,
    lambda_bound: float | None = DEFAULT_LAMBDA_BOUND,
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
      clamp: ``(lo, hi)``, finite with lo < hi, clips λ inside the forward, as the official AdaMerging code
        does with (0, 1); the gradient is zero where λ lies outside. ``None`` (FusionBench's default) does not
        clip.
      dtype: output dtype of the merged leaves (a floating dtype).
      lambda_bound: without a clamp, given λ beyond ±``lambda_bound`` are refused (None: no bound).

    Raises:
      ValueError naming the group, layer and task of a NaN / inf λ (or one beyond the bound), a reversed
      clamp; TypeError for a clamp that is not a pair, a dtype that is not floating. λ that are traced (this
      merge inside ``jax.jit`` or ``jax.grad``) are not inspected.
    """
    clamp = checked_clamp("merge: clamp", clamp)
    if dtype is not None:
        check_float_dtype("merge: dtype", dtype)
    if lambda_bound is not None:
        check_number("merge: lambda_bound", lambda_bound, positive=True)
    check_array_leaves("merge: pretrained", pretrained)
    check_stacked(pretrained, task_vectors)
    check_coefficients(coefficients, task_vectors)
    check_given_coefficients(coefficients, lambda_bound if clamp is None else None)
    return _merge(pretrained, task_vectors, coefficients, clamp, dtype)


@partial(jax.jit, static_argnames=("clamp", "dtype"))
def _merge(pretrained: PyTree, task_vectors: PyTree, coefficients: Coefficients, clamp: tuple[float, float] | None,
           dtype: Any) -> PyTree:
    """`merge` once its arguments are checked."""

    def merge_leaf(path, theta0, tau):
        acc = accumulation_dtype(theta0.dtype, *(jnp.result_type(x) for x in jax.tree_util.tree_leaves(tau)))
        lam = coefficients.for_leaf(path).astype(acc)
        if clamp is not None:
            lam = jnp.clip(lam, clamp[0], clamp[1])
        merged = theta0.astype(acc) + task_vector_sum(lam, tau, acc)
        return merged.astype(dtype or theta0.dtype)

    return map_with_path(merge_leaf, pretrained, task_vectors)
