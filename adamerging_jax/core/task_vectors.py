"""Task vectors: τ_k = θ_k − θ0 (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

The K task vectors are kept *stacked*: one tree with the structure of θ0 whose leaves have shape
`[K, *leaf.shape]`. Every merge method and the AdaMerging optimiser act on this layout, so a merge is one
`tree_map` with a reduction over the leading axis. A leaf may also be `LoraFactors` standing for its dense
`[K, *leaf.shape]` (`core.low_rank`): `num_tasks` and `check_stacked` read the shape the factors stand for.
"""

from __future__ import annotations

from functools import partial
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.low_rank import shape_view
from adamerging_jax.core.trees import (
    PyTree,
    accumulation_dtype,
    check_array_leaves,
    check_float_dtype,
    check_same_structure,
    is_float_dtype,
    named_leaves,
)


def task_vectors(pretrained: PyTree, finetuned: Sequence[PyTree], *, dtype=None, check_finite: bool = True) -> PyTree:
    """Stacked task vectors τ[k] = θ_k − θ0 for every leaf.

    Args:
      pretrained: θ0, any pytree of floating-point arrays.
      finetuned: the K fine-tuned trees θ_1..θ_K, each with θ0's structure, shapes and dtypes.
      dtype: storage dtype of τ (default: θ0's dtype per leaf); e.g. `jnp.bfloat16` halves memory.
      check_finite: reject a τ holding NaN or inf (one more jitted pass over the values).

    Returns:
      A tree with θ0's structure whose leaves are `[K, *leaf.shape]`.

    Raises:
      ValueError naming the leaf (and fine-tuned model index) whose structure, shape, dtype or values are
      wrong, or when K = 0. Integer leaves are rejected: keep buffers such as step counters or BatchNorm
      statistics out of the tree that is merged. TypeError naming the argument: one tree where the sequence
      of fine-tuned trees belongs, a leaf that is not an array, a dtype that is not floating.
    """
    if isinstance(finetuned, Mapping) or not isinstance(finetuned, Iterable):
        raise TypeError(f"task_vectors: finetuned must be a sequence of fine-tuned trees (one per task), got a "
                        f"{type(finetuned).__name__}")
    if dtype is not None:
        check_float_dtype("task_vectors: dtype", dtype)
    finetuned = list(finetuned)
    if not finetuned:
        raise ValueError("task_vectors needs at least one fine-tuned model (K = 0)")
    check_array_leaves("task_vectors: pretrained", pretrained)
    for k, tree in enumerate(finetuned):
        check_array_leaves(f"task_vectors: fine-tuned model {k}", tree)
    pre_named = named_leaves(pretrained)
    for name, leaf in pre_named:
        if not is_float_dtype(jnp.result_type(leaf)):
            raise ValueError(
                f"leaf {name!r} of the pretrained tree has non-float dtype {leaf.dtype}; task vectors are "
                "defined for floating-point parameters only: remove integer buffers from the tree to merge"
            )
    for k, tree in enumerate(finetuned):
        check_same_structure(pretrained, tree, f"fine-tuned model {k}")
        for (name, ref), (_, leaf) in zip(pre_named, named_leaves(tree)):
            if tuple(leaf.shape) != tuple(ref.shape):
                raise ValueError(
                    f"leaf {name!r}: fine-tuned model {k} has shape {tuple(leaf.shape)}, pretrained has {tuple(ref.shape)}"
                )
            if leaf.dtype != ref.dtype:
                raise ValueError(f"leaf {name!r}: fine-tuned model {k} has dtype {leaf.dtype}, pretrained has {ref.dtype}")

    stacked = _stack_differences(pretrained, tuple(finetuned), dtype)
    if check_finite:
        check_task_vectors_finite(stacked)
    return stacked


