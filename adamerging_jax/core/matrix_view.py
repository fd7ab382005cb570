"""The matrix view of a parameter tree: which leaves are weight matrices, and in which orientation.

The SVD-based and per-layer methods (TSV-M, Iso-C/CTS, WUDI, RegMean, ...) are defined on each linear layer's
weight as the reference implementation sees it: a PyTorch ``nn.Linear`` weight ``W ∈ R^{out × in}`` with
y = W x. A Flax ``Dense`` kernel is the transpose, ``[in, out]``, and a scanned stack of L layers adds a
leading axis. The binding that knows the model declares the view; a method never guesses it from shapes.

A `MatrixView` declares, per leaf path (the ``"a/b/c"`` paths of `trees.leaf_paths`), whether the leaf stacks
L layers on its leading axis (``stacked``, for every leaf: per-tensor statistics count such a leaf as L
tensors) and whether it is a matrix stored transposed or not (``layout``; None: "not a matrix" — biases,
norms, embeddings of other rank, convolutions with a spatial extent). `to_matrices` / `from_matrices` move a
stacked task-vector leaf ``[K, (L,) ...]`` to ``[L', K, out, in]`` and back, so a per-matrix method is a
``vmap`` over L'.

    view = MatrixView(lambda path: Matrix(transpose=True) if path.endswith("kernel") else None, clip.stacked)
    mats = to_matrices(tau_leaf, view.matrix(path))   # [L, K, out, in]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from adamerging_jax.core.trees import PyTree, leaf_paths, named_leaves


@dataclasses.dataclass(frozen=True)
class Matrix:
    """How one leaf is read as matrices ``W ∈ R^{out × in}`` (see the module docstring).

    Attributes:
      transpose: the leaf stores ``[..., in, out]`` (Flax ``Dense``/1×1 conv kernels: every axis but the last
        is an input axis); False: ``[..., out, in]`` as stored (e.g. an embedding table read as PyTorch does).
      layers: the leaf stacks L layers on its leading axis (after the task axis of a task-vector leaf);
        `MatrixView.matrix` sets it from the view's ``stacked``.
    """

    transpose: bool = True
    layers: bool = False


def _never(path: str) -> bool:
    del path
    return False


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """Declared by a model binding: per leaf path, its layout as a matrix (or None) and whether it stacks layers.

    Attributes:
      layout: path → `Matrix` (its ``transpose``; ``layers`` is taken from `stacked`) or None.
      stacked: path → the leaf stacks L layers on its leading axis (the binding's own ``stacked``).
    """

    layout: Callable[[str], Matrix | None]
    stacked: Callable[[str], bool] = _never

    def matrix(self, path: str) -> Matrix | None:
        """The leaf at `path` as matrices, or None when it is not a matrix."""
        found = self.layout(path)
        return None if found is None else dataclasses.replace(found, layers=self.stacked(path))

    @staticmethod
    def stored_2d(tree: PyTree, stacked: Callable[[str], bool] | None = None, transpose: bool = True) -> MatrixView:
        """Every leaf whose per-layer shape is 2-D is a matrix stored as Flax stores kernels (``transpose``);
        for a user's own pytree of Dense layers. `stacked` marks the leaves with a layer axis."""
        is_stacked = stacked or _never
        two_d = {path for path, leaf in named_leaves(tree) if jnp.ndim(leaf) - int(is_stacked(path)) == 2}
        return MatrixView(lambda path: Matrix(transpose) if path in two_d else None, is_stacked)

    def matrices(self, tree: PyTree) -> dict[str, Matrix]:
        """``{path: Matrix}`` for the leaves of `tree` that this view calls matrices."""
        return {path: m for path in leaf_paths(tree) if (m := self.matrix(path)) is not None}


NO_VIEW = ("reads each weight matrix: the binding declares no matrix view (ModelBinding.matrix_view, or pass "
           "view=MatrixView...)")


def require_view(owner: str, view: MatrixView | None, kind: str = "method") -> MatrixView:
    """`view`, or one ValueError naming the `kind` of thing and its name when the binding declares none."""
    if view is None:
        raise ValueError(f"{kind} {owner!r} {NO_VIEW}")
    return view


def requires_view(context: object, view: MatrixView | None) -> str | None:
    """`MergeMethod.requires` of a method that reads each weight matrix: the binding must declare its view."""
    del context
    return None if view is not None else NO_VIEW


def to_matrices(leaf: jax.Array, spec: Matrix, task_axis: bool = True) -> jax.Array:
    """``[K, (L,) ...]`` → ``[L', K, out, in]`` (L' = L, or 1 for an unstacked leaf).

    With ``task_axis=False`` the leaf has no task axis (θ0) and the result is ``[L', out, in]``.
    """
    x = leaf if task_axis else leaf[None]
    if not spec.layers:
        x = x[:, None]
    # x: [K, L', *per-layer shape]
    k, l = x.shape[:2]
    shape = x.shape[2:]
    if spec.transpose:
        x = jnp.swapaxes(x.reshape(k, l, math.prod(shape[:-1]), shape[-1]), -1, -2)
    else:
        x = x.reshape(k, l, shape[0], math.prod(shape[1:]))
    x = jnp.swapaxes(x, 0, 1)
    return x if task_axis else x[:, 0]


def from_matrices(matrices: jax.Array, spec: Matrix, like_shape: tuple[int, ...], task_axis: bool = True) -> jax.Array:
    """The inverse of `to_matrices`: ``[L', (K,) out, in]`` → a leaf of ``like_shape`` (``[(K,) (L,) ...]``)."""
    x = matrices if task_axis else matrices[:, None]
    x = jnp.swapaxes(x, 0, 1)  # [K, L', out, in]
    if spec.transpose:
        x = jnp.swapaxes(x, -1, -2)
    per_layer = like_shape[int(task_axis) + int(spec.layers):]
    x = x.reshape(x.shape[:2] + tuple(per_layer))
    if not spec.layers:
        x = x[:, 0]
    return x if task_axis else x[0]


def _per_layer(per_matrix: Callable[..., jax.Array], tau: jax.Array, theta: jax.Array, spec: Matrix) -> jax.Array:
    """``per_matrix`` on each layer's matrices, stacked ``[L', ...]``: a stacked leaf is sliced one layer at a time
    inside the loop, so neither τ nor θ0 is ever copied (transposed) whole."""
    single = dataclasses.replace(spec, layers=False)

    def one(tau_layer: jax.Array, theta_layer: jax.Array) -> jax.Array:
        return per_matrix(to_matrices(tau_layer, single)[0], to_matrices(theta_layer, single, task_axis=False)[0])

    if not spec.layers:
        return one(tau, theta)[None]
    layer = lambda index: one(jax.lax.dynamic_index_in_dim(tau, index, 1, keepdims=False),  # noqa: E731
                              jax.lax.dynamic_index_in_dim(theta, index, 0, keepdims=False))
    return jax.lax.map(layer, jnp.arange(theta.shape[0]))


def map_matrices(
    per_matrix: Callable[..., jax.Array],
    otherwise: Callable[..., jax.Array],
    pretrained: PyTree,
    task_vectors: PyTree,
    view: MatrixView,
    *,
    per_task_output: bool = False,
) -> PyTree:
    """Apply a per-matrix function to every matrix leaf and `otherwise` to the rest.

    ``per_matrix(τ [K, out, in], θ0 [out, in]) -> [out, in]`` (or ``[K, out, in]`` with ``per_task_output``)
    runs over the layers of a stacked leaf one after another (`jax.lax.map`), so the intermediates of one
    layer's SVDs or solves are alive at a time, not L of them; ``otherwise(τ [K, ...], θ0 [...])`` gets the whole leaf and
    returns θ0's shape (or τ's with ``per_task_output``). The result is a tree like θ0 (or like τ).
    """
    paths = leaf_paths(task_vectors)
    flat_pretrained = dict(named_leaves(pretrained))
    leaves, treedef = jax.tree_util.tree_flatten(task_vectors)
    out = []
    for path, tau in zip(paths, leaves):
        theta = flat_pretrained[path]
        spec = view.matrix(path)
        if spec is None:
            out.append(otherwise(tau, theta))
            continue
        out.append(from_matrices(_per_layer(per_matrix, tau, theta, spec), spec,
                                 tau.shape if per_task_output else theta.shape, task_axis=per_task_output))
    return jax.tree_util.tree_unflatten(treedef, out)
