"""Composable transforms of stacked task vectors (leaves `[K, ...]`): sparsify, elect a sign, keep agreeing.

TIES-merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023) and
DARE (Yu et al., "Language Models are Super Mario", ICML 2024) are short compositions of these, in the spirit
of mergekit's generalized task arithmetic: a sparsification (`trim` by magnitude or `drop` at random), a sign
consensus (`elect_sign`), a filter (`keep_agreeing`) and a reduction over tasks (`disjoint_reduce`).

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

from adamerging_jax.core.task_vectors import num_tasks as stacked_num_tasks
from adamerging_jax.core.trees import PyTree, accumulation_dtype


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


@partial(jax.jit, static_argnames=("density", "scope", "total_size"))
def trim(
    task_vectors: PyTree,
    density: float,
    scope: Literal["model", "leaf"] = "model",
    total_size: int | None = None,
) -> PyTree:
    """Keep, per task, the entries of largest magnitude; zero the rest (TIES step 1, "trim").

    keep = ⌊density · D⌋ where D is the number of entries of one task vector: over the whole flattened model
    (``scope="model"``, the official TIES and AdaMerging++ code) or over each leaf (``scope="leaf"``,
    mergekit). `total_size` overrides D for ``scope="model"``: the official AdaMerging++ script flattens a
    state dict that also holds 12.6M never-trained text-side entries (τ = 0), so its ``density=0.2`` keeps
    ⌊0.2 · D_all⌋ entries of the visual tower (≈ 26% of it); pass D_all to match that absolute count.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    num_tasks = stacked_num_tasks(task_vectors)
    leaves, treedef = jax.tree_util.tree_flatten(task_vectors)
    if scope == "leaf":
        return jax.tree_util.tree_map(lambda tau: trim(tau, density, "model"), task_vectors)
    if scope != "model":
        raise ValueError(f"scope must be 'model' or 'leaf', got {scope!r}")
    size = sum(leaf[0].size for leaf in leaves)
    reference = size if total_size is None else total_size
    if reference < size:
        raise ValueError(f"total_size {total_size} is smaller than the task vectors' {size} entries")
    # The official code keeps |τ| ≥ the (D − keep)-th smallest magnitude, i.e. the (keep + 1)-th largest
    # (keep + 1 entries barring ties); the `reference − size` zero entries it also counts are the smallest.
    rank = int(reference * density) + 1
    if rank > size:
        return task_vectors
    threshold = _kth_largest_magnitude(leaves, rank)
    dtype = threshold.dtype
    trimmed = [
        jnp.where(
            jnp.abs(leaf.astype(dtype)) >= threshold.reshape((num_tasks,) + (1,) * (leaf.ndim - 1)), leaf, 0
        ).astype(leaf.dtype)
        for leaf in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, trimmed)


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
def elect_sign(task_vectors: PyTree, method: Literal["sum", "count"] = "sum") -> PyTree:
    """TIES step 2: the elected sign per entry, a tree of `leaf.shape[1:]` arrays in {−1, 0, +1}.

    ``"sum"`` (TIES): γ = sgn(Σ_k τ_k); ``"count"`` (mergekit): γ = sgn(Σ_k sgn τ_k). Entries where γ = 0 take
    the majority sign sgn(Σ_entries γ) computed over the whole model, as the official code does.
    """
    stacked_num_tasks(task_vectors)
    if method == "sum":
        signs = jax.tree_util.tree_map(lambda tau: jnp.sign(jnp.sum(_widened(tau), axis=0)), task_vectors)
    elif method == "count":
        signs = jax.tree_util.tree_map(lambda tau: jnp.sum(jnp.sign(_widened(tau)), axis=0), task_vectors)
        signs = jax.tree_util.tree_map(jnp.sign, signs)
    else:
        raise ValueError(f"method must be 'sum' or 'count', got {method!r}")
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
