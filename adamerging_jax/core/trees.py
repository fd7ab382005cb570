"""Pytree helpers shared by the core: leaf paths as strings and structure checks that name the leaf at fault."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def path_str(path: tuple) -> str:
    """A key path from `jax.tree_util.tree_flatten_with_path` as "a/b/0/c"."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts)


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """(path string, leaf) for every leaf, in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(path), leaf) for path, leaf in flat]


def leaf_paths(tree: PyTree) -> list[str]:
    return [name for name, _ in named_leaves(tree)]


def map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """`jax.tree_util.tree_map_with_path` with the path given as a string."""
    return jax.tree_util.tree_map_with_path(lambda p, *xs: fn(path_str(p), *xs), tree, *rest)


def stack_trees(trees: list[PyTree]) -> PyTree:
    """Equal-structured, equal-shaped trees (e.g. K tasks' batches) as one tree of stacked [len(trees), ...]
    leaves."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def is_float_dtype(dtype: Any) -> bool:
    return jnp.issubdtype(np.dtype(dtype), jnp.floating)


def accumulation_dtype(*dtypes: Any) -> np.dtype:
    """The dtype arithmetic on these dtypes runs in: their promotion with float32, i.e. at least float32.

    bf16 / fp16 / fp32 inputs give float32, float64 inputs give float64 (only present when
    ``jax_enable_x64`` is on), so sums over tasks lose nothing to a narrow storage dtype and float64 is
    never silently rounded to float32.
    """
    acc = np.dtype(jnp.float32)
    for dtype in dtypes:
        acc = jnp.promote_types(acc, dtype)
    return acc


def check_same_structure(reference: PyTree, other: PyTree, what: str) -> None:
    """Raise a ValueError naming the leaves present in one tree and not the other."""
    ref_paths, other_paths = leaf_paths(reference), leaf_paths(other)
    if ref_paths == other_paths and jax.tree_util.tree_structure(reference) == jax.tree_util.tree_structure(other):
        return
    missing = [p for p in ref_paths if p not in set(other_paths)]
    extra = [p for p in other_paths if p not in set(ref_paths)]
    details = []
    if missing:
        details.append(f"missing leaves {_preview(missing)}")
    if extra:
        details.append(f"unexpected leaves {_preview(extra)}")
    if not details:
        details.append("same leaf paths but a different container structure or order")
    raise ValueError(f"{what} does not have the structure of the pretrained tree: " + "; ".join(details))


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)} in all)"


def jsonable(value: Any) -> Any:
    """`value` as JSON: mappings, lists, tuples and scalars kept (tuples as lists), anything else (a callable, an
    optax optimizer, a named tuple) by its name."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return getattr(value, "__qualname__", None) or type(value).__qualname__


def check_int(where: str, value: Any, minimum: int) -> None:
    """A settings field that must be an integer ≥ `minimum`: TypeError or ValueError naming `where`."""
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{where} must be >= {minimum}, got {value!r}")


def check_number(where: str, value: Any, positive: bool = False) -> None:
    """A settings field that must be a finite real number (> 0 when `positive`): TypeError or ValueError."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{where} must be a finite number{' > 0' if positive else ''}, got {value!r}")



def check_float_dtype(where: str, dtype: Any) -> None:
    """A dtype argument that must name a floating dtype: TypeError naming `where` for anything else."""
    try:
        valid = is_float_dtype(jnp.dtype(dtype))
    except TypeError:
        valid = False
    if not valid:
        raise TypeError(f"{where} must be a floating dtype such as 'float32' or jnp.bfloat16, got {dtype!r}")


def check_array_leaves(where: str, tree: PyTree) -> None:
    """Every leaf of `tree` is an array (numpy or JAX, anything with a shape and a dtype): TypeError naming the
    first leaf that is a Python number, string or other object (a Python list of values is a subtree of such
    leaves: convert it with ``np.asarray``)."""
    for path, leaf in named_leaves(tree):
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise TypeError(f"{where}: leaf {path!r} is a {type(leaf).__name__}, not an array (give numpy or JAX "
                            "arrays; a Python list of values becomes one with np.asarray)")
