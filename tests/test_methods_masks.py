"""TALL masks, Consensus merging and EMR-Merging against FusionBench 0.2.33 (tests/fixtures/methods/, made by
scripts/make_method_fixtures.py) in float64 on the tiny CLIP image tower; their parameters refused when bad; the
EMR export of ``adamerging-jax merge`` rebuilt task by task from its folder."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adamerging_jax as am
import method_fixtures as fixtures
from adamerging_jax.core import emr, tall_masks
from adamerging_jax.core.registry import method_spec
from adamerging_jax.core.trees import leaf_paths
from adamerging_jax.merging.config import ConfigError, load_config
from adamerging_jax.merging.emr_files import EMR_FILE, load_emr_task
from adamerging_jax.models import clip
from adamerging_jax.models.clip_checkpoint import load_hf_clip
from test_merge_command import CLASSES, FIXTURE, merge, world, write_config  # noqa: F401 (world: a fixture)

BOUND = 1e-10


@pytest.fixture
def models(x64):
    return fixtures.models()


def as_float(tree):
    return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, np.float64), tree)


def task_mask_difference(stacked_masks, task, reference):
    """max |ours − reference| of task t's mask (0 when they are the same)."""
    return fixtures.max_difference(as_float(jax.tree_util.tree_map(lambda m: m[task], stacked_masks)), reference)


def test_tall_masks_per_task_models_match_fusionbench(models):
    pretrained, task_vectors, k = models
    merged = method_spec("tall_masks").build(pretrained, task_vectors)
    masks = tall_masks.tall_masks(task_vectors, 0.6)
    differences = [fixtures.max_difference(merged.for_task(t), fixtures.merged("tall_masks", f"task{t}"))
                   for t in range(k)]
    print(f"tall_masks: max |ours − FusionBench| per task {differences}")
    assert max(differences) <= BOUND
    for t in range(k):
        assert task_mask_difference(masks, t, fixtures.merged("tall_masks", f"mask/task{t}")) == 0
    assert merged.for_task(k) is None


def test_consensus_matches_fusionbench(models):
    pretrained, task_vectors, _ = models
    merged = method_spec("consensus").build(pretrained, task_vectors)
    difference = fixtures.max_difference(merged.params, fixtures.merged("consensus"))
    print(f"consensus: max |ours − FusionBench| {difference}")
    assert difference <= BOUND
    kept = tall_masks.consensus_mask(task_vectors, 2, 0.6)
    assert fixtures.max_difference(as_float(kept), fixtures.merged("consensus", "consensus")) == 0


def test_emr_matches_fusionbench(models):
    pretrained, task_vectors, k = models
    merged = method_spec("emr").build(pretrained, task_vectors, view=fixtures.VIEW)
    reference = fixtures.read("emr")
    differences = [fixtures.max_difference(merged.for_task(t), fixtures.merged("emr", f"task{t}")) for t in range(k)]
    parts = merged.per_task.parts
    rescalers = np.max(np.abs(np.asarray(parts.rescalers) - reference["rescalers"]))
    print(f"emr: max |ours − FusionBench| per task {differences}, rescalers {rescalers}")
    assert max(differences) <= BOUND and rescalers <= BOUND
    assert fixtures.max_difference(parts.unified, fixtures.merged("emr", "unified")) <= BOUND
    for t in range(k):
        assert task_mask_difference(parts.masks, t, fixtures.merged("emr", f"mask/task{t}")) == 0
    assert merged.for_task(k) is None
    # the rescalers' per-tensor means count each layer of a stacked leaf as a tensor, as the view declares
    stacked = emr.layers_from_view(fixtures.VIEW, pretrained)
    assert all(stacked(path) == clip.stacked(path) for path in leaf_paths(pretrained))
    per_leaf = emr.emr_parts(task_vectors, stacked=None).rescalers
    assert np.max(np.abs(np.asarray(per_leaf) - reference["rescalers"])) > 1e-3


