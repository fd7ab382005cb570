"""A local image-folder source: ``<root>/<split>/<class>/<image>``, as task_vectors' ``ImageFolder`` datasets.

For users who already have the datasets on disk in the layout of github.com/mlfoundations/task_vectors
(``sun397/val``, ``dtd/val``, ``EuroSAT_splits/test``, ...): no tfds preparation needed.

Class ``c`` gets label ``classes.index(c)``; ``classes`` defaults to the sorted class folder names, which is
torchvision ``ImageFolder``'s order and so task_vectors'.  Strict by design, nothing is silently dropped:
a missing split folder, a split without class folders, a missing or empty class folder, an unexpected
class folder or a non-image file raise an error naming it; a corrupt image raises when read (or for all of
them at once in :meth:`FolderImages.verify`).  Hidden files (names starting with ``.``) are ignored.
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


def _scan_class(folder: str, extensions: Sequence[str]) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"class folder {folder!r} is missing")
    names = _visible(os.listdir(folder))
    unexpected = [n for n in names if not n.lower().endswith(tuple(extensions))]
    if unexpected:
        raise ValueError(f"class folder {folder!r} holds files that are not images: {unexpected[:5]}")
    if not names:
        raise ValueError(f"class folder {folder!r} holds no image")
    return [os.path.join(folder, name) for name in names]


def load_rgb(path: str) -> np.ndarray:
    """The image at ``path`` as uint8 [H, W, 3]; ``ValueError`` naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"image {path!r} cannot be decoded: {error}") from error


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
        present = [d for d in _visible(os.listdir(split_dir)) if os.path.isdir(os.path.join(split_dir, d))]
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
            for path in _scan_class(os.path.join(split_dir, name), extensions)
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[index]
        return load_rgb(path), label

    def verify(self) -> None:
        """Decode every image; ``ValueError`` listing all the files that fail."""
        failures = []
        for path, _ in self.samples:
            try:
                load_rgb(path)
            except ValueError as error:
                failures.append(str(error))
        if failures:
            raise ValueError(f"split {self.split!r}: {len(failures)} corrupt image(s):\n" + "\n".join(failures))

    def __repr__(self) -> str:
        return f"FolderImages(split={self.split!r}, {len(self.classes)} classes, {len(self)} images)"


def task_vectors_test_split(task: str, location: str | os.PathLike, classes: Sequence[str] | None = None) -> FolderImages:
    """Task ``task``'s test set under task_vectors' data ``location`` (see :data:`TASK_VECTORS_TEST_FOLDERS`)."""
    if task not in TASK_VECTORS_TEST_FOLDERS:
        raise ValueError(f"task {task!r} is not kept as class folders by task_vectors; those are {sorted(TASK_VECTORS_TEST_FOLDERS)}")
    root, split = os.path.split(TASK_VECTORS_TEST_FOLDERS[task])
    return FolderImages(os.path.join(os.fspath(location), root), split, classes)
