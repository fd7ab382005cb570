"""The paper's 8 tasks through tensorflow-datasets, prepared and read WITHOUT tensorflow.

Preparation writes ArrayRecord (``file_format="array_record"``); reading uses ``builder.as_data_source`` (the
same files ``tfds.data_source`` opens), which needs no tensorflow.

Why an adapter is needed.  tensorflow-datasets 4.9 installs without tensorflow, but the catalog builders of
the paper's datasets (sun397, cars196, resisc45, eurosat, svhn_cropped, mnist, dtd) still call
``tf.io.gfile`` for file I/O, tfds's own archive extractor calls ``tf.io.gfile.GFile`` and
``tf.compat.as_text``, and the ``Image`` feature encodes numpy arrays (mnist, svhn) with ``tf.image``.  So,
without changing any record, this module

1. binds the name ``tf`` inside those tfds modules, for the duration of one ``download_and_prepare`` only,
   to :data:`_GFILE_ONLY_TF`, a stand-in that offers exactly ``tf.io.gfile`` (local files, over ``open``,
   ``os`` and ``glob``) and ``tf.compat.as_text`` -- the real builder code then runs unchanged;
2. PNG-encodes numpy images with Pillow before the ``Image`` feature sees them (PNG is lossless: the decoded
   pixels are those tfds would store);
3. replaces sun397's example generator, which needs a TF1 session and OpenCV, by the same loop decoding,
   resizing (to the config's at most 120,000 pixels, bilinear) and re-encoding (JPEG, the config's quality
   or OpenCV's default 95) with Pillow.
   Same images, labels, keys and file names as the catalog; pixel values may differ by rounding from a
   TF/OpenCV-prepared copy.

Builders keep the catalog's name, config and version, so files prepared elsewhere with tensorflow in the
ArrayRecord format are read the same way.

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

import contextlib
import dataclasses
import glob as glob_lib
import inspect
import io
import os
import sys
import types
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import extractor as tfds_extractor

ARRAY_RECORD = "array_record"

# --------------------------------------------------------------------------------------------------------------
# 1. A tensorflow stand-in with tf.io.gfile (local files) and tf.compat.as_text only.


def _gfile_glob(pattern: str) -> list[str]:
    return sorted(glob_lib.glob(os.fspath(pattern)))


def _gfile_open(path: str, mode: str = "r"):
    return open(os.fspath(path), mode)


def _as_text(text: str | bytes, encoding: str = "utf-8") -> str:
    return text.decode(encoding) if isinstance(text, bytes) else text


_GFILE_ONLY_TF = types.SimpleNamespace(
    io=types.SimpleNamespace(
        gfile=types.SimpleNamespace(
            GFile=_gfile_open,
            exists=lambda path: os.path.exists(os.fspath(path)),
            isdir=lambda path: os.path.isdir(os.fspath(path)),
            listdir=lambda path: sorted(os.listdir(os.fspath(path))),
            glob=_gfile_glob,
            makedirs=lambda path: os.makedirs(os.fspath(path), exist_ok=True),
        )
    ),
    compat=types.SimpleNamespace(as_text=_as_text),
)
"""What the catalog builders and tfds's extractor use of tensorflow, and nothing else."""


def _modules_using_tf(builder_cls: type) -> list[types.ModuleType]:
    """The catalog modules along ``builder_cls``'s MRO (not tfds's core) that hold ``tf``, plus the extractor."""
    modules = [
        sys.modules[cls.__module__]
        for cls in builder_cls.__mro__
        if cls.__module__.startswith("tensorflow_datasets.") and not cls.__module__.startswith("tensorflow_datasets.core")
    ]
    unique = {id(m): m for m in [*modules, tfds_extractor] if hasattr(m, "tf")}
    return list(unique.values())


@contextlib.contextmanager
def _tensorflow_free(builder_cls: type) -> Iterator[None]:
    """Bind ``tf`` to :data:`_GFILE_ONLY_TF` in the modules ``builder_cls`` prepares with; restore on exit.

    Module globals: do not prepare a catalog dataset in one thread while another uses real tensorflow.
    """
    modules = _modules_using_tf(builder_cls)
    saved = [m.__dict__["tf"] for m in modules]
    try:
        for module in modules:
            module.tf = _GFILE_ONLY_TF
        yield
    finally:
        for module, original in zip(modules, saved):
            module.tf = original


# --------------------------------------------------------------------------------------------------------------
# 2. Downloads served from a local folder.


def _url_of(resource: Any) -> str:
    return resource.url if isinstance(resource, tfds.download.Resource) else resource


def _file_name_of_url(url: str) -> str:
    return os.path.basename(urllib.parse.urlparse(url).path)


