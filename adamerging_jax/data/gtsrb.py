"""GTSRB (German Traffic Sign Recognition Benchmark) as a tfds builder of our own, written as ArrayRecord.

GTSRB is not in the tfds catalog.  This builder reads the official download layout (Stallkamp et al., 2012;
https://benchmark.ini.rub.de, files at sid.erda.dk):

- ``GTSRB_Final_Training_Images.zip``: ``GTSRB/Final_Training/Images/<class:05d>/*.ppm`` with one
  ``GT-<class:05d>.csv`` per class folder (39,209 images, 43 classes);
- ``GTSRB_Final_Test_Images.zip``: ``GTSRB/Final_Test/Images/*.ppm`` (12,630 images);
- ``GTSRB_Final_Test_GT.zip``: ``GT-final_test.csv``, the test labels.

The CSVs are ``;``-separated with columns ``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``.
Splits: ``train`` (Final_Training) and ``test`` (Final_Test), the test split being the one task_vectors and
AdaMerging evaluate on.  Images are re-encoded from PPM to lossless PNG; nothing is cropped to the ROI
(task_vectors uses the full image).  A CSV row naming a missing image, a class folder without its CSV, or
a split with no image raises an error naming the file or split.

The builder prepares without tensorflow through :class:`~adamerging_jax.data.tf_standin.TensorflowFreeBuilder`
(local downloads included); it is task ``"gtsrb"`` of :mod:`adamerging_jax.data.tfds_sources`, which prepares
and reads it.  This module imports the adapter only, never the task table.
"""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator

from PIL import Image

import tensorflow_datasets as tfds
from adamerging_jax.data.tf_standin import TensorflowFreeBuilder

NUM_CLASSES = 43
_BASE_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
URLS = {
    "train_images": _BASE_URL + "GTSRB_Final_Training_Images.zip",
    "test_images": _BASE_URL + "GTSRB_Final_Test_Images.zip",
    "test_labels": _BASE_URL + "GTSRB_Final_Test_GT.zip",
}


def read_annotations(csv_path: str) -> list[tuple[str, int]]:
    """``(Filename, ClassId)`` rows of a GTSRB ``;``-separated annotation file."""
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"GTSRB annotation file {csv_path!r} is missing")
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle, delimiter=";", skipinitialspace=True)
        missing = {"Filename", "ClassId"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"GTSRB annotation file {csv_path!r} lacks the columns {sorted(missing)}")
        rows = [(row["Filename"], int(row["ClassId"])) for row in reader]
    for _, label in rows:
        if not 0 <= label < NUM_CLASSES:
            raise ValueError(f"GTSRB annotation file {csv_path!r} has ClassId {label}, outside [0, {NUM_CLASSES})")
    return rows


def training_annotations(images_dir: str) -> list[tuple[str, int]]:
    """``(path, label)`` for every image of ``Final_Training/Images``: each class folder's ``GT-<class>.csv``."""
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"GTSRB training folder {images_dir!r} is missing")
    samples = []
    for class_dir in sorted(d for d in os.listdir(images_dir) if os.path.isdir(os.path.join(images_dir, d))):
        folder = os.path.join(images_dir, class_dir)
        rows = read_annotations(os.path.join(folder, f"GT-{class_dir}.csv"))
        samples += [(os.path.join(folder, name), label) for name, label in rows]
    return samples


def final_test_annotations(images_dir: str, labels_csv: str) -> list[tuple[str, int]]:
    """``(path, label)`` for every row of ``GT-final_test.csv``, images in ``Final_Test/Images``."""
    return [(os.path.join(images_dir, name), label) for name, label in read_annotations(labels_csv)]


def _png(path: str) -> bytes:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GTSRB image {path!r}, listed in its annotation file, is missing")
    try:
        with Image.open(path) as image:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
    except OSError as error:
        raise ValueError(f"GTSRB image {path!r} cannot be decoded: {error}") from error
    return buffer.getvalue()


class Gtsrb(TensorflowFreeBuilder, tfds.core.GeneratorBasedBuilder):
    """GTSRB, 43 classes; splits ``train`` (39,209) and ``test`` (12,630)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official Final_Training / Final_Test, images as PNG."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="German Traffic Sign Recognition Benchmark, official training and final test sets.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "filename": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://benchmark.ini.rub.de/gtsrb_news.html",
        )

    def _split_generators(self, dl_manager):
        paths = dl_manager.download_and_extract(URLS)
        train_dir = os.path.join(paths["train_images"], "GTSRB", "Final_Training", "Images")
        test_dir = os.path.join(paths["test_images"], "GTSRB", "Final_Test", "Images")
        test_csv = os.path.join(paths["test_labels"], "GT-final_test.csv")
        return {
            "train": self._generate_examples(training_annotations(os.fspath(train_dir)), "train"),
            "test": self._generate_examples(final_test_annotations(os.fspath(test_dir), os.fspath(test_csv)), "test"),
        }

    def _generate_examples(self, samples: list[tuple[str, int]], split: str) -> Iterator[tuple[str, dict]]:
        if not samples:
            raise ValueError(f"GTSRB split {split!r} has no images")
        for path, label in samples:
            key = os.path.relpath(path, os.path.dirname(os.path.dirname(path)))
            yield key, {"image": _png(path), "label": label, "filename": os.path.basename(path)}