def test_emr_task_whose_mask_keeps_nothing_is_the_pretrained_model():
    pretrained = {"w": np.array([1.0, 2.0, 3.0], np.float32)}
    tau = {"w": np.array([[0.2, -0.4, 0.6], [-0.1, 0.2, -0.3]], np.float32)}  # task 1 opposes every elected sign
    models = emr.emr_merging(pretrained, tau)
    np.testing.assert_array_equal(models(1)["w"], pretrained["w"])
    np.testing.assert_allclose(models(0)["w"], pretrained["w"] + tau["w"][0], rtol=1e-6)


def test_bfloat16_models_keep_their_dtype():
    rng = np.random.default_rng(0)
    pretrained = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.bfloat16)}
    tau = {"w": jnp.asarray(0.1 * rng.normal(size=(2, 3, 4)), jnp.bfloat16)}
    built = {name: method_spec(name).build(pretrained, tau) for name in ("tall_masks", "consensus", "emr")}
    for name, merged in built.items():
        assert merged.for_task(1)["w"].dtype == jnp.bfloat16, name
    assert built["emr"].per_task.parts.masks["w"].dtype == jnp.bool_


@pytest.mark.parametrize("method, values, parameter", [
    ("tall_masks", {"tall_mask_lambda": -0.1}, "tall_mask_lambda"),
    ("tall_masks", {"tall_mask_lambda": "large"}, "tall_mask_lambda"),
    ("consensus", {"k": -1}, "k"),
    ("consensus", {"k": 1.5}, "k"),
    ("consensus", {"tall_mask_lambda": float("nan")}, "tall_mask_lambda"),
    ("consensus", {"scale": float("inf")}, "scale"),
    ("emr", {"scale": 0.3}, "scale"),
])
def test_bad_parameters_are_refused_naming_method_and_parameter(method, values, parameter):
    with pytest.raises(ValueError, match=f"method '{method}'.*parameter '{parameter}'"):
        method_spec(method, **values)


def test_only_emr_of_the_per_task_methods_is_exported(world):
    with pytest.raises(ConfigError, match="export_method 'tall_masks' has one model per task"):
        load_config(write_config(world, "tall", ["tall_masks"], unlabeled=False, tests=False))
    assert load_config(write_config(world, "emr_config", ["emr"], unlabeled=False, tests=False)).exported == "emr"


@pytest.mark.slow
def test_emr_export_rebuilds_each_task_model_from_the_folder(world):
    out = world / "out_emr"
    merge(write_config(world, "emr", ["emr"], unlabeled=False), "--output", out)
    tasks = list(CLASSES)
    result = json.loads((out / "results.json").read_text())
    assert set(result["methods"]["emr"]["accuracy"]) == set(tasks)
    card = (out / "model" / "README.md").read_text()
    assert "EMR-Merging" in card and "load_emr_task" in card and (out / "model" / EMR_FILE).is_file()

    pretrained = load_hf_clip(FIXTURE)[1]["vision"]
    finetuned = [load_hf_clip(str(world / "finetuned" / task))[1]["vision"] for task in tasks]
    ours = method_spec("emr").build(pretrained, am.task_vectors(pretrained, finetuned), view=clip.matrix_view).per_task
    exported = load_hf_clip(str(out / "model"))[1]["vision"]
    assert max(np.max(np.abs(a - np.asarray(b))) for a, b in
               zip(jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(ours.unified))) <= 1e-6
    for t, task in enumerate(tasks):
        rebuilt = load_emr_task(out / "model", pretrained, task)
        error = max(np.max(np.abs(a - np.asarray(b))) for a, b in
                    zip(jax.tree_util.tree_leaves(rebuilt), jax.tree_util.tree_leaves(ours(t))))
        print(f"emr export: task {task} rebuilt from the folder, max |Δ| {error} (float32)")
        assert error <= 1e-6
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, rebuilt,
                                                             load_emr_task(out / "model", pretrained, t)))
    with pytest.raises(ValueError, match="no task 'boats'"):
        load_emr_task(out / "model", pretrained, "boats")
