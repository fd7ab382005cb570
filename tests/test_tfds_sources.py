"""The tfds catalog builders of the paper's tasks, prepared WITHOUT tensorflow on tiny fake copies of their
source files (in the layout of the real downloads), read back through ``tfds.data_source``.

Every test runs the catalog's own ``_split_generators``/``_generate_examples`` (sun397: our Pillow example
loop) and tfds's own archive extraction; downloads are served from a local folder with ``offline=True``.
The last tests check the data modules' import graph: the tensorflow stand-in depends on neither the task
table nor GTSRB, GTSRB on the stand-in only, and no data module imports another in a circle.
"""
import ast
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

import tensorflow_datasets as tfds
from adamerging_jax.data import tf_standin, tfds_sources


def _jpeg(pixels, quality=95):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _decoded(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _write_tar(path, files):
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def _write_zip(path, files):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)


def _prepare(name, tmp_path, **kwargs):
    return tfds_sources.prepare(
        name, tmp_path / "data", local_downloads=tmp_path / "downloads", download_dir=tmp_path / "dl",
        offline=True, **kwargs,
    )


def _records(tmp_path, name, split, config=None):
    """The split read the public way, by ``tfds.data_source``."""
    full = f"{name}/{config}" if config else name
    return list(tfds.data_source(full, split=split, data_dir=str(tmp_path / "data"), download=False))


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def downloads(tmp_path):
    os.makedirs(tmp_path / "downloads")
    return tmp_path / "downloads"


def test_mnist(tmp_path, downloads, rng, monkeypatch):
    from tensorflow_datasets.image_classification import mnist

    # the catalog reads a fixed number of images; tfds's own mnist test shrinks these constants the same way
    monkeypatch.setattr(mnist, "_TRAIN_EXAMPLES", 5)
    monkeypatch.setattr(mnist, "_TEST_EXAMPLES", 4)
    images = {"train": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
              "t10k": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)}
    labels = {"train": np.array([3, 1, 4, 1, 5], np.uint8), "t10k": np.array([9, 2, 6, 5], np.uint8)}
    for prefix in ("train", "t10k"):
        n = len(labels[prefix])
        header = b"\0\0\x08\x03" + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
        (downloads / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images[prefix].tobytes()))
        header = b"\0\0\x08\x01" + n.to_bytes(4, "big")
        (downloads / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels[prefix].tobytes()))
    _prepare("mnist", tmp_path)
    records = _records(tmp_path, "mnist", "test")
    got = sorted((int(r["label"]), r["image"][..., 0].tobytes()) for r in records)
    assert got == sorted((int(l), i.tobytes()) for l, i in zip(labels["t10k"], images["t10k"]))
    source = tfds_sources.split_source("mnist", tmp_path / "data")
    image, label = source[0]
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8  # grey repeated to RGB
    assert len(_records(tmp_path, "mnist", "train")) == 5


def test_svhn_cropped(tmp_path, downloads, rng):
    expected = {}
    for split, n in (("train", 3), ("test", 5), ("extra", 2)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8)[:, None]  # digit 0 is stored as 10
        scipy.io.savemat(downloads / f"{split}_32x32.mat", {"X": x, "y": y})
        expected[split] = {f"{split}_{i:06d}": (x[..., i], int(y[i, 0]) % 10) for i in range(n)}
    _prepare("svhn", tmp_path)
    for split in ("train", "test", "extra"):
        records = _records(tmp_path, "svhn_cropped", split)
        assert {_text(r["id"]) for r in records} == set(expected[split])
        for r in records:
            pixels, label = expected[split][_text(r["id"])]
            np.testing.assert_array_equal(r["image"], pixels)
            assert r["label"] == label


def test_cars196(tmp_path, downloads, rng):
    def annotations(names, classes, with_class=True):
        fields = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
        table = np.zeros((1, len(names)), dtype=fields)
        for i, (name, cls) in enumerate(zip(names, classes)):
            table[0, i] = (np.array([[1]]), np.array([[2]]), np.array([[10]]), np.array([[8]]), np.array([[cls]]), np.array([name]))
        return {"annotations": table}

    expected = {}
    for split, classes in (("train", [1, 196, 5]), ("test", [2, 2, 196, 7])):
        names = [f"{i + 1:05d}.jpg" for i in range(len(classes))]
        pixels = [rng.integers(0, 256, (12, 16, 3), dtype=np.uint8) for _ in names]
        files = {f"cars_{split}/{n}": _jpeg(p) for n, p in zip(names, pixels)}
        _write_tar(downloads / f"cars_{split}.tgz", files)
        expected[split] = {n[:-4]: (_decoded(files[f"cars_{split}/{n}"]), c - 1) for n, p, c in zip(names, pixels, classes)}
        mat = io.BytesIO()
        scipy.io.savemat(mat, annotations(names, classes))
        if split == "train":
            devkit = mat.getvalue()
        else:
            (downloads / "cars_test_annos_withlabels.mat").write_bytes(mat.getvalue())
    _write_tar(downloads / "car_devkit.tgz", {"devkit/cars_train_annos.mat": devkit})
    _prepare("cars", tmp_path)
    for split in ("train", "test"):
        records = _records(tmp_path, "cars196", split)
        assert {_text(r["id"]) for r in records} == set(expected[split])
        for r in records:
            pixels, label = expected[split][_text(r["id"])]
            np.testing.assert_array_equal(r["image"], pixels)  # the JPEG bytes are stored as downloaded
            assert r["label"] == label
            np.testing.assert_allclose(r["bbox"], [2 / 12, 1 / 16, 8 / 12, 10 / 16], rtol=1e-6)


