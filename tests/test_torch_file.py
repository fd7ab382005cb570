"""The torch-free reader of torch files: bit-identical to torch.load on both formats, and crafted storages and
views (out of bounds, overflowing, truncated, foreign globals) refused before any byte is read through them.

The crafted files are written here opcode by opcode, without torch (``tensor_pickle``, ``write_legacy``,
``write_zip``); the bad-input table of test_bad_inputs_files.py reuses these builders.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from adamerging_jax.models.torch_file import LEGACY_MAGIC, LEGACY_PROTOCOL, UnsafeCheckpointError, read_torch_file


# ---------------------------------------------------------------------------------------------------------
# Hand-made torch pickles (protocol 2 opcodes, as torch writes them)


def _ops(value) -> bytes:
    """The opcodes that push one plain value (int, str, tuple of ints): its pickle without PROTO and STOP."""
    return pickle.dumps(value, protocol=2)[2:-1]


def tensor_pickle(key="0", numel=6, offset=0, size=(2, 3), stride=(3, 1), storage="FloatStorage") -> bytes:
    """Opcodes of ``_rebuild_tensor_v2(("storage", torch.<storage>, key, "cpu", numel), offset, size, stride,
    False, OrderedDict())``."""
    pid = b"(" + _ops("storage") + f"ctorch\n{storage}\n".encode() + _ops(key) + _ops("cpu") + _ops(numel) + b"tQ"
    hooks = b"ccollections\nOrderedDict\n)R"
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + pid
        + _ops(offset)
        + _ops(tuple(size))
        + _ops(tuple(stride))
        + b"\x89"
        + hooks
        + b"tR"
    )


def state_dict_pickle(tensors: dict[str, bytes]) -> bytes:
    """A whole pickle of ``{name: tensor}`` from tensor opcodes."""
    items = b"".join(_ops(name) + ops for name, ops in tensors.items())
    return b"\x80\x02}(" + items + b"u."


def write_legacy(path, payload: bytes, storages: list[tuple[str, int, bytes]]) -> None:
    """A legacy torch file: magic, protocol, sys_info, ``payload`` (a whole pickle), the keys, then per
    storage its 8-byte element count and raw bytes."""
    with open(path, "wb") as file:
        for record in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(record, file, protocol=2)
        file.write(payload)
        pickle.dump([key for key, _, _ in storages], file, protocol=2)
        for _, count, raw in storages:
            file.write(count.to_bytes(8, "little") + raw)


def write_zip(path, payload: bytes, storages: dict[str, bytes], byteorder: bytes = b"little") -> None:
    """A zip-format torch file: ``archive/data.pkl``, ``archive/byteorder``, ``archive/data/<key>``."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", byteorder)
        for key, raw in storages.items():
            archive.writestr(f"archive/data/{key}", raw)


FLOATS = np.arange(6, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------
# Against torch.load


def _assert_same(ours, theirs, torch) -> None:
    """Same container types and keys, and per tensor the same dtype, shape and bytes."""
    if isinstance(theirs, torch.Tensor):
        theirs = theirs.detach().contiguous()
        assert isinstance(ours, np.ndarray)
        assert ours.shape == tuple(theirs.shape)
        if theirs.dtype == torch.bfloat16:
            assert ours.dtype == ml_dtypes.bfloat16
            assert ours.view(np.uint16).tobytes() == theirs.view(torch.int16).numpy().tobytes()
        else:
            assert ours.dtype == theirs.numpy().dtype
            assert ours.tobytes() == theirs.numpy().tobytes()
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs) and list(ours) == list(theirs)
        for key in theirs:
            _assert_same(ours[key], theirs[key], torch)
    else:
        assert type(ours) is type(theirs) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            _assert_same(a, b, torch)


@pytest.fixture(scope="module")
def saved_objects():
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    state = {
        "fp32": torch.linspace(-3, 3, 7),
        "fp16": torch.linspace(-1, 1, 5, dtype=torch.float16),
        "bf16": torch.tensor([1.5, -2.25, 3e38, 1e-40], dtype=torch.bfloat16),
        "int64": torch.tensor([3, -2, 2**40], dtype=torch.int64),
        "uint8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "transposed": base.t(),  # non-contiguous strides
        "offset_slice": base[1:, 2:5],  # storage offset and strides
        "shares_storage": base,
        "expanded": torch.tensor([2.0]).expand(3, 4),  # stride 0
        "empty": torch.zeros(0, 5),
        "scalar": torch.tensor(1.5, dtype=torch.float64),
        "parameter": torch.nn.Parameter(torch.ones(2, 2)),
    }
    nested = {"layers": [base[0], (base[1], torch.tensor([7], dtype=torch.int32))], "bare": base[:, 1]}
    return torch, {"state": state, "bare": base[::2, ::3], "nested": nested}


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("what", ["state", "bare", "nested"])
def test_bit_identical_to_torch_load(tmp_path, saved_objects, zip_format, what):
    torch, objects = saved_objects
    path = tmp_path / f"{what}.pt"
    torch.save(objects[what], path, _use_new_zipfile_serialization=zip_format)
    reference = torch.load(path, weights_only=True)
    _assert_same(read_torch_file(path), reference, torch)


