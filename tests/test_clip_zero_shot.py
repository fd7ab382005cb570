"""Zero-shot heads: tokenizer, head math vs torch and vs numpy, packaged tasks, cache, classifier."""
import os

import jax
import numpy as np
import pytest

from adamerging_jax.heads import zero_shot as zs
from adamerging_jax.models import clip
from adamerging_jax.models.clip_checkpoint import load_hf_clip

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "clip", "ti8")
SENTENCES = ["a photo of the cat.", "the red dog and the car!", "x", "phot photo photos of things, 123"]


@pytest.fixture(scope="module")
def model():
    config, params = load_hf_clip(FIXTURE)
    return config, params, zs.load_tokenizer(FIXTURE), dict(np.load(os.path.join(FIXTURE, "expected.npz")))


def test_tokenizer_matches_the_fixture_ids(model):
    """Same ids as transformers gave the torch model: vocabulary and merges were both taken (no empty vocab)."""
    config, _, tokenizer, expected = model
    np.testing.assert_array_equal(zs.tokenize(tokenizer, SENTENCES, config.text.context_length),
                                  expected["input_ids"])


def test_tokenizer_json_layout(tmp_path, model):
    """The transformers-5 layout (tokenizer.json + tokenizer_config.json, no vocab.json / merges.txt) as its
    save_pretrained writes it loads to the same ids."""
    config, _, tokenizer, expected = model
    tokenizer.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]
    reloaded = zs.load_tokenizer(str(tmp_path))
    np.testing.assert_array_equal(zs.tokenize(reloaded, SENTENCES, config.text.context_length), expected["input_ids"])


def test_default_templates_build_a_head(model):
    """DEFAULT_TEMPLATES: CLIP's default prompt first, all with the class placeholder, usable as a head."""
    config, params, tokenizer, _ = model
    assert zs.DEFAULT_TEMPLATES[0] == "a photo of a {c}." and len(set(zs.DEFAULT_TEMPLATES)) == 8
    assert zs.prompts("cat", zs.DEFAULT_TEMPLATES)[:2] == ["a photo of a cat.", "itap of a cat."]
    head = zs.clip_zero_shot_head(params, config, tokenizer, ["cat", "dog"], zs.DEFAULT_TEMPLATES)
    assert head.shape == (2, config.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(head, axis=1), np.exp(float(params["logit_scale"])), rtol=1e-5)


def test_long_prompts_are_truncated_keeping_the_end_token(model):
    config, _, tokenizer, _ = model
    ids = zs.tokenize(tokenizer, ["a very long sentence " * 10], config.text.context_length)
    assert ids.shape == (1, config.text.context_length)
    assert ids[0, -1] == tokenizer.eos_token_id and (ids[0, :-1] != tokenizer.eos_token_id).all()


def test_head_matches_torch(model):
    config, params, tokenizer, expected = model
    head = zs.clip_zero_shot_head(params, config, tokenizer, list(expected["head_classnames"]),
                                  list(expected["head_templates"]))
    np.testing.assert_allclose(head, expected["zero_shot_head"], rtol=0, atol=1e-5)


def test_head_matches_numpy_formula(model):
    """w_c = exp(s) · m_c / ‖m_c‖ with m_c the mean over templates of e / ‖e‖, written out in numpy."""
    config, params, tokenizer, _ = model
    classnames, templates = ["cat", "the dog", "x"], ["a {c}.", "{c} and {c}", "photo of {c}"]
    head = zs.clip_zero_shot_head(params, config, tokenizer, classnames, templates)
    rows = []
    for name in classnames:
        texts = [t.replace("{c}", name) for t in templates]
        ids = zs.tokenize(tokenizer, texts, config.text.context_length)
        e = np.asarray(clip.encode_text(params, ids, config), np.float64)
        m = (e / np.linalg.norm(e, axis=1, keepdims=True)).mean(axis=0)
        rows.append(m / np.linalg.norm(m))
    np.testing.assert_allclose(head, np.exp(float(params["logit_scale"])) * np.stack(rows), rtol=1e-5, atol=1e-6)


