"""The local class-folder source, the file policy and the image decoder every folder reader shares."""
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from adamerging_jax.data.folder import FolderImages, list_images, load_rgb, task_vectors_test_split
from adamerging_jax.data.packaged import read_class_folders


def _save(path, pixels, fmt="PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


@pytest.fixture
def tree(tmp_path):
    """root/test/{b_cls, a_cls}/ with 2 and 3 lossless images; returns the pixels by path."""
    rng = np.random.default_rng(0)
    pixels = {}
    for name, count in (("b_cls", 2), ("a_cls", 3)):
        for i in range(count):
            path = str(tmp_path / "test" / name / f"{i}.png")
            pixels[path] = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
            _save(path, pixels[path])
    return tmp_path, pixels


def test_reads_every_image_with_sorted_class_labels(tree):
    root, pixels = tree
    source = FolderImages(root, "test")
    assert source.classes == ["a_cls", "b_cls"] and len(source) == 5
    for index, (path, label) in enumerate(source.samples):
        image, got = source[index]
        np.testing.assert_array_equal(image, pixels[path])
        assert got == label == source.classes.index(os.path.basename(os.path.dirname(path)))


def test_grey_image_becomes_rgb(tmp_path):
    _save(str(tmp_path / "s" / "c" / "x.png"), np.arange(12, dtype=np.uint8).reshape(3, 4))
    image, _ = FolderImages(tmp_path, "s")[0]
    assert image.shape == (3, 4, 3) and (image[..., 0] == image[..., 2]).all()


def test_explicit_classes_fix_the_labels_and_a_missing_class_is_named(tree):
    root, _ = tree
    source = FolderImages(root, "test", classes=["b_cls", "a_cls"])
    assert {label for path, label in source.samples if "b_cls" in path} == {0}
    with pytest.raises(FileNotFoundError, match="c_cls"):
        FolderImages(root, "test", classes=["a_cls", "b_cls", "c_cls"])
    with pytest.raises(ValueError, match="b_cls"):
        FolderImages(root, "test", classes=["a_cls"])


def test_missing_or_empty_split_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="'val'"):
        FolderImages(tmp_path, "val")
    os.makedirs(tmp_path / "val")
    with pytest.raises(ValueError, match="'val'.*no class folders"):
        FolderImages(tmp_path, "val")
    os.makedirs(tmp_path / "val" / "empty_class")
    with pytest.raises(ValueError, match="empty_class.*no image"):
        FolderImages(tmp_path, "val")


def test_one_file_policy_for_both_folder_readers(tree):
    """Hidden files and folders ignored, other extensions skipped, image extensions in any case listed, an
    undecodable image an error naming it: the same for FolderImages and packaged.read_class_folders."""
    root, _ = tree
    a_cls = root / "test" / "a_cls"
    (a_cls / "notes.txt").write_text("x")
    (a_cls / "labels.csv").write_text("x")
    (a_cls / ".DS_Store").write_text("x")
    (a_cls / "._0.png").write_bytes(b"AppleDouble, not a png")  # hidden: ignored even with an image extension
    (a_cls / "sub.png").mkdir()  # a folder is not an image
    (root / "test" / ".ipynb_checkpoints").mkdir()  # a hidden folder is not a class
    _save(str(a_cls / "UPPER.PNG"), np.full((5, 6, 3), 9, np.uint8))
    source = FolderImages(root, "test")
    assert source.classes == ["a_cls", "b_cls"]
    expected = sorted(["0.png", "1.png", "2.png", "UPPER.PNG"])
    assert [os.path.basename(p) for p in source.paths if "a_cls" in p] == expected
    classes, images, labels = read_class_folders(str(root / "test"), 5)
    assert classes == ("a_cls", "b_cls") and np.bincount(labels).tolist() == [4, 2]
    assert list_images(a_cls) == [p for p in source.paths if "a_cls" in p]
    (a_cls / "3.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"3\.jpg"):
        read_class_folders(str(root / "test"), 5)
    with pytest.raises(ValueError, match=r"3\.jpg"):
        FolderImages(root, "test").verify()


def test_list_images_recursive_sorts_by_relative_path(tmp_path):
    for relative in ("b.png", "a/z.png", "a/b/c.png", ".hidden/x.png", "a/.git/y.png"):
        _save(str(tmp_path / relative), np.zeros((2, 2, 3), np.uint8))
    names = lambda paths: [os.path.relpath(p, tmp_path) for p in paths]  # noqa: E731
    assert names(list_images(tmp_path)) == ["b.png"]
    expected = [os.path.join("a", "b", "c.png"), os.path.join("a", "z.png"), "b.png"]
    assert names(list_images(tmp_path, recursive=True)) == expected
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "only_notes").mkdir()
    (tmp_path / "only_notes" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="only_notes' holds no images"):
        list_images(tmp_path / "only_notes")