def test_a_state_dict_keeps_its_ordered_dict_and_metadata(tmp_path):
    torch = pytest.importorskip("torch")
    state = torch.nn.Linear(3, 2).state_dict()
    path = tmp_path / "linear.pt"
    torch.save(state, path)
    ours = read_torch_file(path)
    _assert_same(ours, torch.load(path, weights_only=True), torch)
    assert ours._metadata == state._metadata


def test_expanded_view_is_a_read_only_view_and_other_arrays_are_writable_copies(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "views.pt"
    torch.save({"expanded": torch.tensor([2.0, 3.0]).expand(1000, 2), "plain": torch.ones(3)}, path)
    ours = read_torch_file(path)
    assert ours["expanded"].strides == (0, 4) and not ours["expanded"].flags.writeable
    assert ours["plain"].flags.writeable and ours["plain"].flags.owndata


def test_big_endian_zip_archive(tmp_path):
    values = np.array([1.5, -2.0, 3.25], dtype=np.float64)
    complex_values = np.array([1 + 2j, -3.5j], dtype=np.complex64)
    payload = state_dict_pickle(
        {
            "f": tensor_pickle("0", 3, 0, (3,), (1,), "DoubleStorage"),
            "c": tensor_pickle("1", 2, 0, (2,), (1,), "ComplexFloatStorage"),
        }
    )
    path = tmp_path / "big.pt"
    write_zip(path, payload, {"0": values.astype(">f8").tobytes(), "1": complex_values.astype(">c8").tobytes()}, b"big")
    ours = read_torch_file(path)
    np.testing.assert_array_equal(ours["f"], values)
    np.testing.assert_array_equal(ours["c"], complex_values)


# ---------------------------------------------------------------------------------------------------------
# Crafted files, no torch


def test_crafted_files_read_back_in_both_formats(tmp_path):
    """The builders themselves are right: a valid view over a crafted storage gives the numpy view."""
    payload = state_dict_pickle({"w": tensor_pickle(offset=1, size=(2, 2), stride=(1, 2), numel=6)})
    write_legacy(tmp_path / "a.pt", payload, [("0", 6, FLOATS.tobytes())])
    write_zip(tmp_path / "b.pt", payload, {"0": FLOATS.tobytes()})
    expected = np.array([[1, 3], [2, 4]], dtype=np.float32)
    for name in ("a.pt", "b.pt"):
        np.testing.assert_array_equal(read_torch_file(tmp_path / name)["w"], expected)


BAD_VIEWS = {
    "offset_past_end": dict(offset=6, size=(1,), stride=(1,)),
    "last_element_past_end": dict(offset=1, size=(2, 3), stride=(3, 1)),
    "stride_too_large": dict(offset=0, size=(2, 3), stride=(4, 1)),
    "negative_stride": dict(offset=5, size=(6,), stride=(-1,)),
    "negative_offset": dict(offset=-1, size=(1,), stride=(1,)),
    "negative_size": dict(offset=0, size=(-2,), stride=(1,)),
    "size_overflow": dict(offset=0, size=(2**62, 4), stride=(4, 1)),
    "zero_stride_size_overflow": dict(offset=0, size=(2**62, 2**62), stride=(0, 0)),
    "sizes_and_strides_differ": dict(offset=0, size=(2, 3), stride=(3,)),
    "float_offset": dict(offset=0.5, size=(1,), stride=(1,)),
}


@pytest.mark.parametrize("write", [write_legacy, write_zip], ids=["legacy", "zip"])
@pytest.mark.parametrize("name", list(BAD_VIEWS))
def test_out_of_bounds_views_are_refused_naming_the_tensor(tmp_path, write, name):
    payload = state_dict_pickle({"good": tensor_pickle(), "layer.weight": tensor_pickle(**BAD_VIEWS[name])})
    path = tmp_path / "bad.pt"
    write(path, payload, [("0", 6, FLOATS.tobytes())] if write is write_legacy else {"0": FLOATS.tobytes()})
    with pytest.raises(UnsafeCheckpointError, match=r"tensor\['layer\.weight'\] \(storage 0\)") as info:
        read_torch_file(path)
    assert str(path) in str(info.value)


def test_truncated_and_mislabelled_storages_are_refused(tmp_path):
    short = FLOATS[:5].tobytes()
    write_legacy(tmp_path / "legacy.pt", state_dict_pickle({"w": tensor_pickle()}), [("0", 6, short)])
    with pytest.raises(UnsafeCheckpointError, match=r"storage 0 declares 6 float32 elements \(24 bytes\).*20 bytes"):
        read_torch_file(tmp_path / "legacy.pt")
    write_legacy(tmp_path / "count.pt", state_dict_pickle({"w": tensor_pickle()}), [("0", 5, FLOATS.tobytes())])
    with pytest.raises(UnsafeCheckpointError, match="storage 0 has 5 elements, the pickle says 6"):
        read_torch_file(tmp_path / "count.pt")
    write_zip(tmp_path / "zip.pt", state_dict_pickle({"w": tensor_pickle()}), {"0": short})
    with pytest.raises(UnsafeCheckpointError, match=r"storage 0 declares 6 float32 elements \(24 bytes\)"):
        read_torch_file(tmp_path / "zip.pt")
    # the dtype's size must divide the bytes the same way: 24 bytes are not 6 float64 elements
    doubles = state_dict_pickle({"w": tensor_pickle(storage="DoubleStorage")})
    write_zip(tmp_path / "dtype.pt", doubles, {"0": FLOATS.tobytes()})
    with pytest.raises(UnsafeCheckpointError, match=r"6 float64 elements \(48 bytes\)"):
        read_torch_file(tmp_path / "dtype.pt")
    write_zip(tmp_path / "missing.pt", state_dict_pickle({"w": tensor_pickle()}), {})
    with pytest.raises(UnsafeCheckpointError, match="storage 0 has no archive/data/0"):
        read_torch_file(tmp_path / "missing.pt")


def test_one_storage_with_two_dtypes_is_refused(tmp_path):
    payload = state_dict_pickle({"a": tensor_pickle(), "b": tensor_pickle(storage="IntStorage")})
    write_zip(tmp_path / "two.pt", payload, {"0": FLOATS.tobytes()})
    with pytest.raises(UnsafeCheckpointError, match="storage 0 is declared as 6 × float32 and as 6 × int32"):
        read_torch_file(tmp_path / "two.pt")


def test_compressed_entries_are_refused(tmp_path):
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", state_dict_pickle({"w": tensor_pickle()}))
        archive.writestr("archive/data/0", FLOATS.tobytes())
    with pytest.raises(UnsafeCheckpointError, match="archive/data.pkl is compressed"):
        read_torch_file(path)


class _RunsShell:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("write", [write_legacy, write_zip], ids=["legacy", "zip"])
def test_a_foreign_global_is_refused_before_it_runs(tmp_path, write):
    marker = tmp_path / "pwned"
    path = tmp_path / "malicious.pt"
    write(path, pickle.dumps({"weight": _RunsShell(str(marker))}, protocol=2), [] if write is write_legacy else {})
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load global '(posix|os|nt)\.system'") as info:
        read_torch_file(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_pickle_build_cannot_rewrite_a_checked_stand_in(tmp_path):
    """BUILD on the pending tensor (``{"offset": 10**9}``) is refused, not applied after the checks."""
    payload = b"\x80\x02}(" + _ops("w") + tensor_pickle() + _ops({"offset": 10**9}) + b"bu."
    write_zip(tmp_path / "build.pt", payload, {"0": FLOATS.tobytes()})
    with pytest.raises(UnsafeCheckpointError, match="refused to set the state of a PendingTensor"):
        read_torch_file(tmp_path / "build.pt")


def test_a_cyclic_container_is_a_value_error(tmp_path):
    payload = b"\x80\x02]q\x00(h\x00e."  # a list that contains itself
    write_zip(tmp_path / "cycle.pt", payload, {})
    with pytest.raises(ValueError, match="cycle.pt: containers nested too deeply"):
        read_torch_file(tmp_path / "cycle.pt")


def test_files_that_are_not_torch_files_are_value_errors_naming_them(tmp_path):
    cases = {
        "garbage.pt": np.random.default_rng(0).bytes(64),
        "empty.pt": b"",
        "number.pkl": pickle.dumps(12345, protocol=2),
        "broken.zip": b"PK\x03\x04" + b"\x00" * 32,
        "truncated.pt": None,
    }
    buffer = io.BytesIO()
    write_zip(buffer, state_dict_pickle({"w": tensor_pickle()}), {"0": FLOATS.tobytes()})
    cases["truncated.pt"] = buffer.getvalue()[:-40]
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name) as info:
            read_torch_file(tmp_path / name)
        assert not isinstance(info.value, UnsafeCheckpointError), name
    with pytest.raises(FileNotFoundError):
        read_torch_file(tmp_path / "absent.pt")
