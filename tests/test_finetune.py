"""Per-task fine-tuning of a (tiny) EfficientNet-Lite with its head and BatchNorm statistics frozen."""

import math
from functools import partial

import jax
import numpy as np
import pytest

from adamerging_jax.demo.finetune import FinetuneConfig, classification_loss, finetune, learning_rate_schedule
from adamerging_jax.heads.prototype import prototype_head
from adamerging_jax.models import efficientnet
from adamerging_jax.models.efficientnet import EfficientNetConfig, StageSpec

TINY = EfficientNetConfig(
    stages=(StageSpec(1, 3, 1, 1, 8), StageSpec(2, 3, 2, 2, 12)), stem_channels=8, head_channels=16
)
tiny_features = partial(efficientnet.features, config=TINY)
eval_features = jax.jit(tiny_features)  # direct calls: eager Flax is slow


@pytest.fixture(scope="module")
def setup():
    params, batch_stats = efficientnet.init(jax.random.PRNGKey(0), TINY, resolution=16)
    rng = np.random.default_rng(0)
    # Non-trivial running statistics (mean near 0, var near 1), so that "frozen" is visible.
    batch_stats = jax.tree_util.tree_map_with_path(
        lambda path, leaf: (
            rng.normal(0, 0.1, leaf.shape) if path[-1].key == "mean" else rng.uniform(0.5, 1.5, leaf.shape)
        ).astype(np.float32),
        batch_stats,
    )
    labels = np.arange(48) % 3
    images = (rng.normal(size=(48, 16, 16, 3)) * 0.3 + labels[:, None, None, None] * 0.4).astype(np.float32)
    head = prototype_head(eval_features(params, batch_stats, images[:3]), labels[:3], 3, scale=30.0)
    return params, batch_stats, head, images, labels


@jax.jit
def full_loss(params, batch_stats, head, images, labels):
    return classification_loss(params, batch_stats, head, images, labels, tiny_features)


def test_lowers_training_loss_and_leaves_head_and_bn_statistics_unchanged(setup):
    params, batch_stats, head, images, labels = setup
    stats_before = jax.tree_util.tree_map(np.copy, batch_stats)
    head_before = jax.tree_util.tree_map(np.copy, head)
    params_before = jax.tree_util.tree_map(np.copy, params)
    config = FinetuneConfig(learning_rate=3e-3, epochs=4, batch_size=16, seed=0)
    result = finetune(params, batch_stats, head, images, labels, config, features_fn=tiny_features, quiet=True)
    assert len(result.losses) == 4 * 3
    loss_before = full_loss(params, batch_stats, head, images, labels)
    assert full_loss(result.params, batch_stats, head, images, labels) < 0.8 * loss_before
    assert jax.tree_util.tree_structure(result.params) == jax.tree_util.tree_structure(params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, batch_stats, stats_before)
    jax.tree_util.tree_map(np.testing.assert_array_equal, head, head_before)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_before)  # the input is not donated
    moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), result.params, params)
    assert all(jax.tree_util.tree_leaves(moved))  # every conv kernel and BN scale/bias trains


def test_batchnorm_stays_in_inference_mode_after_finetuning(setup):
    params, batch_stats, head, images, labels = setup
    config = FinetuneConfig(1e-3, epochs=1, batch_size=16)
    result = finetune(params, batch_stats, head, images, labels, config, features_fn=tiny_features, quiet=True)
    alone = eval_features(result.params, batch_stats, images[:1])
    in_batch = eval_features(result.params, batch_stats, images[:16])[:1]
    np.testing.assert_allclose(alone, in_batch, rtol=1e-5, atol=1e-6)  # no batch statistics are used


def test_same_seed_same_params_other_seed_other_params(setup):
    params, batch_stats, head, images, labels = setup
    run = lambda seed: finetune(  # noqa: E731
        params, batch_stats, head, images, labels, FinetuneConfig(1e-3, epochs=1, batch_size=16, seed=seed),
        features_fn=tiny_features, quiet=True,
    ).params  # fmt: skip
    first, again, other = run(0), run(0), run(1)
    jax.tree_util.tree_map(np.testing.assert_array_equal, first, again)
    assert not np.array_equal(first["head"]["conv"]["kernel"], other["head"]["conv"]["kernel"])


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    config = FinetuneConfig(learning_rate=1e-4, warmup_fraction=0.1)
    schedule = learning_rate_schedule(config, total_steps=100)
    for step in (0, 5, 10):
        assert float(schedule(step)) == pytest.approx(1e-4 * step / 10, rel=1e-6, abs=1e-12)
    for step in (10, 40, 77, 100):
        expected = 1e-4 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 90))
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_bad_inputs_are_named(setup):
    params, batch_stats, head, images, labels = setup
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        finetune(params, batch_stats, head, images, labels + 1, features_fn=tiny_features, quiet=True)
    with pytest.raises(ValueError, match="48 images but 47 labels"):
        finetune(params, batch_stats, head, images, labels[:-1], features_fn=tiny_features, quiet=True)
    with pytest.raises(ValueError, match="warmup_fraction"):
        FinetuneConfig(warmup_fraction=1.5)
