"""Merging coefficients λ by checkpoint tensor name, and the layouts other AdaMerging code reads and writes.

A `Coefficients` (``adamerging_jax.core.coefficients``) holds λ per group of leaves: `[K]`, or `[K, L]` for a
leaf that stacks L layers on axis 0. Checkpoints name tensors one per layer. A **tensor naming** bridges the
two: a mapping ``(leaf path, layer index or None) -> checkpoint tensor name`` covering every entry of the tree
(layer None for an unstacked leaf), given by the model's converter, e.g.
``adamerging_jax.models.clip_checkpoint.coefficient_tensor_names(config)`` for CLIP's image tower. Through it λ
becomes

    named[t] = λ[:, l] of the leaf and layer (p, l) named t   (λ[:] when the leaf's λ is [K])       ∈ R^K

for every tensor name t: one value per task, so task-wise λ give every tensor the same K values. Several
entries may share one name (a fused tensor, e.g. open_clip's q;k;v ``in_proj``); their λ must then agree.

Interchange layouts, both with the K task columns in the order of the task vectors:

- **FusionBench** (tanganke/fusion_bench, ``LayerWiseMergedModel``): ``merge_weight`` is a float tensor
  `[K, n]`, no row for the pretrained model, one column per parameter of the pretrained model in its
  ``named_parameters()`` order (the requires-grad ones: every parameter of a ``CLIPVisionModel``, 199 for
  ViT-B/32); θ = θ0 + Σ_k w[k, j] τ_k[j]. Saved with ``torch.save(tensor)`` (``save_merging_weights``)
  and read by ``load_tensor_from_file`` (``.pt`` / ``.pth`` through ``torch.load``, ``.np`` through numpy).
- **Official AdaMerging** (EnnengYang/AdaMerging, ``src/main_layer_wise_adamerging.py``): ``lambdas()`` is
  `[n, 1 + K]`, one row per tensor of the pretrained model's state dict in its order, column 0 the pretrained
  coefficient fixed at 1, then the K task values (θ_j = 1·θ0_j + Σ_k λ[j, 1+k] τ_k[j]). Its task-wise script
  uses a single row `[1, 1 + K]` shared by every tensor (``src/merging_cofficient.py`` lists both). An
  `OfficialRows` says what each row scales: for the official open_clip checkpoints the rows follow the
  task_vectors ImageEncoder's state dict (``models.clip_checkpoint.official_coefficient_rows``: 158 rows for
  ViT-B/32 and B/16, 302 for L/14), where one fused ``in_proj`` row scales the q, k and v tensors, six
  text-side rows are never trained (they hold the initial 0.3, which is checked, and are ignored), and the
  ``visual.proj`` row has no tensor in the merged image tower.

Named λ are stored as JSON (an object tensor name → list of K floats) or safetensors (tensor name → float32
`[K]`); all writes are atomic, and a λ that is NaN or inf is refused before anything is written (a JSON file
never holds ``NaN`` or ``Infinity``). Every λ read is checked the same way (`check_coefficients`), with a bound on
|λ| when the merge it feeds has no clamp; errors name the tensor (or row) and the task. Reading a ``.pt``
never runs pickled code (``models.torch_file``).
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Optional

import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.checkpoint import write_atomic, write_json_atomic
from adamerging_jax.core.coefficients import Coefficients
from adamerging_jax.data.strict_text import read_json_object

Entry = tuple[str, Optional[int]]  # (leaf path, layer index or None)
Named = dict[str, list[float]]
OFFICIAL_INITIAL_LAMBDA = 0.3
"""The official code's initial λ (``prior = 0.3``), which the rows it never trains keep."""


