"""θ0 and τ of a causal LM read from safetensors straight into their shards on a device mesh.

AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024) on a
data × fsdp mesh splits θ0 and every τ leaf over the parameter axis (`core.parallel.parameter_sharding`; τ's
task axis K never). Loading every tensor in every process and then placing it would cost each host the whole
model and its K task vectors. Here each leaf becomes a global array by `jax.make_array_from_callback` with the
very sharding `core.parallel.place_tree` gives it (so AdaMerging's placement moves nothing), and the callback,
asked only for the index of each device this process holds, reads only that slice from disk, through
safetensors' memory map: ``safe_open(file).get_slice(name)[index]``.

A leaf's slice in our layout (`models.llama_checkpoint`: Linear kernels [in, out] are torch's [out, in]
transposed, a stacked leaf [L, ...] is L tensors) maps to HF tensors as

    θ0[l0:l1, i0:i1, o0:o1]  =  stack over l in [l0, l1) of  W_l[o0:o1, i0:i1]ᵀ      (a stacked kernel)

and a dense τ shard, whose task axis is whole, is computed from the same slices (Ilharco et al., "Editing
Models with Task Arithmetic", ICLR 2023; Hu et al., "LoRA", ICLR 2022, for an adapter's):

    τ[k][index] = θ_k[index] − θ0[index]            a full fine-tuned model (θ0's slice read once per shard)
    τ[k][l, i, o] = s_k (B_k[o, :] A_k[:, i])ᵀ      an adapter (its factors, small, are read whole)

A factored run (`models.lora.factored_task_vectors`) keeps τ as LoRA factors: A, B and s are placed with the
shardings `place_tree` gives them, each device's slice cut from the adapters' factors in memory.

Bytes read. Each `SliceReader` counts in `bytes_read` the stored bytes of every slice it returned: what this
process read from that checkpoint. A process reads each distinct slice once per leaf (devices that hold the same
slice, on a partly replicated sharding, share one read). With P processes splitting every leaf evenly, each
reads 1/P of θ0 for θ0, and 1/P of θ0 and of every θ_k for τ.

Host memory. `make_array_from_callback` gathers a leaf's slices for all of this process's devices before it
places them, so at any time the host holds at most one shard per local device of the leaf being placed, plus a
bounded buffer: for a τ shard, θ0's slice and the K task slices it is computed from, and the pages of the
memory map those slices touched (each file is closed, its map released, after each slice). The whole model is
never on the host. On CPU devices the device buffers are themselves host memory: one shard per device.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, which safetensors' numpy reader needs for BF16
import numpy as np
from jax.sharding import Mesh
from safetensors import safe_open

from adamerging_jax.core.parallel import tree_shardings
from adamerging_jax.core.trees import PyTree, map_with_path, named_leaves
from adamerging_jax.models.llama import LlamaConfig, Params, stacked
from adamerging_jax.models.llama_checkpoint import hf_name, leaf_shapes, open_hf_causal_lm
from adamerging_jax.models.lora import LoraAdapter, factored_task_vectors

Index = tuple[slice, ...]


def concrete_index(index: Sequence[slice], shape: Sequence[int]) -> Index:
    """``index`` (one slice per axis, as `make_array_from_callback` gives it) with explicit starts and stops."""
    if len(index) != len(shape):
        raise ValueError(f"index {tuple(index)} has {len(index)} axes, the array {len(shape)}")
    out = []
    for axis, (part, size) in enumerate(zip(index, shape)):
        start, stop, step = part.indices(size)
        if step != 1:
            raise ValueError(f"index {tuple(index)}: axis {axis} has step {step}; shards are contiguous")
        out.append(slice(start, stop))
    return tuple(out)


def slice_nbytes(index: Index, itemsize: int) -> int:
    """Bytes of the slice ``index`` (concrete) of an array of ``itemsize``-byte elements."""
    return math.prod(part.stop - part.start for part in index) * itemsize


class SliceReader:
    """One HF causal-LM folder (`llama_checkpoint.open_hf_causal_lm`: every tensor ``config`` describes present
    with its shape and a floating dtype, checked from the headers) whose leaves are read slice by slice
    (`read`), each slice in float32 and checked finite; ``bytes_read`` counts the stored bytes returned."""

    def __init__(self, directory: str, config: LlamaConfig | None = None):
        self.directory = directory
        self.config, self.files = open_hf_causal_lm(directory, config)
        self.shapes = leaf_shapes(self.config)
        self.bytes_read = 0

    def read(self, path: str, index: Sequence[slice]) -> np.ndarray:
        """``θ[path][index]`` in float32 (module docstring), reading only that slice of each tensor."""
        index = concrete_index(index, self.shapes[path])
        layers, inner = (range(index[0].start, index[0].stop), index[1:]) if stacked(path) else ([None], index)
        kernel = path.endswith("kernel")
        torch_index = inner[::-1] if kernel else inner
        parts = []
        with contextlib.ExitStack() as stack:
            opened: dict[str, Any] = {}
            for layer in layers:
                name = hf_name(path, layer)
                file = self.files.location[name].path
                if file not in opened:
                    opened[file] = stack.enter_context(safe_open(file, framework="numpy"))
                part = opened[file].get_slice(name)[torch_index]
                self.bytes_read += part.nbytes
                part = np.asarray(part.T if kernel else part, np.float32)
                if not np.isfinite(part).all():
                    raise ValueError(f"{self.directory}: tensor {name!r} holds NaN or inf values (in the slice "
                                     f"{torch_index} read for leaf {path!r})")
                parts.append(part)
        return np.stack(parts) if stacked(path) else parts[0]


def leaf_shape_tree(config: LlamaConfig) -> Params:
    """Our parameter tree for ``config`` with a float32 `jax.ShapeDtypeStruct` per leaf."""
    tree: Params = {}
    for path, shape in leaf_shapes(config).items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jax.ShapeDtypeStruct(shape, np.float32)
    return tree


def place_by_slices(shapes: PyTree, mesh: Mesh, shard: bool, read: Callable[[str, Index], np.ndarray],
                    skip_leading: int = 0) -> PyTree:
    """Every leaf of ``shapes`` (shape structs) as a global array laid out as `core.parallel.place_tree` lays
    it out (``shard``, ``skip_leading``), built by `jax.make_array_from_callback` from ``read(path, index)``:
    called once per distinct index among this process's devices."""
    shardings = tree_shardings(shapes, mesh, shard, skip_leading)

    def place(path: str, shape: Any, sharding: Any) -> jax.Array:
        read_once: dict[tuple[tuple[int, int], ...], np.ndarray] = {}  # slices are unhashable before 3.12

        def slice_of(index: Sequence[slice]) -> np.ndarray:
            index = concrete_index(index, shape.shape)
            key = tuple((part.start, part.stop) for part in index)
            if key not in read_once:
                read_once[key] = np.asarray(read(path, index), shape.dtype)
            return read_once[key]

        return jax.make_array_from_callback(tuple(shape.shape), sharding, slice_of)

    return map_with_path(place, shapes, shardings)


