"""MagMax (Marczak, Twardowski, Trzciński and Cygert, "MagMax: Leveraging Model Merging for Seamless Continual
Learning", ECCV 2024): per parameter entry, the task vector of largest magnitude.

    τ_max[j] = τ_{k*(j)}[j],   k*(j) = argmax_k |τ_k[j]|   (ties: the later task, the authors' ``>=`` fold)
    θ = θ0 + s · τ_max

Elementwise on every leaf; the default s = 0.5 is the authors' 8-dataset setting (FusionBench's default).
"""

from __future__ import annotations

from functools import reduce

import jax
import jax.numpy as jnp

from adamerging_jax.core.parameters import Parameter
from adamerging_jax.core.task_vectors import add_to_pretrained, check_stacked
from adamerging_jax.core.trees import PyTree, accumulation_dtype

PAPER = ("Marczak, Twardowski, Trzciński and Cygert, MagMax: Leveraging Model Merging for Seamless Continual "
         "Learning, ECCV 2024")
PARAMETERS = (Parameter("scale", 0.5, "s applied to the largest-magnitude task vector"),)


def largest_magnitude(task_vectors: jax.Array) -> jax.Array:
    """τ_max of one stacked leaf [K, ...] → [...]: folding the tasks in order, a task replaces the running choice
    where its magnitude is at least as large."""
    tasks = [task_vectors[k] for k in range(task_vectors.shape[0])]
    return reduce(lambda chosen, tau: jnp.where(jnp.abs(tau) >= jnp.abs(chosen), tau, chosen), tasks)


@jax.jit
def magmax(pretrained: PyTree, task_vectors: PyTree, scale: float = 0.5) -> PyTree:
    """θ = θ0 + s · τ_max (module docstring), in θ0's dtypes."""
    check_stacked(pretrained, task_vectors)
    scaled = lambda tau: scale * largest_magnitude(tau).astype(accumulation_dtype(tau.dtype))  # noqa: E731
    return add_to_pretrained(pretrained, jax.tree_util.tree_map(scaled, task_vectors))
