"""The packaged legacy checkpoint read without torch, and its conversion to the EfficientNet trees.

The reader itself (both torch formats, crafted files) is tested in test_torch_file.py.
"""

import jax
import numpy as np
import pytest

from adamerging_jax.models import efficientnet
from adamerging_jax.models import torch_file
from adamerging_jax.models.efficientnet_checkpoint import (
    UnsafeCheckpointError,
    convert_state_dict,
    load_pretrained,
    package_checkpoint_path,
    read_state_dict,
    tensor_names,
)
from adamerging_jax.core.trees import named_leaves


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
    ours = read_state_dict(path)
    assert len(ours) == 296
    assert_bit_identical(ours, reference)
    assert ours._metadata == reference._metadata  # the OrderedDict's attributes survive too


def test_the_unsafe_checkpoint_error_is_the_readers():
    assert UnsafeCheckpointError is torch_file.UnsafeCheckpointError


def test_a_bare_tensor_is_not_a_state_dict_and_backends_are_named(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "bare.pt"
    torch.save(torch.ones(3), path)
    with pytest.raises(ValueError, match=r"bare\.pt holds a ndarray, not a state dict"):
        read_state_dict(path)
    with pytest.raises(ValueError, match="backend"):
        read_state_dict(path, backend="tensorflow")


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
    assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(weights.params)) == 3_371_008
    depthwise = weights.params["block_05"]["depthwise"]["conv"]["kernel"]
    np.testing.assert_array_equal(depthwise[:, :, 0, 7], state["_blocks.5._depthwise_conv.weight"][7, 0])
    np.testing.assert_array_equal(
        weights.params["stem"]["conv"]["kernel"][1, 2, :, 4], state["_conv_stem.weight"][4, :, 1, 2]
    )
    np.testing.assert_array_equal(weights.batch_stats["head"]["bn"]["var"], state["_bn1.running_var"])
    np.testing.assert_array_equal(weights.classifier["kernel"], state["_fc.weight"].T)


def test_tensor_names_name_every_leaf_by_its_state_dict_tensor_in_the_files_order():
    """Each leaf is its named tensor of the package's state dict (a conv kernel OIHW → HWIO), and ``order`` is
    the file's own order of the backbone's parameters (running statistics and the classifier left out)."""
    weights, state, names = load_pretrained(), read_state_dict(), tensor_names()
    leaves = dict(named_leaves(weights.params))
    assert set(names) == {(path, None) for path in leaves}
    not_merged = ("running_mean", "running_var", "num_batches_tracked")
    assert list(names.order) == [key for key in state
                                 if not key.startswith("_fc.") and key.rsplit(".", 1)[1] not in not_merged]
    for (path, _), name in names.items():
        tensor = state[name].transpose(2, 3, 1, 0) if path.endswith("conv/kernel") else state[name]
        np.testing.assert_array_equal(leaves[path], tensor, err_msg=path)


def test_conversion_names_missing_and_unexpected_keys():
    state = dict(read_state_dict())
    missing = {k: v for k, v in state.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(ValueError, match=r"_blocks\.3\._bn1\.running_var"):
        convert_state_dict(missing)
    with pytest.raises(ValueError, match="_extra.weight"):
        convert_state_dict({**state, "_extra.weight": np.zeros(3)})
