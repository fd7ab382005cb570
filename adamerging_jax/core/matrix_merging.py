"""Merges defined on each weight matrix (TSV-M, Iso-C, Iso-CTS), run over a whole parameter tree.

Such a method is a function of one weight matrix's K task vectors, τ ∈ R^{K × out × in} in the reference's
orientation (`core.matrix_view`): either the merged task vector Δ(τ) ∈ R^{out × in}, or per-task parts
P(τ) ∈ R^{K × out × in} with Σ_k P_k = Δ. A leaf the view does not call a matrix (bias, norm, class embedding,
patch convolution) takes the average (1/K) Σ_k τ_k, and its per-task parts are the shares τ_k / K. Over a tree:

    θ    = θ0 + α Δ        (`merge_by_matrix`: the method's merged model, α its scaling factor)
    τ'_k = P_k             (`split_by_matrix`: the task-vector transform AdaMerging's λ scales;
                            θ0 + Σ_k α τ'_k is the merged model above)

Memory: a leaf that stacks L layers ([K, L, ...]) is worked through one layer at a time (`map_matrices`), so the
temporaries are those of one layer's K matrices and their SVDs, whatever L, and θ0 + α Δ is formed per layer
(no model-sized Δ). CLIP ViT-L/14 with 20 task
vectors thus needs the inputs, the output and one MLP matrix's work, where a layer-vmapped SVD would hold every
layer's singular vectors at once.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from adamerging_jax.core.matrix_view import Matrix, MatrixView, map_matrices, to_matrices
from adamerging_jax.core.trees import PyTree, accumulation_dtype

MatrixFunction = Callable[[jax.Array], jax.Array]
"""τ [K, out, in] → Δ [out, in] (a merged matrix) or P [K, out, in] (per-task parts), in τ's dtype."""


def thin_svd(matrices: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(U, S, Vᵀ) of ``jnp.linalg.svd(matrices, full_matrices=False)``, one LAPACK call per matrix
    (`_convergent_svd`).

    A stack ``[..., m, n]`` is decomposed one matrix after another inside a `jax.lax.map`, never as one batched
    call: jaxlib 0.10's CPU LAPACK kernels split a batch over XLA's intra-op thread pool and block on it, and
    when as many batched decompositions as the pool has threads run at once (independent leaves of one jitted
    merge, two on a 2-core machine) every thread waits on work queued behind it and the process stalls at 0% CPU.
    Each matrix's factors are those of the batched call."""
    if matrices.ndim == 2:
        return _convergent_svd(matrices)
    batch = matrices.shape[:-2]
    flat = matrices.reshape(-1, *matrices.shape[-2:])
    u, s, vh = jax.lax.map(_convergent_svd, flat)
    return u.reshape(*batch, *u.shape[1:]), s.reshape(*batch, *s.shape[1:]), vh.reshape(*batch, *vh.shape[1:])


def _convergent_svd(matrix: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One matrix's thin SVD: LAPACK's divide and conquer (gesdd, `jnp.linalg.svd`'s), and on the CPU, where
    gesdd does not converge (JAX then returns NaN factors), QR iterations (gesvd) instead. gesdd gives up on
    some large, nearly rank-deficient float32 matrices: Iso-CTS's task-specific residuals τ_k − U_c U_cᵀ τ_k of
    ViT-L/14 MLP weights at K = 20 (SciPy's gesdd refuses the same matrices; its gesvd decomposes them)."""

    def divide_and_conquer(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return tuple(jnp.linalg.svd(x, full_matrices=False))

    def with_fallback(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        u, s, vh = divide_and_conquer(x)

        def qr_iterations() -> tuple[jax.Array, jax.Array, jax.Array]:
            return tuple(jax.lax.linalg.svd(x, full_matrices=False, algorithm=jax.lax.linalg.SvdAlgorithm.QR))

        return jax.lax.cond(jnp.isnan(s).any() & ~jnp.isnan(x).any(), qr_iterations, lambda: (u, s, vh))

    return jax.lax.platform_dependent(matrix, cpu=with_fallback, default=divide_and_conquer)


def polar_factor(matrix: jax.Array) -> jax.Array:
    """U Vᵀ for ``matrix = U S Vᵀ`` (thin SVD): the orthonormal factor of its polar decomposition, the matrix
    with orthonormal columns (or rows) nearest to it in Frobenius norm."""
    u, _, vh = thin_svd(matrix)
    return u @ vh


def matrix_shape(leaf: jax.Array, spec: Matrix) -> tuple[int, int]:
    """(out, in) of the matrices of a θ0 leaf read as `spec` says."""
    return jax.eval_shape(lambda x: to_matrices(x, spec, task_axis=False), leaf).shape[1:]


def merge_by_matrix(merged_matrix: MatrixFunction, pretrained: PyTree, task_vectors: PyTree, view: MatrixView,
                    scale: jax.Array) -> PyTree:
    """θ = θ0 + α Δ: Δ = ``merged_matrix(τ)`` on each matrix of `view`, the average (1/K) Σ_k τ_k elsewhere;
    computed in the accumulation dtype, returned in θ0's dtypes (to be called under `jax.jit`)."""

    def onto(delta: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array, jax.Array], jax.Array]:
        def merged(tau: jax.Array, theta: jax.Array) -> jax.Array:
            dtype = accumulation_dtype(tau.dtype, theta.dtype)
            return theta.astype(dtype) + scale.astype(dtype) * delta(tau.astype(dtype))
        return merged

    result = map_matrices(onto(merged_matrix), onto(lambda t: jnp.mean(t, axis=0)), pretrained, task_vectors, view)
    return jax.tree_util.tree_map(lambda merged, theta: merged.astype(theta.dtype), result, pretrained)


def split_by_matrix(matrix_parts: MatrixFunction, task_vectors: PyTree, view: MatrixView) -> PyTree:
    """τ'_k: ``matrix_parts(τ)`` on each matrix of `view`, the shares τ_k / K elsewhere; stacked like τ, in τ's
    dtypes, computed in their accumulation dtype (to be called under `jax.jit`)."""
    widened = lambda tau: tau.astype(accumulation_dtype(tau.dtype))  # noqa: E731
    shapes = jax.tree_util.tree_map(lambda tau: tau[0], task_vectors)  # θ0's shapes; no θ0 is needed
    parts = map_matrices(lambda tau, _: matrix_parts(widened(tau)), lambda tau, _: widened(tau) / tau.shape[0],
                         shapes, task_vectors, view, per_task_output=True)
    return jax.tree_util.tree_map(lambda part, tau: part.astype(tau.dtype), parts, task_vectors)
