"""SLERP of two fine-tuned models (Shoemake, "Animating Rotation with Quaternion Curves", SIGGRAPH 1985, as
model merging applies it): spherical interpolation of the two models' weights, tensor by tensor.

For each tensor (a stacked leaf is one tensor per layer, `core.per_tensor`), with θ_k = θ0 + τ_k:

    u_k = θ_k / ‖θ_k‖ (θ_k itself where ‖θ_k‖ ≤ ε),   d = ⟨u_1, u_2⟩,   Ω = arccos d
    θ = sin((1 − t) Ω) / sin Ω · θ_1 + sin(t Ω) / sin Ω · θ_2     where |d| ≤ dot_threshold
    θ = (1 − t) θ_1 + t θ_2                                        where |d| > dot_threshold (nearly collinear)

(and where sin Ω = 0, which only a dot_threshold of 1 lets through to the spherical branch).

t = 0 gives the first model, t = 1 the second. Defaults: t = 0.5, dot_threshold = 0.9995, ε = 1e-8
(FusionBench's slerp.yaml and SlerpMergeAlgorithm).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from adamerging_jax.core.matrix_view import MatrixView
from adamerging_jax.core.parameters import Parameter
from adamerging_jax.core.per_tensor import layered_leaves, map_tensors
from adamerging_jax.core.task_vectors import check_stacked
from adamerging_jax.core.trees import PyTree, accumulation_dtype

PAPER = "Shoemake, Animating Rotation with Quaternion Curves, SIGGRAPH 1985 (per tensor, between two fine-tuned models)"
PARAMETERS = (
    Parameter("t", 0.5, "interpolation factor: 0 the first model, 1 the second", minimum=0.0, maximum=1.0),
    Parameter("dot_threshold", 0.9995, "|cos Ω| above which a tensor is interpolated linearly", minimum=0.0,
              maximum=1.0),
    Parameter("epsilon", 1e-8, "a tensor whose norm is at most ε is not normalised", minimum=0.0),
)


def slerp_tensor(first: jax.Array, second: jax.Array, t: jax.Array, dot_threshold: jax.Array,
                 epsilon: jax.Array) -> jax.Array:
    """SLERP (lerp where nearly collinear) of two tensors of one shape (module docstring)."""

    def direction(v: jax.Array) -> jax.Array:
        norm = jnp.linalg.norm(v.ravel())
        return jnp.where(norm > epsilon, v / jnp.where(norm > epsilon, norm, 1), v)

    dot = jnp.sum(direction(first) * direction(second))
    angle = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
    sine = jnp.sin(angle)
    spherical = (jnp.sin(angle - angle * t) * first + jnp.sin(angle * t) * second) / jnp.where(sine > 0, sine, 1)
    linear = (1 - t) * first + t * second
    return jnp.where((jnp.abs(dot) > dot_threshold) | (sine == 0), linear, spherical)


@partial(jax.jit, static_argnames="layered")
def _slerp(pretrained: PyTree, task_vectors: PyTree, t: jax.Array, dot_threshold: jax.Array, epsilon: jax.Array,
           layered: tuple[bool, ...]) -> PyTree:
    def merged(tau: jax.Array, theta: jax.Array) -> jax.Array:
        acc = accumulation_dtype(theta.dtype, tau.dtype)
        models = theta.astype(acc) + tau.astype(acc)
        return slerp_tensor(models[0], models[1], t, dot_threshold, epsilon).astype(theta.dtype)

    return map_tensors(merged, pretrained, task_vectors, layered)


def slerp(pretrained: PyTree, task_vectors: PyTree, t: float = 0.5, dot_threshold: float = 0.9995,
          epsilon: float = 1e-8, view: MatrixView | None = None) -> PyTree:
    """SLERP of the two models θ0 + τ_1 and θ0 + τ_2 (module docstring), in θ0's dtypes.

    Args:
      view: the binding's matrix view, read for which leaves stack layers (each layer is one tensor); None:
        every leaf is one tensor.
    """
    k = check_stacked(pretrained, task_vectors)
    if k != 2:
        raise ValueError(f"method 'slerp' merges exactly 2 models; got K = {k} task vectors")
    return _slerp(pretrained, task_vectors, t, dot_threshold, epsilon, layered_leaves(view, pretrained))
