"""Isotropic merging (Marczak, Magistri, Cygert, Twardowski, Bagdanov and van de Weijer, "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025): Iso-C and Iso-CTS, and Iso-CTS's
per-task parts as a task-vector transform for AdaMerging.

Per weight matrix (τ_k ∈ R^{out × in} in the reference's orientation, `core.matrix_view`; r = min(out, in)):

Iso-C flattens the spectrum of the summed task vector:

    Σ_k τ_k = U S Vᵀ,   Δ = s̄ U Vᵀ,   s̄ = mean(diag S)

Iso-CTS keeps the top c directions of the sum (the common subspace) and gives each task n directions of its
own, taken from its task vector with the common subspace projected out:

    c' = ⌊r f⌋,  n = round((r − c') / K),  c = r − K n          (f: common_space_fraction; Python's round)
    Σ_k τ_k = U S Vᵀ,   U_c = U_:,:c,  S_c,  V_c                   the common subspace
    τ_k − U_c U_cᵀ τ_k = A_k Σ_k B_kᵀ                              task k's own directions, top n kept
    Û = polar[A_1,:n … A_K,:n  U_c],   V̂ = polar[B_1,:n … B_K,:n  V_c]     (r columns each)
    Δ = s̄ Û V̂ᵀ,   s̄ = mean(Σ_1,:n … Σ_K,:n, S_c)

(polar(X) = A Bᵀ for X = A Σ Bᵀ.) Both give θ = θ0 + α Δ, and every other leaf θ0 + α (1/K) Σ_k τ_k; α = 1
and f = 0.8 (FusionBench's configs). A fraction that makes c < 0 (n rounded up past r / K, e.g. r = 5, K = 3,
f = 0) is refused: the reference cannot place the blocks either.

The transform ``iso_cts`` splits Δ into per-task parts: task k's own block and an equal share of the common one,

    P_k = s̄ (Û_k V̂_kᵀ + (1/K) Û_c V̂_cᵀ),   Σ_k P_k = Δ

(Û_k, V̂_k: the n columns of task k's block; Û_c, V̂_c: the last c). The common subspace is found from the sum of
all task vectors and its singular values are flattened to s̄ like every other direction, so no task owns more of
it than another: each gets 1/K. Off the matrices τ'_k = τ_k / K. θ0 + Σ_k α τ'_k is Iso-CTS.

References: FusionBench 0.2.33 fusion_bench/method/isotropic_merging/iso_utils.py (``iso_c``, ``iso_cts``),
run as iso.py runs them (θ0 + scaling_factor · merged task vector). Which leaves are matrices is the binding's
view (the reference: every 2-D tensor); its excluded keys are not offered.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from adamerging_jax.core.matrix_merging import (matrix_shape, merge_by_matrix, polar_factor,
                                                split_by_matrix, thin_svd)
from adamerging_jax.core.matrix_view import MatrixView, require_view
from adamerging_jax.core.parameters import Parameter
from adamerging_jax.core.task_vector_transforms import TaskVectorTransform, register_transform
from adamerging_jax.core.task_vectors import check_stacked, num_tasks
from adamerging_jax.core.trees import PyTree, named_leaves

PAPER = ("Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
         "ICML 2025")
ISO_C_FORMULA = "θ = θ0 + α s̄ U Vᵀ per matrix,  Σ_k τ_k = U S Vᵀ,  s̄ = mean diag S;  θ0 + α (1/K) Σ_k τ_k elsewhere"
ISO_CTS_FORMULA = ("θ = θ0 + α s̄ Û V̂ᵀ per matrix,  Û = polar[A_1,:n … A_K,:n U_:,:c],  V̂ = polar[B_1,:n … B_K,:n "
                   "V_:,:c],  Σ_k τ_k = U S Vᵀ,  τ_k − U_:,:c U_:,:cᵀ τ_k = A_k Σ_k B_kᵀ,  c = r − K n,  "
                   "n = round((r − ⌊r f⌋)/K),  s̄ = mean(Σ_k,:n, S_:c);  θ0 + α (1/K) Σ_k τ_k elsewhere")
REFERENCE = "FusionBench 0.2.33 fusion_bench/method/isotropic_merging/ (iso.py, iso_utils.py {})"
SCALE = Parameter("scale", 1.0, "α applied to the merged task vector (the reference's scaling_factor)")
COMMON_SPACE_FRACTION = Parameter("common_space_fraction", 0.8, "share f of each matrix's rank r given to the "
                                  "common subspace (before rounding the task-specific rest to K equal blocks)",
                                  minimum=0.0, maximum=1.0)


def iso_c_matrix(task_vectors: jax.Array) -> jax.Array:
    """Iso-C's merged task vector s̄ U Vᵀ of one matrix ([K, out, in] → [out, in])."""
    u, s, vh = thin_svd(jnp.sum(task_vectors, axis=0))
    return jnp.mean(s) * (u @ vh)


