"""Running tensorflow-datasets builders WITHOUT tensorflow: the adapter that :mod:`.tfds_sources` and
:mod:`.gtsrb` build on.

This module holds the mechanism only; the paper's task table, preparation and reading are in
:mod:`adamerging_jax.data.tfds_sources`, and our own GTSRB builder in :mod:`adamerging_jax.data.gtsrb`.

Why an adapter is needed.  tensorflow-datasets 4.9 installs without tensorflow, but the catalog builders of
the paper's datasets (sun397, cars196, resisc45, eurosat, svhn_cropped, mnist, dtd) still call
``tf.io.gfile`` for file I/O, tfds's own archive extractor calls ``tf.io.gfile.GFile`` and
``tf.compat.as_text``, and the ``Image`` feature encodes numpy arrays (mnist, svhn) with ``tf.image``.  So,
without changing any record, a builder made TF-free here

1. binds the name ``tf`` inside those tfds modules, for the duration of one ``download_and_prepare`` only,
   to :data:`_GFILE_ONLY_TF`, a stand-in that offers exactly ``tf.io.gfile`` (local files, over ``open``,
   ``os`` and ``glob``) and ``tf.compat.as_text`` -- the real builder code then runs unchanged;
2. PNG-encodes numpy images with Pillow before the ``Image`` feature sees them (PNG is lossless: the decoded
   pixels are those tfds would store);
3. for sun397, replaces the catalog's example generator, which needs a TF1 session and OpenCV, by the same
   loop decoding, resizing (to the config's at most 120,000 pixels, bilinear) and re-encoding (JPEG, the
   config's quality or OpenCV's default 95) with Pillow.
   Same images, labels, keys and file names as the catalog; pixel values may differ by rounding from a
   TF/OpenCV-prepared copy.

Builders keep the catalog's name, config and version (:func:`tensorflow_free_catalog_class`), so files
prepared elsewhere with tensorflow in the ArrayRecord format are read the same way.

Downloads.  Several catalog URLs are dead or manual (Stanford Cars left ai.stanford.edu in 2023; RESISC45 is a
manual download).  A :class:`TensorflowFreeBuilder` with ``local_downloads`` set serves every URL whose file
(named as the last component of the URL: ``cars_train.tgz``, ``SUN397.tar.gz``, ...) is in that folder from
it (extracted by tfds's extractor); other URLs go to the network, or raise ``FileNotFoundError`` naming the
URL and the expected file when ``offline`` is set.
"""
from __future__ import annotations

import contextlib
import glob as glob_lib
import inspect
import io
import os
import sys
import types
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import extractor as tfds_extractor

# --------------------------------------------------------------------------------------------------------------
# 1. A tensorflow stand-in with tf.io.gfile (local files) and tf.compat.as_text only.


def _gfile_glob(pattern: str) -> list[str]:
    return sorted(glob_lib.glob(os.fspath(pattern)))


def _gfile_open(path: str, mode: str = "r"):
    return open(os.fspath(path), mode)


def as_text(text: str | bytes, encoding: str = "utf-8") -> str:
    """``tf.compat.as_text``: ``bytes`` decoded (UTF-8 by default), ``str`` unchanged."""
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
    compat=types.SimpleNamespace(as_text=as_text),
)
"""What the catalog builders and tfds's extractor use of tensorflow, and nothing else."""


def _modules_using_tf(builder_cls: type) -> list[types.ModuleType]:
    """The catalog modules along ``builder_cls``'s MRO (not tfds's core) that hold ``tf``, plus the extractor."""
    modules = [
        sys.modules[cls.__module__]
        for cls in builder_cls.__mro__
        if cls.__module__.startswith("tensorflow_datasets.")
        and not cls.__module__.startswith("tensorflow_datasets.core")
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


_EXAMPLE_LOOPS: dict[str, tuple[type, ...]] = {"sun397": (_Sun397PillowExamples,)}
"""Catalog builders whose own example loop needs tensorflow, and the mixins that replace it."""


def tensorflow_free_catalog_class(builder_name: str) -> type:
    """The tfds catalog class ``builder_name`` with the TF-free mixins, under the catalog's own name and module
    (unregistered, so the catalog's registration is untouched)."""
    catalog_cls = tfds.builder_cls(builder_name)
    return type(
        catalog_cls.__name__,
        (*_EXAMPLE_LOOPS.get(builder_name, ()), TensorflowFreeBuilder, catalog_cls),
        {"name": catalog_cls.name, "__module__": catalog_cls.__module__},
        skip_registration=True,
    )
