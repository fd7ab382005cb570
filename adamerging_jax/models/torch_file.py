"""Read torch checkpoint files without torch: a restricted, bounds-checked unpickler for untrusted files.

``read_torch_file(path)`` returns the saved object with every tensor as a numpy array (dicts, OrderedDicts,
lists and tuples of tensors: a state dict, a bare ``torch.save(tensor)``, ...). It reads both serialisations
``torch.save`` writes:

- **zip** (the default since torch 1.6): an uncompressed zip archive with one folder ``<name>/`` holding
  ``data.pkl`` (the pickled object), ``byteorder`` (``little`` or ``big``; absent in early files, meaning
  little) and one raw file ``data/<key>`` per storage;
- **legacy** (pre-1.6, ``_use_new_zipfile_serialization=False``): five consecutive records in one stream, a
  pickle of the magic number ``0x1950a86a20f9469cfc6c``, of the protocol version (1001), of ``sys_info``
  (endianness, type sizes), of the object, and of the storage keys, followed per key, in that order, by an
  8-byte element count and the storage's raw bytes.

In both, a tensor is pickled as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, backward_hooks[, metadata])`` (``backward_hooks`` an empty ``collections.OrderedDict``), an
``nn.Parameter`` as ``torch._utils._rebuild_parameter(tensor, requires_grad, backward_hooks)``, and a storage
as the persistent id ``("storage", torch.<Type>Storage, key, location, numel)``.

**What is refused.** The unpickler resolves only those globals (``_rebuild_tensor_v2``,
``_rebuild_parameter``, ``collections.OrderedDict`` and the ``torch.*Storage`` types), each mapped to a
harmless stand-in; any other global (``os.system``, ``builtins.eval``, ...) raises ``UnsafeCheckpointError``
before anything runs. Every storage and every tensor view is checked before a byte is read through it
(``UnsafeCheckpointError`` naming the tensor or the storage): the storage holds exactly ``numel × itemsize``
bytes and one dtype; the view's offset, sizes and strides are integers ≥ 0 with as many strides as sizes; its
last element ``offset + Σ_i (size_i − 1)·stride_i`` lies inside the storage (an empty tensor is always fine);
its byte count fits in memory addresses. A file that is neither format, or whose pickle is malformed, raises
``ValueError`` naming it.

**Dtypes.** float64/32/16, int64/32/16/8, uint8, bool and complex64/128 map to the same numpy dtype;
**bfloat16 comes back as ``ml_dtypes.bfloat16``** (the numpy dtype jax uses: ``jnp.asarray`` keeps it bf16),
bit-identical to torch's. Arrays are fresh copies in native byte order, except a view showing more elements
than its storage holds (a zero stride, as ``expand`` makes): that one is returned as a read-only strided view
of the storage instead of being materialised.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
ZIP_MAGIC = b"PK\x03\x04"

STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A torch file asked for a global outside the tensor allow-list, or a storage or tensor view in it is
    inconsistent (out of bounds, wrong byte count, conflicting dtypes)."""


class _NoSetState:
    """Stand-ins refuse pickle's BUILD opcode, so a crafted pickle cannot rewrite their fields after the
    checks."""

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(f"refused to set the state of a {type(self).__name__.lstrip('_')}")