def check_coefficients(named: Mapping[str, Sequence[float]], tasks: Sequence[str] | None = None,
                  bound: float | None = None, what: str = "tensor") -> None:
    """Every λ finite and, when ``bound`` is given (a merge without a clamp), |λ| ≤ bound; ValueError naming
    the tensor (or ``what`` the name is) and the task (its name from ``tasks``, else its index)."""
    for name, values in named.items():
        for k, value in enumerate(values):
            value = float(value)
            if math.isfinite(value) and (bound is None or abs(value) <= bound):
                continue
            task = repr(tasks[k]) if tasks is not None and k < len(tasks) else str(k)
            beyond = f", beyond ±{bound:g} (lambda_bound, for a merge without a clamp)" if math.isfinite(value) else ""
            raise ValueError(f"{what} {name!r}: λ of task {task} is {value}{beyond}")


@dataclasses.dataclass(frozen=True)
class TensorNames(Mapping):
    """A tensor naming: (leaf path, layer or None) → checkpoint tensor name, plus ``order``, the checkpoint's
    own order of tensor names (e.g. torch ``named_parameters()``), which FusionBench's columns follow."""

    names: Mapping[Entry, str]
    order: tuple[str, ...]

    def __getitem__(self, entry: Entry) -> str:
        if entry not in self.names:
            path, layer = entry
            where = f"leaf {path!r}" + ("" if layer is None else f" layer {layer}")
            raise KeyError(f"no checkpoint tensor name for {where}")
        return self.names[entry]

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _entries_by_leaf(tensor_names: Mapping[Entry, str]) -> dict[str, list[tuple[Optional[int], str]]]:
    by_leaf: dict[str, list[tuple[Optional[int], str]]] = {}
    for (path, layer), name in tensor_names.items():
        by_leaf.setdefault(path, []).append((layer, name))
    return by_leaf


def _leaf_entries(path: str, lam_shape: tuple[int, ...], by_leaf: Mapping[str, list]
                  ) -> list[tuple[Optional[int], str]]:
    """The (layer, tensor name) entries of one leaf, checked against its λ: `[K, L]` needs layers 0..L−1."""
    if path not in by_leaf:
        raise KeyError(f"the tensor naming has no name for leaf {path!r}")
    entries = by_leaf[path]
    if len(lam_shape) == 2:
        layers = sorted(layer for layer, _ in entries if layer is not None)
        if layers != list(range(lam_shape[1])) or any(layer is None for layer, _ in entries):
            raise ValueError(f"leaf {path!r}: λ of shape {lam_shape} needs names for layers 0..{lam_shape[1] - 1}, "
                             f"the naming has layers {[layer for layer, _ in entries]}")
    return entries


def named_coefficients(coefficients: Coefficients, tensor_names: Mapping[Entry, str]) -> Named:
    """λ by checkpoint tensor name: tensor name → the K task values of its leaf and layer (see module doc).

    Raises KeyError naming a leaf the naming lacks, ValueError naming a tensor whose entries disagree.
    """
    by_leaf = _entries_by_leaf(tensor_names)
    named: Named = {}
    for path, group in coefficients.leaf_groups:
        lam = np.asarray(coefficients.values[group], np.float32)
        for layer, name in _leaf_entries(path, lam.shape, by_leaf):
            values = [float(v) for v in (lam[:, layer] if lam.ndim == 2 else lam)]
            if named.setdefault(name, values) != values:
                raise ValueError(f"tensor {name!r} is named by several entries whose λ differ: "
                                 f"{named[name]} and {values} (leaf {path!r})")
    return named


