"""Safetensors checkpoints read and written one tensor at a time, for models larger than memory.

A ``.safetensors`` file is an 8-byte little-endian header length N, N bytes of JSON (per tensor its dtype,
shape and ``data_offsets`` [begin, end) into the data that follows; an optional ``__metadata__`` of strings),
then the tensors' bytes, row-major, little-endian.

Reading (`SafetensorsFile`, `CheckpointFiles`; `RenamedTensors` reads them under other names): the header is
parsed and checked once (every entry's dtype, shape and offsets; the data covered exactly, as the format
requires). `read` then reads one tensor's bytes with positioned reads into a fresh array in its stored dtype
(bf16 as ``ml_dtypes.bfloat16``, exactly). No memory map: the pages of a mapped file that were touched count
in the process's resident memory as long as the file stays open, so reading a whole model through one would
hold the model. Every reader counts the bytes it read (`bytes_read`).

Writing (`ShardedWriter`): the layout of the output (which tensors in which order, their dtypes and shapes,
cut into shards of at most ``max_shard_bytes``) is fixed first, so each shard's header is written before its
data and each tensor's bytes reach the file as soon as it is computed; each file is flushed to disk
(``fsync``) when complete. A model of several shards also gets its ``model.safetensors.index.json``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from adamerging_jax.models.hf_files import SAFETENSORS, SAFETENSORS_INDEX, read_weight_map

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file: its dtype, shape and byte range [begin, end) inside the file."""

    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """The header of one ``.safetensors`` file, checked; `read` reads one tensor (module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no safetensors file at {self.path!r}")
        try:
            self.tensors, self.metadata = _read_header(self.path)
        except ValueError as error:
            raise ValueError(f"{self.path!r} is not a readable safetensors file: {error}") from None
        self.bytes_read = 0

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a new array in its stored dtype."""
        info = self.tensors[name]
        raw = np.empty(info.nbytes, np.uint8)
        with open(self.path, "rb", buffering=0) as file:
            done = 0
            while done < info.nbytes:
                count = os.preadv(file.fileno(), [memoryview(raw)[done:]], info.begin + done)
                if count == 0:
                    raise ValueError(f"{self.path!r}: tensor {name!r} ends past the end of the file (truncated)")
                done += count
        self.bytes_read += info.nbytes
        return raw.view(info.dtype).reshape(info.shape)


def _read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Every tensor's `TensorInfo` and the metadata; ValueError saying what is wrong."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"header length {length} exceeds the file ({size} bytes)")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"the header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start, data_size = 8 + length, size - 8 - length
    tensors = {name: _tensor_info(name, entry, start) for name, entry in header.items()}
    covered = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != start + covered:
            raise ValueError(f"tensor {name!r} starts at byte {info.begin - start} of the data, expected {covered} "
                             "(tensors overlap or leave a hole)")
        covered += info.nbytes
    if covered != data_size:
        raise ValueError(f"the tensors cover {covered} bytes of data, the file holds {data_size}")
    return tensors, metadata


def _tensor_info(name: str, entry: Any, start: int) -> TensorInfo:
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
        raise ValueError(f"tensor {name!r}: unknown dtype {entry.get('dtype') if isinstance(entry, dict) else entry!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end]")
    dtype = DTYPES[entry["dtype"]]
    if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {entry['dtype']}")
    return TensorInfo(dtype, tuple(shape), start + offsets[0], start + offsets[1])


class CheckpointFiles:
    """The tensors of a model folder, read lazily: ``model.safetensors``, or the shards that
    ``model.safetensors.index.json`` maps each tensor to (each shard present, inside the folder, and holding
    the tensors mapped to it)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"no checkpoint folder at {self.directory!r}")
        single = os.path.join(self.directory, SAFETENSORS)
        index = os.path.join(self.directory, SAFETENSORS_INDEX)
        if os.path.isfile(single):
            file = SafetensorsFile(single)
            self.files = [file]
            self.location = {name: file for name in file.tensors}
        elif os.path.isfile(index):
            self.files, self.location = _shards(self.directory, index)
        else:
            present = sorted(os.listdir(self.directory))
            hint = " (pytorch_model.bin is not read: re-save it with safe_serialization=True)" if (
                "pytorch_model.bin" in present) else ""
            raise FileNotFoundError(f"no {SAFETENSORS} or {SAFETENSORS_INDEX} in {self.directory!r}; it holds "
                                    f"{present}{hint}")

    @property
    def names(self) -> list[str]:
        return sorted(self.location)

    def info(self, name: str) -> TensorInfo:
        return self.location[name].tensors[name]

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` in its stored dtype (`SafetensorsFile.read`)."""
        return self.location[name].read(name)

    @property
    def bytes_read(self) -> int:
        return sum(file.bytes_read for file in self.files)