def read_pretrained(reader: SliceReader, mesh: Mesh, shard: bool) -> Params:
    """θ0 as global float32 arrays on ``mesh``, sharded (``shard``) or replicated as `place_tree` would; this
    process reads only its devices' slices."""
    return place_by_slices(leaf_shape_tree(reader.config), mesh, shard, reader.read)


def adapter_slice(adapter: LoraAdapter, path: str, index: Index) -> np.ndarray:
    """τ[path][index] of one adapter, float32: s (B[o] A[:, i])ᵀ on its modules of leaf ``path``, 0 elsewhere."""
    out = np.zeros([part.stop - part.start for part in index], np.float32)
    for module in adapter.modules.values():
        if module.path != path:
            continue
        if stacked(path):
            layers, (rows, columns) = index[0], index[1:]
            if not layers.start <= module.layer < layers.stop:
                continue
            target = out[module.layer - layers.start]
        else:
            (rows, columns), target = index, out
        target[...] = module.scale * (module.b[columns] @ module.a[:, rows]).T
    return out


def read_task_vectors(pretrained: SliceReader, sources: Sequence[SliceReader | LoraAdapter], mesh: Mesh,
                      shard: bool) -> Params:
    """The dense stacked τ [K, ...] as global float32 arrays on ``mesh`` (laid out as `place_tree(...,
    skip_leading=1)` lays τ out), task k from a fine-tuned folder or an adapter (module docstring); this
    process reads only its devices' slices of θ0 and of each θ_k."""
    if not sources:
        raise ValueError("no task given: AdaMerging needs at least one task vector")
    k = len(sources)
    shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct((k, *s.shape), s.dtype),
                                    leaf_shape_tree(pretrained.config))

    def read(path: str, index: Index) -> np.ndarray:
        tasks, inner = index[0], index[1:]
        base = None
        out = []
        for source in sources[tasks]:
            if isinstance(source, LoraAdapter):
                out.append(adapter_slice(source, path, inner))
                continue
            base = pretrained.read(path, inner) if base is None else base
            out.append(source.read(path, inner) - base)
        return np.stack(out)

    return place_by_slices(shapes, mesh, shard, read, skip_leading=1)


def place_factored(adapters: Sequence[LoraAdapter], config: LlamaConfig, mesh: Mesh, shard: bool) -> Params:
    """`models.lora.factored_task_vectors` (LoRA factors on adapted kernels, zero τ elsewhere) as global arrays
    on ``mesh``, every factor laid out as `place_tree(..., skip_leading=1)` lays it out; each device's slice is
    cut from the factors in host memory (K·r·(in + out) numbers per kernel)."""
    factors = jax.tree_util.tree_map(np.asarray, factored_task_vectors(adapters, leaf_shape_tree(config)))
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), factors)
    by_path = dict(named_leaves(factors))
    return place_by_slices(shapes, mesh, shard, lambda path, index: by_path[path][index], skip_leading=1)
