"""Every bad file the loaders and the cache handle, one table row each: what it is, what the API does with it.

``CASES`` is the table (a README can list ``id``, ``description`` and ``expected``). A row builds its input
under ``tmp_path`` and calls the public API. ``expected`` is the exception type raised (its message one line
naming the culprit), ``"warning+None"`` (a ``CacheWarning`` naming the culprit and a ``None`` result: a cache
miss) or ``"handled"`` (the input is read correctly; the row checks the values itself).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from adamerging_jax.cache import CacheWarning, load_tree, save_tree
from adamerging_jax.coefficient_formats import read_named_json
from adamerging_jax.data.strict_text import read_json_object
from adamerging_jax.data.text import read_prompts
from adamerging_jax.data.folder import load_rgb
from adamerging_jax.data.unlabeled import ImageFileList, UnlabeledFolder
from adamerging_jax.models.torch_file import UnsafeCheckpointError, read_torch_file
from test_folder_source import png_header_only
from test_torch_file import FLOATS, state_dict_pickle, tensor_pickle, write_legacy, write_zip

WARNING_AND_NONE = "warning+None"
HANDLED = "handled"


@dataclass(frozen=True)
class BadInput:
    id: str
    description: str
    expected: type[BaseException] | str
    run: Callable[[Path], Any] = field(repr=False)
    culprit: str = ""


# ------------------------------------------------------------------------------------------- torch files


def _torch_view(**view) -> Callable[[Path], Any]:
    def run(tmp_path: Path) -> Any:
        path = tmp_path / "crafted.pt"
        write_zip(path, state_dict_pickle({"w": tensor_pickle(**view)}), {"0": FLOATS.tobytes()})
        return read_torch_file(path)

    return run


def _torch_truncated_storage(tmp_path: Path) -> Any:
    path = tmp_path / "short.pt"
    write_legacy(path, state_dict_pickle({"w": tensor_pickle()}), [("0", 6, FLOATS[:4].tobytes())])
    return read_torch_file(path)


def _torch_two_dtypes(tmp_path: Path) -> Any:
    path = tmp_path / "two.pt"
    payload = state_dict_pickle({"a": tensor_pickle(), "b": tensor_pickle(storage="LongStorage")})
    write_zip(path, payload, {"0": FLOATS.tobytes()})
    return read_torch_file(path)


def _torch_foreign_global(tmp_path: Path) -> Any:
    path = tmp_path / "evil.pt"
    write_zip(path, b"\x80\x02cbuiltins\neval\nX\x07\x00\x00\x001 + 1 #\x85R.", {})
    return read_torch_file(path)


def _torch_compressed(tmp_path: Path) -> Any:
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", state_dict_pickle({"w": tensor_pickle()}))
    return read_torch_file(path)


def _torch_payload(name: str, payload: bytes) -> Callable[[Path], Any]:
    def run(tmp_path: Path) -> Any:
        write_zip(tmp_path / name, payload, {"0": FLOATS.tobytes()})
        return read_torch_file(tmp_path / name)

    return run


def _write_and_read(name: str, data: bytes) -> Callable[[Path], Any]:
    def run(tmp_path: Path) -> Any:
        (tmp_path / name).write_bytes(data)
        return read_torch_file(tmp_path / name)

    return run


# ------------------------------------------------------------------------------------------------ images


def _image_bomb(tmp_path: Path) -> Any:
    png_header_only(tmp_path / "bomb.png", 20_000, 20_000)
    return load_rgb(str(tmp_path / "bomb.png"))


def _image_corrupt(tmp_path: Path) -> Any:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n then nothing")
    return load_rgb(str(tmp_path / "broken.png"))


def _image_16_bit(tmp_path: Path) -> Any:
    Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(load_rgb(str(tmp_path / "deep.png"))[0, :, 0], [0, 128, 255])


def _image_rgba(tmp_path: Path) -> Any:
    Image.new("RGBA", (3, 2), (10, 20, 30, 0)).save(tmp_path / "clear.png")
    np.testing.assert_array_equal(load_rgb(str(tmp_path / "clear.png")), np.full((2, 3, 3), [10, 20, 30]))


# ---------------------------------------------------------------------------------------- unlabeled data


def _empty_folder(tmp_path: Path) -> Any:
    (tmp_path / "my_images").mkdir()
    (tmp_path / "my_images" / "notes.txt").write_text("no images here")
    return UnlabeledFolder(tmp_path / "my_images")


def _missing_list_entry(tmp_path: Path) -> Any:
    Image.new("RGB", (2, 2)).save(tmp_path / "here.png")
    (tmp_path / "list.txt").write_text("here.png\n# a comment\ngone.png\n")
    return ImageFileList(tmp_path / "list.txt")


def _missing_list(tmp_path: Path) -> Any:
    return ImageFileList(tmp_path / "nowhere.txt")


def _folder_with_link(target: str, name: str = "dead.png", recursive: bool = False) -> Callable[[Path], Any]:
    """An unlabeled folder of one image and a symbolic link ``name`` → ``target``."""
    def run(tmp_path: Path) -> Any:
        folder = tmp_path / "images"
        (folder / "sub").mkdir(parents=True)
        Image.new("RGB", (2, 2)).save(folder / "sub" / "0.png")
        (folder / "sub" / name).symlink_to(target)
        return UnlabeledFolder(folder, recursive=recursive)

    return run


def _looping_links(tmp_path: Path) -> Any:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (2, 2)).save(tmp_path / "images" / "0.png")
    (tmp_path / "images" / "a.png").symlink_to("b.png")
    (tmp_path / "images" / "b.png").symlink_to("a.png")
    return UnlabeledFolder(tmp_path / "images")


LATIN_1 = "café\n".encode("latin-1")  # é is byte 0xe9 at offset 3


def _latin_1_list(tmp_path: Path) -> Any:
    (tmp_path / "list.txt").write_bytes(b"# images\n" + LATIN_1)
    return ImageFileList(tmp_path / "list.txt")


def _prompts(name: str, data: bytes, field: str | None = None) -> Callable[[Path], Any]:
    def run(tmp_path: Path) -> Any:
        (tmp_path / name).write_bytes(data)
        return read_prompts(tmp_path / name, field)

    return run


def _read_json(data: str, read: Callable[[Path], Any] = read_json_object) -> Callable[[Path], Any]:
    def run(tmp_path: Path) -> Any:
        (tmp_path / "file.json").write_text(data, encoding="utf-8")
        return read(tmp_path / "file.json")

    return run


# ----------------------------------------------------------------------------------------------- caches

TREE = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}


def _cache_file(tmp_path: Path, damage: Callable[[bytes], bytes]) -> Path:
    path = tmp_path / "tree.npz"
    save_tree(path, TREE)
    path.write_bytes(damage(path.read_bytes()))
    return path


def _flip_byte_in_w(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.getinfo("w.npy")
    position = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size - 1
    return data[:position] + bytes([data[position] ^ 1]) + data[position + 1 :]


def _other_values(data: bytes) -> bytes:
    with np.load(io.BytesIO(data)) as arrays:
        replaced = {name: arrays[name] for name in arrays.files}
    replaced["w"] = replaced["w"][::-1].copy()
    buffer = io.BytesIO()
    np.savez(buffer, **replaced)
    return buffer.getvalue()


def _cache(damage: Callable[[bytes], bytes], like: Any = TREE) -> Callable[[Path], Any]:
    return lambda tmp_path: load_tree(_cache_file(tmp_path, damage), like)


CASES: list[BadInput] = [
    BadInput("torch_offset_past_end", "torch file: a tensor view whose storage offset lies past its storage",
             UnsafeCheckpointError, _torch_view(offset=6, size=(1,), stride=(1,)), "tensor['w'] (storage 0)"),
    BadInput("torch_stride_too_large", "torch file: a tensor view whose strides reach past its storage",
             UnsafeCheckpointError, _torch_view(size=(2, 3), stride=(4, 1)), "tensor['w'] (storage 0)"),
    BadInput("torch_negative_stride", "torch file: a tensor view with a negative stride",
             UnsafeCheckpointError, _torch_view(offset=5, size=(6,), stride=(-1,)), "tensor['w'] (storage 0)"),
    BadInput("torch_size_overflow", "torch file: a tensor view whose sizes overflow 64-bit element counts",
             UnsafeCheckpointError, _torch_view(size=(2**62, 2**62), stride=(0, 0)), "tensor['w'] (storage 0)"),
    BadInput("torch_truncated_storage", "torch file: a storage with fewer bytes than its declared elements",
             UnsafeCheckpointError, _torch_truncated_storage, "storage 0 declares 6 float32 elements"),
    BadInput("torch_storage_two_dtypes", "torch file: one storage declared with two dtypes",
             UnsafeCheckpointError, _torch_two_dtypes, "storage 0 is declared as"),
    BadInput("torch_disallowed_global", "torch file: a pickle calling a global outside the tensor allow-list",
             UnsafeCheckpointError, _torch_foreign_global, "builtins.eval"),
    BadInput("torch_compressed_entry", "torch file: a zip entry compressed (torch.save never compresses)",
             UnsafeCheckpointError, _torch_compressed, "archive/data.pkl is compressed"),
    BadInput("torch_self_containing_list", "torch file: a pickled list that contains itself",
             ValueError, _torch_payload("cycle.pt", b"\x80\x02]q\x00(h\x00e."), "cycle.pt"),
    BadInput("torch_rewritten_view", "torch file: a pickle that rewrites a tensor view after it was built (BUILD)",
             UnsafeCheckpointError, _torch_payload("build.pt", b"\x80\x02" + tensor_pickle() + b"}b."),
             "build.pt: refused to set the state of a PendingTensor"),
    BadInput("torch_garbage", "torch file: random bytes, neither a zip archive nor a legacy stream",
             ValueError, _write_and_read("garbage.pt", np.random.default_rng(0).bytes(64)), "garbage.pt"),
    BadInput("torch_broken_zip", "torch file: a zip header with no archive behind it",
             ValueError, _write_and_read("broken.pt", b"PK\x03\x04" + bytes(40)), "broken.pt"),
    BadInput("image_decompression_bomb", "image: a 20000 × 20000 PNG of 100 bytes (decompression bomb)",
             ValueError, _image_bomb, "bomb.png"),
    BadInput("image_corrupt", "image: a file with an image extension that does not decode",
             ValueError, _image_corrupt, "broken.png"),
    BadInput("image_16_bit", "image: a 16-bit grayscale PNG is scaled to 0–255, not saturated",
             HANDLED, _image_16_bit),
    BadInput("image_transparent", "image: RGBA with alpha 0 keeps its colour (alpha dropped, as torchvision)",
             HANDLED, _image_rgba),
    BadInput("unlabeled_empty_folder", "unlabeled data: a folder without image files",
             ValueError, _empty_folder, "my_images' holds no images"),
    BadInput("unlabeled_missing_list_entry", "unlabeled data: an image list naming a file that does not exist",
             FileNotFoundError, _missing_list_entry, "line 3"),
    BadInput("unlabeled_missing_list", "unlabeled data: an image list that does not exist",
             FileNotFoundError, _missing_list, "nowhere.txt"),
    BadInput("unlabeled_broken_link", "unlabeled data: a symbolic link to a missing image (never dropped silently)",
             ValueError, _folder_with_link("gone.png", recursive=True), "dead.png' is a broken symbolic link"),
    BadInput("unlabeled_link_loop", "unlabeled data: two symbolic links pointing at each other",
             ValueError, _looping_links, "a.png' is a broken symbolic link: its target 'b.png' does not exist or the "
             "link loops"),
    BadInput("unlabeled_folder_loop", "unlabeled data, recursive: a linked subfolder leading back to the folder",
             ValueError, _folder_with_link("..", name="up", recursive=True), "up' leads to"),
    BadInput("unlabeled_list_not_utf8", "unlabeled data: an image list in Latin-1, not UTF-8",
             ValueError, _latin_1_list, "list.txt: not UTF-8 text: byte 0xe9 at byte offset 12"),
    BadInput("prompts_not_utf8", "prompts: a prompt file in Latin-1, not UTF-8",
             ValueError, _prompts("p.txt", b"a prompt\n" + LATIN_1),
             "p.txt: not UTF-8 text: byte 0xe9 at byte offset 12"),
    BadInput("prompts_invisible", "prompts: a prompt of zero-width characters only", ValueError,
             _prompts("p.txt", "a prompt\n\u200b\u200d\u2060\n".encode()), "p.txt:2: the prompt"),
    BadInput("prompts_jsonl_invisible", "prompts: a JSONL prompt field of spaces and a soft hyphen", ValueError,
             _prompts("p.jsonl", b'{"q": "ok"}\n{"q": "  \\u00ad "}\n', "q"), "p.jsonl:2: the prompt"),
    BadInput("json_duplicate_key", "JSON (config, index, adapter config): a key given twice in one object",
             ValueError, _read_json('{"a": 1, "b": {"c": 1, "c": 2}}'), "key(s) ['c'] given more than once"),
    BadInput("json_not_object", "JSON (config, index, adapter config): a list where an object belongs",
             ValueError, _read_json("[1, 2]"), "file.json: expected a JSON object {...}, got list"),
    BadInput("lambdas_json_duplicate", "named λ JSON: one tensor given twice", ValueError,
             _read_json('{"t": [0.1, 0.2], "t": [0.3, 0.4]}', read_named_json), "key(s) ['t'] given more than once"),
    BadInput("cache_truncated", "tree cache: a truncated file",
             WARNING_AND_NONE, _cache(lambda data: data[: len(data) // 2]), "tree.npz: it cannot be read"),
    BadInput("cache_bit_flip", "tree cache: one flipped bit in a leaf's values",
             WARNING_AND_NONE, _cache(_flip_byte_in_w), "tree.npz: it cannot be read (BadZipFile: Bad CRC-32"),
    BadInput("cache_not_a_zip", "tree cache: a file that is not a zip archive",
             WARNING_AND_NONE, _cache(lambda data: b"\0" * 64), "tree.npz: it cannot be read"),
    BadInput("cache_wrong_values", "tree cache: a well-formed file whose values are not the checksummed ones",
             WARNING_AND_NONE, _cache(_other_values), "tree.npz: its values do not match its sha256 checksum"),
    BadInput("cache_wrong_leaves", "tree cache: a file of another tree (other leaf shapes)",
             WARNING_AND_NONE, _cache(lambda data: data, {"w": np.zeros((3, 2), np.float32), "b": TREE["b"]}),
             "leaf 'w' is float32[2, 3]"),
]  # fmt: skip


def test_the_table_is_well_formed():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    for case in CASES:
        assert "\n" not in case.description and case.description
        assert case.expected in (WARNING_AND_NONE, HANDLED) or issubclass(case.expected, BaseException), case.id
        assert bool(case.culprit) == (case.expected != HANDLED), case.id


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: BadInput, tmp_path):
    if case.expected == HANDLED:
        case.run(tmp_path)
    elif case.expected == WARNING_AND_NONE:
        with pytest.warns(CacheWarning) as record:
            assert case.run(tmp_path) is None
        messages = [str(warning.message) for warning in record]
        assert len(messages) == 1 and case.culprit in messages[0], messages
    else:
        with pytest.raises(case.expected) as info:
            case.run(tmp_path)
        message = str(info.value)
        assert case.culprit in message, message
        assert "\n" not in message, message
