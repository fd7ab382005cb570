"""Data-free merges streamed tensor by tensor from disk to disk, for checkpoints larger than memory, for every
model family of ``merge`` (when a run streams: `streams`).

θ0 and each task's checkpoint are read one tensor at a time (`models.safetensors_stream`). For every tensor
merged, in name order:

    τ_k = θ_k − θ0          (a full fine-tuned checkpoint; in the accumulation dtype, float32, or float64 for
                             float64 inputs, as `core.task_vectors` takes it)
    τ_k = s · B A           (a LoRA adapter's module on this weight [out, in]; 0 on the weights it leaves)

then the registry method itself runs on a one-tensor tree (θ0's tensor and the stacked τ ``[K, ...]``, laid
out as the model's tree lays that leaf: a Linear weight as its kernel [in, out], a layer of a stacked leaf with
a layer axis of 1, so a method that reads the binding's matrix view sees the matrix it would see in memory;
`binding_placement` finds that from the model binding's tensor names and matrix view),
and the merged tensor is cast to the output dtype and written at once (`ShardedWriter`). A method that does not
read the matrix view (elementwise methods) gets each tensor flattened to one axis instead, so one compiled
program serves every tensor of a size. The tensors of θ0 the output keeps unmerged (a CLIP export's text
tower) are copied in their place in name order, one at a time. The inputs are checked for NaN / inf as they
are read (on their exponent bits), and the merged tensor before it is written. Peak memory is a few copies of
the largest tensor times K, whatever the model's size.

How a method streams is declared on it (`core.registry.MergeMethod.streaming`):

- ``"tensor"``: one pass, each tensor whole (in the model's layout for a method that reads the matrix view).
- ``"entry"``: one pass, each tensor flattened and merged in parts of at most `BLOCK` entries (`TensorStream`),
  for methods whose merged entry depends on that entry alone: memory and compiled programs are bounded by
  the part. Task arithmetic and weight averaging give their in-memory result. A ``seed`` parameter becomes
  the part's own key, fold_in(fold_in(key(seed), i), j) for part j of the i-th tensor in the output's name
  order, so DARE draws an independent mask per part: the same law as in memory, another draw.
- ``"global"``: the statistics the method reads beyond one entry are found first, exactly, in streaming
  passes, then given to it with every part. TIES (`ties_statistics`) reads two:

  - per task, the trim threshold t_k = the r-th largest |τ_k| (r = ⌊density · D⌋ + 1 as
    `core.transforms.trim` counts), over the whole model for scope ``"model"`` (D the entries of one task
    vector, or ``total_size``) and over each checkpoint tensor for scope ``"leaf"`` (mergekit's per-tensor
    density; D its entries). Found by radix selection on the IEEE-754 bit patterns of |τ| (`KthLargest`):
    each pass counts 16 bits per entry in 65536 buckets (only the entries still in the chosen bucket), and the
    search stops early once every entry left shares the remaining bits, so float32 needs at most 2 passes and
    float64 at most 4; no sort, no copy of the model, the value `core.transforms` finds in memory;
  - the majority sign sgn Σ_entries γ of the elected signs γ = sgn Σ_k τ̂_k over the whole model (entries
    where γ = 0 take it), an exact integer count: one pass (for scope ``"leaf"`` the same pass that finds
    each tensor's thresholds).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.binding import ModelBinding
from adamerging_jax.core.matrix_view import MatrixView
from adamerging_jax.core.registry import MethodSpec
from adamerging_jax.core.transforms import elect_sign, trim
from adamerging_jax.core.trees import PyTree, accumulation_dtype
from adamerging_jax.models.safetensors_stream import CheckpointFiles, RenamedTensors, ShardedWriter

if TYPE_CHECKING:
    from adamerging_jax.core.protocol import MergeSettings
    from adamerging_jax.merging.schema import MergeConfig

BUCKET_BITS = 16
CHUNK = 1 << 23  # entries per selection step: bounds the temporaries of a huge tensor
BLOCK = 1 << 22  # entries per part of a tensor merged entry by entry


Tensors = CheckpointFiles | RenamedTensors
"""A checkpoint's tensors read one at a time, by the names the merge writes them as."""

