"""EMR-Merging (Huang, Ye, Huang, Wang, Shi, Wen and Shao, "EMR-Merging: Tuning-Free High-Performance Model
Merging", NeurIPS 2024): Elect a unified task vector, then Mask and Rescale it per task.

    γ_uni = sgn(Σ_k τ_k)  (a zero sum counts as −1)
    m_t   = [τ_t · γ_uni > 0]                                   per-task binary masks
    τ_uni = γ_uni ⊙ max_k |m_k ⊙ τ_k|                           the unified task vector
    s_t   = Σ_n mean|τ_t,n| / Σ_n mean|m_t,n ⊙ τ_uni,n|         per-task rescalers (n: the model's tensors)
    θ_t   = θ0 + s_t · m_t ⊙ τ_uni                              task t's model

The rescalers sum one mean per tensor, as the authors' code does: a leaf that stacks L layers is L tensors.
The masks stay bool and the rescalers scalars (`EmrParts`), so a task's model is built when asked for
(`EmrModels`); the unified model θ0 + τ_uni is what the ``merge`` command exports beside them.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from adamerging_jax.core.matrix_view import MatrixView
from adamerging_jax.core.task_vectors import add_to_pretrained, check_stacked, num_tasks
from adamerging_jax.core.trees import PyTree, accumulation_dtype, leaf_paths

PAPER = "Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging, NeurIPS 2024"


class EmrParts(NamedTuple):
    """What EMR-Merging keeps: ``unified`` τ_uni (θ0's shapes, τ's dtypes), ``masks`` m_t (bool ``[K, ...]``)
    and ``rescalers`` s_t (``[K]``, τ's accumulation dtype)."""

    unified: PyTree
    masks: PyTree
    rescalers: jax.Array


def layers_from_view(view: MatrixView | None, tree: PyTree) -> Callable[[str], bool]:
    """Which leaves stack L layers on their leading axis, as the binding's view declares it (``view.stacked``);
    without a view no leaf is stacked. (`tree` is unused: the declaration is by path.)"""
    del tree
    return view.stacked if view is not None else (lambda path: False)


def _tensor_means(tree: PyTree, layered: tuple[bool, ...]) -> jax.Array:
    """Σ_n mean|x_k,n| over the tensors n of stacked leaves ``[K, (L,) ...]`` (a layered leaf is L tensors), [K]."""
    total = 0
    for leaf, stacked in zip(jax.tree_util.tree_leaves(tree), layered):
        magnitude = jnp.abs(leaf.astype(accumulation_dtype(leaf.dtype)))
        per_tensor = jnp.mean(magnitude, axis=tuple(range(1 + stacked, leaf.ndim)))
        total = total + (jnp.sum(per_tensor, axis=1) if stacked else per_tensor)
    return total


def _elected_positive(tau: jax.Array) -> jax.Array:
    """γ_uni > 0: Σ_k τ_k > 0 (a zero sum elects −1)."""
    return jnp.sum(tau.astype(accumulation_dtype(tau.dtype)), axis=0) > 0


def _unified(tau: jax.Array, masks: jax.Array, positive: jax.Array) -> jax.Array:
    """τ_uni = γ_uni ⊙ max_k |m_k ⊙ τ_k|, in τ's dtype."""
    largest = jnp.max(jnp.where(masks, jnp.abs(tau), 0), axis=0)
    return jnp.where(positive, largest, -largest)


@partial(jax.jit, static_argnames="layered")
def _emr_parts(task_vectors: PyTree, layered: tuple[bool, ...]) -> EmrParts:
    positive = jax.tree_util.tree_map(_elected_positive, task_vectors)
    masks = jax.tree_util.tree_map(lambda tau, p: jnp.where(p, tau > 0, tau < 0), task_vectors, positive)
    unified = jax.tree_util.tree_map(_unified, task_vectors, masks, positive)
    masked = jax.tree_util.tree_map(lambda u, m: jnp.where(m, u, 0), unified, masks)
    kept = _tensor_means(masked, layered)
    rescalers = jnp.where(kept > 0, _tensor_means(task_vectors, layered) / jnp.where(kept > 0, kept, 1), 1)
    return EmrParts(unified, masks, rescalers)


def emr_parts(task_vectors: PyTree, stacked: Callable[[str], bool] | None = None) -> EmrParts:
    """Elect, mask and rescale (module docstring): τ_uni, the masks m_t and the rescalers s_t.

    `stacked` tells which leaves stack L layers on their leading axis (each layer is one tensor of the
    rescalers' per-tensor means; the binding's predicate, or `layers_from_view`). A task whose mask keeps
    nothing has s_t = 1 (its model is θ0; the authors' code divides by zero there).
    """
    num_tasks(task_vectors)
    is_stacked = stacked or (lambda path: False)
    return _emr_parts(task_vectors, tuple(is_stacked(path) for path in leaf_paths(task_vectors)))


@jax.jit
def emr_task_model(pretrained: PyTree, parts: EmrParts, task: int | jax.Array) -> PyTree:
    """Task t's model θ_t = θ0 + s_t · m_t ⊙ τ_uni."""
    scale = parts.rescalers[task]
    return add_to_pretrained(pretrained, jax.tree_util.tree_map(
        lambda u, m: scale * jnp.where(m[task], u, 0).astype(scale.dtype), parts.unified, parts.masks))


@jax.jit
def emr_unified_model(pretrained: PyTree, parts: EmrParts) -> PyTree:
    """The unified model θ0 + τ_uni (no task's mask or rescaler)."""
    return add_to_pretrained(pretrained, parts.unified)


@dataclasses.dataclass(frozen=True)
class EmrModels:
    """EMR-Merging's per-task models, built on demand: ``models(t)`` is θ_t (None for a task it did not merge)."""

    pretrained: PyTree
    parts: EmrParts

    def __call__(self, task: int) -> PyTree | None:
        return emr_task_model(self.pretrained, self.parts, task) if task < self.parts.rescalers.shape[0] else None

    @property
    def unified(self) -> PyTree:
        """θ0 + τ_uni."""
        return emr_unified_model(self.pretrained, self.parts)


def emr_merging(pretrained: PyTree, task_vectors: PyTree, stacked: Callable[[str], bool] | None = None) -> EmrModels:
    """EMR-Merging's per-task models of θ0 and the stacked τ (module docstring)."""
    check_stacked(pretrained, task_vectors)
    return EmrModels(pretrained, emr_parts(task_vectors, stacked))