def test_packaged_tasks():
    counts = {"sun397": 397, "stanford-cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43,
              "mnist": 10, "dtd": 47}
    assert sorted(zs.task_names()) == sorted(counts)
    for task, count in counts.items():
        classnames, templates = zs.task_prompts(task)
        assert len(classnames) == len(set(classnames)) == count, task
        assert all("{c}" in t for t in templates), task
    assert zs.task_prompts("mnist")[1] == ['a photo of the number: "{c}".']
    assert zs.prompts("forest", zs.task_prompts("eurosat")[1])[0] == "a centered satellite photo of forest."


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="imagenet-zz"):
        zs.task_prompts("imagenet-zz")
    with pytest.raises(ValueError, match="a photo of a thing"):
        zs.prompts("cat", ["a photo of a thing"])
    with pytest.raises(FileNotFoundError, match=r"vocab\.json \+ merges\.txt nor tokenizer\.json"):
        zs.load_tokenizer(str(tmp_path))


def test_cached_head_builds_once_and_rebuilds_on_new_prompts(tmp_path):
    calls = []

    def build(rows):
        calls.append(rows)
        return np.full((rows, 4), float(len(calls)), np.float32)

    path = str(tmp_path / "heads" / "task.npz")
    first = zs.cached_head(path, ["a", "b"], ["{c}"], "m", lambda: build(2))
    again = zs.cached_head(path, ["a", "b"], ["{c}"], "m", lambda: build(2))
    np.testing.assert_array_equal(first, again)
    assert len(calls) == 1
    changed = zs.cached_head(path, ["a", "b", "c"], ["{c}"], "m", lambda: build(3))
    assert changed.shape == (3, 4) and len(calls) == 2
    assert os.listdir(tmp_path / "heads") == ["task.npz"]


def test_classifier_normalises_features(model):
    config, params, _, expected = model
    heads = [np.random.default_rng(k).standard_normal((5, config.embed_dim)).astype(np.float32) for k in range(2)]
    apply_fn = zs.classifier(clip.image_encoder(config, params["visual_projection"]["kernel"]), heads)
    x = expected["pixel_values_nchw"].transpose(0, 2, 3, 1)
    f = expected["image_embeds"].astype(np.float64)
    for task in range(2):
        want = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ heads[task].T
        np.testing.assert_allclose(jax.jit(apply_fn, static_argnums=2)(params["vision"], x, task), want,
                                   rtol=0, atol=1e-5)


def test_zero_shot_model_splits_at_the_normalised_image_embedding(model):
    """features_fn = f / ‖f‖ of torch's image embedding f, head_fn(z, t) = z H_tᵀ, and apply_fn their
    composition; the paper's binding is the merge command's (`clip_binding`: one builder)."""
    from adamerging_jax.paper.models import ClipModels

    config, params, _, expected = model
    heads = [np.random.default_rng(k).standard_normal((5, config.embed_dim)).astype(np.float32) for k in range(2)]
    projection = params["visual_projection"]["kernel"]
    x = expected["pixel_values_nchw"].transpose(0, 2, 3, 1)
    f = expected["image_embeds"].astype(np.float64)
    z = f / np.linalg.norm(f, axis=1, keepdims=True)
    built = zs.zero_shot_model(clip.image_encoder(config, projection), heads)
    paper = ClipModels(config, params["vision"], [], np.asarray(projection), heads).binding()
    for split in (built, paper):
        np.testing.assert_allclose(split.features_fn(params["vision"], x), z, rtol=0, atol=1e-5)
        for task in range(2):
            np.testing.assert_allclose(split.head_fn(z, task), z @ heads[task].T, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(split.apply_fn(params["vision"], x, task), z @ heads[task].T,
                                       rtol=0, atol=1e-5)