def png_header_only(path, width: int, height: int) -> None:
    """A 1-bit grayscale PNG whose header claims ``width × height`` and whose data is empty: a few bytes
    on disk that decode to a huge image (a decompression bomb, as far as opening it is concerned)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    with open(path, "wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n" + body)


@pytest.mark.parametrize("side", [20_000, 10_000], ids=["pil_error", "pil_warning"])
def test_a_decompression_bomb_is_one_error_naming_the_file(tmp_path, side):
    """20000² is over twice PIL's limit (PIL raises), 10000² between once and twice (PIL only warns)."""
    path = tmp_path / "bomb.png"
    png_header_only(path, side, side)
    assert path.stat().st_size < 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ValueError, match=r"bomb\.png' is refused as a possible decompression bomb"):
            load_rgb(str(path))
    with warnings.catch_warnings():  # with warnings as errors, still the same one error
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"bomb\.png' is refused as a possible decompression bomb"):
            load_rgb(str(path))


def test_16_bit_grayscale_is_scaled_not_saturated(tmp_path):
    values = np.array([[0, 1, 128, 129], [257, 1000, 32768, 65535]], np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"
    expected = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    assert expected.tolist() == [[0, 0, 0, 1], [1, 4, 128, 255]]
    image = load_rgb(str(path))
    assert image.dtype == np.uint8 and image.shape == (2, 4, 3)
    np.testing.assert_array_equal(image, np.repeat(expected[..., None], 3, -1))
    wide = tmp_path / "wide.tif"  # 32-bit integer grayscale (mode I) is read as 16-bit and clipped
    Image.fromarray(np.array([[-5, 65535, 70000]], np.int32)).save(wide)
    np.testing.assert_array_equal(load_rgb(str(wide))[..., 0], [[0, 255, 255]])


def test_palette_alpha_and_cmyk_images_become_rgb(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (4, 5), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_rgb(str(tmp_path / "rgba.png")), rgb)  # alpha dropped, colour kept
    Image.fromarray(np.dstack([rgb[..., 0], alpha]), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_rgb(str(tmp_path / "la.png")), np.repeat(rgb[..., :1], 3, -1))
    palette = np.array([[255, 0, 0], [0, 128, 255], [7, 8, 9]], np.uint8)
    indices = rng.integers(0, 3, (4, 5), dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.ravel().tolist())
    image.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(load_rgb(str(tmp_path / "palette.png")), palette[indices])
    cmyk = rng.integers(0, 256, (4, 5, 4), dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "cmyk.tif")
    c, k = cmyk[..., :3].astype(np.int64), cmyk[..., 3:].astype(np.int64)
    expected = (255 - k) - np.floor(c * (255 - k) / 255 + 0.5)  # R = (255 − K)(1 − C/255), PIL's rounding
    np.testing.assert_allclose(load_rgb(str(tmp_path / "cmyk.tif")), expected, atol=1)


def test_a_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.png"):
        load_rgb(str(tmp_path / "gone.png"))


def test_corrupt_image_is_named_on_read_and_by_verify(tree):
    root, _ = tree
    bad = root / "test" / "b_cls" / "9.png"
    bad.write_bytes(b"\x89PNG not really")
    source = FolderImages(root, "test")
    index = [p for p, _ in source.samples].index(str(bad))
    with pytest.raises(ValueError, match="9.png"):
        source[index]
    with pytest.raises(ValueError, match="(?s)1 corrupt image.*9.png"):
        source.verify()
    assert len(source) == 6  # the corrupt file is listed, not dropped


def test_task_vectors_layout(tmp_path):
    _save(str(tmp_path / "EuroSAT_splits" / "test" / "Forest" / "Forest_1.jpg"), np.zeros((4, 4, 3), np.uint8), "JPEG")
    source = task_vectors_test_split("eurosat", tmp_path)
    assert source.classes == ["Forest"] and len(source) == 1
    with pytest.raises(ValueError, match="mnist"):
        task_vectors_test_split("mnist", tmp_path)