def coefficients_from_named(named: Mapping[str, Sequence[float]], like: Coefficients,
                            tensor_names: Mapping[Entry, str], *, tasks: Sequence[str] | None = None,
                            bound: float | None = None) -> Coefficients:
    """`Coefficients` shaped as ``like`` (same groups, leaves, K) holding the named values; the inverse of
    :func:`named_coefficients`, exact for float32 values.

    Every tensor of every leaf must be named, with K finite values (|λ| ≤ ``bound`` when given: `check_coefficients`,
    the task named from ``tasks``); all tensors that share one λ (a task-wise or grouped coefficient, a `[K]`
    λ on a stacked leaf) must carry the same values; names that no entry has are refused. Errors name the
    tensor.
    """
    check_coefficients(named, tasks, bound)
    by_leaf = _entries_by_leaf(tensor_names)
    num_tasks = like.num_tasks
    values = {group: np.zeros(np.shape(v), np.float32) for group, v in like.values.items()}
    source = {group: np.full(np.shape(v)[1:], "", dtype=object) for group, v in like.values.items()}
    used = set()
    for path, group in like.leaf_groups:
        target = values[group]
        for layer, name in _leaf_entries(path, target.shape, by_leaf):
            if name not in named:
                raise KeyError(f"no λ for tensor {name!r} (leaf {path!r})")
            given = np.asarray(named[name], np.float32)
            if given.shape != (num_tasks,):
                raise ValueError(f"tensor {name!r}: λ must hold K = {num_tasks} values, got shape {given.shape}")
            used.add(name)
            index = (slice(None), layer) if target.ndim == 2 else (slice(None),)
            slot = index[1:]
            if source[group][slot] and not np.array_equal(target[index], given):
                raise ValueError(f"tensor {name!r} has λ {given.tolist()} but {source[group][slot]!r}, which shares "
                                 f"its coefficient (group {group!r}), has {target[index].tolist()}")
            target[index], source[group][slot] = given, name
    if unknown := sorted(set(named) - used):
        raise ValueError(f"λ given for tensors the tree does not have: {unknown[:5]}")
    return Coefficients({g: jnp.asarray(v, like.values[g].dtype) for g, v in values.items()}, like.leaf_groups)


# ------------------------------------------------------------------------------------------- named files


def write_named_json(path: str | os.PathLike, named: Mapping[str, Sequence[float]]) -> None:
    """``named`` as a JSON object tensor name → list of K floats, written atomically; a NaN or inf λ is
    refused (naming the tensor and task) and nothing is written."""
    named = _checked(named, path)
    check_coefficients(named)
    write_json_atomic(path, {name: [float(v) for v in values] for name, values in named.items()})


def read_named_json(path: str | os.PathLike) -> Named:
    """The named λ of a :func:`write_named_json` file (UTF-8, one object, no tensor named twice)."""
    obj = read_json_object(path)
    for name, values in obj.items():
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values):
            raise ValueError(f"{os.fspath(path)!r}: tensor {name!r} must map to a list of numbers, got {values!r}")
    return _checked({name: [float(v) for v in values] for name, values in obj.items()}, path)


def write_named_safetensors(path: str | os.PathLike, named: Mapping[str, Sequence[float]]) -> None:
    """``named`` as a safetensors file, tensor name → float32 `[K]`, written atomically; a NaN or inf λ is
    refused as by :func:`write_named_json`."""
    from safetensors.numpy import save

    named = _checked(named, path)
    check_coefficients(named)
    arrays = {name: np.asarray(values, np.float32) for name, values in named.items()}
    write_atomic(path, save(arrays, metadata={"content": "adamerging_jax named lambdas"}))


def read_named_safetensors(path: str | os.PathLike) -> Named:
    """The named λ of a :func:`write_named_safetensors` file."""
    from safetensors.numpy import load_file

    try:
        arrays = load_file(os.fspath(path))
    except Exception as err:  # safetensors raises its own error type on a bad header
        raise ValueError(f"{os.fspath(path)!r} is not a readable safetensors file: {err}") from err
    for name, array in arrays.items():
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{os.fspath(path)!r}: tensor {name!r} must be a float vector [K], got "
                             f"{array.dtype} {array.shape}")
    return _checked({name: [float(v) for v in array] for name, array in arrays.items()}, path)


