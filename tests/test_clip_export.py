"""Whole-model export: a merged tower written as CLIPVisionModelWithProjection / CLIPModel folders that
transformers loads with no missing or unexpected keys, reproducing our embeddings; atomic folder writes."""
import json
import os

import jax
import numpy as np
import pytest
import skimage.data

from adamerging_jax.data.clip_preprocess import preprocess
from adamerging_jax.heads import zero_shot
from adamerging_jax.models import clip
from adamerging_jax.models import clip_checkpoint as ck
from hf_loading import load_checked

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "clip", "ti8")
SENTENCES = ["a photo of the cat.", "the red dog and the car!", "x"]


@pytest.fixture(scope="module")
def reference():
    config, params = ck.load_hf_clip(FIXTURE)
    merged = jax.tree_util.tree_map(lambda a: np.asarray(a) * 1.01, params["vision"])  # not the fixture's tower
    return config, params, merged, dict(np.load(os.path.join(FIXTURE, "expected.npz")))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, reference):
    config, params, merged, _ = reference
    root = tmp_path_factory.mktemp("export")
    for kind in ck.EXPORT_KINDS:
        ck.save_hf_clip(str(root / kind), merged, params, config, kind=kind, tokenizer_dir=FIXTURE)
    return root


def images_nhwc(expected):
    return expected["pixel_values_nchw"].transpose(0, 2, 3, 1)


@pytest.mark.parametrize("kind", ck.EXPORT_KINDS)
def test_folder_contents(exported, kind):
    assert sorted(os.listdir(exported / kind)) == ["config.json", "merges.txt", "model.safetensors",
                                                   "preprocessor_config.json", "vocab.json"]
    assert [p for p in os.listdir(exported) if p.startswith(".")] == []


def test_round_trip_through_our_loader(exported, reference):
    """The CLIPModel folder reads back to the merged tower and the pretrained rest, bit for bit."""
    config, params, merged, _ = reference
    loaded_config, loaded = ck.load_hf_clip(str(exported / "clip"))
    assert loaded_config == config
    want = dict(params, vision=merged)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, b)
    _, with_projection = ck.load_hf_clip(str(exported / "vision_with_projection"))
    assert set(with_projection) == {"vision", "visual_projection"}
    np.testing.assert_array_equal(with_projection["visual_projection"]["kernel"], params["visual_projection"]["kernel"])


def torch_features(output):
    """transformers 5 returns an output object whose pooler_output holds the projected features."""
    return getattr(output, "pooler_output", output).numpy()


def test_vision_with_projection_loads_in_transformers(exported, reference):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, params, merged, expected = reference
    model = load_checked(transformers.CLIPVisionModelWithProjection, exported / "vision_with_projection")
    with torch.no_grad():
        theirs = model(pixel_values=torch.from_numpy(expected["pixel_values_nchw"])).image_embeds.numpy()
    ours = clip.image_encoder(config, params["visual_projection"]["kernel"])(merged, images_nhwc(expected))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_clip_model_loads_in_transformers(exported, reference):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, params, merged, expected = reference
    model = load_checked(transformers.CLIPModel, exported / "clip")
    with torch.no_grad():
        image = torch_features(model.get_image_features(pixel_values=torch.from_numpy(expected["pixel_values_nchw"])))
        text = torch_features(model.get_text_features(input_ids=torch.from_numpy(expected["input_ids"]).long()))
    full = dict(params, vision=merged)
    np.testing.assert_allclose(clip.encode_image(full, images_nhwc(expected), config), image, rtol=0, atol=1e-5)
    np.testing.assert_allclose(clip.encode_text(full, expected["input_ids"], config), text, rtol=0, atol=1e-5)
    np.testing.assert_allclose(text, expected["text_embeds"], rtol=0, atol=1e-5)  # the pretrained text tower


@pytest.mark.parametrize("kind", ck.EXPORT_KINDS)
def test_processor_and_tokenizer_load(exported, reference, kind):
    """AutoImageProcessor reads the preprocessor config and preprocesses as our CLIP pipeline does; the
    copied tokenizer gives the fixture's ids."""
    transformers = pytest.importorskip("transformers")
    config, _, _, expected = reference
    processor = transformers.AutoImageProcessor.from_pretrained(str(exported / kind))
    photo = skimage.data.astronaut()[::4, ::3]  # 128 × 171: not square, so the crop matters
    theirs = processor(images=photo, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(theirs, preprocess(photo, config.vision.image_size), rtol=0, atol=1e-5)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(exported / kind), local_files_only=True)
    np.testing.assert_array_equal(zero_shot.tokenize(tokenizer, SENTENCES, config.text.context_length),
                                  expected["input_ids"][: len(SENTENCES)])


def test_without_processor_or_tokenizer(tmp_path, reference):
    config, params, merged, _ = reference
    ck.save_hf_clip(str(tmp_path / "m"), merged, params, config, processor=False)
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    with open(tmp_path / "m" / "config.json") as f:
        assert json.load(f)["architectures"] == ["CLIPVisionModelWithProjection"]


def test_failed_write_leaves_no_folder(tmp_path, reference, monkeypatch):
    import safetensors.numpy

    config, params, merged, _ = reference

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        ck.save_hf_clip(str(tmp_path / "m"), merged, params, config)
    assert os.listdir(tmp_path) == []


def test_replaces_an_earlier_export_but_not_foreign_files(tmp_path, reference):
    config, params, merged, _ = reference
    target = tmp_path / "m"
    ck.save_hf_clip(str(target), merged, params, config, kind="clip", tokenizer_dir=FIXTURE)
    ck.save_hf_clip(str(target), params["vision"], params, config, processor=False)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    _, loaded = ck.load_hf_clip(str(target))
    np.testing.assert_array_equal(loaded["vision"]["pos_embedding"], params["vision"]["pos_embedding"])
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        ck.save_hf_clip(str(target), merged, params, config)
    assert (target / "notes.txt").read_text() == "mine"


def test_bad_requests_are_named(tmp_path, reference):
    config, params, merged, _ = reference
    with pytest.raises(ValueError, match="'vision_only'"):
        ck.save_hf_clip(str(tmp_path / "a"), merged, params, config, kind="vision_only")
    with pytest.raises(KeyError, match="text_projection"):
        ck.save_hf_clip(str(tmp_path / "b"), merged, {k: v for k, v in params.items() if k != "text_projection"},
                        config, kind="clip")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ck.save_hf_clip(str(tmp_path / "c"), merged, params, config, tokenizer_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []
