"""The GTSRB builder on a fake copy of the official download (zips of ppm images and ;-separated CSVs)."""
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from adamerging_jax.data import tfds_sources
from adamerging_jax.data.gtsrb import read_annotations

HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"


def _ppm(rng, size=(9, 7)):
    return rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def _write_zip(path, files):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)


def _ppm_bytes(array):
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PPM")
    return buffer.getvalue()


def fake_gtsrb(folder, rng, classes=(0, 5, 42), per_class=2, n_test=4, drop_test_image=None):
    """Writes the three official zips; returns {split: {filename: (pixels, label)}}."""
    os.makedirs(folder, exist_ok=True)
    expected = {"train": {}, "test": {}}
    train = {}
    for label in classes:
        rows = HEADER
        for i in range(per_class):
            name = f"{label:05d}_{i:05d}.ppm"
            pixels = _ppm(rng)
            train[f"GTSRB/Final_Training/Images/{label:05d}/{name}"] = _ppm_bytes(pixels)
            rows += f"{name};9;7;1;1;8;6;{label}\n"
            expected["train"][name] = (pixels, label)
        train[f"GTSRB/Final_Training/Images/{label:05d}/GT-{label:05d}.csv"] = rows
    _write_zip(os.path.join(folder, "GTSRB_Final_Training_Images.zip"), train)
    test, rows = {}, HEADER
    for i in range(n_test):
        name, label, pixels = f"{i:05d}.ppm", classes[i % len(classes)], _ppm(rng, (11, 10))
        rows += f"{name};11;10;1;1;10;9;{label}\n"
        if name != drop_test_image:
            test[f"GTSRB/Final_Test/Images/{name}"] = _ppm_bytes(pixels)
        expected["test"][name] = (pixels, label)
    _write_zip(os.path.join(folder, "GTSRB_Final_Test_Images.zip"), test)
    _write_zip(os.path.join(folder, "GTSRB_Final_Test_GT.zip"), {"GT-final_test.csv": rows})
    return expected


def test_gtsrb_builder_writes_every_image_with_its_label(tmp_path):
    expected = fake_gtsrb(tmp_path / "downloads", np.random.default_rng(0))
    builder = tfds_sources.prepare(
        "gtsrb", tmp_path / "data", local_downloads=tmp_path / "downloads", download_dir=tmp_path / "dl", offline=True
    )
    for split in ("train", "test"):
        records = builder.as_data_source(split=split)
        got = {r["filename"].decode() if isinstance(r["filename"], bytes) else r["filename"]: r for r in records}
        assert set(got) == set(expected[split])
        for name, (pixels, label) in expected[split].items():
            np.testing.assert_array_equal(got[name]["image"], pixels)  # PNG is lossless
            assert got[name]["label"] == label
    source = tfds_sources.split_source("gtsrb", tmp_path / "data")  # the task's test split
    assert len(source) == 4 and sorted(source[i][1] for i in range(4)) == sorted(v[1] for v in expected["test"].values())


def test_gtsrb_missing_test_image_is_named(tmp_path):
    fake_gtsrb(tmp_path / "downloads", np.random.default_rng(1), drop_test_image="00002.ppm")
    with pytest.raises(FileNotFoundError, match="00002.ppm"):
        tfds_sources.prepare(
            "gtsrb", tmp_path / "data", local_downloads=tmp_path / "downloads", download_dir=tmp_path / "dl",
            offline=True,
        )


def test_gtsrb_offline_without_the_download_names_the_url(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="GTSRB_Final_Training_Images.zip"):
        tfds_sources.prepare("gtsrb", tmp_path / "data", local_downloads=tmp_path / "empty", offline=True)


def test_annotation_file_errors(tmp_path):
    bad = tmp_path / "GT-bad.csv"
    bad.write_text("Filename;Width\nx.ppm;3\n")
    with pytest.raises(ValueError, match="ClassId"):
        read_annotations(str(bad))
    out_of_range = tmp_path / "GT-range.csv"
    out_of_range.write_text(HEADER + "x.ppm;1;1;0;0;1;1;43\n")
    with pytest.raises(ValueError, match="43"):
        read_annotations(str(out_of_range))
    with pytest.raises(FileNotFoundError, match="GT-none.csv"):
        read_annotations(str(tmp_path / "GT-none.csv"))
