"""The cache root and the checksummed tree cache: exact round trips, and every damaged or mismatched file a
cache miss with a warning naming it."""

import hashlib
import io
import json
import os
import warnings
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from adamerging_jax import cache
from adamerging_jax.cache import CacheWarning, load_tree, save_tree


def make_tree(offset: float = 0.0) -> dict:
    rng = np.random.default_rng(0)
    return {
        "block": {"kernel": rng.normal(size=(3, 4)).astype(np.float32) + offset, "bias": jnp.arange(4.0) + offset},
        "bf16": np.array([1.5, -2.25, 3e38], ml_dtypes.bfloat16),
        "steps": np.array([1, -2, 2**40], np.int64),
        "layers": [np.float32(offset + 0.5), np.zeros((0, 3), np.float16)],
        "flag": np.array(True),
    }


def assert_exact(ours, reference) -> None:
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(reference)
    for got, want in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(reference)):
        want = np.asarray(want)
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


def test_round_trip_is_exact_and_the_checksum_is_the_documented_one(tmp_path):
    tree = make_tree()
    path = tmp_path / "sub" / "tree.npz"
    save_tree(path, tree)
    assert os.listdir(path.parent) == ["tree.npz"]  # written atomically: no temporary file left
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_exact(load_tree(path, tree), tree)
        shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)
        assert_exact(load_tree(path, shapes), tree)  # shapes and dtypes are enough
    with np.load(path) as data:
        manifest = json.loads(data[cache.MANIFEST].tobytes())
        assert data["bf16"].dtype == np.uint16  # bfloat16 stored by width, typed by the manifest
    digest = hashlib.sha256()
    for name, leaf in (
        ("bf16", tree["bf16"]),
        ("block/bias", np.arange(4.0, dtype=np.float32)),
        ("block/kernel", tree["block"]["kernel"]),
        ("flag", tree["flag"]),
        ("layers/0", np.asarray(tree["layers"][0])),
        ("layers/1", tree["layers"][1]),
        ("steps", tree["steps"]),
    ):
        digest.update(f'["{name}", "{leaf.dtype.name}", {list(leaf.shape)}]'.encode() + b"\0" + leaf.tobytes())
    assert manifest["sha256"] == digest.hexdigest()
    assert [leaf[0] for leaf in manifest["leaves"]] == ["bf16", "block/bias", "block/kernel", "flag", "layers/0",
                                                        "layers/1", "steps"]


def test_a_missing_file_is_a_silent_miss(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_tree(tmp_path / "absent.npz", make_tree()) is None


def expect_miss(path, like, reason: str) -> None:
    with pytest.warns(CacheWarning, match=rf"{path.name}: {reason}"):
        assert load_tree(path, like) is None


def test_damaged_files_are_misses_with_a_warning(tmp_path):
    tree = make_tree()
    path = tmp_path / "tree.npz"
    save_tree(path, tree)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    expect_miss(truncated, tree, "it cannot be read")
    flipped = tmp_path / "flipped.npz"
    with zipfile.ZipFile(path) as archive:  # flip one byte inside the kernel's values
        info = archive.getinfo("block/kernel.npy")
        position = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size - 3
    damaged = bytearray(data)
    damaged[position] ^= 0x40
    flipped.write_bytes(bytes(damaged))
    expect_miss(flipped, tree, r"it cannot be read \(BadZipFile: Bad CRC-32")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    expect_miss(garbage, tree, "it cannot be read")
    plain = tmp_path / "plain.npz"
    np.savez(plain, **{"block/kernel": tree["block"]["kernel"]})
    expect_miss(plain, tree, r"it is not a tree cache file \(no manifest\)")


def test_valid_file_with_other_values_fails_its_checksum(tmp_path):
    """A well-formed npz whose values are not the ones its manifest was computed from (e.g. one leaf
    replaced by another run's): every leaf matches in name, shape and dtype, only the checksum tells."""
    path = tmp_path / "tree.npz"
    save_tree(path, make_tree())
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["block/kernel"] = arrays["block/kernel"] + np.float32(1e-3)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    expect_miss(path, make_tree(), "its values do not match its sha256 checksum")


def test_other_leaves_are_misses_naming_the_leaf(tmp_path):
    tree = make_tree()
    path = tmp_path / "tree.npz"
    save_tree(path, tree)
    renamed = {**tree, "block": {"w": tree["block"]["kernel"], "bias": tree["block"]["bias"]}}
    expect_miss(path, renamed, r"leaf 'block/kernel' is float32\[3, 4\], the tree wants 'block/w'")
    reshaped = {**tree, "steps": np.zeros(4, np.int64)}
    expect_miss(path, reshaped, r"leaf 'steps' is int64\[3\], the tree wants 'steps' as int64\[4\]")
    retyped = {**tree, "bf16": np.zeros(3, np.float16)}  # same width, other dtype
    expect_miss(path, retyped, r"leaf 'bf16' is bfloat16\[3\], the tree wants 'bf16' as float16\[3\]")
    expect_miss(path, {"only": np.zeros(1)}, "it holds 7 leaves, the tree has 1")


def test_reserved_leaf_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match=cache.MANIFEST):
        save_tree(tmp_path / "x.npz", {cache.MANIFEST: np.zeros(1)})


def test_cache_root_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(cache.ENV_VAR, raising=False)
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "adamerging_jax"
    monkeypatch.setenv(cache.ENV_VAR, "")
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "adamerging_jax"
    monkeypatch.setenv(cache.ENV_VAR, "~/elsewhere")
    assert cache.cache_root() == tmp_path / "home" / "elsewhere"
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "c"))
    assert cache.cache_dir("finetuned") == tmp_path / "c" / "finetuned"
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError, match="one folder name"):
            cache.cache_dir(bad)


def test_enable_compilation_cache_points_jax_at_the_root(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        assert cache.enable_compilation_cache(2.5) == tmp_path / "jax"
        assert (tmp_path / "jax").is_dir()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.5
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
