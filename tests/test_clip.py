"""CLIP in Flax against transformers' torch CLIP (committed fixtures made by scripts/make_clip_fixtures.py)."""
import os

import jax
import numpy as np
import pytest

from adamerging_jax.models import clip
from adamerging_jax.models.clip_checkpoint import coefficient_tensor_names, load_hf_clip

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "clip", "ti8")
TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint():
    config, params = load_hf_clip(FIXTURE)
    return config, params, dict(np.load(os.path.join(FIXTURE, "expected.npz")))


def images_nhwc(expected):
    return expected["pixel_values_nchw"].transpose(0, 2, 3, 1)


def test_fixture_config_is_the_tiny_variant(checkpoint):
    config, _, _ = checkpoint
    assert config == clip.get_config("Ti/8")


def test_vision_tower_matches_torch(checkpoint):
    config, params, expected = checkpoint
    last, pooled = clip.vision_forward(params["vision"], images_nhwc(expected), config)
    np.testing.assert_allclose(last, expected["vision_last_hidden_state"], rtol=0, atol=TOL)
    np.testing.assert_allclose(pooled, expected["vision_pooled"], rtol=0, atol=TOL)


def test_visual_projection_matches_torch(checkpoint):
    config, params, expected = checkpoint
    np.testing.assert_allclose(clip.encode_image(params, images_nhwc(expected), config), expected["image_embeds"],
                               rtol=0, atol=TOL)
    apply_fn = clip.image_encoder(config, params["visual_projection"]["kernel"])
    np.testing.assert_allclose(apply_fn(params["vision"], images_nhwc(expected)), expected["image_embeds"],
                               rtol=0, atol=TOL)


def test_text_tower_matches_torch(checkpoint):
    config, params, expected = checkpoint
    last, pooled = clip.text_forward(params["text"], expected["input_ids"], config)
    np.testing.assert_allclose(last, expected["text_last_hidden_state"], rtol=0, atol=TOL)
    np.testing.assert_allclose(pooled, expected["text_pooled"], rtol=0, atol=TOL)
    np.testing.assert_allclose(clip.encode_text(params, expected["input_ids"], config), expected["text_embeds"],
                               rtol=0, atol=TOL)


def test_logits_match_torch(checkpoint):
    config, params, expected = checkpoint
    logits = jax.jit(clip.logits_per_image, static_argnums=3)(params, images_nhwc(expected),
                                                               expected["input_ids"], config)
    np.testing.assert_allclose(logits, expected["logits_per_image"], rtol=0, atol=TOL)


@pytest.mark.parametrize("variant, layers, hf_tensors", [("B/32", 12, 199), ("B/16", 12, 199), ("L/14", 24, 391)])
def test_variant_tensor_counts(variant, layers, hf_tensors):
    """One λ per tensor per layer: stacked leaves count L times, giving HF CLIPVisionModel's tensor count."""
    shapes = jax.eval_shape(lambda: clip.init_params(variant, jax.random.key(0)))
    flat = jax.tree_util.tree_flatten_with_path(shapes["vision"])[0]
    paths = {"/".join(k.key for k in path): leaf.shape for path, leaf in flat}
    for path, shape in paths.items():
        assert clip.stacked(path) == (shape[0] == layers and path.startswith("layers/")), path
    assert sum(shape[0] if clip.stacked(path) else 1 for path, shape in paths.items()) == hf_tensors
    names = coefficient_tensor_names(clip.get_config(variant))
    assert len(names) == len(set(names.values())) == len(names.order) == hf_tensors
    assert set(names.order) == set(names.values())


def test_stacked_paths():
    assert clip.stacked("vision/layers/attn/q/kernel")
    assert clip.stacked("layers/mlp/fc1/bias")
    assert not clip.stacked("vision/pos_embedding")
    assert not clip.stacked("visual_projection/kernel")


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="H/99"):
        clip.get_config("H/99")


def test_merge_at_one_zero_gives_first_tower():
    """θ0 + 1·(θ_A − θ0) + 0·(θ_B − θ0) through the core's merge reproduces tower A's logits."""
    from adamerging_jax import init_coefficients, merge, task_vectors

    config = clip.get_config("Ti/4")
    shapes = jax.eval_shape(lambda: clip.init_params(config, jax.random.key(0))["vision"])
    rng = np.random.default_rng(0)
    theta0, tower_a, tower_b = (jax.tree_util.tree_map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32),
                                                       shapes) for _ in range(3))
    tv = task_vectors(theta0, [tower_a, tower_b])
    lam = init_coefficients(theta0, 2, granularity="layer", value=np.array([1.0, 0.0]), stacked=clip.stacked)
    merged = merge(theta0, tv, lam)
    images = jax.random.normal(jax.random.key(9), (3, 16, 16, 3))
    encode = jax.jit(clip.image_encoder(config))
    np.testing.assert_allclose(encode(merged, images), encode(tower_a, images), rtol=0, atol=1e-5)
    assert not np.allclose(encode(tower_b, images), encode(tower_a, images), atol=1e-3)