class _LocalDownloads:
    """A tfds ``DownloadManager`` whose ``download``/``download_and_extract`` serve files from a folder.

    A URL ``.../<name>`` is served from ``<folder>/<name>`` when that file exists; otherwise the wrapped
    manager downloads it, or, with ``offline=True``, ``FileNotFoundError`` names the URL and the file.
    Everything else (``manual_dir``, ``extract``, ``iter_archive``) is the wrapped manager's.
    """

    def __init__(self, manager: Any, folder: str | os.PathLike | None, offline: bool):
        self._manager = manager
        self._folder = folder
        self._offline = offline

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    def _local_path(self, resource: Any) -> str | None:
        url = _url_of(resource)
        local = os.path.join(os.fspath(self._folder), _file_name_of_url(url)) if self._folder else None
        if local is not None and os.path.isfile(local):
            return local
        if self._offline:
            raise FileNotFoundError(
                f"offline preparation: {url!r} is not downloaded; expected the file {local!r}"
                if local
                else f"offline preparation needs local_downloads, but {url!r} was requested"
            )
        return None

    def _map(self, url_or_urls: Any, serve_local, serve_remote) -> Any:
        if isinstance(url_or_urls, Mapping):
            return {key: self._map(value, serve_local, serve_remote) for key, value in url_or_urls.items()}
        if isinstance(url_or_urls, (list, tuple)):
            return type(url_or_urls)(self._map(value, serve_local, serve_remote) for value in url_or_urls)
        local = self._local_path(url_or_urls)
        return serve_remote(url_or_urls) if local is None else serve_local(url_or_urls, local)

    def download(self, url_or_urls: Any) -> Any:
        return self._map(url_or_urls, lambda _, local: local, self._manager.download)

    def download_and_extract(self, url_or_urls: Any) -> Any:
        def extract_local(resource: Any, local: str) -> Any:
            if isinstance(resource, tfds.download.Resource) and resource.extract_method is not None:
                return self._manager.extract(tfds.download.Resource(path=local, extract_method=resource.extract_method))
            return self._manager.extract(local)

        return self._map(url_or_urls, extract_local, self._manager.download_and_extract)


# --------------------------------------------------------------------------------------------------------------
# 3. Builder mixins.


def _png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 image [H, W] or [H, W, C] (C = 1 is squeezed, as PNG stores grey as 2-D)."""
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class CodePathFromModuleFile:
    """Builder mixin: ``code_path`` is the file of the class's module.

    tfds 4.9.10's own ``code_path`` imports the ``importlib_resources`` backport, which it declares only for
    Python < 3.9, so every builder living in a package fails on 3.9+ without it; the module file is what that
    code computes for an ordinary installed package.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))


class TensorflowFreeBuilder(CodePathFromModuleFile):
    """Mixin for a catalog builder: TF-free preparation, local downloads, numpy images PNG-encoded by Pillow."""

    local_downloads: str | os.PathLike | None = None
    offline: bool = False

    def _make_download_manager(self, download_dir, download_config):
        manager = super()._make_download_manager(download_dir=download_dir, download_config=download_config)
        return _LocalDownloads(manager, self.local_downloads, self.offline)

    def _generate_examples(self, *args, **kwargs):
        image_keys = [k for k, f in self.info.features.items() if isinstance(f, tfds.features.Image)]
        for key, example in super()._generate_examples(*args, **kwargs):
            for name in image_keys:
                if isinstance(example.get(name), np.ndarray):
                    example = {**example, name: _png_bytes(example[name])}
            yield key, example

    def download_and_prepare(self, *args, **kwargs):
        with _tensorflow_free(type(self)):
            return super().download_and_prepare(*args, **kwargs)


_SUN397_MAX_PIXELS = 120_000
_OPENCV_JPEG_QUALITY = 95  # what the catalog gets from OpenCV when its config sets no quality (all of them)


def _sun397_jpeg(data: bytes, max_pixels: int | None = _SUN397_MAX_PIXELS, quality: int | None = None) -> bytes:
    """Decode any format to RGB, shrink by sqrt(max_pixels / (h w)) when larger, re-encode as JPEG.

    As the catalog's ``_process_image_file`` (SUN397 holds BMP, PNG, GIF and JPEG data behind .jpg names),
    with Pillow in place of OpenCV.
    """
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
    width, height = image.size
    if max_pixels and width * height > max_pixels:
        factor = np.sqrt(max_pixels / (width * height))
        image = image.resize((int(round(width * factor)), int(round(height * factor))), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality or _OPENCV_JPEG_QUALITY)
    return buffer.getvalue()


class _Sun397PillowExamples:
    """sun397's example loop without its TF1 session and OpenCV (see :func:`_sun397_jpeg`)."""

    def _generate_examples(self, archive, subset_images):
        ignore = set(_catalog_module(self)._SUN397_IGNORE_IMAGES)
        prefix_len = len("SUN397")
        for path_in_archive, fobj in archive:
            if path_in_archive in ignore:
                continue
            file_name = path_in_archive[prefix_len:].replace("\\", "/")
            if file_name in subset_images:
                label = "/".join(file_name.split("/")[:-1])
                config = self.builder_config
                image = _sun397_jpeg(fobj.read(), config.target_pixels, config.quality)
                yield file_name, {"file_name": file_name, "image": image, "label": label}


def _catalog_module(builder: Any) -> types.ModuleType:
    catalog = next(c for c in type(builder).__mro__ if c.__module__.startswith("tensorflow_datasets"))
    return sys.modules[catalog.__module__]


# --------------------------------------------------------------------------------------------------------------
# 4. The task table, builders, preparation and reading.


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
            split_note="Final_Test with GT-final_test.csv, 12,630 images: same (our builder, adamerging_jax.data.gtsrb).",
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
    """The catalog class ``builder_name`` with the TF-free mixins, under the catalog's own name (unregistered)."""
    if builder_name == "gtsrb":
        from adamerging_jax.data.gtsrb import Gtsrb

        return Gtsrb
    catalog_cls = tfds.builder_cls(builder_name)
    mixins = (_Sun397PillowExamples,) if builder_name == "sun397" else ()
    return type(
        catalog_cls.__name__,
        (*mixins, TensorflowFreeBuilder, catalog_cls),
        {"name": catalog_cls.name, "__module__": catalog_cls.__module__},
        skip_registration=True,
    )


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
    position = {_as_text(headers[i][spec.file_key]): i for i in range(len(headers))}
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