def subspace_sizes(rank: int, num_tasks: int, fraction: float) -> tuple[int, int]:
    """(c, n): the common subspace's dimension and each task's, as the reference rounds them (module docstring);
    c < 0 where the fraction leaves no room for K blocks of n."""
    task_specific = round((rank - int(rank * fraction)) / num_tasks) * num_tasks
    return rank - task_specific, task_specific // num_tasks


def _isotropic_bases(task_vectors: jax.Array, fraction: float) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """(Û [out, r], V̂ᵀ [r, in], s̄, n) of one matrix's task vectors [K, out, in] for Iso-CTS (module docstring):
    task k's block is columns k·n … (k+1)·n − 1, the common subspace the last c."""
    count, rows, columns = task_vectors.shape
    common, per_task = subspace_sizes(min(rows, columns), count, fraction)
    u, s, vh = thin_svd(jnp.sum(task_vectors, axis=0))
    lefts, values, rights = [u[:, :common]], [s[:common]], [vh[:common]]
    if per_task > 0:
        specific = task_vectors - jnp.einsum("oc,cp,kpi->koi", lefts[0], lefts[0].T, task_vectors)
        a, sigma, bh = thin_svd(specific)
        lefts.insert(0, jnp.moveaxis(a[:, :, :per_task], 0, 1).reshape(rows, count * per_task))
        values.insert(0, sigma[:, :per_task].reshape(-1))
        rights.insert(0, bh[:, :per_task].reshape(count * per_task, columns))
    flat = jnp.mean(jnp.concatenate(values))
    return polar_factor(jnp.concatenate(lefts, axis=1)), polar_factor(jnp.concatenate(rights)), flat, per_task


def iso_cts_matrix(task_vectors: jax.Array, fraction: float) -> jax.Array:
    """Iso-CTS's merged task vector s̄ Û V̂ᵀ of one matrix ([K, out, in] → [out, in])."""
    left, right, flat, _ = _isotropic_bases(task_vectors, fraction)
    return flat * (left @ right)


def iso_cts_parts(task_vectors: jax.Array, fraction: float) -> jax.Array:
    """Each task's part P_k = s̄ (Û_k V̂_kᵀ + (1/K) Û_c V̂_cᵀ) of one matrix ([K, out, in] → [K, out, in];
    Σ_k P_k = `iso_cts_matrix`)."""
    count, rows, columns = task_vectors.shape
    left, right, flat, per_task = _isotropic_bases(task_vectors, fraction)
    split = count * per_task
    own = jnp.einsum("okn,kni->koi", left[:, :split].reshape(rows, count, per_task),
                     right[:split].reshape(count, per_task, columns))
    common = left[:, split:] @ right[split:]
    return flat * (own + common / count)


