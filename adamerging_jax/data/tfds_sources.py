"""The paper's 8 tasks through tensorflow-datasets, prepared and read WITHOUT tensorflow.

This module holds the task table (:class:`TfdsTask`, :data:`TASKS`, :func:`task`), each task's TF-free builder
(:func:`builder`), preparation (:func:`prepare`) and reading (:func:`split_source`, :class:`LabeledImages`,
published file lists, SUN397's class order).  How a tfds builder runs without tensorflow -- the ``tf``
stand-in, local downloads, Pillow in place of TF/OpenCV image code -- is in
:mod:`adamerging_jax.data.tf_standin`; GTSRB, which the tfds catalog lacks, is our builder in
:mod:`adamerging_jax.data.gtsrb`.

Preparation writes ArrayRecord (``file_format="array_record"``); reading uses ``builder.as_data_source`` (the
same files ``tfds.data_source`` opens), which needs no tensorflow.  Builders keep the catalog's name, config
and version, so files prepared elsewhere with tensorflow in the ArrayRecord format are read the same way.

Downloads.  Several catalog URLs are dead or manual (Stanford Cars left ai.stanford.edu in 2023; RESISC45 is a
manual download).  :func:`prepare` takes ``local_downloads``: a folder of files already downloaded, each named
as the last component of its URL (``cars_train.tgz``, ``car_devkit.tgz``, ``SUN397.tar.gz``, ...).  A URL
whose file is there is served from it (and extracted by tfds's extractor); other URLs go to the network, or
raise ``FileNotFoundError`` naming the URL and the expected file when ``offline=True``.

Splits: the paper (AdaMerging, after task_vectors) adapts and evaluates on each task's test set.  Where the
split below differs from the one in github.com/mlfoundations/task_vectors (``src/datasets/*.py`` and its
issue #1), :attr:`TfdsTask.split_note` says how.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

import tensorflow_datasets as tfds
from adamerging_jax.data.gtsrb import Gtsrb
from adamerging_jax.data.tf_standin import as_text, tensorflow_free_catalog_class

ARRAY_RECORD = "array_record"


@dataclasses.dataclass(frozen=True)
class TfdsTask:
    """One of the paper's tasks as a tfds dataset.

    ``test_split`` is a tfds split expression (slices allowed, e.g. ``"train[90%:]"``); ``image_key``,
    ``label_key`` and ``file_key`` name the record fields (``file_key``: the source file name, used to
    select a published file list, see :func:`split_source`); ``split_note`` compares the split with
    task_vectors'.  ``relabel``, when set, maps the tfds class names to task_vectors' label of each tfds
    label, for the tasks whose class order differs (task_vectors' class names build the CLIP heads).
    """

    name: str
    builder: str
    config: str | None
    test_split: str
    file_key: str | None = None
    image_key: str = "image"
    label_key: str = "label"
    split_note: str = "same split as task_vectors"
    relabel: Callable[[Sequence[str]], np.ndarray] | None = None


def sun397_folder_order(names: Sequence[str]) -> np.ndarray:
    """task_vectors' SUN397 label of each tfds label: the rank of its class folder among sorted folders.

    tfds numbers SUN397 classes in ``ClassName.txt`` order (``/j/jail/indoor`` before ``/j/jail_cell``, as
    ``/`` < ``_``); task_vectors reads class folders named ``jail_indoor``, ``jail_cell`` with ImageFolder,
    which sorts them, so the two orders differ (there: labels 206 and 207 swap).
    """
    folders = [name[3:].replace("/", "_") for name in names]
    order = sorted(range(len(folders)), key=folders.__getitem__)
    ranks = np.empty(len(folders), dtype=np.int64)
    ranks[order] = np.arange(len(folders))
    return ranks


TASKS: dict[str, TfdsTask] = {
    task.name: task
    for task in (
        TfdsTask(
            "sun397", "sun397", "standard-part1-120k", "test", "file_name",
            split_note="Testing_01 of the official partition 1 (19,850 images, 50 per class), as task_vectors' "
            "sun397/val; tfds shrinks images to at most 120,000 pixels and re-encodes them as JPEG, task_vectors "
            "reads the originals. Labels are renumbered to task_vectors' class order (sun397_folder_order).",
            relabel=sun397_folder_order,
        ),
        TfdsTask("cars", "cars196", None, "test", "id", split_note="cars_test, 8,041 images: same as task_vectors."),
        TfdsTask(
            "resisc45", "resisc45", None, "train[80%:]", "filename",
            split_note="DIFFERS by default: tfds has one split (train, all 31,500 images); task_vectors tests on "
            "the 6,300 images of resisc45-test.txt (Neumann et al. 2019). By default we take the last 20% of "
            "tfds's train (6,300 images, tfds's deterministic hash order): same size, different images. Pass "
            "split_source(..., file_list='resisc45-test.txt') for task_vectors' exact split.",
        ),
        TfdsTask(
            "eurosat", "eurosat", "rgb", "train[90%:]", "filename",
            split_note="DIFFERS by default: tfds has one split (train, 27,000 images); task_vectors tests on a "
            "random 2,700 that was never published (EuroSAT_splits/test). By default we take the last 10% of "
            "tfds's train (2,700 images, tfds's deterministic hash order): same size, different images. With "
            "a copy of EuroSAT_splits/test, pass its file names as split_source(..., file_list=...).",
        ),
        TfdsTask("svhn", "svhn_cropped", None, "test", "id", split_note="test_32x32.mat, 26,032 images: same."),
        TfdsTask(
            "gtsrb", "gtsrb", None, "test", "filename",
            split_note="Final_Test with GT-final_test.csv, 12,630 images: same (our builder, "
            "adamerging_jax.data.gtsrb).",
        ),
        TfdsTask("mnist", "mnist", None, "test", split_note="t10k, 10,000 images: same."),
        TfdsTask(
            "dtd", "dtd", None, "test", "file_name",
            split_note="test1 of DTD's first fold (1,880 images), as task_vectors' dtd/val: same.",
        ),
    )
}
"""The 8 tasks of AdaMerging Table 1, in the paper's order."""


def task(name: str) -> TfdsTask:
    """The :class:`TfdsTask` called ``name`` (one of :data:`TASKS`); ``ValueError`` otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are {sorted(TASKS)}")
    return TASKS[name]


def _tensorflow_free_class(builder_name: str) -> type:
    """Our :class:`~adamerging_jax.data.gtsrb.Gtsrb` for ``"gtsrb"``, else the TF-free catalog class."""
    return Gtsrb if builder_name == "gtsrb" else tensorflow_free_catalog_class(builder_name)


def builder(
    name: str,
    data_dir: str | os.PathLike,
    *,
    local_downloads: str | os.PathLike | None = None,
    offline: bool = False,
) -> tfds.core.DatasetBuilder:
    """The tfds builder of task ``name`` (a key of :data:`TASKS`), writing/reading ArrayRecord under ``data_dir``."""
    spec = task(name)
    cls = _tensorflow_free_class(spec.builder)
    instance = cls(data_dir=os.fspath(data_dir), config=spec.config, file_format=ARRAY_RECORD)
    instance.local_downloads = local_downloads
    instance.offline = offline
    return instance


def prepare(
    name: str,
    data_dir: str | os.PathLike,
    *,
    local_downloads: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    download_dir: str | os.PathLike | None = None,
    offline: bool = False,
) -> tfds.core.DatasetBuilder:
    """Download (or take from ``local_downloads``) and prepare task ``name`` as ArrayRecord; return the builder.

    ``manual_dir`` is where manual datasets are found (resisc45: the extracted ``NWPU-RESISC45/`` folder).
    Preparing twice is a no-op (tfds keeps the finished dataset).
    """
    instance = builder(name, data_dir, local_downloads=local_downloads, offline=offline)
    config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
    instance.download_and_prepare(download_dir=download_dir, download_config=config)
    return instance


class LabeledImages:
    """A random-access source of ``(image uint8 [H, W, 3], label int)`` over a tfds data source.

    Grey images are repeated to 3 channels so every task yields RGB, as CLIP expects; ``label_map[l]``
    replaces label ``l`` when given.
    """

    def __init__(
        self, records: Any, image_key: str, label_key: str, description: str, label_map: np.ndarray | None = None
    ):
        self._records = records
        self._image_key = image_key
        self._label_key = label_key
        self._label_map = label_map
        self.description = description

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        record = self._records[index]
        label = int(record[self._label_key])
        return as_rgb(record[self._image_key]), label if self._label_map is None else int(self._label_map[label])

    def __repr__(self) -> str:
        return f"LabeledImages({self.description}, {len(self)} examples)"


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W], [H, W, 1] or [H, W, 3] -> [H, W, 3] (grey repeated)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an image [H, W, 1 or 3], got shape {image.shape}")
    return image


class _Subset:
    """Records ``indices`` of a random-access sequence, in that order."""

    def __init__(self, records: Any, indices: np.ndarray):
        self._records, self._indices = records, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> Any:
        return self._records[int(self._indices[index])]


def _read_file_list(file_list: str | os.PathLike | Iterable[str]) -> list[str]:
    if isinstance(file_list, (str, os.PathLike)):
        with open(file_list) as handle:
            return [line.strip() for line in handle if line.strip()]
    return list(file_list)


def _indices_of_files(instance: Any, split: str, spec: TfdsTask, wanted: list[str]) -> np.ndarray:
    """Positions, in ``wanted``'s order, of the records of ``split`` whose ``spec.file_key`` is in ``wanted``."""
    if spec.file_key is None:
        raise ValueError(f"task {spec.name!r}: its records carry no file name to select a file list by")
    headers = instance.as_data_source(split=split, decoders={spec.image_key: tfds.decode.SkipDecoding()})
    position = {as_text(headers[i][spec.file_key]): i for i in range(len(headers))}
    missing = [name for name in wanted if name not in position]
    if missing:
        raise ValueError(
            f"task {spec.name!r}: {len(missing)} listed file(s) are not in split {split!r}, e.g. {missing[:5]}"
        )
    return np.array([position[name] for name in wanted], dtype=np.int64)


def split_source(
    name: str,
    data_dir: str | os.PathLike,
    split: str | None = None,
    *,
    file_list: str | os.PathLike | Iterable[str] | None = None,
) -> LabeledImages:
    """Task ``name``'s prepared test split (or ``split``) from ArrayRecord under ``data_dir``, as a random-access
    source of (image, label), labels in task_vectors' class order (see :attr:`TfdsTask.relabel`).
    ``FileNotFoundError`` if the task was not prepared there.

    ``file_list`` (a text file with one name per line, or names) selects, in its order, the records of the
    whole base split (``"train"`` for ``"train[80%:]"``) whose file name is listed -- e.g. task_vectors'
    ``resisc45-test.txt``.  A listed name that is not there raises ``ValueError``.
    """
    spec = task(name)
    instance = builder(name, data_dir)
    if not instance.is_prepared():
        raise FileNotFoundError(
            f"task {name!r} ({spec.builder}) is not prepared in {os.fspath(data_dir)!r}; "
            f"run adamerging_jax.data.tfds_sources.prepare({name!r}, ...) first"
        )
    split = split or spec.test_split
    label_map = spec.relabel(instance.info.features[spec.label_key].names) if spec.relabel else None
    if file_list is not None:
        split = split.split("[")[0]
        records = _Subset(
            instance.as_data_source(split=split), _indices_of_files(instance, split, spec, _read_file_list(file_list))
        )
        description = f"{name}: {spec.builder} {split}, listed files"
    else:
        records = instance.as_data_source(split=split)
        description = f"{name}: {spec.builder} {split}"
    return LabeledImages(records, spec.image_key, spec.label_key, description, label_map)
