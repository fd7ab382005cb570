"""A local image-folder source: ``<root>/<split>/<class>/<image>``, as task_vectors' ``ImageFolder`` datasets,
and the one file policy and decoder every folder reader of the package uses.

For users who already have the datasets on disk in the layout of github.com/mlfoundations/task_vectors
(``sun397/val``, ``dtd/val``, ``EuroSAT_splits/test``, ...): no tfds preparation needed.

Class ``c`` gets label ``classes.index(c)``; ``classes`` defaults to the sorted class folder names, which is
torchvision ``ImageFolder``'s order and so task_vectors'.  A missing split folder, a split without class
folders, a missing or empty class folder or an unexpected class folder raise an error naming it.

**Which files are images** (:func:`list_images`, also used by ``packaged.read_class_folders`` /
``task_from_folder`` and ``unlabeled.UnlabeledFolder``): names starting with ``.`` (files and folders) are
ignored; a file whose extension, in any case, is not in :data:`IMAGE_EXTENSIONS` is skipped (notes, CSVs,
``Thumbs.db``); every other file is an image, and one that then fails to decode is an error naming it, when
read (or for all of them at once in :meth:`FolderImages.verify`): it is never dropped. Symbolic links are
followed; a broken one (its target missing, or a link loop) is an error naming it, and so is a linked
subfolder that leads to a folder already walked (a loop, or the same images twice).

**How an image is decoded** (:func:`load_rgb`): to uint8 RGB. An image with more pixels than PIL's
``Image.MAX_IMAGE_PIXELS`` (≈ 89.5M; PIL itself only warns below twice that) is refused as a possible
decompression bomb before any pixel is decoded; 16-bit grayscale (PIL modes ``I;16*``, and ``I`` taken as
16-bit) is scaled 0–65535 → 0–255, where PIL's own conversion would saturate everything above 255; palette,
1-bit, LA / RGBA / PA (alpha dropped, as torchvision's loader and CLIP's preprocessing do), CMYK and YCbCr go
through PIL's ``convert("RGB")``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

TASK_VECTORS_TEST_FOLDERS = {
    "sun397": os.path.join("sun397", "val"),
    "eurosat": os.path.join("EuroSAT_splits", "test"),
    "dtd": os.path.join("dtd", "val"),
}
"""Where task_vectors reads the test set of the tasks it keeps as class folders (relative to its data location)."""


def _visible(names: list[str]) -> list[str]:
    return sorted(name for name in names if not name.startswith("."))


def list_class_folders(root: str) -> list[str]:
    """Sorted names of the visible subfolders of ``root`` (its classes); files beside them are ignored."""
    return [name for name in _visible(os.listdir(root)) if os.path.isdir(os.path.join(root, name))]


def list_images(
    folder: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS, recursive: bool = False
) -> list[str]:
    """Paths of the images in ``folder``, sorted by their path below it (the file policy of the module docstring).

    ``recursive`` walks visible subfolders too (linked ones included); otherwise subfolders are ignored.
    ``FileNotFoundError`` when ``folder`` is not a folder, ``ValueError`` naming it when it holds no image,
    naming the link when one is broken or leads to a folder already walked.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder!r} is missing")
    suffixes = tuple(extension.lower() for extension in extensions)
    found = []
    walked = {os.path.realpath(folder)}
    for directory, subfolders, names in os.walk(folder, followlinks=True):
        for name in _visible(names):
            _refuse_broken_link(os.path.join(directory, name))
        subfolders[:] = [name for name in _visible(subfolders)
                         if _first_visit(os.path.join(directory, name), walked)] if recursive else []
        found.extend(
            os.path.join(directory, name)
            for name in _visible(names)
            if name.lower().endswith(suffixes) and os.path.isfile(os.path.join(directory, name))
        )
    if not found:
        raise ValueError(f"folder {folder!r} holds no images (files ending in {', '.join(extensions)})")
    return sorted(found, key=lambda path: os.path.relpath(path, folder).split(os.sep))