@dataclass(frozen=True)
class _StorageType(_NoSetState):
    """Stand-in for ``torch.<name>Storage``: only its element dtype matters."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


@dataclass(eq=False)
class _Storage(_NoSetState):
    """A storage named in the pickle; ``data`` (1-D, native byte order) is filled once its bytes are read."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class _PendingTensor(_NoSetState):
    """The arguments of one ``_rebuild_tensor_v2`` call, exactly as the pickle gave them; checked and turned
    into an array once the storages are read."""

    storage: Any
    offset: Any
    size: Any
    stride: Any


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: records the view, reads nothing yet."""
    del requires_grad, backward_hooks, metadata
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """Stand-in for ``torch._utils._rebuild_parameter``: a parameter is its tensor."""
    del requires_grad, backward_hooks
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals tensors need, to the stand-ins above."""

    def __init__(self, file: BinaryIO, storages: dict[str, _Storage]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"refused to load global '{module}.{name}'; only collections.OrderedDict, "
            "torch._utils._rebuild_tensor_v2 / _rebuild_parameter and torch.*Storage types are allowed in a "
            "weights file"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unsupported persistent id {pid!r:.200}")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"storage {key!r:.100} has no torch storage type")
        if not isinstance(key, str) or not _is_count(numel):
            raise UnsafeCheckpointError(f"storage {key!r:.100} has a malformed key or element count")
        if len(pid) == 6 and pid[5] is not None:
            raise UnsafeCheckpointError(f"storage {key}: storage views (pre-0.4 files) are not supported")
        storage = self._storages.setdefault(key, _Storage(key, storage_type.dtype, numel))
        if (storage.dtype, storage.numel) != (storage_type.dtype, numel):
            raise UnsafeCheckpointError(
                f"storage {key} is declared as {storage.numel} × {storage.dtype} and as "
                f"{numel} × {storage_type.dtype}"
            )
        return storage


def _is_count(value: Any) -> bool:
    """An int ≥ 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _load_pickle(file: BinaryIO, source: str, storages: dict[str, _Storage]) -> Any:
    """One pickle record through the restricted unpickler; a malformed record is a ValueError naming the file."""
    try:
        return _RestrictedUnpickler(file, storages).load()
    except UnsafeCheckpointError as error:  # raised by the stand-ins, which do not know the file
        raise UnsafeCheckpointError(f"{source}: {error}") from None
    except Exception as error:  # garbage bytes fail in many ways inside pickle: report them as one kind
        raise ValueError(f"{source}: not a readable torch file ({type(error).__name__}: {error})") from error


def _decode_storage(raw: bytes, dtype: np.dtype, little_endian: bool) -> np.ndarray:
    """The storage's bytes as a 1-D array in native byte order (complex values swap per component)."""
    if little_endian == (sys.byteorder == "little"):
        return np.frombuffer(raw, dtype=dtype)
    unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
    return np.frombuffer(raw, dtype=f"u{unit}").byteswap().view(dtype)


def _storage_bytes_needed(source: str, storage: _Storage, available: int) -> int:
    """``numel × itemsize``, checked against the bytes the file has for this storage."""
    needed = storage.numel * storage.dtype.itemsize
    if needed != available:
        raise UnsafeCheckpointError(
            f"{source}: storage {storage.key} declares {storage.numel} {storage.dtype} elements ({needed} bytes) "
            f"but the file holds {available} bytes for it"
        )
    return needed


def _check_view(where: str, tensor: _PendingTensor, storage_numel: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(offset, size, stride) of a tensor view after checking it stays inside its storage.

    Valid: integers ≥ 0, ``len(size) == len(stride)``, and, for a non-empty view, its last element
    ``offset + Σ_i (size_i − 1)·stride_i < storage_numel`` (every element it reads then lies in
    ``[offset, last]`` since all strides are ≥ 0), and its byte count representable as a memory size.
    """
    offset, size, stride = tensor.offset, tensor.size, tensor.stride
    if not _is_count(offset):
        raise UnsafeCheckpointError(f"{where}: storage offset {offset!r:.50} is not an integer ≥ 0")
    if not (isinstance(size, (tuple, list)) and all(_is_count(n) for n in size)):
        raise UnsafeCheckpointError(f"{where}: size {size!r:.100} is not a tuple of integers ≥ 0")
    if not (isinstance(stride, (tuple, list)) and all(_is_count(s) for s in stride)):
        raise UnsafeCheckpointError(f"{where}: stride {stride!r:.100} is not a tuple of integers ≥ 0")
    if len(size) != len(stride):
        raise UnsafeCheckpointError(f"{where}: {len(size)} sizes but {len(stride)} strides")
    size, stride = tuple(size), tuple(stride)
    if 0 in size:
        return offset, size, stride
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage_numel:
        raise UnsafeCheckpointError(
            f"{where}: view (offset {offset}, size {size}, stride {stride}) reaches element {last} of a "
            f"{storage_numel}-element storage"
        )
    if math.prod(size) > sys.maxsize // 16:
        raise UnsafeCheckpointError(f"{where}: size {size} overflows: {math.prod(size)} elements")
    return offset, size, stride


def _to_array(where: str, tensor: _PendingTensor) -> np.ndarray:
    """The checked view as an array: a copy, or a read-only view when it repeats storage elements."""
    storage = tensor.storage
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError(f"{where}: built from a {type(storage).__name__}, not a storage")
    if storage.data is None:
        raise UnsafeCheckpointError(f"{where}: storage {storage.key} was never read from the file")
    data = storage.data
    offset, size, stride = _check_view(f"{where} (storage {storage.key})", tensor, len(data))
    if 0 in size:
        return np.zeros(size, dtype=data.dtype)
    strides = tuple(0 if n == 1 else s * data.itemsize for n, s in zip(size, stride))
    view = np.lib.stride_tricks.as_strided(data[offset:], shape=size, strides=strides, writeable=False)
    return view if math.prod(size) > len(data) else view.copy()


def _resolve(obj: Any, where: str) -> Any:
    """Replace every pending tensor inside (ordered) dicts, lists and tuples by its checked array; ``where``
    names the position (``file: tensor['a'][0]``) for errors."""
    if isinstance(obj, _PendingTensor):
        return _to_array(where, obj)
    if isinstance(obj, dict):
        resolved = type(obj)((key, _resolve(value, f"{where}[{key!r}]")) for key, value in obj.items())
        if hasattr(obj, "__dict__"):  # torch's state dict carries ``_metadata`` as an attribute
            vars(resolved).update(vars(obj))
        return resolved
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(value, f"{where}[{i}]") for i, value in enumerate(obj))
    return obj


def _read_legacy(file: BinaryIO, source: str, size: int) -> tuple[Any, dict[str, _Storage]]:
    """Object and filled storages of a legacy (pre-1.6) stream."""
    storages: dict[str, _Storage] = {}
    if _load_pickle(file, source, storages) != LEGACY_MAGIC:
        raise ValueError(f"{source} is not a torch file (neither a zip archive nor the legacy magic number)")
    protocol = _load_pickle(file, source, storages)
    if protocol != LEGACY_PROTOCOL:
        raise ValueError(f"{source}: unsupported legacy torch protocol {protocol!r:.50}")
    sys_info = _load_pickle(file, source, storages)
    little_endian = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    obj = _load_pickle(file, source, storages)
    keys = _load_pickle(file, source, storages)
    if not isinstance(keys, list):
        raise ValueError(f"{source}: the storage key record is a {type(keys).__name__}, not a list")
    for key in keys:
        if key not in storages:
            raise UnsafeCheckpointError(f"{source}: storage {key!r:.100} is listed but no tensor uses it")
        storage = storages[key]
        header = file.read(8)
        if len(header) != 8:
            raise UnsafeCheckpointError(f"{source}: the file ends before storage {key}")
        (count,) = struct.unpack("<q" if little_endian else ">q", header)
        if count != storage.numel:
            raise UnsafeCheckpointError(
                f"{source}: storage {key} has {count} elements, the pickle says {storage.numel}"
            )
        available = min(storage.numel * storage.dtype.itemsize, size - file.tell())
        raw = file.read(_storage_bytes_needed(source, storage, available))
        storage.data = _decode_storage(raw, storage.dtype, little_endian)
    return obj, storages


def _zip_entry(archive: zipfile.ZipFile, name: str, source: str, size: int) -> bytes:
    """The bytes of one stored (uncompressed, as torch writes) entry that lies inside the file."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise UnsafeCheckpointError(f"{source}: {name} is compressed; torch.save writes entries uncompressed")
    if info.header_offset + info.file_size > size:
        raise UnsafeCheckpointError(f"{source}: {name} claims {info.file_size} bytes, past the end of the file")
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, EOFError, OSError) as error:  # bad CRC, truncated entry
        raise ValueError(f"{source}: cannot read {name} ({error})") from error


def _read_zip(file: BinaryIO, source: str, size: int) -> tuple[Any, dict[str, _Storage]]:
    """Object and filled storages of a zip-format archive."""
    try:
        archive = zipfile.ZipFile(file)
    except zipfile.BadZipFile as error:
        raise ValueError(f"{source}: not a readable zip archive ({error})") from error
    with archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{source}: a torch zip archive holds one <name>/data.pkl, found {pickles[:3]}")
        prefix = pickles[0][: -len("data.pkl")]
        names = set(archive.namelist())
        byteorder = b"little"
        if f"{prefix}byteorder" in names:
            byteorder = _zip_entry(archive, f"{prefix}byteorder", source, size).strip()
        if byteorder not in (b"little", b"big"):
            raise ValueError(f"{source}: unknown byte order {byteorder[:20]!r}")
        storages: dict[str, _Storage] = {}
        obj = _load_pickle(io.BytesIO(_zip_entry(archive, pickles[0], source, size)), source, storages)
        for key, storage in storages.items():
            name = f"{prefix}data/{key}"
            if name not in names:
                raise UnsafeCheckpointError(f"{source}: storage {key} has no {name} in the archive")
            _storage_bytes_needed(source, storage, archive.getinfo(name).file_size)
            raw = _zip_entry(archive, name, source, size)
            storage.data = _decode_storage(raw, storage.dtype, byteorder == b"little")
    return obj, storages


def read_torch_file(path: str | os.PathLike) -> Any:
    """The object a ``torch.save`` file holds, every tensor a numpy array, read without torch or code execution.

    Reads the zip and the legacy format (module docstring). Raises ``UnsafeCheckpointError`` for a global
    outside the allow-list or an inconsistent storage or view (naming the tensor or storage), ``ValueError``
    for a file that is not a readable torch file, ``FileNotFoundError`` when ``path`` does not exist.
    """
    source = os.fspath(path)
    with open(source, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        is_zip = file.read(4) == ZIP_MAGIC
        file.seek(0)
        obj, _ = (_read_zip if is_zip else _read_legacy)(file, source, size)
    try:
        return _resolve(obj, f"{source}: tensor")
    except RecursionError as error:  # a crafted pickle can nest containers deeply, or in a cycle
        raise ValueError(f"{source}: containers nested too deeply (or in a cycle) to be a checkpoint") from error
