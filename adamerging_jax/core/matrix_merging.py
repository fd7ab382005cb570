"""Merges defined on each weight matrix (TSV-M, Iso-C, Iso-CTS), run over a whole parameter tree.

Such a method is a function of one weight matrix's K task vectors, τ ∈ R^{K × out × in} in the reference's
orientation (`core.matrix_view`): either the merged task vector Δ(τ) ∈ R^{out × in}, or per-task parts
P(τ) ∈ R^{K × out × in} with Σ_k P_k = Δ. A leaf the view does not call a matrix (bias, norm, class embedding,
patch convolution) takes the average (1/K) Σ_k τ_k, and its per-task parts are the shares τ_k / K. Over a tree:

    θ    = θ0 + α Δ        (`merge_by_matrix`: the method's merged model, α its scaling factor)
    τ'_k = P_k             (`split_by_matrix`: the task-vector transform AdaMerging's λ scales;
                            θ0 + Σ_k α τ'_k is the merged model above)

Memory: a leaf that stacks L layers ([K, L, ...]) is worked through one layer at a time (`lax.fori_loop`
writing each layer's result into the output in place), so the temporaries are those of one layer's K matrices
and their SVDs, whatever L, and θ0 + α Δ is formed per layer (no model-sized Δ). CLIP ViT-L/14 with 20 task
vectors thus needs the inputs, the output and one MLP matrix's work, where a layer-vmapped SVD would hold every
layer's singular vectors at once.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from adamerging_jax.core.matrix_view import Matrix, MatrixView, from_matrices, to_matrices
from adamerging_jax.core.trees import PyTree, accumulation_dtype, map_with_path

MatrixFunction = Callable[[jax.Array], jax.Array]
"""τ [K, out, in] → Δ [out, in] (a merged matrix) or P [K, out, in] (per-task parts), in τ's dtype."""


def require_view(method: str, view: MatrixView | None) -> MatrixView:
    """`view`, or one ValueError naming `method` when the binding declares none."""
    if view is None:
        raise ValueError(f"method {method!r} reads each weight matrix: the binding declares no matrix view "
                         "(ModelBinding.matrix_view, or pass view=MatrixView...)")
    return view


def polar_factor(matrix: jax.Array) -> jax.Array:
    """U Vᵀ for ``matrix = U S Vᵀ`` (thin SVD): the orthonormal factor of its polar decomposition, the matrix
    with orthonormal columns (or rows) nearest to it in Frobenius norm."""
    u, _, vh = jnp.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def matrix_shape(leaf: jax.Array, spec: Matrix) -> tuple[int, int]:
    """(out, in) of the matrices of a θ0 leaf read as `spec` says."""
    return jax.eval_shape(lambda x: to_matrices(x, spec, task_axis=False), leaf).shape[1:]


def _on_matrix(compute: Callable[[jax.Array, jax.Array], jax.Array], tau: jax.Array, theta: jax.Array,
               spec: Matrix, per_task: bool) -> jax.Array:
    """``compute(τ [K, out, in], θ0 [out, in])`` on an unstacked leaf pair (τ [K, ...], θ0 [...]), returned in the
    leaf's layout: τ's shape with `per_task`, else θ0's."""
    single = dataclasses.replace(spec, layers=False)
    result = compute(to_matrices(tau, single)[0], to_matrices(theta, single, task_axis=False)[0])
    return from_matrices(result[None], single, tau.shape if per_task else theta.shape, task_axis=per_task)


def _on_each_layer(compute: Callable[[jax.Array, jax.Array], jax.Array], tau: jax.Array, theta: jax.Array,
                   spec: Matrix, per_task: bool, dtype: jnp.dtype) -> jax.Array:
    """`_on_matrix` on every layer of a leaf, one layer at a time for a stacked one (module docstring)."""
    if not spec.layers:
        return _on_matrix(compute, tau, theta, spec, per_task).astype(dtype)
    layer_axis = 1 if per_task else 0

    def layer(index: jax.Array, out: jax.Array) -> jax.Array:
        result = _on_matrix(compute, lax.dynamic_index_in_dim(tau, index, 1, keepdims=False),
                            lax.dynamic_index_in_dim(theta, index, 0, keepdims=False), spec, per_task)
        return lax.dynamic_update_index_in_dim(out, result.astype(dtype), index, layer_axis)

    return lax.fori_loop(0, theta.shape[0], layer, jnp.zeros(tau.shape if per_task else theta.shape, dtype))


def merge_by_matrix(merged_matrix: MatrixFunction, pretrained: PyTree, task_vectors: PyTree, view: MatrixView,
                    scale: jax.Array) -> PyTree:
    """θ = θ0 + α Δ: Δ = ``merged_matrix(τ)`` on each matrix of `view`, the average (1/K) Σ_k τ_k elsewhere;
    computed in the accumulation dtype, returned in θ0's dtypes (to be called under `jax.jit`)."""

    def onto(tau: jax.Array, theta: jax.Array, delta: Callable[[jax.Array], jax.Array]) -> jax.Array:
        dtype = accumulation_dtype(tau.dtype, theta.dtype)
        return theta.astype(dtype) + scale.astype(dtype) * delta(tau.astype(dtype))

    def leaf(path: str, theta: jax.Array, tau: jax.Array) -> jax.Array:
        spec = view.matrix(path)
        if spec is None:
            return onto(tau, theta, lambda t: jnp.mean(t, axis=0)).astype(theta.dtype)
        return _on_each_layer(lambda t, th: onto(t, th, merged_matrix), tau, theta, spec, False, theta.dtype)

    return map_with_path(leaf, pretrained, task_vectors)


def split_by_matrix(matrix_parts: MatrixFunction, task_vectors: PyTree, view: MatrixView) -> PyTree:
    """τ'_k: ``matrix_parts(τ)`` on each matrix of `view`, the shares τ_k / K elsewhere; stacked like τ, in τ's
    dtypes, computed in their accumulation dtype (to be called under `jax.jit`)."""

    def leaf(path: str, tau: jax.Array) -> jax.Array:
        dtype = accumulation_dtype(tau.dtype)
        spec = view.matrix(path)
        if spec is None:
            return (tau.astype(dtype) / tau.shape[0]).astype(tau.dtype)
        parts = lambda t, _: matrix_parts(t.astype(dtype))  # noqa: E731  (no θ0: τ_0 stands in for its shape)
        return _on_each_layer(parts, tau, tau[0], spec, True, tau.dtype)

    return map_with_path(leaf, task_vectors)
