"""One cache root for everything the package caches, and checksummed on-disk caches of pytrees.

**Where.** :func:`cache_root` is ``$ADAMERGING_JAX_CACHE`` when set (``~`` expanded), else
``~/.cache/adamerging_jax``; each kind of cache is one folder below it, :func:`cache_dir` ``(kind)``: ``jax``
(XLA's persistent compilation cache, :func:`enable_compilation_cache`), ``finetuned`` (fine-tuned
backbones), ``heads`` (zero-shot heads), ... Deleting a folder only costs recomputation.

**Tree files.** :func:`save_tree` writes an uncompressed ``.npz`` holding one array per leaf, named by its
path (``core.trees.named_leaves``: ``"block_00/conv/kernel"``), plus a manifest entry :data:`MANIFEST`: the
JSON (as uint8 bytes) of the format version, every leaf's ``[name, dtype name, shape]`` in flattening order,
and ``sha256`` over, per leaf in that order, ``json([name, dtype name, shape])``, a NUL byte and the leaf's
raw C-order bytes. Leaves of dtypes numpy cannot name in an ``.npy`` header (``bfloat16``, float8, ...) are
stored as unsigned integers of the same width; the manifest keeps their dtype. The write is atomic.

:func:`load_tree` ``(path, like)`` gives the tree back, shaped like ``like`` (arrays or
``jax.ShapeDtypeStruct`` leaves), with numpy leaves, or ``None`` (a cache miss) when there is no file, and
``None`` with a :class:`CacheWarning` naming the file and the reason when the file is unreadable (truncated,
bit-flipped, not a zip), has no manifest, holds other leaf names, shapes or dtypes than ``like``, or holds
values whose checksum differs from its manifest's. The caller recomputes and saves over it.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import jax
import numpy as np

from adamerging_jax.core.checkpoint import write_npz_atomic
from adamerging_jax.core.trees import PyTree, named_leaves

ENV_VAR = "ADAMERGING_JAX_CACHE"
MANIFEST = "__adamerging_jax_manifest__"
FORMAT_VERSION = 1


class CacheWarning(UserWarning):
    """A cache file was ignored (unreadable, mismatched or corrupt); the value will be recomputed."""


def cache_root() -> Path:
    """``$ADAMERGING_JAX_CACHE`` (``~`` expanded, made absolute) when set and non-empty, else
    ``~/.cache/adamerging_jax``; read at every call."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        return Path(configured).expanduser().absolute()
    return Path.home() / ".cache" / "adamerging_jax"


def cache_dir(kind: str) -> Path:
    """``cache_root() / kind`` for one kind of cache (``"jax"``, ``"finetuned"``, ``"heads"``, ...); not created."""
    if not kind or kind in (".", "..") or "/" in kind or os.sep in kind:
        raise ValueError(f"cache kind must be one folder name, got {kind!r}")
    return cache_root() / kind


def enable_compilation_cache(min_compile_seconds: float = 1.0) -> Path:
    """Turn on jax's persistent compilation cache in ``cache_dir("jax")`` for programs that take at least
    ``min_compile_seconds`` to compile; returns the folder."""
    folder = cache_dir("jax")
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    return folder


def _storable(leaf: np.ndarray) -> np.ndarray:
    """``leaf`` as an array an ``.npy`` header can describe: dtypes outside numpy's own (kind ``V``: bfloat16,
    float8) as unsigned integers of their width."""
    return leaf.view(f"u{leaf.dtype.itemsize}") if leaf.dtype.kind == "V" else leaf


def _checksum(entries: list[tuple[str, str, tuple[int, ...], bytes]]) -> str:
    """sha256 of ``json([name, dtype, shape]) NUL bytes`` per leaf, in order (module docstring)."""
    digest = hashlib.sha256()
    for name, dtype, shape, data in entries:
        digest.update(json.dumps([name, dtype, list(shape)]).encode() + b"\0")
        digest.update(data)
    return digest.hexdigest()


