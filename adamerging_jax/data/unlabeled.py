"""Unlabeled image sources for a user's own test data: AdaMerging adapts on unlabeled test images only.

Both sources follow the ``Source`` protocol of ``data/pipeline.py`` (``len(source)``, ``source[i] -> (image
uint8 [H, W, 3], label)``) with every label :data:`UNLABELED` (−1), so ``pipeline.AdaptationBatches`` and
``pipeline.CachedSource`` take them as they are. They keep their files in ``paths`` and decode one on every
read with ``folder.load_rgb`` (16-bit grayscale scaled, alpha dropped, decompression bombs refused; an image
that cannot be decoded raises ``ValueError`` naming it).

- :class:`UnlabeledFolder` ``(path, recursive=False)``: the images of one folder, chosen by
  ``folder.list_images`` (hidden files ignored, files without an image extension skipped), sorted by path.
- :class:`ImageFileList` ``(path)``: a text file naming one image per line; a relative path is resolved
  against the list's own folder (not the working directory), surrounding whitespace is stripped, blank lines
  and lines whose first non-blank character is ``#`` are ignored. Every listed entry is used whatever its
  extension, and every one must be an existing file when the list is read.

An empty folder or list, a missing folder, list or listed file is a one-line error naming the path at fault.
:func:`check_images` decodes every image of a source up front (a dry run) and returns the unreadable ones.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from adamerging_jax.data.folder import list_images, load_rgb, unreadable_images
from adamerging_jax.data.strict_text import text_lines

UNLABELED = -1
"""The label of every image of an unlabeled source."""


class ImagePaths:
    """Random-access ``(image uint8 [H, W, 3], UNLABELED)`` over a list of image files."""

    def __init__(self, paths: Sequence[str], origin: str):
        self.paths = list(paths)
        self.origin = origin

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return load_rgb(self.paths[index]), UNLABELED

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.origin!r}, {len(self)} images)"


class UnlabeledFolder(ImagePaths):
    """The images of the folder ``path`` (and of its visible subfolders when ``recursive``), sorted by path."""

    def __init__(self, path: str | os.PathLike, recursive: bool = False):
        super().__init__(list_images(path, recursive=recursive), os.fspath(path))


class ImageFileList(ImagePaths):
    """The images named by the text file ``path``, one per line, in the file's order (module docstring)."""

    def __init__(self, path: str | os.PathLike):
        source = os.fspath(path)
        super().__init__(read_image_list(source), source)


def read_image_list(path: str) -> list[str]:
    """The files a list names, relative entries joined to the list's folder; every one must exist.

    ``FileNotFoundError`` naming the list, or its missing entries with their line numbers; ``ValueError``
    when it names no image or is not UTF-8 text (the byte offset named).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image list {path!r} is missing")
    base = os.path.dirname(os.path.abspath(path))
    entries = [
        (number, os.path.join(base, line))  # join keeps an absolute entry as it is
        for number, raw in enumerate(text_lines(path), start=1)
        if (line := raw.strip()) and not line.startswith("#")
    ]
    if not entries:
        raise ValueError(f"image list {path!r} names no image (only blank lines and # comments)")
    missing = [f"line {number}: {entry!r}" for number, entry in entries if not os.path.isfile(entry)]
    if missing:
        shown = "; ".join(missing[:3]) + ("; ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"image list {path!r}: {len(missing)} listed file(s) missing: {shown}")
    return [entry for _, entry in entries]


def check_images(source: ImagePaths, limit: int | None = None) -> dict[str, str]:
    """Decode the first ``limit`` images of ``source`` (all when None); ``{path: reason}`` of those that fail.

    ``source`` is any source with a ``paths`` list (these two, ``folder.FolderImages``).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    return unreadable_images(source.paths[:limit])