def _checked(named: Mapping[str, Sequence[float]], where: str | os.PathLike) -> Mapping[str, Sequence[float]]:
    """``named`` if it is non-empty and every tensor holds the same number K ≥ 1 of values."""
    if not named:
        raise ValueError(f"{os.fspath(where)!r}: no named λ")
    counts = {name: len(values) for name, values in named.items()}
    first = next(iter(counts))
    if bad := [name for name, count in counts.items() if count != counts[first] or count == 0]:
        raise ValueError(f"{os.fspath(where)!r}: tensor {bad[0]!r} holds {counts[bad[0]]} λ, "
                         f"{first!r} holds {counts[first]}")
    return named


# ----------------------------------------------------------------------------------------------- FusionBench


def to_fusionbench(coefficients: Coefficients, order: Sequence[str], tensor_names: Mapping[Entry, str]
                   ) -> np.ndarray:
    """FusionBench's layer-wise ``merge_weight``: float32 `[K, n]`, column j the λ of tensor ``order[j]``
    (the pretrained model's ``named_parameters()`` order, e.g. ``coefficient_tensor_names(config).order``)."""
    named = named_coefficients(coefficients, tensor_names)
    if missing := [name for name in order if name not in named]:
        raise KeyError(f"no λ for tensor {missing[0]!r} of the FusionBench order ({len(missing)} missing)")
    if extra := sorted(set(named) - set(order)):
        raise ValueError(f"tensors {extra[:5]} have λ but are not in the FusionBench order")
    return np.asarray([named[name] for name in order], np.float32).T


def from_fusionbench(array: np.ndarray, like: Coefficients, order: Sequence[str],
                     tensor_names: Mapping[Entry, str], *, tasks: Sequence[str] | None = None,
                     bound: float | None = None) -> Coefficients:
    """`Coefficients` shaped as ``like`` from FusionBench's `[K, n]` ``merge_weight`` (columns in ``order``;
    values checked as by :func:`coefficients_from_named`)."""
    array = np.asarray(array, np.float32)
    if array.shape != (like.num_tasks, len(order)):
        raise ValueError(f"FusionBench merge weights have shape {array.shape}, expected [K, n] = "
                         f"({like.num_tasks}, {len(order)})")
    return coefficients_from_named({name: array[:, j] for j, name in enumerate(order)}, like, tensor_names,
                                   tasks=tasks, bound=bound)


def read_fusionbench(path: str | os.PathLike) -> np.ndarray:
    """FusionBench merge weights from ``torch.save(tensor)`` (``.pt`` / ``.pth``, read without running any
    pickled code) or a numpy ``.npy`` file; a float32 array."""
    from adamerging_jax.models.torch_file import read_torch_file

    name = os.fspath(path)
    array = np.load(name, allow_pickle=False) if name.endswith(".npy") else read_torch_file(name)
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        raise ValueError(f"{name!r} holds {type(array).__name__} {getattr(array, 'shape', '')}, "
                         f"not FusionBench's [K, n] merge weights")
    return np.asarray(array, np.float32)


# ------------------------------------------------------------------------------------------ official code


@dataclasses.dataclass(frozen=True)
class OfficialRows:
    """The rows of an official `[n, 1 + K]` λ file: ``names`` in file order; ``scales``, row name → the
    tensor names of the naming that the row's λ scales (several for a fused tensor, such as open_clip's
    ``in_proj_weight`` for the q, k and v weights; none for a row whose tensor is not in the merged tree;
    a row absent from ``scales`` scales the tensor of its own name); ``untrained``, the rows the official run
    never trains, which must hold `OFFICIAL_INITIAL_LAMBDA` for every task and are then ignored."""

    names: tuple[str, ...]
    scales: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    untrained: Collection[str] = frozenset()

    def scaled_by(self, row: str) -> tuple[str, ...]:
        """The tensor names row ``row`` scales."""
        return () if row in self.untrained else tuple(self.scales.get(row, (row,)))


