"""Unlabeled folder and file-list sources: order, path resolution, errors naming the path, the dry-run check,
and the adaptation pipeline running on them unchanged."""

import os

import numpy as np
import pytest
from PIL import Image

from adamerging_jax.data.pipeline import AdaptationBatches, CachedSource
from adamerging_jax.data.unlabeled import UNLABELED, ImageFileList, UnlabeledFolder, check_images
from test_folder_source import png_header_only


def _save(path, value: int, shape=(4, 5, 3)) -> np.ndarray:
    """A lossless PNG whose every pixel is ``value``; returns its pixels."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.full(shape, value, np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture
def folder(tmp_path):
    """tmp/images/{10,11,12}.png, a nested sub/13.png, a note and a hidden file."""
    root = tmp_path / "images"
    for value in (12, 10, 11):
        _save(str(root / f"{value}.png"), value)
    _save(str(root / "sub" / "13.png"), 13)
    (root / "README.txt").write_text("my test images")
    (root / ".hidden.png").write_bytes(b"not read")
    return root


def test_folder_is_sorted_unlabeled_and_decoded(folder):
    source = UnlabeledFolder(folder)
    assert [os.path.basename(p) for p in source.paths] == ["10.png", "11.png", "12.png"]
    assert len(source) == 3 and "UnlabeledFolder" in repr(source)
    for index, value in enumerate((10, 11, 12)):
        image, label = source[index]
        assert label == UNLABELED == -1
        np.testing.assert_array_equal(image, np.full((4, 5, 3), value, np.uint8))
    recursive = UnlabeledFolder(folder, recursive=True)
    assert [os.path.relpath(p, folder) for p in recursive.paths][-1] == os.path.join("sub", "13.png")


def test_folder_errors_name_the_path(tmp_path, folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty' holds no images"):
        UnlabeledFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        UnlabeledFolder(tmp_path / "nowhere")
    (folder / "13.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    source = UnlabeledFolder(folder)
    with pytest.raises(ValueError, match=r"13\.png' cannot be decoded"):
        source[3]


def test_file_list_resolves_against_its_folder_and_skips_comments(tmp_path, folder, monkeypatch):
    absolute = _save(str(tmp_path / "elsewhere" / "abs.png"), 99)
    listing = folder / "lists" / "test.txt"
    listing.parent.mkdir()
    listing.write_text(
        "# my unlabeled test set\n"
        "../11.png\n"
        "\n"
        "   ../sub/13.png  \n"
        "  # an indented comment\n"
        f"{tmp_path / 'elsewhere' / 'abs.png'}\r\n"
        "../10.png\n"
    )
    monkeypatch.chdir(tmp_path)  # relative entries do not depend on the working directory
    source = ImageFileList(listing)
    assert [os.path.basename(p) for p in source.paths] == ["11.png", "13.png", "abs.png", "10.png"]
    assert [int(source[i][0][0, 0, 0]) for i in range(4)] == [11, 13, 99, 10]
    np.testing.assert_array_equal(source[2][0], absolute)
    assert {source[i][1] for i in range(4)} == {UNLABELED}


def test_file_list_errors_name_the_list_and_the_missing_entries(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="no_list.txt"):
        ImageFileList(tmp_path / "no_list.txt")
    comments = tmp_path / "comments.txt"
    comments.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="comments.txt' names no image"):
        ImageFileList(comments)
    listing = tmp_path / "list.txt"
    listing.write_text("images/10.png\nimages/gone.png\nimages/sub\n")
    with pytest.raises(FileNotFoundError, match=r"list\.txt': 2 listed file\(s\) missing: line 2: .*gone\.png.*line 3"):
        ImageFileList(listing)


def test_check_images_reports_unreadable_files_by_path(folder):
    (folder / "13.png").write_bytes(b"garbage")
    png_header_only(folder / "14.png", 20_000, 20_000)
    report = check_images(UnlabeledFolder(folder))
    assert sorted(os.path.basename(p) for p in report) == ["13.png", "14.png"]
    assert "decompression bomb" in report[str(folder / "14.png")]
    assert check_images(UnlabeledFolder(folder), limit=3) == {}
    with pytest.raises(ValueError, match="limit"):
        check_images(UnlabeledFolder(folder), limit=-1)


def test_adaptation_batches_and_cache_run_on_unlabeled_sources(tmp_path, folder):
    for value in range(20, 25):
        _save(str(tmp_path / "other" / f"{value}.png"), value)
    listing = tmp_path / "other.txt"
    listing.write_text("\n".join(f"other/{value}.png" for value in range(20, 25)))
    sources = [UnlabeledFolder(folder), CachedSource(ImageFileList(listing), transform=lambda image: image)]
    sampler = AdaptationBatches(
        sources, batch_size=2, n_batches=2, seed=1, preprocess=lambda image: image.astype(np.float32), num_threads=2
    )
    for step, images in sampler.batches(0, 3):
        assert images.shape == (2, 2, 2, 4, 5, 3)
        expected = sampler.indices(step) + np.array([10, 20])[:, None, None]  # image i of task t has value base_t + i
        np.testing.assert_array_equal(images[..., 0, 0, 0], expected)
    assert len(sources[1]._cache) == 5  # every list entry decoded once, then served from the cache
