"""Merging coefficients λ and their granularity (AdaMerging, Yang et al., ICLR 2024, §3.2).

θ = θ0 + Σ_k λ_k ⊙ τ_k, where λ is shared at one of several granularities:

- ``"task"``: task-wise AdaMerging, K scalars λ_k shared by every leaf;
- ``"layer"``: layer-wise AdaMerging, one λ_{k,l} per task and per leaf (one "layer" is one tensor: weight and
  bias are separate, as in the paper); a leaf that stacks L layers for `lax.scan` gets `[K, L]`, so the
  count of coefficients is the same as for the unstacked model;
- a callable ``path -> group name``: one λ per task per group of leaves (e.g. one per transformer block).

`Coefficients` is a pytree: its trainable leaves are the arrays in ``values`` (one `[K]` or `[K, L]` array
per group), and the leaf→group assignment is static metadata, so `optax` updates it like any parameter tree
and `merge` knows which coefficient scales which leaf.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Literal, Union

import jax
import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.low_rank import shape_view
from adamerging_jax.core.trees import PyTree, accumulation_dtype, check_array_leaves, check_int, named_leaves

Granularity = Union[Literal["task", "layer"], Callable[[str], str]]
TASK_GROUP = "*"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Coefficients:
    """Trainable merge coefficients.

    Attributes:
      values: group name → λ of shape `[K]` (one scalar per task) or `[K, L]` (one per task and stacked layer).
      leaf_groups: static `(leaf path, group name)` for every leaf of the tree it merges, in flattening order.
    """

    values: dict[str, jax.Array]
    leaf_groups: tuple[tuple[str, str], ...] = dataclasses.field(metadata=dict(static=True))

    @property
    def num_tasks(self) -> int:
        return int(next(iter(self.values.values())).shape[0])

    def for_leaf(self, path: str) -> jax.Array:
        """λ for one leaf: `[K]` or `[K, L]`."""
        return self.values[dict(self.leaf_groups)[path]]

    def per_leaf(self) -> dict[str, np.ndarray]:
        """λ of every leaf as numpy, keyed by leaf path (for reports and heatmaps)."""
        return {path: np.asarray(self.values[group]) for path, group in self.leaf_groups}


def coefficient_dtype(leaves: Iterable[Any]) -> np.dtype:
    """λ's dtype for parameters with these leaves: float64 when a leaf is float64 and ``jax_enable_x64`` is on,
    else float32 (bf16 / fp16 / fp32 parameters train float32 λ, as the merge accumulates in float32)."""
    return jax.dtypes.canonicalize_dtype(accumulation_dtype(*(jnp.result_type(leaf) for leaf in leaves)))


def init_coefficients(
    pretrained: PyTree,
    num_tasks: int,
    granularity: Granularity = "layer",
    value: float | np.ndarray = 0.3,
    stacked: Callable[[str], bool] | None = None,
) -> Coefficients:
    """Initial λ (0.3 for every task by default: the task-arithmetic prior of the paper).

    Args:
      pretrained: θ0 (or any tree with its structure); only leaf paths and shapes are read.
      num_tasks: K ≥ 1.
      granularity: ``"task"``, ``"layer"`` or a function from leaf path to group name.
      value: initial λ, a scalar or a length-K vector (e.g. 1/K for weight averaging); stored in
        `coefficient_dtype` of θ0's leaves (float32, or float64 for float64 θ0 under ``jax_enable_x64``).
      stacked: predicate on leaf path telling which leaves stack L layers on their leading axis; such leaves
        get one λ per layer (`[K, L]`) under ``"layer"`` and under a grouping whose group holds only stacked
        leaves of the same L. Ignored by ``"task"``.
    """
    check_int("init_coefficients: num_tasks", num_tasks, minimum=1)
    named = named_leaves(pretrained)
    if not named:
        raise ValueError("the pretrained tree has no leaves")
    check_array_leaves("init_coefficients: pretrained", pretrained)
    dtype = coefficient_dtype(leaf for _, leaf in named)
    init = _initial_values(value, num_tasks, dtype)
    is_stacked = stacked or (lambda path: False)

    if granularity == "task":
        leaf_groups = tuple((path, TASK_GROUP) for path, _ in named)
        return Coefficients({TASK_GROUP: jnp.asarray(init)}, leaf_groups)
    if granularity == "layer":
        group_of = lambda path: path  # noqa: E731
    elif callable(granularity):
        group_of = granularity
    else:
        raise ValueError(f"granularity must be 'task', 'layer' or a callable path -> group, got {granularity!r}")

    leaf_groups = tuple((path, str(group_of(path))) for path, _ in named)
    layers_per_group: dict[str, set] = {}
    for (path, leaf), (_, group) in zip(named, leaf_groups):
        layers_per_group.setdefault(group, set()).add(int(leaf.shape[0]) if is_stacked(path) else None)
    values = {}
    for group, layer_counts in layers_per_group.items():
        (count,) = layer_counts if len(layer_counts) == 1 else (None,)
        values[group] = jnp.asarray(init if count is None else np.repeat(init[:, None], count, axis=1))
    return Coefficients(values, leaf_groups)


def _initial_values(value: Any, num_tasks: int, dtype: np.dtype) -> np.ndarray:
    """The K initial λ of ``value`` (a number or K numbers), each finite; TypeError / ValueError naming
    ``value`` and the task."""
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"init_coefficients: value must be a number or {num_tasks} numbers, got {value!r}")
    init = np.broadcast_to(array.astype(dtype), (num_tasks,)) if array.ndim == 0 else array.astype(dtype)
    if init.shape != (num_tasks,):
        raise ValueError(f"value must be a scalar or have shape ({num_tasks},), got {init.shape}")
    if not np.isfinite(init).all():
        task = int(np.argmin(np.isfinite(init)))
        raise ValueError(f"init_coefficients: value for task {task} is {init[task]}; λ must be finite")
    return init


def check_coefficients(coefficients: Coefficients, stacked_task_vectors: PyTree) -> None:
    """Raise a ValueError when λ was made for another tree, another K, or has the wrong shape for a leaf (a
    `LoraFactors` leaf is read as the dense `[K, *shape]` it stands for)."""
    if not isinstance(coefficients, Coefficients):
        raise TypeError(f"coefficients must be a Coefficients (see init_coefficients), got {type(coefficients).__name__}")
    named = named_leaves(shape_view(stacked_task_vectors))
    paths = [p for p, _ in named]
    coefficient_paths = [p for p, _ in coefficients.leaf_groups]
    if paths != coefficient_paths:
        missing = sorted(set(paths) - set(coefficient_paths))
        extra = sorted(set(coefficient_paths) - set(paths))
        raise ValueError(
            "coefficients were made for another tree: "
            f"leaves without a coefficient {missing[:5]}, coefficients for unknown leaves {extra[:5]}"
        )
    for path, tau in named:
        lam = coefficients.for_leaf(path)
        if lam.shape[0] != tau.shape[0]:
            raise ValueError(f"leaf {path!r}: coefficients hold K = {lam.shape[0]} tasks, task vectors K = {tau.shape[0]}")
        if lam.ndim == 2 and (tau.ndim < 2 or tau.shape[1] != lam.shape[1]):
            raise ValueError(
                f"leaf {path!r}: per-layer coefficients of shape {lam.shape} need a stacked leaf [K, {lam.shape[1]}, ...], "
                f"task vector has shape {tau.shape}"
            )
        if lam.ndim not in (1, 2):
            raise ValueError(f"leaf {path!r}: coefficients must be [K] or [K, L], got shape {lam.shape}")
