"""The Flax Llama / Qwen2 decoder against transformers' torch logits (committed fixtures), RoPE against an
independent formula, padding, remat, bf16 and config validation."""
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adamerging_jax.models import llama
from adamerging_jax.models import llama_checkpoint as ck

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "llama")
forward = jax.jit(llama.forward, static_argnums=3, static_argnames="remat")


@functools.cache
def load(name):
    directory = os.path.join(FIXTURES, name)
    config, params = ck.load_hf_causal_lm(directory)
    return name, config, params, dict(np.load(os.path.join(directory, "expected.npz")))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def fixture(request):
    return load(request.param)


def hf_config(name):
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        return json.load(f)


def test_fixture_configs_cover_the_variants():
    llama_config = ck.read_config(os.path.join(FIXTURES, "llama"))
    qwen2_config = ck.read_config(os.path.join(FIXTURES, "qwen2"))
    assert llama_config.rope_scaling is not None and llama_config.rope_theta == 500000.0
    assert llama_config.num_kv_heads < llama_config.num_heads and qwen2_config.num_kv_heads < qwen2_config.num_heads
    assert llama_config.head_dim != llama_config.hidden_size // llama_config.num_heads
    assert (llama_config.qkv_bias, llama_config.o_bias, llama_config.mlp_bias) == (True, True, True)
    assert (qwen2_config.qkv_bias, qwen2_config.o_bias, qwen2_config.mlp_bias) == (True, False, False)
    assert not llama_config.tie_word_embeddings and qwen2_config.tie_word_embeddings


def test_logits_match_transformers(fixture):
    """fp32 logits of a batch with full, left- and right-padded rows against torch's, ≤ 1e-5 where mask = 1."""
    _, config, params, expected = fixture
    mask = expected["attention_mask"]
    assert (mask == 0).any(axis=1).sum() >= 2  # padded rows present
    np.testing.assert_array_equal(np.asarray(llama.position_ids_from_mask(mask)), expected["position_ids"])
    logits = np.asarray(forward(params, expected["input_ids"], mask, config))
    assert logits.shape == expected["logits"].shape
    error = np.abs(logits - expected["logits"])[mask == 1].max()
    assert error <= 1e-5, error


def test_left_padding_gives_the_unpadded_logits(fixture):
    """Row 1 is left-padded by 4: its tokens must get the logits of the same tokens fed alone."""
    _, config, params, expected = fixture
    row, mask = expected["input_ids"][1], expected["attention_mask"][1]
    alone = forward(params, row[mask == 1][None], None, config)[0]
    padded = forward(params, row[None], mask[None], config)[0][mask == 1]
    np.testing.assert_allclose(np.asarray(padded), np.asarray(alone), atol=1e-5)
    assert np.isfinite(np.asarray(forward(params, row[None], mask[None], config))).all()


def test_remat_same_logits_and_gradients():
    _, config, params, expected = load("llama")
    ids, mask = expected["input_ids"], expected["attention_mask"]

    def loss(p, remat):
        logits = forward(p, ids, mask, config, remat=remat)
        return jnp.sum(jax.nn.logsumexp(logits, axis=-1) * mask)

    np.testing.assert_array_equal(np.asarray(forward(params, ids, mask, config, remat=True)),
                                  np.asarray(forward(params, ids, mask, config)))
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    plain, remat = grad(params, False), grad(params, True)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()  # the same up to float32 reassociation


def test_bf16_params_give_bf16_compute_close_to_fp32(fixture):
    _, config, params, expected = fixture
    ids, mask = expected["input_ids"], expected["attention_mask"]
    bf16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    logits = forward(bf16, ids, mask, config)
    assert logits.dtype == jnp.bfloat16
    error = np.abs(np.asarray(logits, np.float32) - expected["logits"])[mask == 1]
    scale = np.abs(expected["logits"]).max()
    assert error.max() < 0.1 * scale and np.isfinite(error).all()


def test_rope_frequencies_llama3_formula():
    """Llama 3.1 scaling against its reference formula, written out per frequency; all three regimes occur."""
    config = ck.read_config(os.path.join(FIXTURES, "llama"))
    s = config.rope_scaling
    ours = llama.rope_frequencies(config)
    regimes = set()
    for i, got in enumerate(ours):
        freq = 1 / 500000.0 ** (2 * i / config.head_dim)
        wavelength = 2 * math.pi / freq
        if wavelength < s.original_max_position_embeddings / s.high_freq_factor:
            want, regime = freq, "high"
        elif wavelength > s.original_max_position_embeddings / s.low_freq_factor:
            want, regime = freq / s.factor, "low"
        else:
            smooth = (s.original_max_position_embeddings / wavelength - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            want, regime = (1 - smooth) * freq / s.factor + smooth * freq, "medium"
        regimes.add(regime)
        assert got == pytest.approx(want, rel=1e-6)
    assert regimes == {"high", "medium", "low"}


def test_rope_rotation_is_relative():
    """q·k after RoPE depends on positions only through their difference (the property RoPE exists for)."""
    config = llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                               num_kv_heads=1, head_dim=8)
    q, k = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    freqs = llama.rope_frequencies(config)

    def rotated(x, p):
        angles = np.concatenate([p * freqs, p * freqs])
        return np.asarray(llama._rotate(jnp.asarray(x), jnp.cos(angles), jnp.sin(angles)))

    assert rotated(q, 7) @ rotated(k, 3) == pytest.approx(rotated(q, 4) @ rotated(k, 0), rel=1e-5)


def test_init_params_shapes_and_stacked():
    config = llama.LlamaConfig.from_hf(hf_config("qwen2"))
    params = llama.init_params(config, jax.random.key(0), dtype=jnp.bfloat16)
    assert "lm_head" not in params  # tied
    assert params["layers"]["attn"]["q"]["kernel"].shape == (2, 32, 32)
    assert params["layers"]["attn"]["k"]["kernel"].shape == (2, 32, 8)
    assert "bias" not in params["layers"]["attn"]["o"]
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(params))
    assert llama.stacked("layers/attn/q/kernel") and not llama.stacked("embed")
    assert not llama.stacked("norm/scale") and not llama.stacked("lm_head/kernel")


def test_hf_config_round_trip():
    for name in ["llama", "qwen2"]:
        config = llama.LlamaConfig.from_hf(hf_config(name))
        assert llama.LlamaConfig.from_hf(config.to_hf()) == config


def test_legacy_rope_fields_read():
    """Hub files (transformers 4.x) say rope_theta + rope_scaling with "type" or "rope_type"."""
    hf = hf_config("llama")
    rope = hf.pop("rope_parameters")
    theta = rope.pop("rope_theta")
    legacy = dict(hf, rope_theta=theta, rope_scaling=dict(rope))
    assert llama.LlamaConfig.from_hf(legacy) == llama.LlamaConfig.from_hf(hf_config("llama"))
    no_scaling = dict(hf, rope_theta=1234.0)
    assert llama.LlamaConfig.from_hf(no_scaling).rope_scaling is None
    assert llama.LlamaConfig.from_hf(no_scaling).rope_theta == 1234.0


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_parameters"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"vocab_size": 0}, "vocab_size"),
])
def test_bad_config_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        llama.LlamaConfig.from_hf(dict(hf_config("llama"), **change))


def test_missing_config_field_named():
    hf = hf_config("qwen2")
    del hf["intermediate_size"]
    with pytest.raises(ValueError, match="intermediate_size"):
        llama.LlamaConfig.from_hf(hf)