def check_fraction(owner: str, pretrained: PyTree, view: MatrixView, count: int, fraction: float) -> None:
    """A ValueError naming `owner`, the parameter and the first matrix of `view` whose subspaces the common-space
    fraction cannot size for `count` tasks (c < 0, `subspace_sizes`)."""
    matrices = view.matrices(pretrained)
    for path, leaf in named_leaves(pretrained):
        if path not in matrices:
            continue
        rank = min(matrix_shape(leaf, matrices[path]))
        common, per_task = subspace_sizes(rank, count, fraction)
        if common < 0:
            raise ValueError(
                f"{owner}: parameter 'common_space_fraction' = {fraction} leaves matrix {path!r} (rank {rank}) "
                f"{count} task blocks of {per_task} directions, more than its rank; choose a larger fraction")


@partial(jax.jit, static_argnames="view")
def _iso_c(pretrained: PyTree, task_vectors: PyTree, view: MatrixView, scale: jax.Array) -> PyTree:
    return merge_by_matrix(iso_c_matrix, pretrained, task_vectors, view, scale)


def iso_c_merging(pretrained: PyTree, task_vectors: PyTree, view: MatrixView | None, scale: float = 1.0) -> PyTree:
    """Iso-C: θ = θ0 + α s̄ U Vᵀ on each matrix of `view`, θ0 + α (1/K) Σ_k τ_k elsewhere (module docstring);
    the result has θ0's dtypes."""
    require_view("iso_c", view)
    check_stacked(pretrained, task_vectors)
    return _iso_c(pretrained, task_vectors, view, jnp.asarray(scale))


@partial(jax.jit, static_argnames=("view", "fraction"))
def _iso_cts(pretrained: PyTree, task_vectors: PyTree, view: MatrixView, scale: jax.Array, fraction: float) -> PyTree:
    return merge_by_matrix(partial(iso_cts_matrix, fraction=fraction), pretrained, task_vectors, view, scale)


def iso_cts_merging(pretrained: PyTree, task_vectors: PyTree, view: MatrixView | None, scale: float = 1.0,
                    common_space_fraction: float = 0.8) -> PyTree:
    """Iso-CTS: θ = θ0 + α s̄ Û V̂ᵀ on each matrix of `view`, θ0 + α (1/K) Σ_k τ_k elsewhere (module docstring);
    the result has θ0's dtypes."""
    require_view("iso_cts", view)
    count = check_stacked(pretrained, task_vectors)
    check_fraction("method 'iso_cts'", pretrained, view, count, common_space_fraction)
    return _iso_cts(pretrained, task_vectors, view, jnp.asarray(scale), common_space_fraction)


@partial(jax.jit, static_argnames=("view", "fraction"))
def _iso_cts_task_vectors(task_vectors: PyTree, view: MatrixView, fraction: float) -> PyTree:
    return split_by_matrix(partial(iso_cts_parts, fraction=fraction), task_vectors, view)


def iso_cts_task_vectors(task_vectors: PyTree, view: MatrixView, common_space_fraction: float = 0.8) -> PyTree:
    """The transform ``iso_cts``: τ'_k = s̄ (Û_k V̂_kᵀ + (1/K) Û_c V̂_cᵀ) on each matrix of `view`, τ_k / K
    elsewhere, stacked like τ (Σ_k α τ'_k is Iso-CTS's merged task vector; module docstring)."""
    shapes = jax.tree_util.tree_map(lambda tau: jax.ShapeDtypeStruct(tau.shape[1:], tau.dtype), task_vectors)
    check_fraction("task-vector transform 'iso_cts'", shapes, view, num_tasks(task_vectors), common_space_fraction)
    return _iso_cts_task_vectors(task_vectors, view, common_space_fraction)


register_transform(TaskVectorTransform(
    "iso_cts", "Iso-CTS's per-task parts s̄ (Û_k V̂_kᵀ + Û_c V̂_cᵀ / K) (τ_k / K off the matrices): Σ_k τ'_k is "
    "Iso-CTS's task vector", PAPER, iso_cts_task_vectors, (COMMON_SPACE_FRACTION,), uses_view=True))