STREAMED = "streamed tensor by tensor from disk, nothing loaded"
"""How a plan says its export is streamed."""


def streams(config: MergeConfig, settings: MergeSettings, coefficients_file: str | None, scored: bool) -> bool:
    """Whether a ``merge`` run merges tensor by tensor from disk, for every model family: the exported method
    streams (`core.registry.MergeMethod.streaming`), no method learns from data, no ``--weights``, and nothing
    is scored on the merged models (``scored``: the family's data that needs them in memory, the causal LM's
    prompts or CLIP's test folders)."""
    exported = next(spec for spec in settings.methods if spec.name == config.exported)
    return exported.method.streaming is not None and not settings.needs_data and coefficients_file is None and not scored


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a checkpoint tensor sits in the model's tree: ``path`` (the leaf), ``transpose`` (the leaf stores
    it transposed), ``stacked`` (it is one layer of a leaf with a layer axis). The default: a tensor (or part
    of one) flattened (`TensorStream.parts`), under one path."""

    path: str = "tensor"
    transpose: bool = False
    stacked: bool = False


AS_STORED = Placement()


def binding_placement(binding: ModelBinding) -> Callable[[str], Placement]:
    """Where each checkpoint tensor sits in the tree of ``binding``'s model, from the binding alone: the (leaf
    path, layer) its ``tensor_names`` gives the name, stacked when that names a layer, and transposed where its
    ``matrix_view`` reads the leaf as a matrix stored transposed (a Flax kernel, [in, out]; a torch-layout
    checkpoint holds it as the view reads it, [out, in]). A tensor the view does not read as a matrix (a bias,
    a norm, a convolution) goes as the checkpoint stores it: no streaming method reads such a tensor by its
    axes. KeyError naming a tensor that is not in the tree."""
    where = {name: entry for entry, name in binding.tensor_names.items()}
    view = binding.matrix_view

    def placement(name: str) -> Placement:
        if name not in where:
            raise KeyError(f"tensor {name!r} is not a tensor of the model's tree")
        path, layer = where[name]
        matrix = view.matrix(path) if view is not None else None
        return Placement(path, matrix is not None and matrix.transpose, layer is not None)

    return placement


@dataclasses.dataclass(frozen=True)
class TaskTensors:
    """Where task ``name``'s τ comes from: a full fine-tuned ``checkpoint`` (τ = θ_k − θ0), or the ``adapter``
    modules of a LoRA adapter by the tensor they adapt (objects with ``a`` [r, in], ``b`` [out, r] and
    ``scale``: τ = s B A there, 0 elsewhere); ``source`` is how an error names it."""

    name: str
    source: str
    checkpoint: Tensors | None = None
    adapter: Mapping[str, Any] | None = None


# ------------------------------------------------------------------------------------ one tensor at a time


def _to_leaf(x: jax.Array, transpose: bool, stacked: bool, task_axis: bool) -> jax.Array:
    if transpose:
        x = jnp.swapaxes(x, -1, -2)
    return jnp.expand_dims(x, int(task_axis)) if stacked else x


def _leaves(theta0: jax.Array, inputs: tuple[jax.Array, ...], kinds: tuple[str, ...], transpose: bool,
            stacked: bool) -> tuple[jax.Array, jax.Array]:
    """θ0's leaf and τ's stacked leaf in the accumulation dtype."""
    acc = accumulation_dtype(theta0.dtype)
    base = theta0.astype(acc)
    given = iter(inputs)
    taus = []
    for kind in kinds:
        if kind == "zero":
            taus.append(jnp.zeros_like(base))
        else:
            x = next(given).astype(acc)
            taus.append(x - base if kind == "full" else x)
    return _to_leaf(base, transpose, stacked, False), _to_leaf(jnp.stack(taus), transpose, stacked, True)


_task_vector_leaves = jax.jit(_leaves, static_argnames=("kinds", "transpose", "stacked"))


def _tensor(leaf: jax.Array, transpose: bool, stacked: bool) -> jax.Array:
    """The checkpoint tensor of a merged leaf."""
    x = leaf[0] if stacked else leaf
    return jnp.swapaxes(x, -1, -2) if transpose else x


def one_leaf_tree(path: str, leaf: Any) -> PyTree:
    """The one-leaf tree {a: {b: leaf}} of leaf path "a/b"."""
    tree = leaf
    for key in reversed(path.split("/")):
        tree = {key: tree}
    return tree


def _leaf_at(tree: PyTree, path: str) -> Any:
    for key in path.split("/"):
        tree = tree[key]
    return tree


class TensorStream:
    """θ0 and the tasks' τ for each output tensor, read from disk in one pass per call of `read_ahead` or
    `leaves`, handed to the method in ``mode``:

    - ``"leaf"``: each tensor laid out as in the model's tree (`Placement`; methods that read the matrix view);
    - ``"tensor"``: each tensor flattened to one axis (one compiled program per tensor size);
    - ``"entry"``: each tensor flattened and cut into parts of at most `BLOCK` entries (methods whose merged
      entry depends on that entry alone, given the statistics: memory and compiled programs bounded by the
      part, whatever the tensor).

    ``names`` are the tensors merged, taken in name order; ``kept`` are θ0's tensors the output holds unmerged
    (e.g. a CLIP export's text tower and projections), read one at a time by `kept_tensor`.
    """

    def __init__(self, pretrained: Tensors, pretrained_source: str, tasks: Sequence[TaskTensors],
                 names: Sequence[str], placement: Callable[[str], Placement], kept: Sequence[str] = ()):
        self.pretrained, self.pretrained_source, self.tasks = pretrained, pretrained_source, list(tasks)
        self.names, self.placement, self.kept = sorted(names), placement, sorted(kept)
        self.passes = 0
        self.mode = "leaf"

    def place(self, name: str) -> Placement:
        """Where tensor ``name`` goes in a one-tensor tree: its leaf in the model's tree, laid out as there (mode
        "leaf"), else the flattened tensor or part under one fixed path."""
        return self.placement(name) if self.mode == "leaf" else AS_STORED

    def parts(self, theta0: np.ndarray, inputs: tuple[np.ndarray, ...]
              ) -> Iterator[tuple[slice | None, np.ndarray, tuple[np.ndarray, ...]]]:
        """(which entries of the flattened tensor, θ0's part, the inputs' parts) as ``mode`` cuts a tensor."""
        if self.mode == "leaf":
            yield None, theta0, inputs
            return
        theta0, inputs = theta0.reshape(-1), tuple(x.reshape(-1) for x in inputs)
        step = BLOCK if self.mode == "entry" else max(theta0.size, 1)
        for start in range(0, max(theta0.size, 1), step):
            part = slice(start, start + step)
            yield part, theta0[part], tuple(x[part] for x in inputs)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def bytes_read(self) -> int:
        return self.pretrained.bytes_read + sum(t.checkpoint.bytes_read for t in self.tasks if t.checkpoint)

    @property
    def accumulation_dtype(self) -> np.dtype:
        """The dtype τ comes in: float32, float64 when θ0 holds float64 tensors."""
        return np.dtype(accumulation_dtype(*(self.pretrained.info(name).dtype for name in self.names)))

    def size(self) -> int:
        """D, the entries of one task vector."""
        return sum(int(np.prod(self.pretrained.info(name).shape)) for name in self.names)

    def inputs(self, name: str) -> tuple[np.ndarray, tuple[np.ndarray, ...], tuple[str, ...]]:
        """Tensor ``name`` of θ0, of each task that has one (a fine-tuned tensor, or an adapter's s B A), and
        each task's kind ("full", "delta" or "zero": an adapter that leaves this weight); ValueError naming the
        file and tensor holding NaN or inf."""
        inputs, kinds, sources = [], [], [self.pretrained_source]
        for task in self.tasks:
            if task.checkpoint is not None:
                inputs.append(task.checkpoint.read(name))
                kinds.append("full")
                sources.append(task.source)
            elif name in task.adapter:
                module = task.adapter[name]
                inputs.append(np.asarray(module.scale * (module.b @ module.a), np.float32))
                kinds.append("delta")
                sources.append(task.source)
            else:
                kinds.append("zero")
        theta0 = self.pretrained.read(name)
        for array, source in zip((theta0, *inputs), sources):
            if holds_nonfinite(array):
                raise ValueError(f"{source}: tensor {name!r} holds NaN or inf values")
        return theta0, tuple(inputs), tuple(kinds)

    def kept_tensor(self, name: str) -> np.ndarray:
        """θ0's tensor ``name`` as stored; ValueError naming the file and tensor when it holds NaN or inf."""
        tensor = self.pretrained.read(name)
        if holds_nonfinite(tensor):
            raise ValueError(f"{self.pretrained_source}: tensor {name!r} holds NaN or inf values")
        return tensor

    def read_ahead(self) -> Iterator[tuple[int, str, tuple[np.ndarray, tuple[np.ndarray, ...], tuple[str, ...]]]]:
        """One pass: (index, name, `inputs`) per output tensor, the next tensor read by a second thread while
        the caller computes on this one (two tensors' inputs in memory at most)."""
        self.passes += 1
        with ThreadPoolExecutor(1) as reader:
            pending = reader.submit(self.inputs, self.names[0])
            for index, name in enumerate(self.names):
                current = pending.result()
                if index + 1 < len(self.names):
                    pending = reader.submit(self.inputs, self.names[index + 1])
                yield index, name, current

    def leaves(self) -> Iterator[tuple[str, Placement, jax.Array, jax.Array]]:
        """One pass: (name, placement, θ0 leaf, τ leaf [K, ...]) per tensor, or per part of one (``mode``)."""
        for _, name, (theta0, inputs, kinds) in self.read_ahead():
            place = self.place(name)
            for _, theta0_part, inputs_part in self.parts(theta0, inputs):
                yield (name, place,
                       *_task_vector_leaves(theta0_part, inputs_part, kinds, place.transpose, place.stacked))


EXPONENT_BITS = {"bfloat16": 0x7F80, "float16": 0x7C00, "float32": 0x7F800000, "float64": 0x7FF0000000000000}


def holds_nonfinite(array: np.ndarray, chunk: int = 1 << 20) -> bool:
    """Whether a float array holds NaN or inf: an entry whose exponent bits are all ones (read in chunks that
    stay in cache; several times faster than a compiled reduction on the CPU)."""
    mask = EXPONENT_BITS[array.dtype.name]
    bits = array.reshape(-1).view(f"u{array.dtype.itemsize}")
    mask = bits.dtype.type(mask)
    return any(np.any((bits[start:start + chunk] & mask) == mask) for start in range(0, bits.size, chunk))


# ------------------------------------------------------------------------------- model-wide statistics


class KthLargest:
    """Per task, the ``rank``-th largest of non-negative floats streamed in chunks ``[K, n]`` (module
    docstring): radix selection on their bit patterns, 16 bits a pass, from the top.

    A pass (`start_pass`, `add` for every chunk, `end_pass`) counts the entries whose higher bits equal the
    prefix chosen so far, by their next 16 bits; `end_pass` picks the bucket holding the rank-th largest. The
    search is `done` when every entry in that bucket has zero lower bits, or no bits are left; `value` is
    then the rank-th largest, exactly. Without ``early_stop`` (values in memory, where another pass over the
    few entries left is cheaper than counting the lower bits of every entry) every 16 bits are searched.
    """

    def __init__(self, num_tasks: int, rank: int, dtype: Any, early_stop: bool = True):
        self.early_stop = early_stop
        self.dtype = np.dtype(dtype)
        self.uint = np.dtype(f"u{self.dtype.itemsize}")
        self.bits = 8 * self.dtype.itemsize
        self.rank = np.full(num_tasks, rank, np.int64)  # rank inside the entries that match the prefix
        self.prefix = np.zeros(num_tasks, self.uint)
        self.known = 0  # leading bits fixed so far
        self.finished = np.zeros(num_tasks, bool)

    @property
    def done(self) -> bool:
        return bool(self.finished.all())

    @property
    def shift(self) -> int:
        return self.bits - self.known - BUCKET_BITS

    def start_pass(self) -> None:
        tasks = len(self.rank)
        self.counts = np.zeros((tasks, 1 << BUCKET_BITS), np.int64)
        self.inexact = np.zeros((tasks, 1 << BUCKET_BITS), np.int64)  # entries with non-zero lower bits

    def add(self, values: np.ndarray) -> None:
        """A chunk of values, [K, ...] in ``dtype``."""
        bits = np.ascontiguousarray(values, self.dtype).reshape(len(self.rank), -1).view(self.uint)
        for k in np.flatnonzero(~self.finished):
            for start in range(0, bits.shape[1], CHUNK):
                digits, rest = self._digits(bits[k, start:start + CHUNK], self.prefix[k])
                self.counts[k] += np.bincount(digits, minlength=1 << BUCKET_BITS)
                if rest is not None:
                    self.inexact[k] += np.bincount(digits[rest != 0], minlength=1 << BUCKET_BITS)

    def _digits(self, chunk: np.ndarray, prefix: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """The next 16 bits of the entries of ``chunk`` that match ``prefix``, and their lower bits (None when
        none are left)."""
        if self.known == 0:  # the leading 16 bits: the high half of each word, read in place
            halves = chunk.view(np.uint16).reshape(-1, self.dtype.itemsize // 2)
            lower = chunk & self.uint.type((1 << self.shift) - 1) if self.early_stop else None
            return halves[:, -1], lower
        above = self.uint.type(self.bits - self.known)
        chunk = chunk[(chunk >> above) == (prefix >> above)]
        digits = (chunk >> self.uint.type(self.shift)) & self.uint.type((1 << BUCKET_BITS) - 1)
        return digits, (chunk & self.uint.type((1 << self.shift) - 1)) if self.shift and self.early_stop else None

    def end_pass(self) -> None:
        for k in np.flatnonzero(~self.finished):
            from_top = np.cumsum(self.counts[k][::-1])
            position = int(np.searchsorted(from_top, self.rank[k]))  # first bucket (from the top) reaching rank
            digit = (1 << BUCKET_BITS) - 1 - position
            self.rank[k] -= int(from_top[position]) - int(self.counts[k][digit])
            self.prefix[k] |= self.uint.type(digit) << self.uint.type(self.shift)
            self.finished[k] = (self.early_stop and self.inexact[k][digit] == 0) or self.shift == 0
        self.known += BUCKET_BITS

    @property
    def value(self) -> np.ndarray:
        """[K] the rank-th largest values (once `done`)."""
        return self.prefix.view(self.dtype)


def ties_statistics(stream: TensorStream, params: Mapping[str, Any], log: Callable[[str], None]
                    ) -> Callable[[str], dict[str, jax.Array]]:
    """TIES's statistics for each tensor (module docstring): the trim ``thresholds`` (over the model for scope
    "model"; the tensor's own for scope "leaf", found in the same pass as the sign count) and the model's
    ``majority`` sign. Given them TIES is entrywise."""
    density, scope, total_size = params["density"], params["scope"], params["total_size"]
    per_tensor: dict[str, jax.Array] = {}
    if scope == "model":
        stream.mode = "entry"
        model_wide = _thresholds(stream, density, total_size, log)
    else:
        stream.mode = "tensor"
    started = time.perf_counter()
    balance = 0
    for name, place, _, tau in stream.leaves():
        if scope == "model":
            thresholds = model_wide
        else:
            thresholds = per_tensor[name] = tensor_thresholds(np.abs(np.asarray(tau)), density)
        balance += int(_sign_balance(one_leaf_tree(place.path, tau), density, thresholds))
    majority = jnp.asarray(np.sign(balance), stream.accumulation_dtype)
    what = "TIES majority sign" if scope == "model" else "TIES thresholds of each tensor and majority sign"
    log(f"[merge] pass {stream.passes}: {what} {int(np.sign(balance)):+d} ({time.perf_counter() - started:.1f} s)")
    return lambda name: {"thresholds": model_wide if scope == "model" else per_tensor[name], "majority": majority}


def tensor_thresholds(magnitudes: np.ndarray, density: float) -> jax.Array:
    """Per task, the (⌊density · n⌋ + 1)-th largest of one tensor's |τ| [K, n] (0: keep all when that exceeds
    n), as `core.transforms.trim` finds it for one leaf."""
    magnitudes = magnitudes.reshape(len(magnitudes), -1)
    rank = int(magnitudes.shape[1] * density) + 1
    if rank > magnitudes.shape[1]:
        return jnp.zeros(len(magnitudes), magnitudes.dtype)
    selection = KthLargest(len(magnitudes), rank, magnitudes.dtype, early_stop=False)
    while not selection.done:
        selection.start_pass()
        selection.add(magnitudes)
        selection.end_pass()
    return jnp.asarray(selection.value)


def _thresholds(stream: TensorStream, density: float, total_size: int | None, log: Callable[[str], None]
                ) -> jax.Array:
    """Per task the r-th largest |τ_k| over the model (0: keep everything, when r exceeds the entries)."""
    size = stream.size()
    reference = size if total_size is None else total_size
    if reference < size:
        raise ValueError(f"total_size {total_size} is smaller than the task vectors' {size} entries")
    rank = int(reference * density) + 1
    if rank > size:
        return jnp.zeros(stream.num_tasks, stream.accumulation_dtype)
    selection = KthLargest(stream.num_tasks, rank, stream.accumulation_dtype)
    while not selection.done:
        started = time.perf_counter()
        selection.start_pass()
        for *_, tau in stream.leaves():
            selection.add(np.abs(np.asarray(tau)))
            del tau
        selection.end_pass()
        log(f"[merge] pass {stream.passes}: TIES thresholds, bits {selection.bits - selection.known + BUCKET_BITS - 1}"
            f"–{max(selection.shift + BUCKET_BITS, 0)} ({time.perf_counter() - started:.1f} s)")
    return jnp.asarray(selection.value)


@partial(jax.jit, static_argnames="density")
def _sign_balance(task_vectors: PyTree, density: float, thresholds: jax.Array) -> jax.Array:
    """#{γ > 0} − #{γ < 0} over one tensor or part, γ = sgn Σ_k τ̂_k TIES's elected sign before the majority
    fills its zeros."""
    signs = jax.tree_util.tree_leaves(elect_sign(trim(task_vectors, density, "model", None, thresholds), "sum",
                                                 jnp.zeros(())))[0]
    return jnp.sum(signs > 0, dtype=jnp.int32) - jnp.sum(signs < 0, dtype=jnp.int32)


GLOBAL_STATISTICS: dict[str, Callable[[TensorStream, Mapping[str, Any], Callable[[str], None]],
                                       Callable[[str], dict[str, jax.Array]]]] = {
    "ties": ties_statistics,
}
"""The streaming passes of each ``streaming="global"`` method, by method name: its statistics for each tensor
(given them, the method is entrywise)."""


# ----------------------------------------------------------------------------------------------- the merge


_output_tensor = jax.jit(lambda leaf, transpose, stacked, dtype: _tensor(leaf, transpose, stacked).astype(dtype),
                         static_argnames=("transpose", "stacked", "dtype"))


def merge_program(spec: MethodSpec, view: MatrixView | None) -> Callable[..., jax.Array]:
    """The merge of one tensor (or part): θ0's and the tasks' tensors in, the merged tensor in ``dtype`` out,
    in three steps: θ0's and τ's leaves laid out as in the model's tree (`_task_vector_leaves`, compiled once
    per shape), the method's own `build` on the one-tensor tree (its parameters, a per-part ``seed`` key, the
    statistics), and the merged leaf's checkpoint tensor (compiled). The method is called as the in-memory merge
    calls it, so its own compiled functions see what they see there: τ materialised in the tree's layout and
    its parameters as arguments. Compiled into one program with the rest, the checkpoint's transposes would be
    folded into the method's products and its parameters into constants, and XLA:CPU would sum and round in
    another order (TSV-M, Iso-CTS and WUDI a few float32 roundings off their in-memory result)."""

    def merged_leaf(base: jax.Array, tau: jax.Array, statistics: Mapping[str, jax.Array], index: jax.Array,
                    path: str) -> jax.Array:
        arguments = {**spec.params, **dict(spec.method.fixed), **statistics}
        if "seed" in arguments:
            key = jax.random.key(arguments["seed"])
            arguments["seed"] = jax.random.fold_in(jax.random.fold_in(key, index[0]), index[1])
        if spec.method.uses_view:
            arguments["view"] = view
        merged = spec.method.build(one_leaf_tree(path, base), one_leaf_tree(path, tau), **arguments)
        return _leaf_at(merged.params, path)

    def merged(theta0: jax.Array, inputs: tuple[jax.Array, ...], statistics: Mapping[str, jax.Array],
               index: jax.Array, *, kinds: tuple[str, ...], path: str, transpose: bool, stacked: bool, dtype: Any
               ) -> jax.Array:
        base, tau = _task_vector_leaves(theta0, inputs, kinds, transpose, stacked)
        leaf = merged_leaf(base, tau, statistics, index, path)
        return _output_tensor(leaf, transpose, stacked, dtype)

    return merged


def stream_merge(spec: MethodSpec, stream: TensorStream, folder: str, dtypes: Mapping[str, Any], *,
                 view: MatrixView | None = None, max_shard_bytes: int, log: Callable[[str], None] = print
                 ) -> dict[str, Any]:
    """Merge ``stream``'s tensors with ``spec`` (module docstring) and write them into ``folder`` as
    safetensors shards, with θ0's ``kept`` tensors as they are, every tensor in name order and tensor ``name``
    in ``dtypes[name]``; returns what was done (passes, bytes read and written, files, seconds)."""
    if spec.method.streaming not in ("entry", "tensor", "global") or (
            spec.method.streaming == "global" and spec.name not in GLOBAL_STATISTICS):
        raise ValueError(f"method {spec.name!r} does not stream tensor by tensor")
    started = time.perf_counter()
    wide = any(stream.pretrained.info(name).dtype == np.float64 for name in stream.names)
    with jax.enable_x64(True) if wide else contextlib.nullcontext():
        statistics = lambda name: {}  # noqa: E731
        if spec.method.streaming == "global":
            statistics = GLOBAL_STATISTICS[spec.name](stream, spec.params, log)
        # a global method is entrywise once given its statistics (TIES reads the view only for its per-tensor scope)
        leaf = spec.method.uses_view and spec.method.streaming != "global"
        stream.mode = "leaf" if leaf else "tensor" if spec.method.streaming == "tensor" else "entry"
        layout = {name: (np.dtype(dtypes[name]), stream.pretrained.info(name).shape)
                  for name in sorted([*stream.names, *stream.kept])}
        program = merge_program(spec, view)
        writer = ShardedWriter(folder, layout, max_shard_bytes)
        kept = collections.deque(stream.kept)

        def write_kept(before: str | None = None) -> None:
            """θ0's kept tensors that come before ``before`` in name order (all without it)."""
            while kept and (before is None or kept[0] < before):
                name = kept.popleft()
                writer.write(name, np.asarray(stream.kept_tensor(name), layout[name][0]))

        try:
            merge_started = time.perf_counter()
            for index, name, (theta0, inputs, kinds) in stream.read_ahead():
                write_kept(name)
                place, (dtype, shape) = stream.place(name), layout[name]
                tensor = np.empty(shape, dtype).reshape(-1 if stream.mode != "leaf" else shape)
                for part_index, (part, theta0_part, inputs_part) in enumerate(stream.parts(theta0, inputs)):
                    merged = program(theta0_part, inputs_part, statistics(name), np.array([index, part_index], np.uint32),
                                     kinds=kinds, path=place.path, transpose=place.transpose, stacked=place.stacked,
                                     dtype=dtype)
                    tensor[part if part is not None else ...] = np.asarray(merged)
                tensor = tensor.reshape(shape)
                if holds_nonfinite(tensor):
                    raise ValueError(f"the merged model's tensor {name!r} holds {int((~np.isfinite(tensor)).sum())} "
                                     f"NaN or inf values (in {tensor.dtype}); the model is not exported")
                writer.write(name, tensor)
            write_kept()
            files = writer.close()
        finally:
            writer.abandon()
    copied = f", and {len(stream.kept)} of θ0's as they are" if stream.kept else ""
    log(f"[merge] pass {stream.passes}: {spec.name} merged and wrote {len(stream.names)} tensors{copied} "
        f"({time.perf_counter() - merge_started:.1f} s)")
    return {"passes": stream.passes, "bytes_read": stream.bytes_read, "bytes_written": writer.bytes_written,
            "files": files, "seconds": time.perf_counter() - started}
