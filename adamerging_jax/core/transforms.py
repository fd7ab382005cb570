"""Composable transforms of stacked task vectors (leaves `[K, ...]`): sparsify, elect a sign, keep agreeing.

TIES-merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023) and
DARE (Yu et al., "Language Models are Super Mario", ICML 2024) are short compositions of these, in the spirit
of mergekit's generalized task arithmetic: a sparsification (`trim` by magnitude or `drop` at random), a sign
consensus (`elect_sign`), a filter (`keep_agreeing`) and a reduction over tasks (`disjoint_reduce`).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.trees import PyTree


def _magnitude_threshold(magnitudes: jax.Array, keep: int) -> jax.Array:
    """Per row of `magnitudes` [K, D], the value v such that `|τ| ≥ v` keeps the top `keep` entries.

    Follows the official TIES code (`topk_values_mask`): v is the (D − keep)-th smallest magnitude, so the
    mask keeps `keep + 1` entries barring ties; when keep ≥ D every entry is kept.
    """
    size = magnitudes.shape[1]
    index = size - keep - 1
    if index < 0:
        return jnp.zeros((magnitudes.shape[0], 1), magnitudes.dtype)
    return jnp.sort(magnitudes, axis=1)[:, index : index + 1]


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
    leaves, treedef = jax.tree_util.tree_flatten(task_vectors)
    num_tasks = leaves[0].shape[0]
    if scope == "leaf":
        return jax.tree_util.tree_map(lambda tau: trim(tau, density, "model"), task_vectors)
    if scope != "model":
        raise ValueError(f"scope must be 'model' or 'leaf', got {scope!r}")
    magnitudes = jnp.concatenate([jnp.abs(leaf).reshape(num_tasks, -1).astype(jnp.float32) for leaf in leaves], axis=1)
    size = magnitudes.shape[1]
    reference = size if total_size is None else total_size
    if reference < size:
        raise ValueError(f"total_size {total_size} is smaller than the task vectors' {size} entries")
    keep = int(reference * density)
    threshold = _magnitude_threshold(magnitudes, keep)
    del magnitudes
    trimmed = [
        jnp.where(jnp.abs(leaf).reshape(num_tasks, -1) >= threshold, leaf.reshape(num_tasks, -1), 0).reshape(leaf.shape)
        for leaf in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, trimmed)


def drop(task_vectors: PyTree, p: float, seed: int | jax.Array, rescale: bool = True) -> PyTree:
    """DARE: zero each entry independently with probability p and rescale the survivors by 1/(1 − p)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop rate p must be in [0, 1), got {p}")
    key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
    leaves, treedef = jax.tree_util.tree_flatten(task_vectors)
    out = []
    for i, leaf in enumerate(leaves):
        kept = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - p, leaf.shape)
        scale = 1.0 / (1.0 - p) if rescale else 1.0
        out.append(jnp.where(kept, leaf * scale, 0).astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def elect_sign(task_vectors: PyTree, method: Literal["sum", "count"] = "sum") -> PyTree:
    """TIES step 2: the elected sign per entry, a tree of `leaf.shape[1:]` arrays in {−1, 0, +1}.

    ``"sum"`` (TIES): γ = sgn(Σ_k τ_k); ``"count"`` (mergekit): γ = sgn(Σ_k sgn τ_k). Entries where γ = 0 take
    the majority sign sgn(Σ_entries γ) computed over the whole model, as the official code does.
    """
    if method == "sum":
        signs = jax.tree_util.tree_map(lambda tau: jnp.sign(jnp.sum(tau.astype(jnp.float32), axis=0)), task_vectors)
    elif method == "count":
        signs = jax.tree_util.tree_map(lambda tau: jnp.sum(jnp.sign(tau).astype(jnp.float32), axis=0), task_vectors)
        signs = jax.tree_util.tree_map(jnp.sign, signs)
    else:
        raise ValueError(f"method must be 'sum' or 'count', got {method!r}")
    majority = jnp.sign(sum(jnp.sum(s) for s in jax.tree_util.tree_leaves(signs)))
    return jax.tree_util.tree_map(lambda s: jnp.where(s == 0, majority, s), signs)


def keep_agreeing(task_vectors: PyTree, signs: PyTree) -> PyTree:
    """TIES step 3 (disjoint selection): keep τ_k's entries whose sign is the elected one, zero the others."""

    def keep(tau, sign):
        agrees = jnp.where(sign > 0, tau > 0, tau < 0)
        return jnp.where(agrees, tau, 0).astype(tau.dtype)

    return jax.tree_util.tree_map(keep, task_vectors, signs)


def disjoint_reduce(task_vectors: PyTree, reduce: Literal["mean", "sum"] = "mean") -> PyTree:
    """Reduce over tasks: the sum, or the mean over the tasks whose entry is non-zero (TIES "disjoint mean")."""
    if reduce == "sum":
        return jax.tree_util.tree_map(lambda tau: jnp.sum(tau.astype(jnp.float32), axis=0), task_vectors)
    if reduce == "mean":

        def mean(tau):
            count = jnp.maximum(jnp.sum(tau != 0, axis=0), 1)
            return jnp.sum(tau.astype(jnp.float32), axis=0) / count

        return jax.tree_util.tree_map(mean, task_vectors)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
