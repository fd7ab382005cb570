"""The torch-free legacy checkpoint reader and the conversion to the EfficientNet trees."""

import os
import pickle

import jax
import numpy as np
import pytest

from adamerging_jax.models import efficientnet
from adamerging_jax.models.efficientnet_checkpoint import (
    LEGACY_MAGIC,
    LEGACY_PROTOCOL,
    UnsafeCheckpointError,
    convert_state_dict,
    load_pretrained,
    package_checkpoint_path,
    read_legacy_torch_file,
    read_state_dict,
)


def assert_bit_identical(ours: dict, reference: dict) -> None:
    assert list(ours) == list(reference)
    for key, tensor in reference.items():
        expected = tensor.numpy()
        assert ours[key].dtype == expected.dtype, key
        assert ours[key].shape == expected.shape, key
        assert ours[key].tobytes() == expected.tobytes(), key


def test_reads_the_package_file_bit_identical_to_torch_load():
    torch = pytest.importorskip("torch")
    path = package_checkpoint_path()
    reference = torch.load(path, map_location="cpu", weights_only=True)
    ours = read_legacy_torch_file(path)
    assert len(ours) == 296
    assert_bit_identical(ours, reference)
    assert ours._metadata == reference._metadata  # the OrderedDict's attributes survive too


def test_reads_a_small_hand_made_legacy_file_with_views_offsets_and_dtypes(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    state = {
        "transposed": base.t(),  # non-contiguous strides
        "offset_slice": base[1:, 2:5],  # storage offset and strides
        "shares_storage": base,
        "long": torch.tensor([3, -2, 2**40], dtype=torch.int64),
        "half": torch.linspace(-1, 1, 5, dtype=torch.float16),
        "scalar": torch.tensor(1.5, dtype=torch.float64),
    }
    path = tmp_path / "legacy.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert_bit_identical(read_legacy_torch_file(path), torch.load(path, weights_only=True))


class _RunsShell:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_legacy_records(path, payload) -> None:
    with open(path, "wb") as file:
        for record in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}, payload, []):
            pickle.dump(record, file, protocol=2)


def test_refuses_a_pickle_with_a_foreign_global_before_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "malicious.pth"
    write_legacy_records(path, {"weight": _RunsShell(str(marker))})
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load global '(posix|os|nt)\.system'") as info:
        read_legacy_torch_file(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_rejects_zip_format_and_foreign_files(tmp_path):
    zipped = tmp_path / "new.pth"
    zipped.write_bytes(b"PK\x03\x04" + b"\x00" * 32)
    with pytest.raises(ValueError, match="zip-format"):
        read_legacy_torch_file(zipped)
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps(12345, protocol=2))
    with pytest.raises(ValueError, match="magic"):
        read_legacy_torch_file(other)
    with pytest.raises(ValueError, match="backend"):
        read_state_dict(other, backend="tensorflow")


def test_torch_backend_gives_the_same_arrays():
    pytest.importorskip("torch")
    ours, theirs = read_state_dict(backend="numpy"), read_state_dict(backend="torch")
    assert list(ours) == list(theirs)
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key])


def test_conversion_splits_params_stats_and_classifier_in_the_models_layout():
    weights = load_pretrained()
    state = read_state_dict()
    params, stats = jax.eval_shape(efficientnet.init, jax.random.PRNGKey(0))
    as_shapes = lambda tree: jax.tree_util.tree_map(np.shape, tree)  # noqa: E731
    assert as_shapes(weights.params) == as_shapes(params)
    assert as_shapes(weights.batch_stats) == as_shapes(stats)
    assert len(jax.tree_util.tree_leaves(weights.params)) == 147
    assert efficientnet.param_count(weights.params) == 3_371_008
    depthwise = weights.params["block_05"]["depthwise"]["conv"]["kernel"]
    np.testing.assert_array_equal(depthwise[:, :, 0, 7], state["_blocks.5._depthwise_conv.weight"][7, 0])
    np.testing.assert_array_equal(
        weights.params["stem"]["conv"]["kernel"][1, 2, :, 4], state["_conv_stem.weight"][4, :, 1, 2]
    )
    np.testing.assert_array_equal(weights.batch_stats["head"]["bn"]["var"], state["_bn1.running_var"])
    np.testing.assert_array_equal(weights.classifier["kernel"], state["_fc.weight"].T)


def test_conversion_names_missing_and_unexpected_keys():
    state = dict(read_state_dict())
    missing = {k: v for k, v in state.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(ValueError, match=r"_blocks\.3\._bn1\.running_var"):
        convert_state_dict(missing)
    with pytest.raises(ValueError, match="_extra.weight"):
        convert_state_dict({**state, "_extra.weight": np.zeros(3)})