def _refuse_broken_link(path: str) -> None:
    """ValueError naming ``path`` when it is a symbolic link whose target is missing or that loops."""
    if os.path.islink(path) and not os.path.exists(path):
        raise ValueError(f"{path!r} is a broken symbolic link: its target {os.readlink(path)!r} does not exist or "
                         "the link loops")


def _first_visit(subfolder: str, walked: set[str]) -> bool:
    """Record ``subfolder``'s real path; ValueError naming it when that folder was walked already."""
    real = os.path.realpath(subfolder)
    if real in walked:
        raise ValueError(f"{subfolder!r} leads to {real!r}, a folder already walked (a symbolic link loop or a "
                         "second path to the same images)")
    walked.add(real)
    return True


def to_rgb(image: Image.Image) -> np.ndarray:
    """A decoded PIL image as uint8 [H, W, 3]: 16-bit grayscale scaled by round(v · 255 / 65535), the rest
    through PIL's ``convert("RGB")`` (module docstring)."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


def load_rgb(path: str) -> np.ndarray:
    """The image at ``path`` as uint8 [H, W, 3] (module docstring); ``ValueError`` naming the file when it is
    a possible decompression bomb or cannot be decoded, ``FileNotFoundError`` when it does not exist."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and width * height > limit:
                raise Image.DecompressionBombError(
                    f"{width} × {height} = {width * height} pixels, over Image.MAX_IMAGE_PIXELS = {limit}"
                )
            return to_rgb(image)
    except FileNotFoundError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"image {path!r} is refused as a possible decompression bomb: {error}") from error
    except Exception as error:  # a malformed file fails in many ways inside PIL's decoders
        raise ValueError(f"image {path!r} cannot be decoded: {type(error).__name__}: {error}") from error


def unreadable_images(paths: Sequence[str]) -> dict[str, str]:
    """Decode every image of ``paths``; ``{path: reason}`` for those that fail (empty when all decode)."""
    failures = {}
    for path in paths:
        try:
            load_rgb(path)
        except (ValueError, OSError) as error:
            failures[path] = str(error)
    return failures


class FolderImages:
    """Random-access ``(image uint8 [H, W, 3], label)`` over ``<root>/<split>/<class>/*``."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        classes: Sequence[str] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ):
        split_dir = os.path.join(os.fspath(root), split)
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(f"split {split!r}: folder {split_dir!r} is missing")
        present = list_class_folders(split_dir)
        if classes is None:
            if not present:
                raise ValueError(f"split {split!r}: folder {split_dir!r} has no class folders")
            classes = present
        unexpected = sorted(set(present) - set(classes))
        if unexpected:
            raise ValueError(f"split {split!r}: class folders {unexpected} are not among the {len(classes)} classes")
        self.split = split
        self.classes = list(classes)
        self.samples: list[tuple[str, int]] = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in list_images(os.path.join(split_dir, name), extensions)
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[index]
        return load_rgb(path), label

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.samples]

    def verify(self) -> None:
        """Decode every image; ``ValueError`` listing all the files that fail."""
        failures = unreadable_images(self.paths)
        if failures:
            raise ValueError(
                f"split {self.split!r}: {len(failures)} corrupt image(s):\n" + "\n".join(failures.values())
            )

    def __repr__(self) -> str:
        return f"FolderImages(split={self.split!r}, {len(self.classes)} classes, {len(self)} images)"


def task_vectors_test_split(task: str, location: str | os.PathLike, classes: Sequence[str] | None = None) -> FolderImages:
    """Task ``task``'s test set under task_vectors' data ``location`` (see :data:`TASK_VECTORS_TEST_FOLDERS`)."""
    if task not in TASK_VECTORS_TEST_FOLDERS:
        raise ValueError(f"task {task!r} is not kept as class folders by task_vectors; those are {sorted(TASK_VECTORS_TEST_FOLDERS)}")
    root, split = os.path.split(TASK_VECTORS_TEST_FOLDERS[task])
    return FolderImages(os.path.join(os.fspath(location), root), split, classes)
