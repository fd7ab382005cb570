"""Per-tensor maps over stacked task vectors, for the methods defined on each tensor of a checkpoint (Model Stock's
angles, SLERP's interpolation): a leaf that stacks L layers on its leading axis (a scanned block) is L tensors,
as the reference implementations see them. Which leaves stack layers is read from the binding's matrix view
(`emr.layers_from_view`); without a view every leaf is one tensor.
"""

from __future__ import annotations

from typing import Callable

import jax

from adamerging_jax.core.emr import layers_from_view
from adamerging_jax.core.matrix_view import MatrixView
from adamerging_jax.core.trees import PyTree, leaf_paths


def layered_leaves(view: MatrixView | None, tree: PyTree) -> tuple[bool, ...]:
    """For each leaf of `tree` (in `jax.tree_util` order): whether it stacks layers on its leading axis."""
    stacked = layers_from_view(view, tree)
    return tuple(stacked(path) for path in leaf_paths(tree))


def map_tensors(
    per_tensor: Callable[[jax.Array, jax.Array], jax.Array],
    pretrained: PyTree,
    task_vectors: PyTree,
    layered: tuple[bool, ...],
) -> PyTree:
    """``per_tensor(τ [K, ...], θ0 [...])`` on every tensor, vmapped over the layers of a layered leaf (τ's axis
    1, θ0's axis 0); the result of each tensor gets a leading L axis where its leaf has one."""
    thetas = jax.tree_util.tree_leaves(pretrained)
    taus, treedef = jax.tree_util.tree_flatten(task_vectors)
    mapped = [jax.vmap(per_tensor, in_axes=(1, 0))(tau, theta) if stacked else per_tensor(tau, theta)
              for tau, theta, stacked in zip(taus, thetas, layered)]
    return jax.tree_util.tree_unflatten(treedef, mapped)
