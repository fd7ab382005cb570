"""Each task's test set as a random-access source of ``(uint8 image [H, W, 3], label)``.

From a class-folder split (:class:`~adamerging_jax.data.folder.FolderImages`) when ``DataConfig.folders``
names one (or, for SUN397, EuroSAT and DTD, ``DataConfig.task_vectors_dir`` holds task_vectors' data), else
from the ArrayRecord dataset prepared under ``DataConfig.tfds_dir``
(:func:`~adamerging_jax.data.tfds_sources.split_source`).  Errors name the task and the folder or data dir.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np

from adamerging_jax.data import tfds_sources
from adamerging_jax.data.folder import TASK_VECTORS_TEST_FOLDERS, FolderImages, task_vectors_test_split
from adamerging_jax.data.pipeline import CachedSource, Source, clip_resize_crop
from adamerging_jax.heads.zero_shot import task_prompts
from adamerging_jax.paper.settings import DataConfig
from adamerging_jax.paper.tasks import paper_task


class FirstImages:
    """The first ``count`` examples of ``source`` (a smoke-test subset)."""

    def __init__(self, source: Source, count: int):
        self.source, self.count = source, min(count, len(source))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.source[index]


def task_test_set(task: str, data: DataConfig) -> Source:
    """Task ``task``'s test set (see the module docstring); ``max_test_images`` keeps its first N images."""
    num_classes = len(task_prompts(paper_task(task).head)[0])
    if task in data.folders or (data.task_vectors_dir is not None and task in TASK_VECTORS_TEST_FOLDERS):
        if task in data.folders:
            folder = os.path.normpath(os.fspath(data.folders[task]))
            source = FolderImages(*os.path.split(folder))
        else:
            folder = os.path.join(data.task_vectors_dir, TASK_VECTORS_TEST_FOLDERS[task])
            source = task_vectors_test_split(task, data.task_vectors_dir)
        if len(source.classes) != num_classes:
            raise ValueError(f"task {task!r}: {folder!r} has {len(source.classes)} class folders, its head has "
                             f"{num_classes} classes (every class needs its folder, in task_vectors' sorted order)")
    elif data.tfds_dir is not None:
        source = tfds_sources.split_source(task, data.tfds_dir, file_list=data.file_lists.get(task))
    else:
        raise ValueError(f"task {task!r}: no test data; give DataConfig.tfds_dir (prepared with "
                         f"adamerging_jax.data.tfds_sources.prepare), a class folder in DataConfig.folders, or "
                         f"DataConfig.task_vectors_dir for SUN397, EuroSAT, DTD")
    if len(source) == 0:
        raise ValueError(f"task {task!r}: its test split {source!r} is empty")
    return FirstImages(source, data.max_test_images) if data.max_test_images else source


def task_test_sets(tasks: Sequence[str], data: DataConfig) -> list[Source]:
    return [task_test_set(task, data) for task in tasks]


def adaptation_view(sources: Sequence[Source], data: DataConfig, image_size: int) -> list[Source]:
    """The sources AdaMerging samples from: with ``cache_images``, each decoded and resized crop kept once read."""
    if not data.cache_images:
        return list(sources)
    return [CachedSource(s, functools.partial(clip_resize_crop, size=image_size)) for s in sources]


def corrupted(sources: Sequence[Source], name: str, severity: int, seed: int, size: int | None) -> list[Source]:
    """The sources under corruption ``name`` ("clean" returns them unchanged)."""
    if name == "clean":
        return list(sources)
    from adamerging_jax.data.corruptions import CorruptedSource

    return [CorruptedSource(s, name, severity, seed=seed, size=size) for s in sources]