class RenamedTensors:
    """Tensors of one or more checkpoints under the names a merge gives them: ``location`` maps each name to the
    `CheckpointFiles` holding it and its name there (e.g. a CLIP image tower stored without the
    ``vision_model.`` prefix, or θ0's image tower read from one checkpoint and its text tower from another).
    Read as `CheckpointFiles` reads."""

    def __init__(self, location: Mapping[str, tuple[CheckpointFiles, str]]):
        self.location = dict(location)

    @property
    def names(self) -> list[str]:
        return sorted(self.location)

    def info(self, name: str) -> TensorInfo:
        files, stored = self.location[name]
        return files.info(stored)

    def read(self, name: str) -> np.ndarray:
        files, stored = self.location[name]
        return files.read(stored)

    @property
    def bytes_read(self) -> int:
        """The bytes read from every checkpoint this reads from (the checkpoints' own counts)."""
        return sum({id(files): files.bytes_read for files, _ in self.location.values()}.values())


def _shards(directory: str, index: str) -> tuple[list[SafetensorsFile], dict[str, SafetensorsFile]]:
    """The shards of an index (`hf_files.read_weight_map`), each present and holding exactly the tensors the
    index maps to it."""
    weight_map = read_weight_map(index)
    files, location = [], {}
    for shard in sorted(set(weight_map.values())):
        names = sorted(name for name, file in weight_map.items() if file == shard)
        path = os.path.join(directory, shard)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{index}: shard {shard!r} (tensor {names[0]!r} and {len(names) - 1} more) is "
                                    "missing")
        file = SafetensorsFile(path)
        if absent := sorted(set(names) - set(file.tensors)):
            raise ValueError(f"{index}: tensors {absent[:5]} ({len(absent)} in all) are in no shard")
        if foreign := sorted(set(file.tensors) - set(names)):
            raise ValueError(f"{index}: shard {shard!r} holds tensor {foreign[0]!r}, which the index maps to "
                             f"{weight_map.get(foreign[0])!r}")
        files.append(file)
        location.update(dict.fromkeys(names, file))
    return files, location


# ----------------------------------------------------------------------------------------------- writing


def shard_names(count: int) -> list[str]:
    """The files of a model in ``count`` shards: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``."""
    return [SAFETENSORS] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def cut_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Names in the given order, cut into consecutive groups of at most ``max_shard_bytes`` (a larger tensor
    alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


class ShardedWriter:
    """Writes the tensors of ``layout`` (name → (dtype, shape), in that order) into ``directory`` as they come
    (`write`, in layout order), then the index (`close`); see the module docstring."""

    def __init__(self, directory: str | os.PathLike, layout: Mapping[str, tuple[Any, tuple[int, ...]]],
                 max_shard_bytes: int, metadata: Mapping[str, str] | None = None):
        self.directory = os.fspath(directory)
        self.layout = {name: (np.dtype(dtype), tuple(shape)) for name, (dtype, shape) in layout.items()}
        for name, (dtype, _) in self.layout.items():
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"tensor {name!r}: safetensors has no dtype {dtype}")
        sizes = [(name, math.prod(shape) * dtype.itemsize) for name, (dtype, shape) in self.layout.items()]
        self.shards = cut_shards(sizes, max_shard_bytes)
        self.files = shard_names(len(self.shards))
        self.metadata = dict(metadata or {"format": "pt"})
        self._order = iter(name for shard in self.shards for name in shard)
        self._shard = -1
        self._remaining: list[str] = []
        self._file: Any = None
        self.bytes_written = 0

    def write(self, name: str, array: np.ndarray) -> None:
        """The next tensor of the layout; its dtype and shape must be the layout's."""
        expected = next(self._order, None)
        if name != expected:
            raise ValueError(f"tensor {name!r} written out of order: the layout's next tensor is {expected!r}")
        dtype, shape = self.layout[name]
        if array.dtype != dtype or tuple(array.shape) != shape:
            raise ValueError(f"tensor {name!r}: got {array.dtype} {tuple(array.shape)}, the layout has {dtype} {shape}")
        if not self._remaining:
            self._open_next()
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        self.bytes_written += array.nbytes
        self._remaining.pop(0)
        if not self._remaining:
            _close_synced(self._file)
            self._file = None

    def _open_next(self) -> None:
        self._shard += 1
        names = self.shards[self._shard]
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for name in names:
            dtype, shape = self.layout[name]
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._file = open(os.path.join(self.directory, self.files[self._shard]), "wb")
        self._file.write(len(text).to_bytes(8, "little") + text)
        self._remaining = list(names)

    def close(self) -> list[str]:
        """Check every tensor was written and write the index of a sharded model; the files written."""
        if (missing := next(self._order, None)) is not None:
            raise ValueError(f"tensor {missing!r} of the layout was never written")
        if len(self.files) == 1:
            return list(self.files)
        total = sum(math.prod(shape) * dtype.itemsize for dtype, shape in self.layout.values())
        weight_map = {name: file for file, names in zip(self.files, self.shards) for name in names}
        with open(os.path.join(self.directory, SAFETENSORS_INDEX), "w", encoding="utf-8") as index:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, index, indent=2, sort_keys=True)
            _close_synced(index)
        return [*self.files, SAFETENSORS_INDEX]

    def abandon(self) -> None:
        """Close an open shard after a failure (the caller removes the folder)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _close_synced(file: Any) -> None:
    file.flush()
    os.fsync(file.fileno())
    file.close()


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flush a folder's entries (the files just created in it) to disk."""
    fd = os.open(os.fspath(directory), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