def test_resisc45_from_manual_dir(tmp_path, rng):
    manual = tmp_path / "manual" / "NWPU-RESISC45"
    expected = {}
    for label in ("airplane", "wetland", "sea_ice"):
        os.makedirs(manual / label)
        for i in range(1, 3):
            data = _jpeg(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
            (manual / label / f"{label}_{i:03d}.jpg").write_bytes(data)
            expected[f"{label}_{i:03d}.jpg"] = (_decoded(data), label)
    os.makedirs(tmp_path / "downloads")
    builder = _prepare("resisc45", tmp_path, manual_dir=tmp_path / "manual")
    names = builder.info.features["label"].names
    records = _records(tmp_path, "resisc45", "train")
    assert {_text(r["filename"]) for r in records} == set(expected)
    for r in records:
        pixels, label = expected[_text(r["filename"])]
        np.testing.assert_array_equal(r["image"], pixels)
        assert names[r["label"]] == label
    # the task's default test split: the last 20% of train
    assert len(tfds_sources.split_source("resisc45", tmp_path / "data")) == len(_records(tmp_path, "resisc45", "train[80%:]"))
    # task_vectors' exact split: a published file list (resisc45-test.txt), kept in its order
    listed = tmp_path / "resisc45-test.txt"
    listed.write_text("wetland_002.jpg\nairplane_001.jpg\n")
    source = tfds_sources.split_source("resisc45", tmp_path / "data", file_list=listed)
    assert len(source) == 2
    for (image, label), name in zip((source[0], source[1]), ("wetland_002.jpg", "airplane_001.jpg")):
        np.testing.assert_array_equal(image, expected[name][0])
        assert names[label] == expected[name][1]
    with pytest.raises(ValueError, match="sea_ice_009.jpg"):
        tfds_sources.split_source("resisc45", tmp_path / "data", file_list=["airplane_001.jpg", "sea_ice_009.jpg"])


def test_resisc45_without_manual_download_fails(tmp_path):
    os.makedirs(tmp_path / "manual" / "other")
    os.makedirs(tmp_path / "downloads")
    with pytest.raises(AssertionError, match="manually"):
        _prepare("resisc45", tmp_path, manual_dir=tmp_path / "manual")


def test_eurosat_rgb(tmp_path, downloads, rng):
    files, expected = {}, {}
    for label in ("AnnualCrop", "SeaLake", "Highway"):
        for i in range(1, 4):
            data = _jpeg(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
            files[f"2750/{label}/{label}_{i}.jpg"] = data
            expected[f"{label}_{i}.jpg"] = (_decoded(data), label)
    _write_zip(downloads / "EuroSAT.zip", files)
    builder = _prepare("eurosat", tmp_path)
    names = builder.info.features["label"].names
    records = _records(tmp_path, "eurosat", "train", config="rgb")
    assert {_text(r["filename"]) for r in records} == set(expected)
    for r in records:
        pixels, label = expected[_text(r["filename"])]
        np.testing.assert_array_equal(r["image"], pixels)
        assert names[r["label"]] == label
    test = tfds_sources.split_source("eurosat", tmp_path / "data")  # last 10% of 9 -> 1 image
    assert len(test) == len(_records(tmp_path, "eurosat", "train[90%:]", config="rgb")) == 1


def test_dtd(tmp_path, downloads, rng):
    files, lists, expected = {}, {"train1": [], "val1": [], "test1": []}, {}
    for label in ("banded", "zigzagged"):
        for i, split in enumerate(("train1", "val1", "test1", "test1")):
            name = f"{label}/{label}_{i:04d}.jpg"
            data = _jpeg(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
            files[f"dtd/images/{name}"] = data
            lists[split].append(name)
            expected[name] = (_decoded(data), label, split)
    for split, names in lists.items():
        files[f"dtd/labels/{split}.txt"] = ("\n".join(names) + "\n").encode()
    _write_tar(downloads / "dtd-r1.0.1.tar.gz", files)
    builder = _prepare("dtd", tmp_path)
    names = builder.info.features["label"].names
    for split, tfds_split in (("train1", "train"), ("val1", "validation"), ("test1", "test")):
        records = _records(tmp_path, "dtd", tfds_split)
        assert sorted(_text(r["file_name"]) for r in records) == sorted(lists[split])
        for r in records:
            pixels, label, _ = expected[_text(r["file_name"])]
            np.testing.assert_array_equal(r["image"], pixels)
            assert names[r["label"]] == label


def test_sun397_standard_partition_1(tmp_path, downloads, rng):
    from adamerging_jax.data.tf_standin import _sun397_jpeg

    members, partitions = {}, {"Training_01.txt": [], "Testing_01.txt": []}
    expected = {}
    large = rng.integers(0, 256, (400, 500, 3), dtype=np.uint8)  # 200,000 pixels: shrunk to <= 120,000
    for j, (name, split) in enumerate((
        ("/a/abbey/sun_aaaaaaaaaaaaaaaa.jpg", "Training_01.txt"),
        ("/a/abbey/sun_bbbbbbbbbbbbbbbb.jpg", "Testing_01.txt"),
        ("/c/car_interior/backseat/sun_cccccccccccccccc.jpg", "Testing_01.txt"),
        ("/a/abbey/sun_dddddddddddddddd.jpg", None),  # in no partition-1 list: in no split
    )):
        pixels = large if j == 1 else rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG" if j == 2 else "JPEG")  # SUN397 hides PNGs behind .jpg
        members["SUN397" + name] = buffer.getvalue()
        if split:
            partitions[split].append(name)
        expected[name] = _decoded(_sun397_jpeg(buffer.getvalue()))
    _write_tar(downloads / "SUN397.tar.gz", members)
    _write_zip(downloads / "Partitions.zip", {k: "\n".join(v) + "\n" for k, v in partitions.items()})
    builder = _prepare("sun397", tmp_path)
    labels = builder.info.features["label"].names
    for split, tfds_split in (("Training_01.txt", "train"), ("Testing_01.txt", "test")):
        records = _records(tmp_path, "sun397", tfds_split, config="standard-part1-120k")
        assert sorted(_text(r["file_name"]) for r in records) == sorted(partitions[split])
        for r in records:
            name = _text(r["file_name"])
            np.testing.assert_array_equal(r["image"], expected[name])
            assert labels[r["label"]] == "/".join(name.split("/")[:-1])
            assert r["image"].shape[0] * r["image"].shape[1] <= 120_000


def test_sun397_labels_follow_task_vectors_class_order(tmp_path, downloads, rng):
    """task_vectors' class names (the CLIP heads' order, shipped in adamerging_jax/heads) against tfds' labels."""
    import json

    names = tfds.builder_cls("sun397")(data_dir=str(tmp_path), config="standard-part1-120k").info.features["label"].names
    ranks = tfds_sources.sun397_folder_order(names)
    heads = os.path.join(os.path.dirname(tfds_sources.__file__), "..", "heads", "clip_tasks.json")
    task_vectors_names = json.load(open(heads))["tasks"]["sun397"]["classnames"]
    relabelled = [None] * len(names)
    for tfds_label, name in enumerate(names):
        relabelled[ranks[tfds_label]] = name[3:].replace("/", " ").replace("_", " ")
    assert relabelled == task_vectors_names
    assert (ranks != np.arange(len(names))).sum() == 2  # /j/jail/indoor and /j/jail_cell swap
    # and split_source applies it: a fake copy holding those two classes
    jail = [n for n in names if n.startswith("/j/jail")]
    members = {f"SUN397{c}/sun_{'a' * 16}.jpg": _jpeg(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for c in jail}
    test_names = "\n".join(m[len("SUN397"):] for m in members)
    members["SUN397/a/abbey/sun_bbbbbbbbbbbbbbbb.jpg"] = _jpeg(np.zeros((8, 8, 3), np.uint8))  # train may not be empty
    _write_tar(downloads / "SUN397.tar.gz", members)
    _write_zip(downloads / "Partitions.zip", {"Training_01.txt": "/a/abbey/sun_bbbbbbbbbbbbbbbb.jpg\n", "Testing_01.txt": test_names})
    _prepare("sun397", tmp_path)
    source = tfds_sources.split_source("sun397", tmp_path / "data")
    records = _records(tmp_path, "sun397", "test", config="standard-part1-120k")
    for index, record in enumerate(records):
        assert source[index][1] == ranks[record["label"]] != record["label"]


def test_sun397_resize_keeps_aspect_and_pixel_budget():
    from adamerging_jax.data.tf_standin import _sun397_jpeg

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((400, 500, 3), np.uint8)).save(buffer, format="BMP")
    small = _decoded(_sun397_jpeg(buffer.getvalue()))
    factor = np.sqrt(120_000 / 200_000)
    assert small.shape == (round(400 * factor), round(500 * factor), 3)


def test_offline_without_downloads_names_the_url(tmp_path):
    os.makedirs(tmp_path / "downloads")
    with pytest.raises(FileNotFoundError, match="test_32x32.mat|train_32x32.mat|extra_32x32.mat"):
        _prepare("svhn", tmp_path)


def test_unprepared_task_and_unknown_task_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="dtd"):
        tfds_sources.split_source("dtd", tmp_path / "nothing")
    with pytest.raises(ValueError, match="imagenet"):
        tfds_sources.task("imagenet")


def test_task_table_covers_the_paper():
    assert list(tfds_sources.TASKS) == ["sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    for spec in tfds_sources.TASKS.values():
        assert spec.builder == "gtsrb" or spec.builder in tfds.list_builders(with_community_datasets=False)


def test_tensorflow_stand_in_is_restored_after_preparing(tmp_path, downloads):
    from tensorflow_datasets.core.download import extractor

    before = extractor.__dict__["tf"]
    with pytest.raises(FileNotFoundError):
        _prepare("svhn", tmp_path)
    assert extractor.__dict__["tf"] is before


def test_catalog_class_keeps_the_catalogs_identity_and_registration():
    mnist = tf_standin.tensorflow_free_catalog_class("mnist")
    catalog = tfds.builder_cls("mnist")
    assert mnist is not catalog and issubclass(mnist, catalog) and issubclass(mnist, tf_standin.TensorflowFreeBuilder)
    assert (mnist.name, mnist.__name__, mnist.__module__) == (catalog.name, catalog.__name__, catalog.__module__)
    assert tfds.builder_cls("mnist") is catalog  # not registered over the catalog's class
    sun397 = tf_standin.tensorflow_free_catalog_class("sun397")
    assert sun397.__mro__[1] is tf_standin._Sun397PillowExamples  # the Pillow loop before the catalog's own
    assert tf_standin._Sun397PillowExamples not in mnist.__mro__
    assert tf_standin.as_text(b"caf\xc3\xa9") == tf_standin.as_text("caf\u00e9") == "caf\u00e9"


DATA = Path(tfds_sources.__file__).resolve().parent
PACKAGE = "adamerging_jax.data"


def _data_imports(path: Path) -> set[str]:
    """The sibling data modules ``path`` imports anywhere (top level or inside a function), by module name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level <= 1:  # absolute, or relative to this package
            base = node.module or "" if node.level == 0 else ".".join(filter(None, (PACKAGE, node.module)))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name[len(PACKAGE) + 1:] for name in names if name.startswith(PACKAGE + "."))
    siblings = {p.stem for p in DATA.glob("*.py")}
    return {name.split(".")[0] for name in found} & siblings - {path.stem}


def test_data_modules_import_each_other_without_a_circle():
    graph = {path.stem: _data_imports(path) for path in DATA.glob("*.py") if path.stem != "__init__"}
    assert graph["tf_standin"] == set()
    assert graph["gtsrb"] == {"tf_standin"}
    assert graph["tfds_sources"] == {"gtsrb", "tf_standin"}
    done, on_path = set(), []

    def visit(module):  # depth-first search; meeting a module already on the path is a circle
        assert module not in on_path, f"import circle: {' -> '.join(on_path[on_path.index(module):] + [module])}"
        if module not in done:
            on_path.append(module)
            for imported in sorted(graph[module]):
                visit(imported)
            on_path.pop()
            done.add(module)

    for module in sorted(graph):
        visit(module)


def test_each_tfds_module_imports_first_in_a_fresh_interpreter():
    """Importing a module first succeeds, and loads none of the modules that must not depend on it."""
    code = (
        "import importlib, json, sys; importlib.import_module(sys.argv[1]); "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('adamerging_jax.data.'))))"
    )
    must_not_load = {"tf_standin": {"gtsrb", "tfds_sources"}, "gtsrb": {"tfds_sources"}, "tfds_sources": set()}
    runs = {
        module: subprocess.Popen([sys.executable, "-c", code, f"{PACKAGE}.{module}"], cwd=DATA.parents[1],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for module in must_not_load
    }
    loaded = {}
    for module, run in runs.items():
        out, err = run.communicate(timeout=180)
        assert run.returncode == 0, f"import {PACKAGE}.{module} first: {err[-2000:]}"
        loaded[module] = {name.removeprefix(PACKAGE + ".") for name in json.loads(out.splitlines()[-1])}
        assert module in loaded[module] and not loaded[module] & must_not_load[module], (module, loaded[module])
    assert loaded["tfds_sources"] >= {"tf_standin", "gtsrb"}  # the task table brings the builder and the adapter
