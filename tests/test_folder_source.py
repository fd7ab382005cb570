"""The local class-folder source and its errors."""
import os

import numpy as np
import pytest
from PIL import Image

from adamerging_jax.data.folder import FolderImages, task_vectors_test_split


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


def test_non_image_file_is_not_dropped_silently(tree):
    root, _ = tree
    (root / "test" / "a_cls" / "notes.txt").write_text("x")
    (root / "test" / "a_cls" / ".DS_Store").write_text("x")  # hidden files are ignored
    with pytest.raises(ValueError, match="notes.txt"):
        FolderImages(root, "test")


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
