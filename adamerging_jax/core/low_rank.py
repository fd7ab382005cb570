"""Factored (low-rank) task vectors: τ_k = s_k (B_k A_k)ᵀ kept as its factors inside the merge.

A LoRA adapter (Hu et al., ICLR 2022) changes a kernel W [in, out] (our layout; torch's Linear weight
transposed) by τ = s · (B A)ᵀ with A [r, in], B [out, r] and a scale s (α / r, or α / √r with rsLoRA). With K
adapters, the merge θ = θ0 + Σ_k λ_k τ_k needs only

    Σ_k λ_k s_k (B_k A_k)ᵀ = Ãᵀ B̃ᵀ,  Ã = [λ_1 s_1 A_1; …; λ_K s_K A_K] [K r, in],  B̃ = [B_1 … B_K] [out, K r]

one contraction over (k, r) that forms only the in × out result: the factors cost K·r·(in + out) numbers per
kernel instead of the K·in·out of the dense τ, and the λ-gradient contracts the output's gradient with the
factors the same way (∂/∂λ_k = s_k ⟨G, A_kᵀ B_kᵀ⟩).

In a task-vector tree (θ0's structure, see `core.task_vectors`) a leaf is either a dense `[K, *shape]` array
or a `LoraFactors` standing for it; `core.merge.merge` and the AdaMerging optimiser take both. A leaf that no
adapter touches keeps a zero τ entry (`zero_task_vector`): zero-rank factors for a matrix (r = 0, nothing
stored), dense zeros for a small vector leaf (a norm gain, a bias). Every θ0 leaf thus keeps one τ entry and
the coefficient layout is the one of the dense tree (the λ of a zero τ gets a zero gradient). Leading axes between K and the
kernel (e.g. the L layers of a `lax.scan`-stacked leaf) carry one λ each under layer-wise granularity.
This module is model-agnostic: `models.lora` builds the factors from PEFT adapters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.trees import PyTree, path_str


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """The K adapters' factors of one kernel leaf [*lead, in, out] (lead: e.g. the L stacked layers):
    a [K, *lead, r, in], b [K, *lead, out, r], scale [K, *lead] (zero where an adapter leaves the leaf or a
    layer alone). A pytree: every field is a leaf. ``shape`` and ``ndim`` are those of the dense stacked τ
    leaf the factors stand for, [K, *lead, in, out]."""

    a: jax.Array
    b: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return (*np.shape(self.a)[:-2], np.shape(self.a)[-1], np.shape(self.b)[-2])

    @property
    def ndim(self) -> int:
        return len(self.shape)


def is_factors(node: Any) -> bool:
    """True for a `LoraFactors` node (the ``is_leaf`` of a task-vector tree)."""
    return isinstance(node, LoraFactors)


def empty_factors(leaf_shape: tuple[int, ...], num_tasks: int, dtype: Any = jnp.float32) -> LoraFactors:
    """Zero-rank factors of a kernel leaf [*lead, in, out] for K tasks: τ = 0 at no memory cost."""
    *lead, d_in, d_out = leaf_shape
    return LoraFactors(jnp.zeros((num_tasks, *lead, 0, d_in), dtype), jnp.zeros((num_tasks, *lead, d_out, 0), dtype),
                       jnp.zeros((num_tasks, *lead), jnp.float32))


def zero_task_vector(leaf_shape: tuple[int, ...], num_tasks: int, lead: int = 0, dtype: Any = jnp.float32) -> Any:
    """The zero τ of a leaf no adapter touches, given ``lead`` leading axes that carry their own λ (1 for a
    stacked leaf [L, ...]): zero-rank factors when the rest is a matrix (no memory), else dense zeros
    [K, *leaf_shape] (vectors such as norm gains and biases: K times a small leaf)."""
    if len(leaf_shape) - lead >= 2:
        return empty_factors(tuple(leaf_shape), num_tasks, dtype)
    return jnp.zeros((num_tasks, *leaf_shape), dtype)


def check_factors(name: str, factors: LoraFactors) -> None:
    """Raise a ValueError naming leaf ``name`` when a, b and scale do not fit together: a [K, *lead, r, in],
    b [K, *lead, out, r], scale [K, *lead]."""
    a, b, scale = (tuple(np.shape(x)) for x in (factors.a, factors.b, factors.scale))
    if len(a) < 3 or len(b) != len(a) or scale != a[:-2] or b[:-2] != a[:-2] or b[-1] != a[-2]:
        raise ValueError(f"leaf {name!r}: LoRA factors a {a}, b {b}, scale {scale} are not a [K, *lead, r, in], "
                         "b [K, *lead, out, r], scale [K, *lead]")


def shape_view(task_vectors: PyTree) -> PyTree:
    """``task_vectors`` with every `LoraFactors` replaced by a `jax.ShapeDtypeStruct` of the dense leaf it
    stands for (for checks that read only paths and shapes); the factors are checked on the way."""

    def view(path, node):
        if not is_factors(node):
            return node
        check_factors(path_str(path), node)
        return jax.ShapeDtypeStruct(node.shape, jnp.result_type(node.a))

    return jax.tree_util.tree_map_with_path(view, task_vectors, is_leaf=is_factors)


def cast_task_vectors(task_vectors: PyTree, dtype: Any) -> PyTree:
    """Dense τ leaves and the factors a, b cast to the storage ``dtype`` (e.g. bfloat16); each factor's scale
    keeps its dtype (K·(L) numbers, and α/√r is not exact in bfloat16)."""

    def cast(node):
        if is_factors(node):
            return LoraFactors(jnp.asarray(node.a, dtype), jnp.asarray(node.b, dtype), node.scale)
        return jnp.asarray(node, dtype)

    return jax.tree_util.tree_map(cast, task_vectors, is_leaf=is_factors)


def low_rank_weighted_sum(lam: jax.Array, factors: LoraFactors) -> jax.Array:
    """Σ_k λ_k s_k (B_k A_k)ᵀ, [*lead, in, out], as one contraction over (k, r) (module docstring): the K dense
    matrices are never formed. ``lam`` is [K] (one λ per task) or [K, *lead] (e.g. one per task per layer);
    the contraction runs in the factors' dtype at full precision."""
    lead = factors.scale.ndim - 1
    lam = jnp.asarray(lam, factors.scale.dtype)
    if lam.shape not in (factors.scale.shape, factors.scale.shape[:1]):
        raise ValueError(f"λ of shape {lam.shape} does not fit factors with scale {factors.scale.shape}")
    lam = lam.reshape(lam.shape + (1,) * (factors.scale.ndim - lam.ndim))
    weight = (lam * factors.scale).astype(factors.a.dtype)
    scaled_a = weight[..., None, None] * factors.a
    axes = "lmnpq"[:lead]
    return jnp.einsum(f"k{axes}ri,k{axes}or->{axes}io", scaled_a, factors.b, precision=jax.lax.Precision.HIGHEST)


def factored_sizes(factors: Mapping[str, LoraFactors]) -> tuple[int, int]:
    """(numbers held by the factors, K·r·(in + out) per kernel and lead index at the padded rank; numbers the
    dense τ of the same leaves would hold, K·in·out per kernel and lead index)."""
    held = sum(f.a.size + f.b.size for f in factors.values())
    dense = sum(int(np.prod(f.shape)) for f in factors.values())
    return int(held), int(dense)