def to_official(coefficients: Coefficients, row_names: Sequence[str] | None, tensor_names: Mapping[Entry, str],
                *, fill: float | None = None) -> np.ndarray:
    """The official code's ``lambdas()``: float32 `[n, 1 + K]`, row j = [1, λ of tensor ``row_names[j]``].

    ``row_names`` is the pretrained state dict's tensor order. Rows no entry names (tensors outside the
    merged tree, such as the official checkpoints' unused text-side leftovers) get ``fill`` for every task, or
    raise KeyError naming the tensor when ``fill`` is None. ``row_names=None`` gives the task-wise layout, one
    row `[1, 1 + K]`, which needs every tensor to carry the same λ.
    """
    named = named_coefficients(coefficients, tensor_names)
    if row_names is None:
        distinct = {tuple(values) for values in named.values()}
        if len(distinct) != 1:
            raise ValueError(f"the task-wise layout (row_names=None) needs one λ shared by every tensor; "
                             f"found {len(distinct)} different ones")
        rows = [list(distinct.pop())]
    else:
        if fill is None and (missing := [name for name in row_names if name not in named]):
            raise KeyError(f"no λ for tensor {missing[0]!r} ({len(missing)} rows unnamed; pass fill= for them)")
        if extra := sorted(set(named) - set(row_names)):
            raise ValueError(f"tensors {extra[:5]} have λ but no row in row_names")
        rows = [named.get(name, [fill] * coefficients.num_tasks) for name in row_names]
    return np.asarray([[1.0, *row] for row in rows], np.float32)


def from_official(array: np.ndarray, like: Coefficients, rows: OfficialRows | Sequence[str] | None,
                  tensor_names: Mapping[Entry, str], *, tasks: Sequence[str] | None = None,
                  bound: float | None = None) -> Coefficients:
    """`Coefficients` shaped as ``like`` from the official `[n, 1 + K]` ``lambdas()``.

    ``rows`` says what each row scales (`OfficialRows`; a sequence of tensor names: each row its own tensor);
    ``rows=None`` reads a task-wise `[1, 1 + K]` row into every tensor. Column 0, the pretrained coefficient,
    must be 1; every λ finite (|λ| ≤ ``bound`` when given, the task named from ``tasks``); the untrained rows
    at `OFFICIAL_INITIAL_LAMBDA`; every tensor of the tree scaled by exactly one row. Errors name the row.
    """
    if rows is not None and not isinstance(rows, OfficialRows):
        rows = OfficialRows(tuple(rows))
    array = np.asarray(array, np.float32)
    count = 1 if rows is None else len(rows.names)
    if array.shape != (count, 1 + like.num_tasks):
        raise ValueError(f"official λ have shape {array.shape}, expected [n, 1 + K] = ({count}, {1 + like.num_tasks})")
    names = ("the task-wise row",) if rows is None else rows.names
    if bad := [j for j in range(count) if array[j, 0] != 1.0]:
        raise ValueError(f"official λ: row {names[bad[0]]!r} has pretrained coefficient {array[bad[0], 0]}, not 1")
    values = {name: array[j, 1:] for j, name in enumerate(names)}
    check_coefficients(values, tasks, bound, what="official λ: row")
    if rows is None:
        return coefficients_from_named({name: values[names[0]] for name in set(tensor_names.values())}, like,
                                       tensor_names)
    initial = np.float32(OFFICIAL_INITIAL_LAMBDA)
    for row in rows.untrained:
        if not (values[row] == initial).all():
            raise ValueError(f"official λ: row {row!r}, which the official code never trains, holds "
                             f"{values[row].tolist()}, not its initial {OFFICIAL_INITIAL_LAMBDA} for every task "
                             "(rows in another order, or not an official λ file)")
    named: dict[str, np.ndarray] = {}
    for row in rows.names:
        for tensor in rows.scaled_by(row):
            if tensor in named:
                raise ValueError(f"official λ: tensor {tensor!r} is scaled by two rows (the second {row!r})")
            named[tensor] = values[row]
    return coefficients_from_named(named, like, tensor_names)
