"""Model Stock (Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024): the
average of the fine-tuned models pulled towards the pretrained anchor, per tensor, by how far apart the task
vectors point.

For each tensor of the checkpoint (a stacked leaf is one tensor per layer, `core.per_tensor`):

    cos φ_ij = ⟨τ_i, τ_j⟩ / (‖τ_i‖ ‖τ_j‖ + ε),   φ̄ = mean_{i<j} arccos(clip(cos φ_ij, −1, 1))
    t = K cos φ̄ / ((K − 1) cos φ̄ + 1 + ε)                                          (ε = 1e-8)
    θ = t · (1/K) Σ_k θ_k + (1 − t) · θ0 = θ0 + t · (1/K) Σ_k τ_k

Every tensor gets its t (matrices, biases, norms, embeddings alike); an ignored leaf (FusionBench's
``ignore_keys``) is the plain average of the fine-tuned models, t = 1. The angles are averaged, not the cosines,
as FusionBench's ModelStock does for K > 2 (for K = 2 the two agree). FusionBench computes the cosines in
float32 whatever the model's dtype; here they run in the task vectors' accumulation dtype (float32, or float64).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.matrix_view import MatrixView
from adamerging_jax.core.parameters import Parameter
from adamerging_jax.core.per_tensor import layered_leaves, map_tensors
from adamerging_jax.core.task_vectors import add_to_pretrained, check_stacked
from adamerging_jax.core.trees import PyTree, accumulation_dtype, leaf_paths

EPSILON = 1e-8
PAPER = "Jang, Yun and Han, Model Stock: All we need is just a few fine-tuned models, ECCV 2024"


def leaf_path_list(value: Any) -> tuple[str, ...]:
    """A leaf path or a list of leaf paths as a tuple; anything else is refused."""
    paths = (value,) if isinstance(value, str) else value
    if not isinstance(paths, (list, tuple)) or not all(isinstance(path, str) for path in paths):
        raise ValueError(f"must be a leaf path or a list of leaf paths ('a/b/c'), got {value!r}")
    return tuple(paths)


PARAMETERS = (Parameter("ignore", (), "leaf paths merged as the plain average of the fine-tuned models (FusionBench's "
                        "ignore_keys)", convert=leaf_path_list),)


def interpolation_ratio(task_vectors: jax.Array) -> jax.Array:
    """t of one tensor from its task vectors [K, ...] (module docstring); a scalar in the accumulation dtype."""
    k = task_vectors.shape[0]
    flat = task_vectors.reshape(k, -1).astype(accumulation_dtype(task_vectors.dtype))
    inner = flat @ flat.T
    squared_norms = jnp.diag(inner)
    cosines = inner / (jnp.sqrt(squared_norms[:, None] * squared_norms[None, :]) + EPSILON)
    first, second = np.triu_indices(k, 1)
    mean_angle = jnp.mean(jnp.arccos(jnp.clip(cosines[first, second], -1.0, 1.0)))
    cosine = jnp.cos(mean_angle)
    return k * cosine / ((k - 1) * cosine + 1 + EPSILON)


@partial(jax.jit, static_argnames=("layered", "ignored"))
def _model_stock(pretrained: PyTree, task_vectors: PyTree, layered: tuple[bool, ...],
                 ignored: tuple[bool, ...]) -> PyTree:
    ratios = map_tensors(lambda tau, theta: interpolation_ratio(tau), pretrained, task_vectors, layered)

    def pulled_average(tau: jax.Array, ratio: jax.Array, skip: bool) -> jax.Array:
        average = jnp.mean(tau.astype(accumulation_dtype(tau.dtype)), axis=0)
        return average if skip else ratio.reshape(ratio.shape + (1,) * (average.ndim - ratio.ndim)) * average

    taus, treedef = jax.tree_util.tree_flatten(task_vectors)
    deltas = [pulled_average(tau, ratio, skip)
              for tau, ratio, skip in zip(taus, jax.tree_util.tree_leaves(ratios), ignored)]
    return add_to_pretrained(pretrained, jax.tree_util.tree_unflatten(treedef, deltas))


def model_stock(pretrained: PyTree, task_vectors: PyTree, ignore: tuple[str, ...] = (),
                view: MatrixView | None = None) -> PyTree:
    """Model Stock's merged θ (module docstring) for K ≥ 2 task vectors, in θ0's dtypes.

    Args:
      ignore: leaf paths (``"a/b/c"``) merged as the plain average of the fine-tuned models.
      view: the binding's matrix view, read for which leaves stack layers (each layer is one tensor with its
        own t); None: every leaf is one tensor.
    """
    k = check_stacked(pretrained, task_vectors)
    if k < 2:
        raise ValueError(f"method 'model_stock' needs at least 2 task vectors (angles between them); got K = {k}")
    paths = leaf_paths(pretrained)
    unknown = sorted(set(ignore) - set(paths))
    if unknown:
        raise ValueError(f"method 'model_stock': parameter 'ignore' names leaves the tree does not have: {unknown}; "
                         f"its leaves: {paths}")
    ignored = tuple(path in ignore for path in paths)
    return _model_stock(pretrained, task_vectors, layered_leaves(view, pretrained), ignored)
