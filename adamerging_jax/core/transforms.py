"""Composable transforms of stacked task vectors (leaves `[K, ...]`): sparsify, elect a sign, keep agreeing.

TIES-merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023) and
DARE (Yu et al., "Language Models are Super Mario", ICML 2024) are short compositions of these, in the spirit
of mergekit's generalized task arithmetic: a sparsification (`trim` by magnitude or `drop` at random), a sign
consensus (`elect_sign`), a filter (`keep_agreeing`) and a reduction over tasks (`disjoint_reduce`). Model
Breadcrumbs and DELLA sparsify each tensor on its own as mergekit does: `trim_outliers` (drop the largest and the
smallest magnitudes), `rank_keep_probabilities` → `sample_masks` → `apply_masks` (`drop_by_rank`), `match_l1_norm`.

Each checks that its input is stacked with one K (`task_vectors.num_tasks`). Sums over tasks, magnitudes and
thresholds run in `trees.accumulation_dtype` of τ: float32 for bf16 / fp16 / fp32 τ, float64 for float64 τ
(so a sign sum that cancels below float32 resolution keeps its float64 sign).
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.matrix_view import Matrix, MatrixView, from_matrices, to_matrices
from adamerging_jax.core.per_tensor import layered_leaves
from adamerging_jax.core.task_vectors import num_tasks as stacked_num_tasks
from adamerging_jax.core.trees import PyTree, accumulation_dtype, leaf_paths


def _widened(tau: jax.Array) -> jax.Array:
    """τ in its accumulation dtype (float32 for narrower floats, float64 stays float64)."""
    return tau.astype(accumulation_dtype(tau.dtype))


def _kth_largest_magnitude(leaves: list[jax.Array], rank: int) -> jax.Array:
    """Per task k, the `rank`-th largest |τ_k| over all leaves (1 ≤ rank ≤ D), shape [K].

    Found by bisection on the IEEE-754 bit patterns of |τ| (for non-negative floats their order is the order
    of the bits read as integers): 32 (64 for float64) counting passes over the leaves, with no sort and no
    concatenated [K, D] copy of the model, so it scales to ViT-L/14 × 20 tasks.
    """
    dtype = accumulation_dtype(*(leaf.dtype for leaf in leaves))
    int_dtype, bits = (jnp.int64, 64) if dtype == jnp.float64 else (jnp.int32, 32)
    num_tasks = leaves[0].shape[0]
    as_bits = lambda leaf: jax.lax.bitcast_convert_type(jnp.abs(leaf.astype(dtype)), int_dtype).reshape(num_tasks, -1)  # noqa: E731

    def count_at_least(threshold):
        return sum(jnp.sum(as_bits(leaf) >= threshold[:, None], axis=1, dtype=jnp.int64 if bits == 64 else jnp.int32) for leaf in leaves)

    def halve(_, bounds):
        low, high = bounds  # count(≥ low) ≥ rank > count(≥ high)
        middle = low + (high - low) // 2
        enough = count_at_least(middle) >= rank
        return jnp.where(enough, middle, low), jnp.where(enough, high, middle)

    infinity_bits = jax.lax.bitcast_convert_type(jnp.asarray(jnp.inf, dtype), int_dtype)
    low = jnp.zeros(num_tasks, int_dtype)
    high = jnp.full(num_tasks, infinity_bits + 1, int_dtype)
    low, _ = jax.lax.fori_loop(0, bits, halve, (low, high))
    return jax.lax.bitcast_convert_type(low, dtype)


@partial(jax.jit, static_argnames=("density", "scope", "total_size", "view"))
def trim(
    task_vectors: PyTree,
    density: float,
    scope: Literal["model", "leaf"] = "model",
    total_size: int | None = None,
    thresholds: jax.Array | None = None,
    view: MatrixView | None = None,
) -> PyTree:
    """Keep, per task, the entries of largest magnitude; zero the rest (TIES step 1, "trim").

    Per task k, keep |τ_k| ≥ t_k, t_k the r-th largest |τ_k| over D entries, r = ⌊density · D⌋ + 1 (the
    official code's count: entries ≥ the (D − keep)-th smallest magnitude; r > D keeps everything). D is:

    - ``scope="model"`` (the official TIES and AdaMerging++ code): the entries of one task vector, the whole
      flattened model. `total_size` overrides D: the official AdaMerging++ script flattens a state dict that
      also holds 12.6M never-trained text-side entries (τ = 0), so its ``density=0.2`` keeps ⌊0.2 · D_all⌋
      entries of the visual tower (≈ 26% of it); pass D_all to match that absolute count.
    - ``scope="leaf"`` (mergekit's per-tensor density): the entries of one tensor of the checkpoint, each with
      its own t_k. A leaf that stacks L layers on its leading axis (``view.stacked``, the binding's matrix view
      `core.matrix_view`) is L tensors, trimmed layer by layer as the checkpoint's per-layer tensors are;
      without a view every leaf is one tensor.

    `thresholds` ([K]): the per-task t_k already found over the whole model (``scope="model"``) or over the
    one tensor this one-leaf tree holds (``scope="leaf"``; a merge streamed part by part finds them first,
    `merging.streaming`); the entries of this tree are then trimmed against them instead of their own top-k.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    num_tasks = stacked_num_tasks(task_vectors)
    leaves, treedef = jax.tree_util.tree_flatten(task_vectors)
    if scope not in ("model", "leaf"):
        raise ValueError(f"scope must be 'model' or 'leaf', got {scope!r}")
    if scope == "leaf" and thresholds is None:
        trimmed = [_trim_tensors(leaf, density, stacked)
                   for leaf, stacked in zip(leaves, layered_leaves(view, task_vectors))]
        return jax.tree_util.tree_unflatten(treedef, trimmed)
    if scope == "leaf" and len(leaves) != 1:
        raise ValueError(f"thresholds of one leaf (scope 'leaf') given for a tree of {len(leaves)} leaves")
    if thresholds is None:
        size = sum(leaf[0].size for leaf in leaves)
        reference = size if total_size is None else total_size
        if reference < size:
            raise ValueError(f"total_size {total_size} is smaller than the task vectors' {size} entries")
        # The `reference − size` zero entries the official code also counts are the smallest.
        rank = int(reference * density) + 1
        if rank > size:
            return task_vectors
        thresholds = _kth_largest_magnitude(leaves, rank)
    threshold = thresholds.astype(accumulation_dtype(*(leaf.dtype for leaf in leaves)))
    dtype = threshold.dtype
    trimmed = [
        jnp.where(
            jnp.abs(leaf.astype(dtype)) >= threshold.reshape((num_tasks,) + (1,) * (leaf.ndim - 1)), leaf, 0
        ).astype(leaf.dtype)
        for leaf in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, trimmed)


def _trim_tensors(tau: jax.Array, density: float, stacked: bool) -> jax.Array:
    """`trim` with scope "leaf" on one leaf ``[K, (L,) ...]``: each task's each tensor (each layer of a stacked
    leaf) of n entries keeps |τ| ≥ its own (⌊density · n⌋ + 1)-th largest magnitude."""
    n = int(np.prod(tau.shape[1 + int(stacked):]))
    rank = int(n * density) + 1
    if rank > n:
        return tau
    tensors = _per_tensor(tau, stacked)  # [K, L', n]
    thresholds = _kth_largest_magnitude([tensors.reshape(-1, n)], rank).reshape(tensors.shape[:2] + (1,))
    kept = jnp.abs(_widened(tensors)) >= thresholds
    return jnp.where(kept, tensors, 0).reshape(tau.shape).astype(tau.dtype)


def drop(task_vectors: PyTree, p: float, seed: int | jax.Array, rescale: bool = True) -> PyTree:
    """DARE: zero each entry independently with probability p and rescale the survivors by 1/(1 − p).

    `seed` is an int or a `jax.random.key`; leaf i draws its mask from `fold_in(key, i)`.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop rate p must be in [0, 1), got {p}")
    stacked_num_tasks(task_vectors)
    key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
    return _drop(task_vectors, p, key, rescale)


@partial(jax.jit, static_argnames=("p", "rescale"))
def _drop(task_vectors: PyTree, p: float, key: jax.Array, rescale: bool) -> PyTree:
    leaves, treedef = jax.tree_util.tree_flatten(task_vectors)
    out = []
    for i, leaf in enumerate(leaves):
        kept = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - p, leaf.shape)
        scale = 1.0 / (1.0 - p) if rescale else 1.0
        out.append(jnp.where(kept, leaf * scale, 0).astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


@partial(jax.jit, static_argnames="method")
def elect_sign(task_vectors: PyTree, method: Literal["sum", "count"] = "sum", majority: jax.Array | None = None
               ) -> PyTree:
    """TIES step 2: the elected sign per entry, a tree of `leaf.shape[1:]` arrays in {−1, 0, +1}.

    ``"sum"`` (TIES): γ = sgn(Σ_k τ_k); ``"count"`` (mergekit): γ = sgn(Σ_k sgn τ_k). Entries where γ = 0 take
    the majority sign sgn(Σ_entries γ) computed over the whole model, as the official code does; `majority`
    gives it when this tree is part of a model (a merge streamed tensor by tensor counts it first; 0 leaves
    γ = 0 as it is).
    """
    stacked_num_tasks(task_vectors)
    if method == "sum":
        signs = jax.tree_util.tree_map(lambda tau: jnp.sign(jnp.sum(_widened(tau), axis=0)), task_vectors)
    elif method == "count":
        signs = jax.tree_util.tree_map(lambda tau: jnp.sum(jnp.sign(_widened(tau)), axis=0), task_vectors)
        signs = jax.tree_util.tree_map(jnp.sign, signs)
    else:
        raise ValueError(f"method must be 'sum' or 'count', got {method!r}")
    if majority is None:
        majority = jnp.sign(sum(jnp.sum(s) for s in jax.tree_util.tree_leaves(signs)))
    return jax.tree_util.tree_map(lambda s: jnp.where(s == 0, majority, s), signs)


@jax.jit
def keep_agreeing(task_vectors: PyTree, signs: PyTree) -> PyTree:
    """TIES step 3 (disjoint selection): keep τ_k's entries whose sign is the elected one, zero the others."""

    def keep(tau, sign):
        agrees = jnp.where(sign > 0, tau > 0, tau < 0)
        return jnp.where(agrees, tau, 0).astype(tau.dtype)

    return jax.tree_util.tree_map(keep, task_vectors, signs)


@partial(jax.jit, static_argnames="reduce")
def disjoint_reduce(task_vectors: PyTree, reduce: Literal["mean", "sum"] = "mean") -> PyTree:
    """Reduce over tasks: Σ_k τ_k, or the mean over the tasks whose entry is non-zero (TIES "disjoint mean"),
    Σ_k τ_k / max(#{k : τ_k ≠ 0}, 1); in `accumulation_dtype(τ)`."""
    stacked_num_tasks(task_vectors)
    if reduce == "sum":
        return jax.tree_util.tree_map(lambda tau: jnp.sum(_widened(tau), axis=0), task_vectors)
    if reduce == "mean":

        def mean(tau):
            count = jnp.maximum(jnp.sum(tau != 0, axis=0), 1)
            return jnp.sum(_widened(tau), axis=0) / count

        return jax.tree_util.tree_map(mean, task_vectors)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


# --- per-tensor sparsifiers of mergekit's generalized task arithmetic: Model Breadcrumbs, DELLA ----------------
#
# mergekit sparsifies each tensor of each task on its own. A leaf stacking L layers (as the view declares it:
# `per_tensor.layered_leaves`) is L tensors; without a view a leaf is one.

L1_GUARD = 1e-7
"""mergekit's ``rescaled_masked_tensor`` leaves a tensor unscaled when either L1 norm is below this."""


def _tensor_layouts(task_vectors: PyTree, view: MatrixView | None) -> tuple[tuple[Matrix | None, bool], ...]:
    """Per leaf: its `Matrix` in the view (None: not a matrix, or no view) and whether it stacks layers."""
    matrices = [view.matrix(path) if view is not None else None for path in leaf_paths(task_vectors)]
    return tuple(zip(matrices, layered_leaves(view, task_vectors)))


def _per_tensor(tau: jax.Array, stacked: bool) -> jax.Array:
    """A stacked leaf ``[K, (L,) ...]`` as ``[K, L', n]``: one row of n entries per task and tensor."""
    return tau.reshape(tau.shape[0], tau.shape[1] if stacked else 1, -1)


def _magnitude_ranks(x: jax.Array) -> jax.Array:
    """The rank of each |x| along the last axis: 0 for the smallest, n − 1 for the largest; equal magnitudes are
    ranked in the order of their positions."""
    return jnp.argsort(jnp.argsort(jnp.abs(x), axis=-1, stable=True), axis=-1)


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def trim_outliers(task_vectors: PyTree, density: float, gamma: float, view: MatrixView | None = None) -> PyTree:
    """Model Breadcrumbs' sparsification (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model
    Merging with Sparse Masks", ECCV 2024) as mergekit's ``magnitude_outliers``: per task and tensor of n entries
    ranked by |τ| ascending (ranks 0 … n − 1), keep the ranks in [b, b + keep) and zero the rest, with

        keep = ⌊ρ n⌋,  top = ⌊γ n⌋,  b = max(0, n − keep − top)

    i.e. drop the ⌊γ n⌋ largest magnitudes (fewer when ρ + γ > 1, so that ⌊ρ n⌋ entries stay) and keep the next
    ⌊ρ n⌋. ρ ≥ 1 keeps every tensor whole. Ranks in `accumulation_dtype` (mergekit sorts float32 magnitudes on
    CPU; only equal magnitudes, ranked here by position, can differ).
    """
    _check_fraction("density", density)
    _check_fraction("gamma", gamma)
    stacked_num_tasks(task_vectors)
    return _trim_outliers(task_vectors, float(density), float(gamma), _tensor_layouts(task_vectors, view))


@partial(jax.jit, static_argnames=("density", "gamma", "layouts"))
def _trim_outliers(task_vectors: PyTree, density: float, gamma: float, layouts: tuple) -> PyTree:
    if density >= 1.0:
        return task_vectors

    def trim_tensors(tau: jax.Array, stacked: bool) -> jax.Array:
        tensors = _per_tensor(tau, stacked)
        n = tensors.shape[-1]
        keep = int(density * n)
        bottom = max(0, n - keep - int(gamma * n))
        ranks = _magnitude_ranks(_widened(tensors))
        kept = (ranks >= bottom) & (ranks < bottom + keep)
        return jnp.where(kept, tensors, 0).reshape(tau.shape).astype(tau.dtype)

    leaves, treedef = jax.tree_util.tree_flatten(task_vectors)
    trimmed = [trim_tensors(tau, stacked) for tau, (_, stacked) in zip(leaves, layouts)]
    return jax.tree_util.tree_unflatten(treedef, trimmed)


def check_keep_band(density: float, epsilon: float, owner: str = "della") -> None:
    """DELLA's keep probabilities ρ ± ε must lie in (0, 1) when 0 < ρ < 1 (mergekit's condition); ε ≥ 0."""
    _check_fraction("density", density)
    if epsilon < 0 or (0.0 < density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0)):
        raise ValueError(f"{owner}: parameter 'epsilon' = {epsilon} with density {density}: the keep probabilities "
                         "density ± epsilon must lie in (0, 1), and epsilon ≥ 0")


def _rank_fractions(rows: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """r / (m − 1) for the ascending magnitude rank r of each entry among the m entries of its row (last axis);
    1/2, the middle, for a row of one entry (mergekit's 0/0 fails there)."""
    m = rows.shape[-1]
    if m == 1:
        return jnp.full(rows.shape, 0.5, dtype)
    return _magnitude_ranks(rows).astype(dtype) / (m - 1)


def _row_rank_fractions(tau: jax.Array, matrix: Matrix | None, stacked: bool, dtype: jnp.dtype) -> jax.Array:
    """`_rank_fractions` along the rows PyTorch's tensor has on its axis 1 (mergekit ranks along ``dim=1``).

    A matrix of the view: each row of its ``[out, in]`` weight. Any other leaf with ≥ 2 axes per layer is read as
    Flax stores kernels, ``[*window, in, out]`` (torch ``[out, in, *window]``): along ``in``. A leaf of one axis
    per layer: the whole tensor (mergekit ranks a 1-D tensor as one row).
    """
    if matrix is not None:
        return from_matrices(_rank_fractions(to_matrices(tau, matrix), dtype), matrix, tau.shape)
    axes = tau.ndim - 1 - stacked
    if axes >= 2:
        return jnp.moveaxis(_rank_fractions(jnp.moveaxis(tau, -2, -1), dtype), -1, -2)
    return _rank_fractions(tau if axes == 1 else tau[..., None], dtype).reshape(tau.shape)


def rank_keep_probabilities(task_vectors: PyTree, density: float, epsilon: float,
                            view: MatrixView | None = None) -> PyTree:
    """DELLA's MAGPRUNE probabilities (Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
    Magnitude-Based Sampling", 2024) as mergekit's ``della_magprune`` sets them: entry i of a row of m entries,
    of ascending magnitude rank r_i ∈ {0, …, m − 1}, is kept with probability

        q_i = (ρ − ε) + (r_i / (m − 1)) · 2 · ε,   i.e. dropped with p_i = 1 − q_i ∈ [1 − ρ − ε, 1 − ρ + ε],

    larger magnitudes kept more often; rows as `_row_rank_fractions` reads them. ρ ≥ 1 keeps all (q = 1), ρ = 0
    none (q = 0). A tree like τ, in its `accumulation_dtype`.
    """
    check_keep_band(density, epsilon, "rank_keep_probabilities")
    stacked_num_tasks(task_vectors)
    return _rank_keep_probabilities(task_vectors, float(density), float(epsilon), _tensor_layouts(task_vectors, view))


@partial(jax.jit, static_argnames=("density", "epsilon", "layouts"))
def _rank_keep_probabilities(task_vectors: PyTree, density: float, epsilon: float, layouts: tuple) -> PyTree:
    def probabilities(tau: jax.Array, layout: tuple[Matrix | None, bool]) -> jax.Array:
        dtype = accumulation_dtype(tau.dtype)
        if density >= 1.0 or density <= 0.0:
            return jnp.full(tau.shape, float(density >= 1.0), dtype)
        return (density - epsilon) + _row_rank_fractions(tau, *layout, dtype) * 2 * epsilon

    leaves, treedef = jax.tree_util.tree_flatten(task_vectors)
    return jax.tree_util.tree_unflatten(treedef, [probabilities(tau, layout) for tau, layout in zip(leaves, layouts)])


def sample_masks(probabilities: PyTree, seed: int | jax.Array) -> PyTree:
    """Bernoulli keep masks m ~ B(q) per entry (bool, q's shapes); `seed` is an int or a `jax.random.key`, leaf i
    draws from ``fold_in(key, i)``."""
    return _sample_masks(probabilities, jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed)


@jax.jit
def _sample_masks(probabilities: PyTree, key: jax.Array) -> PyTree:
    leaves, treedef = jax.tree_util.tree_flatten(probabilities)
    masks = [jax.random.bernoulli(jax.random.fold_in(key, i), q) for i, q in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, masks)


@jax.jit
def apply_masks(task_vectors: PyTree, masks: PyTree) -> PyTree:
    """τ ⊙ m: the entries of τ where the mask is true, zero elsewhere (τ's dtypes)."""
    return jax.tree_util.tree_map(lambda tau, mask: jnp.where(mask, tau, 0).astype(tau.dtype), task_vectors, masks)


def drop_by_rank(task_vectors: PyTree, density: float, epsilon: float, seed: int | jax.Array,
                 view: MatrixView | None = None) -> PyTree:
    """DELLA's MAGPRUNE without rescaling: τ ⊙ m, m ~ B(q) with q from `rank_keep_probabilities`."""
    return apply_masks(task_vectors, sample_masks(rank_keep_probabilities(task_vectors, density, epsilon, view), seed))


def match_l1_norm(task_vectors: PyTree, sparse: PyTree, view: MatrixView | None = None) -> PyTree:
    """Rescale sparsified task vectors to the L1 norm they had, per task and tensor (mergekit's
    ``rescaled_masked_tensor`` with ``RescaleNorm.l1``, which Breadcrumbs and DELLA use when ``rescale``):

        τ̃ ← τ̃ · ‖τ‖₁ / ‖τ̃‖₁,  left as it is where ‖τ‖₁ or ‖τ̃‖₁ < 1e-7.

    (The DELLA paper rescales each survivor by 1 / (1 − p_i); mergekit matches each tensor's L1 norm.)
    """
    stacked_num_tasks(task_vectors)
    return _match_l1_norm(task_vectors, sparse, _tensor_layouts(task_vectors, view))


@partial(jax.jit, static_argnames="layouts")
def _match_l1_norm(task_vectors: PyTree, sparse: PyTree, layouts: tuple) -> PyTree:
    def rescale(tau: jax.Array, kept: jax.Array, stacked: bool) -> jax.Array:
        before = jnp.sum(jnp.abs(_widened(_per_tensor(tau, stacked))), axis=-1, keepdims=True)
        after = jnp.sum(jnp.abs(_widened(_per_tensor(kept, stacked))), axis=-1, keepdims=True)
        unscaled = (before < L1_GUARD) | (after < L1_GUARD)
        ratio = jnp.where(unscaled, 1, before / jnp.where(unscaled, 1, after))
        return (_widened(_per_tensor(kept, stacked)) * ratio).reshape(tau.shape).astype(kept.dtype)

    leaves, treedef = jax.tree_util.tree_flatten(task_vectors)
    kept_leaves = treedef.flatten_up_to(sparse)
    return jax.tree_util.tree_unflatten(
        treedef, [rescale(tau, kept, stacked) for tau, kept, (_, stacked) in zip(leaves, kept_leaves, layouts)])