def save_tree(path: str | os.PathLike, tree: PyTree) -> None:
    """Write ``tree``'s leaves and their manifest (names, dtypes, shapes, sha256) to the ``.npz`` ``path``,
    atomically."""
    leaves = [(name, np.asarray(leaf, order="C")) for name, leaf in named_leaves(tree)]
    arrays = {}
    for name, leaf in leaves:
        if name == MANIFEST or name in arrays:
            raise ValueError(f"{path}: leaf name {name!r} is reserved or repeated; cannot cache this tree")
        arrays[name] = _storable(leaf)
    entries = [(name, leaf.dtype.name, leaf.shape, leaf.tobytes()) for name, leaf in leaves]
    manifest = {
        "format": FORMAT_VERSION,
        "leaves": [[name, dtype, list(shape)] for name, dtype, shape, _ in entries],
        "sha256": _checksum(entries),
    }
    arrays[MANIFEST] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
    write_npz_atomic(path, arrays)


def _expected_leaves(like: PyTree) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    return [(name, np.dtype(leaf.dtype), tuple(np.shape(leaf))) for name, leaf in named_leaves(like)]


def _mismatch(manifest: dict, expected: list[tuple[str, np.dtype, tuple[int, ...]]]) -> str | None:
    """Why the file's leaves are not ``like``'s (the first difference), or None when they are."""
    stored = [(name, dtype, tuple(shape)) for name, dtype, shape in manifest["leaves"]]
    if len(stored) != len(expected):
        return f"it holds {len(stored)} leaves, the tree has {len(expected)}"
    for (name, dtype, shape), (want_name, want_dtype, want_shape) in zip(stored, expected):
        if (name, dtype, shape) != (want_name, want_dtype.name, want_shape):
            wanted = f"{want_name!r} as {want_dtype.name}{list(want_shape)}"
            return f"leaf {name!r} is {dtype}{list(shape)}, the tree wants {wanted}"
    return None


def _read(path: str, like: PyTree) -> tuple[PyTree | None, str]:
    """``(tree, "")``, or ``(None, reason)`` for a file that cannot serve as ``like``'s cache."""
    expected = _expected_leaves(like)
    try:
        # np.load(path) leaks its file handle when the zip is unreadable: open (and close) the file here
        with open(path, "rb") as file, np.load(file, allow_pickle=False) as data:
            if MANIFEST not in data.files:
                return None, "it is not a tree cache file (no manifest)"
            manifest = json.loads(data[MANIFEST].tobytes())
            if manifest.get("format") != FORMAT_VERSION:
                return None, f"its format {manifest.get('format')!r} is not {FORMAT_VERSION}"
            reason = _mismatch(manifest, expected)
            if reason:
                return None, reason
            leaves = []
            for name, dtype, shape in expected:
                stored = data[name]
                if stored.shape != shape or stored.dtype.itemsize != dtype.itemsize:
                    stored_as = f"{stored.dtype}{list(stored.shape)}"
                    return None, f"leaf {name!r} is stored as {stored_as}, not {dtype.name}{list(shape)}"
                leaves.append(stored.view(dtype))
            entries = [
                (name, dtype.name, shape, leaf.tobytes()) for (name, dtype, shape), leaf in zip(expected, leaves)
            ]
            if _checksum(entries) != manifest["sha256"]:
                return None, "its values do not match its sha256 checksum"
    except Exception as error:  # truncated or bit-flipped zips and malformed manifests fail in many ways
        return None, f"it cannot be read ({type(error).__name__}: {error})"
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves), ""


def load_tree(path: str | os.PathLike, like: PyTree) -> PyTree | None:
    """The tree saved at ``path`` (numpy leaves, ``like``'s structure), or None: silently when there is no
    file, with a :class:`CacheWarning` naming the file and the reason when it cannot be used."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    tree, reason = _read(path, like)
    if tree is None:
        warnings.warn(f"ignoring the cache file {path}: {reason}; it will be recomputed", CacheWarning, stacklevel=2)
    return tree
