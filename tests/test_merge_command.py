"""``adamerging-jax merge`` end to end on the tiny CLIP fixture (Ti/8, 32 px): fine-tuned towers written with
``save_hf_vision_model``, unlabeled folders and class-folder test sets of a few images, a few steps.

The export is checked against transformers (torch) on the same images: the image embeddings of the merged
tower + projection computed by our Flax model; ``--weights`` against the trained run bit for bit.
"""
import json
import os

import jax
import numpy as np
import pytest
import yaml
from PIL import Image

from adamerging_jax import coefficient_formats as formats
from adamerging_jax.cli import main
from adamerging_jax.data.clip_preprocess import preprocess
from adamerging_jax.models import clip
from adamerging_jax.models.clip_checkpoint import coefficient_tensor_names, load_hf_clip, save_hf_vision_model
from hf_loading import load_checked

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "clip", "ti8")
CLASSES = {"cats": ["tabby", "siamese"], "cars": ["sedan", "truck", "van"]}
STEPS = 3


def image(rng, size=(24, 28)):
    ramp = np.linspace(0, 1, size[1])[None, :, None] * rng.uniform(-200, 200, 3) + rng.uniform(0, 255, 3)
    noisy = np.broadcast_to(ramp, (*size, 3)) + rng.normal(0, 30, (*size, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    patch = pytest.MonkeyPatch()
    patch.setenv("ADAMERGING_JAX_CACHE", str(root / "cache"))
    config, params = load_hf_clip(FIXTURE)
    rng = np.random.default_rng(0)
    for task, classes in CLASSES.items():
        tower = jax.tree_util.tree_map(
            lambda a: np.asarray(a) + 0.5 * np.std(a) * rng.standard_normal(np.shape(a)).astype(np.float32),
            params["vision"])
        save_hf_vision_model(str(root / "finetuned" / task), tower, config)
        (root / "unlabeled" / task).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(image(rng)).save(root / "unlabeled" / task / f"{i}.png")
        for name in classes:
            (root / "test" / task / name).mkdir(parents=True)
            Image.fromarray(image(rng)).save(root / "test" / task / name / "0.png")
    yield root
    patch.undo()


def write_config(world, name, methods, unlabeled=True, tests=True, **extra):
    tasks = []
    for task, classes in CLASSES.items():
        entry = {"name": task, "finetuned": str(world / "finetuned" / task), "classes": classes,
                 "templates": ["a photo of a {}."]}
        if unlabeled:
            entry["unlabeled"] = {"folder": str(world / "unlabeled" / task)}
        if tests:
            entry["test"] = str(world / "test" / task)
        tasks.append(entry)
    document = {"pretrained": FIXTURE, "tasks": tasks, "methods": methods, "preset": "official",
                "adamerging": {"steps": STEPS, "batch_size": 2, "batches_per_task": 1, "checkpoint_every": 1},
                "devices": 1, "eval_batch_size": 8, **extra}
    path = world / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def merge(*argv):
    assert main(["merge", *map(str, argv)]) == 0


@pytest.fixture(scope="module")
def layer_wise(world):
    config = write_config(world, "layer", ["layer_wise_adamerging", "task_arithmetic"])
    out = world / "out_layer"
    merge(config, "--output", out)
    return config, out


def test_layer_wise_output_folder(layer_wise):
    _, out = layer_wise
    for name in ["model/config.json", "model/model.safetensors", "model/preprocessor_config.json",
                 "model/vocab.json", "model/merges.txt", "model/README.md", "lambdas.json", "lambdas.safetensors",
                 "results.json", "table.md", "entropy.png", "lambda_layer_wise_adamerging.png"]:
        assert (out / name).is_file(), name
    result = json.loads((out / "results.json").read_text())
    record = result["methods"]["layer_wise_adamerging"]
    assert len(record["entropy"]) == STEPS and set(record["accuracy"]) == set(CLASSES)
    named = formats.read_named_json(out / "lambdas.json")
    order = coefficient_tensor_names(clip.get_config("Ti/8")).order
    assert sorted(named) == sorted(order) and all(len(v) == 2 for v in named.values())
    lam = {path: np.asarray(v) for path, v in record["coefficients"].items()}
    assert named["vision_model.encoder.layers.1.self_attn.q_proj.weight"] == lam["layers/attn/q/kernel"][:, 1].tolist()
    assert formats.read_named_safetensors(out / "lambdas.safetensors") == named
    card = (out / "model" / "README.md").read_text()
    assert "Layer-wise AdaMerging" in card and "| cats |" in card
    assert os.listdir(out / "state" / "layer_wise_adamerging")


def our_features(out, images):
    config, full = load_hf_clip(FIXTURE)
    _, merged = load_hf_clip(str(out / "model"))
    encode = clip.image_encoder(config, full["visual_projection"]["kernel"])
    return np.asarray(encode(merged["vision"], images))


def test_transformers_loads_the_export_with_our_features(layer_wise, world):
    torch = pytest.importorskip("torch")
    from transformers import CLIPVisionModelWithProjection

    _, out = layer_wise
    model = load_checked(CLIPVisionModelWithProjection, out / "model")
    rng = np.random.default_rng(1)
    images = np.stack([preprocess(image(rng), 32) for _ in range(3)])
    with torch.no_grad():
        theirs = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).image_embeds.numpy()
    np.testing.assert_allclose(theirs, our_features(out, images), atol=1e-5)


def test_weights_reproduce_the_trained_merge_bit_for_bit(layer_wise, world):
    config, out = layer_wise
    trained = (out / "model" / "model.safetensors").read_bytes()
    for name, weights in [("json", out / "lambdas.json"), ("st", out / "lambdas.safetensors")]:
        again = world / f"out_weights_{name}"
        merge(config, "--output", again, "--weights", weights)
        assert (again / "model" / "model.safetensors").read_bytes() == trained, name


def test_fusionbench_weights_reproduce_the_trained_merge(layer_wise, world):
    torch = pytest.importorskip("torch")
    from adamerging_jax.core.coefficients import init_coefficients

    config, out = layer_wise
    names = coefficient_tensor_names(clip.get_config("Ti/8"))
    _, params = load_hf_clip(FIXTURE)
    like = init_coefficients(params["vision"], 2, "layer", 0.3, clip.stacked)
    lam = formats.coefficients_from_named(formats.read_named_json(out / "lambdas.json"), like, names)
    path = world / "fusionbench.pt"
    torch.save(torch.from_numpy(formats.to_fusionbench(lam, names.order, names)), path)
    again = world / "out_weights_fb"
    merge(config, "--output", again, "--weights", path)
    trained = (out / "model" / "model.safetensors").read_bytes()
    assert (again / "model" / "model.safetensors").read_bytes() == trained


def test_ties_without_unlabeled_data_exports_a_clip_model(world):
    torch = pytest.importorskip("torch")
    from transformers import CLIPModel

    config = write_config(world, "ties", [{"name": "ties", "density": 0.2}], unlabeled=False, tests=False,
                          export="clip")
    out = world / "out_ties"
    merge(config, "--output", out)
    assert not (out / "lambdas.json").exists() and (out / "table.md").is_file()
    model = load_checked(CLIPModel, out / "model")
    rng = np.random.default_rng(2)
    images = np.stack([preprocess(image(rng), 32) for _ in range(2)])
    with torch.no_grad():
        theirs = model.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    theirs = getattr(theirs, "pooler_output", theirs)
    np.testing.assert_allclose(np.asarray(theirs), our_features(out, images), atol=1e-5)


@pytest.mark.parametrize("change, expected", [
    ("batch_size", "data"),
    ("data", "data"),
    ("task_vectors", "task vectors"),
])
def test_resume_with_other_inputs_is_refused(layer_wise, world, change, expected, capsys):
    config, out = layer_wise
    document = yaml.safe_load(config.read_text())
    if change == "batch_size":
        document["adamerging"]["batch_size"] = 3
    elif change == "data":
        extra = world / "unlabeled_more"
        extra.mkdir(exist_ok=True)
        for i in range(7):
            Image.fromarray(image(np.random.default_rng(i + 10))).save(extra / f"{i}.png")
        document["tasks"][0]["unlabeled"] = {"folder": str(extra)}
    else:
        document["tasks"][0]["finetuned"] = str(world / "finetuned" / "cars")
    changed = world / f"resume_{change}.yaml"
    changed.write_text(yaml.safe_dump(document))
    with pytest.raises(SystemExit) as error:
        main(["merge", str(changed), "--output", str(out)])
    message = str(error.value.code)
    assert message.startswith("error: ") and "\n" not in message and "written by another run" in message
    assert expected in message


def test_matrix_and_gram_methods_run_through_merge(world):
    """TSV-M (the CLIP binding's matrix view), RegMean (its Gram capture) and WUDI run in `merge`; the exported
    TSV-M tower equals the core's `tsv_merging` on the same checkpoints."""
    import adamerging_jax as am

    config = write_config(world, "svd", ["tsv_m", "regmean", "wudi"], tests=False, export_method="tsv_m")
    out = world / "out_svd"
    merge(config, "--output", out)
    assert set(json.loads((out / "results.json").read_text())["methods"]) == {"tsv_m", "regmean", "wudi"}
    card = (out / "model" / "README.md").read_text()
    assert am.get_method("tsv_m").formula in card and "AdaMerging (" not in card, "the card names TSV-M's own formula"
    _, pretrained = load_hf_clip(FIXTURE)
    finetuned = [load_hf_clip(str(world / "finetuned" / task))[1]["vision"] for task in CLASSES]
    expected = am.tsv_merging(pretrained["vision"], am.task_vectors(pretrained["vision"], finetuned), clip.matrix_view)
    _, exported = load_hf_clip(str(out / "model"))
    for ours, theirs in zip(jax.tree_util.tree_leaves(exported["vision"]), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
