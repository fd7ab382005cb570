"""TSV-M, task singular vectors merging (Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri and Rodolà,
"Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025), and its per-task parts as a
task-vector transform for AdaMerging.

For each weight matrix (τ_k ∈ R^{out × in} in the reference's orientation, `core.matrix_view`), with r =
min(out, in) and k = ⌊r · (1/K)⌋ (computed as the reference does, in floating point):

    τ_k = U_k Σ_k V_kᵀ                             thin SVD of each task vector, its top k triplets kept
    U = [U_1,:k … U_K,:k],  S = diag(Σ_1,:k … Σ_K,:k),  V = [V_1,:k … V_K,:k]      (K·k ≤ r columns)
    Û = polar(U),  V̂ = polar(V)                     polar(X) = A Bᵀ for X = A Σ Bᵀ: orthogonalised
    Δ = Û S V̂ᵀ = Σ_k P_k,   P_k = Û_k S_k V̂_kᵀ      (Û_k: task k's k columns of Û)
    θ = θ0 + α Δ

and every other leaf takes the average (1/K) Σ_k τ_k, also scaled by α (the reference scales its whole merged
task vector). α = 1 (FusionBench's config). A matrix with k = 0 (K > r) gets Δ = 0, as in the reference.

The transform ``tsv`` is τ'_k = P_k on each matrix and τ_k / K elsewhere, so θ0 + Σ_k α τ'_k is TSV-M and
AdaMerging (θ = θ0 + Σ_k λ_k ⊙ τ'_k) starts from TSV-M at λ = α.

The reference is FusionBench 0.2.33's ``compute_and_sum_svd_mem_reduction`` (fusion_bench/method/
task_singular_vector/utils/TSVM_utils.py, run by TSVM.py); its ``return_single_task_models`` parts are P_k on
the matrices. Scalar α only (the reference's per-task α list, applied before the SVDs, and its excluded keys
are not offered); which leaves are matrices is the binding's view (the reference: every 2-D tensor).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from adamerging_jax.core.matrix_merging import merge_by_matrix, polar_factor, split_by_matrix, thin_svd
from adamerging_jax.core.matrix_view import MatrixView, require_view
from adamerging_jax.core.parameters import Parameter
from adamerging_jax.core.task_vector_transforms import TaskVectorTransform, register_transform
from adamerging_jax.core.task_vectors import check_stacked
from adamerging_jax.core.trees import PyTree

PAPER = ("Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025")
FORMULA = ("θ = θ0 + α Û S V̂ᵀ per matrix,  Û = polar[U_1,:k … U_K,:k],  V̂ = polar[V_1,:k … V_K,:k],  "
           "S = diag(Σ_1,:k … Σ_K,:k),  τ_t = U_t Σ_t V_tᵀ,  k = ⌊r/K⌋;  θ0 + α (1/K) Σ_k τ_k elsewhere")
REFERENCE = ("FusionBench 0.2.33 fusion_bench/method/task_singular_vector/ (TSVM.py, "
             "utils/TSVM_utils.py compute_and_sum_svd_mem_reduction)")
SCALE = Parameter("scale", 1.0, "α applied to the merged task vector (the reference's alpha)")


def kept_rank(rank: int, num_tasks: int) -> int:
    """k = int(r · (1/K)), the reference's count of singular triplets kept per task (as floating point gives it:
    0 for r = K = 49, where 49 · (1/49) < 1)."""
    return int(rank * (1 / num_tasks))


def orthogonalised_triplets(task_vectors: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(Û [out, K·k], S [K·k], V̂ᵀ [K·k, in]) of one matrix's task vectors [K, out, in] (module docstring); the
    columns of Û, entries of S and rows of V̂ᵀ come in task order, k per task."""
    num_tasks, rows, columns = task_vectors.shape
    kept = kept_rank(min(rows, columns), num_tasks)
    u, s, vh = thin_svd(task_vectors)
    left = jnp.moveaxis(u[:, :, :kept], 0, 1).reshape(rows, num_tasks * kept)
    right = vh[:, :kept, :].reshape(num_tasks * kept, columns)
    return polar_factor(left), s[:, :kept].reshape(-1), polar_factor(right)


def tsv_matrix(task_vectors: jax.Array) -> jax.Array:
    """TSV-M's merged task vector Δ = Û S V̂ᵀ of one matrix ([K, out, in] → [out, in])."""
    num_tasks, rows, columns = task_vectors.shape
    if kept_rank(min(rows, columns), num_tasks) == 0:
        return jnp.zeros((rows, columns), task_vectors.dtype)
    left, values, right = orthogonalised_triplets(task_vectors)
    return left @ (values[:, None] * right)


def tsv_parts(task_vectors: jax.Array) -> jax.Array:
    """Each task's part P_k = Û_k S_k V̂_kᵀ of one matrix ([K, out, in] → [K, out, in]; Σ_k P_k = `tsv_matrix`)."""
    num_tasks, rows, columns = task_vectors.shape
    kept = kept_rank(min(rows, columns), num_tasks)
    if kept == 0:
        return jnp.zeros_like(task_vectors)
    left, values, right = orthogonalised_triplets(task_vectors)
    return jnp.einsum("okr,kr,kri->koi", left.reshape(rows, num_tasks, kept), values.reshape(num_tasks, kept),
                      right.reshape(num_tasks, kept, columns))


@partial(jax.jit, static_argnames="view")
def _tsv_merging(pretrained: PyTree, task_vectors: PyTree, view: MatrixView, scale: jax.Array) -> PyTree:
    return merge_by_matrix(tsv_matrix, pretrained, task_vectors, view, scale)


def tsv_merging(pretrained: PyTree, task_vectors: PyTree, view: MatrixView | None, scale: float = 1.0) -> PyTree:
    """TSV-M: θ = θ0 + α Û S V̂ᵀ on each matrix of `view`, θ0 + α (1/K) Σ_k τ_k elsewhere (module docstring);
    the result has θ0's dtypes."""
    require_view("tsv_m", view)
    check_stacked(pretrained, task_vectors)
    return _tsv_merging(pretrained, task_vectors, view, jnp.asarray(scale))


@partial(jax.jit, static_argnames="view")
def tsv_task_vectors(task_vectors: PyTree, view: MatrixView) -> PyTree:
    """The transform ``tsv``: τ'_k = Û_k S_k V̂_kᵀ on each matrix of `view`, τ_k / K elsewhere, stacked like τ
    (Σ_k α τ'_k is TSV-M's merged task vector; module docstring)."""
    return split_by_matrix(tsv_parts, task_vectors, view)


register_transform(TaskVectorTransform(
    "tsv", "TSV-M's per-task parts Û_k S_k V̂_kᵀ (τ_k / K off the matrices): Σ_k τ'_k is TSV-M's task vector",
    PAPER, tsv_task_vectors, uses_view=True))
