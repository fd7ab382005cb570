"""EfficientNet-Lite0 in Flax: the convolutions, a torch reference forward on the real weights, real photos."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adamerging_jax.data.packaged import preprocess
from adamerging_jax.models import efficientnet
from adamerging_jax.models.efficientnet_checkpoint import load_pretrained, read_state_dict


@pytest.fixture(scope="module")
def weights():
    return load_pretrained()


@pytest.mark.parametrize("size,kernel,stride", [(7, 3, 1), (8, 3, 2), (9, 5, 2), (6, 5, 1), (3, 5, 2)])
def test_depthwise_conv_equals_grouped_lax_conv(size, kernel, stride):
    x = jax.random.normal(jax.random.PRNGKey(1), (2, size, size + 1, 4))
    w = jax.random.normal(jax.random.PRNGKey(2), (kernel, kernel, 1, 4))
    expected = jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4
    )
    np.testing.assert_allclose(efficientnet.depthwise_conv(x, w, stride), expected, rtol=1e-5, atol=1e-5)


def test_same_padding_is_tensorflows():
    # TF: out = ceil(n / s); total = max((out - 1) s + k - n, 0); before = total // 2.
    assert efficientnet.same_padding(64, 3, 2) == (0, 1)
    assert efficientnet.same_padding(65, 3, 2) == (1, 1)
    assert efficientnet.same_padding(12, 5, 2) == (1, 2)
    assert efficientnet.same_padding(6, 5, 1) == (2, 2)


def test_blocks_and_tree_follow_the_reference_layout():
    specs = efficientnet.block_specs(efficientnet.LITE0)
    assert len(specs) == 16
    assert [s.stride for s in specs] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    assert [s.has_residual for s in specs].count(True) == 9
    assert not efficientnet.stacked("block_03/expand/conv/kernel")


def torch_reference_logits(state: dict, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An independent torch EfficientNet-Lite0 forward (lukemelas layout, TF SAME padding) on NCHW input."""
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}

    def conv_same(x, weight, stride, groups=1):
        k = weight.shape[-1]
        pads = []
        for n in (x.shape[3], x.shape[2]):  # F.pad lists the last axis first
            out = -(-n // stride)
            total = max((out - 1) * stride + k - n, 0)
            pads += [total // 2, total - total // 2]
        return f.conv2d(f.pad(x, pads), weight, stride=stride, groups=groups)

    def bn(x, name):
        return f.batch_norm(
            x, t[f"{name}.running_mean"], t[f"{name}.running_var"], t[f"{name}.weight"], t[f"{name}.bias"],
            training=False, eps=1e-3,
        )  # fmt: skip

    relu6 = lambda x: f.hardtanh(x, 0.0, 6.0)  # noqa: E731
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = relu6(bn(conv_same(x, t["_conv_stem.weight"], 2), "_bn0"))
    settings = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]  # fmt: skip
    index = 0
    for repeats, _, stride, expand, _ in settings:
        for r in range(repeats):
            p = f"_blocks.{index}"
            inputs = x
            if expand != 1:
                x = relu6(bn(conv_same(x, t[f"{p}._expand_conv.weight"], 1), f"{p}._bn0"))
            depthwise = conv_same(x, t[f"{p}._depthwise_conv.weight"], stride if r == 0 else 1, groups=x.shape[1])
            x = relu6(bn(depthwise, f"{p}._bn1"))
            x = bn(conv_same(x, t[f"{p}._project_conv.weight"], 1), f"{p}._bn2")
            if x.shape == inputs.shape and (stride == 1 or r > 0):
                x = x + inputs
            index += 1
    x = relu6(bn(conv_same(x, t["_conv_head.weight"], 1), "_bn1"))
    pooled = x.mean(dim=(2, 3))
    return pooled.numpy(), f.linear(pooled, t["_fc.weight"], t["_fc.bias"]).numpy()


def test_matches_a_torch_reference_forward_on_the_real_weights(weights):
    images = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    ref_features, ref_logits = torch_reference_logits(read_state_dict(), images)
    ours = jax.jit(efficientnet.features)(weights.params, weights.batch_stats, images)
    np.testing.assert_allclose(ours, ref_features, rtol=1e-4, atol=1e-4)
    logits = jax.jit(efficientnet.logits)(weights.params, weights.batch_stats, weights.classifier, images)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=2e-4)


def test_features_in_batches_equals_one_forward(weights):
    images = np.random.default_rng(1).uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)
    expected = jax.jit(efficientnet.features)(weights.params, weights.batch_stats, images)
    batched = efficientnet.features_in_batches(weights.params, weights.batch_stats, images, batch_size=2)
    assert batched.shape == (5, 1280)
    np.testing.assert_allclose(batched, expected, rtol=1e-5, atol=1e-5)


def test_it_is_the_real_imagenet_network(weights):
    skimage_data = pytest.importorskip("skimage.data")
    photos = np.concatenate([preprocess(photo[None], 224) for photo in (skimage_data.chelsea(), skimage_data.coffee())])
    logits = jax.jit(efficientnet.logits)(weights.params, weights.batch_stats, weights.classifier, photos)
    probabilities = jax.nn.softmax(logits)
    assert jnp.argmax(logits, -1).tolist() == [285, 967]  # ImageNet "Egyptian cat", "espresso"
    assert float(probabilities[0, 285]) > 0.5 and float(probabilities[1, 967]) > 0.5


def test_rejects_input_without_three_channels(weights):
    with pytest.raises(ValueError, match="3 channels"):
        efficientnet.features(weights.params, weights.batch_stats, jnp.zeros((1, 32, 32)))