@partial(jax.jit, static_argnums=2)
def _stack_differences(pretrained: PyTree, finetuned: tuple, dtype) -> PyTree:
    """τ leaves `[K, ...]`, the differences taken in at least float32; one compiled program for the tree."""

    def stack(theta0, *thetas):
        acc = accumulation_dtype(theta0.dtype)
        return jnp.stack([t.astype(acc) - theta0.astype(acc) for t in thetas]).astype(dtype or theta0.dtype)

    return jax.tree_util.tree_map(stack, pretrained, *finetuned)


@jax.jit
def _finite_per_task(stacked: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda leaf: jnp.all(jnp.isfinite(leaf).reshape(leaf.shape[0], -1), axis=1), stacked)


def check_task_vectors_finite(stacked: PyTree) -> None:
    """Raise a ValueError naming the leaf and task index of the first NaN or inf in stacked task vectors."""
    flags = jax.device_get(_finite_per_task(stacked))
    for (name, _), finite in zip(named_leaves(stacked), jax.tree_util.tree_leaves(flags)):
        finite = np.asarray(finite)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise ValueError(f"task vector of task {bad} has NaN or inf values in leaf {name!r}")


def num_tasks(stacked: PyTree) -> int:
    """K, the length of the leading axis shared by every leaf of stacked task vectors.

    Raises:
      ValueError naming the first leaf that is a scalar or whose leading axis differs from the first leaf's
      (or LoRA factors whose a, b and scale do not fit together).
    """
    named = named_leaves(shape_view(stacked))
    if not named:
        raise ValueError("the task-vector tree has no leaves")
    first_name, first_leaf = named[0]
    for name, leaf in named:
        shape = tuple(np.shape(leaf))
        if not shape:
            raise ValueError(f"leaf {name!r} of the task vectors is a scalar; task vectors are stacked [K, *leaf.shape]")
        if shape[0] != np.shape(first_leaf)[0]:
            raise ValueError(
                f"leaf {name!r} of the task vectors has leading axis {shape[0]} (shape {shape}), expected "
                f"K = {np.shape(first_leaf)[0]} as in leaf {first_name!r} (task vectors are stacked [K, *leaf.shape])"
            )
    return int(np.shape(first_leaf)[0])


def check_stacked(pretrained: PyTree, task_vectors: PyTree) -> int:
    """Check that `task_vectors` are stacked for `pretrained` and return K.

    The contract every merge relies on: the two trees have the same structure, and every task-vector leaf
    has shape `[K, *θ0_leaf.shape]` with one K for the whole tree. Checking only the leading axis is not
    enough: a τ leaf `[K, 1, 3]` for a θ0 leaf `[2, 3]` broadcasts in θ0 + Σ_k λ_k τ_k, and an unstacked tree
    whose leading axis happens to equal K passes for K stacked tasks; both give a wrong merged model.
    Only shapes are read, so the check costs nothing under `jit` (it runs once, at trace time).

    Raises:
      ValueError naming the leaf and both shapes (or the leaves missing from one tree, or the leaf whose
      leading axis is not K).
    """
    view = shape_view(task_vectors)
    check_same_structure(pretrained, view, "the task-vector tree")
    k = num_tasks(task_vectors)
    for (name, theta0), (_, tau) in zip(named_leaves(pretrained), named_leaves(view)):
        expected = (k, *np.shape(theta0))
        if tuple(np.shape(tau)) != expected:
            raise ValueError(
                f"leaf {name!r}: task vectors have shape {tuple(np.shape(tau))}, expected [K, *pretrained shape] = "
                f"{expected} for the pretrained shape {tuple(np.shape(theta0))} (task vectors are stacked "
                "[K, *leaf.shape], see task_vectors)"
            )
    return k


def add_to_pretrained(pretrained: PyTree, delta: PyTree) -> PyTree:
    """θ0 + δ leaf by leaf (δ unstacked, θ0's shapes), computed in at least float32 and cast to θ0's dtype."""

    def add(theta0, d):
        acc = accumulation_dtype(theta0.dtype, d.dtype)
        return (theta0.astype(acc) + d.astype(acc)).astype(theta0.dtype)

    return jax.tree_util.tree_map(add, pretrained, delta)
