"""Representation Surgery against FusionBench 0.2.33 (tests/fixtures/methods/surgery.npz, made by
scripts/make_method_fixtures.py with its ``SurgeryModelWrapper``, ``compute_features``, L1 loss and Adam loop)
on the tiny float64 CLIP image tower over a task-arithmetic base: step 0's losses and gradients and the modules
after 20 steps; then resume, refusals and the registry's per-task models."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from method_fixtures import models, read
from test_merge_command import world  # noqa: F401 (a fixture)
from test_resume import assert_refused_naming

import adamerging_jax as am
from adamerging_jax.core import surgery
from adamerging_jax.core.methods import task_arithmetic
from adamerging_jax.core.protocol import build_models
from adamerging_jax.models import clip

TINY = clip.VisionConfig(image_size=16, patch_size=8, width=24, layers=2, heads=2, mlp_dim=40)
"""The fixture script's ``tiny_clip_vision``."""
BOUND = 1e-10


def mesh() -> jax.sharding.Mesh:
    """4 of the test session's devices: each task's batch of 4 split over them (data parallel)."""
    return am.data_mesh(jax.devices()[:4])


@functools.lru_cache(maxsize=1)
def fixture() -> dict[str, np.ndarray]:
    return read("surgery")


def features_fn(params: dict, images: jax.Array) -> jax.Array:
    """FusionBench's compute_features: pooled @ projectionᵀ, L2-normalised."""
    pooled = clip.vision_forward(params, images, TINY)[1]
    return clip.l2_normalize(pooled @ jnp.asarray(fixture()["projection"], pooled.dtype).T)


def images(distinct: int, task: int) -> np.ndarray:
    return fixture()["images"][distinct, task].transpose(0, 2, 3, 1)  # NCHW → NHWC


def batches(step: int) -> list[np.ndarray]:
    """Step s's batches as the reference saw them (the fixture's distinct batches, cycled)."""
    count = fixture()["images"].shape[0]
    return [images(step % count, t) for t in range(fixture()["images"].shape[1])]


def initial_modules() -> surgery.SurgeryModules:
    return surgery.SurgeryModules(jnp.asarray(fixture()["initial/down"]), jnp.asarray(fixture()["initial/up"]))


def base_model(pretrained: dict, tau: dict) -> dict:
    return task_arithmetic(pretrained, tau, scale=0.3)


def test_step_0_loss_and_gradients_are_fusionbench_s(x64):
    """L_t and ∂L_t/∂(W_down,t, W_up,t) at the initial modules equal the reference's, task by task."""
    pretrained, tau, count = models()
    base = base_model(pretrained, tau)
    step0 = batches(0)
    merged = jnp.stack([features_fn(base, x) for x in step0])
    targets = jnp.stack([features_fn(jax.tree_util.tree_map(lambda p, t: p + t[k], pretrained, tau), x)
                         for k, x in enumerate(step0)])
    losses, grads = surgery.surgery_gradients(initial_modules(), merged, targets)
    arrays = fixture()
    assert np.max(np.abs(np.asarray(losses) - arrays["losses"][0])) <= BOUND
    for part in ("down", "up"):
        reference = np.stack([arrays[f"step0_grad/{part}/{t}"] for t in range(count)])
        assert np.max(np.abs(np.asarray(getattr(grads, part)) - reference)) <= BOUND
    assert np.max(np.abs(arrays["step0_grad/up/0"])) > 1e-3  # a gradient worth comparing


def test_modules_after_20_steps_are_fusionbench_s(x64):
    """The jitted Adam loop on Σ_t L_t gives the reference's per-task Adam steps: every step's losses and the
    final modules within 1e-10."""
    pretrained, tau, _ = models()
    arrays = fixture()
    steps = arrays["losses"].shape[0]
    config = surgery.SurgeryConfig(steps=steps, batch_size=arrays["images"].shape[2], quiet=True)
    result = surgery.train_surgery(features_fn, base_model(pretrained, tau), pretrained, tau, batches, config,
                                   modules=initial_modules(), mesh=mesh())
    assert np.max(np.abs(result.history["loss"] - arrays["losses"])) <= 1e-6  # the history is kept in float32
    for part in ("down", "up"):
        difference = np.max(np.abs(np.asarray(getattr(result.modules, part)) - arrays[f"final/{part}"]))
        assert difference <= BOUND, (part, difference)
    assert np.max(np.abs(arrays["final/down"] - arrays["initial/down"])) > 1e-3  # W_down moved too


def test_initial_modules_follow_torch_s_law():
    """W_down ~ U(−1/√d, 1/√d) (kaiming_uniform_ with a = √5 on fan-in d), W_up = 0."""
    modules = surgery.init_modules(jax.random.PRNGKey(0), 3, 64, 16)
    bound = 1 / np.sqrt(64)
    down = np.asarray(modules.down)
    assert modules.down.shape == (3, 16, 64) and modules.up.shape == (3, 64, 16)
    assert np.all(np.abs(down) <= bound) and np.max(np.abs(down)) > 0.95 * bound
    assert abs(down.std() - bound / np.sqrt(3)) < 0.05 * bound
    assert not np.any(np.asarray(modules.up))


def nonnegative_features_fn(params: dict, images: jax.Array) -> jax.Array:
    """A representation with no negative entry (as features after a ReLU are): |z| of `features_fn`."""
    return jnp.abs(features_fn(params, images))


def numpy_active_units(modules: surgery.SurgeryModules, base: dict, representation, size: int) -> np.ndarray:
    """Per task, the hidden units with W_down,t z > 0 for some z of step 0's batch, written out in numpy."""
    down = np.asarray(modules.down, np.float64)
    counts = []
    for t, x in enumerate(batches(0)):
        z = np.asarray(representation(base, x[:size]), np.float64)
        counts.append(int(np.sum(np.any(z @ down[t].T > 0, axis=0))))
    return np.asarray(counts)


def test_modules_turned_off_by_adam_are_reported_naming_the_tasks():
    """On a representation with no negative entry, Adam at a large rate drives W_down,t z below 0 for every unit
    of most tasks: the run warns naming exactly those tasks, whose modules are then the identity; `active_units`
    is the count written out in numpy, and a run on the signed representation at the reference's rate keeps its
    units and says nothing."""
    pretrained, tau, base = float32_models()
    config = surgery.SurgeryConfig(steps=40, lr=0.2, batch_size=4, quiet=True)
    with pytest.warns(UserWarning, match="surgery_lr 0.2") as caught:
        result = surgery.train_surgery(nonnegative_features_fn, base, pretrained, tau, batches, config, mesh=mesh())
    np.testing.assert_array_equal(result.active_units, numpy_active_units(result.modules, base,
                                                                          nonnegative_features_fn, 4))
    idle = [int(t) for t in np.flatnonzero(result.active_units == 0)]
    assert len(idle) >= 2 and f"tasks {idle} have none" in str(caught[0].message)
    x = images(0, idle[0])
    z = nonnegative_features_fn(base, x)
    np.testing.assert_array_equal(surgery.surgery_features(result.modules.task(idle[0]), z), z)

    signed = dataclasses.replace(config, lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = surgery.train_surgery(features_fn, base, pretrained, tau, batches, signed, mesh=mesh())
    np.testing.assert_array_equal(kept.active_units, numpy_active_units(kept.modules, base, features_fn, 4))
    assert np.all(kept.active_units > 0)


RESUMED = surgery.SurgeryConfig(steps=8, batch_size=4, checkpoint_every=2, quiet=True, seed=3)


def float32_models() -> tuple[dict, dict, dict]:
    """(θ0, τ, the task-arithmetic base) in float32."""
    pretrained, tau, _ = models()
    pretrained, tau = (jax.tree_util.tree_map(lambda x: x.astype(np.float32), t) for t in (pretrained, tau))
    return pretrained, tau, base_model(pretrained, tau)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> str:
    """The checkpoint folder of `RESUMED` stopped after 4 of its 8 steps."""
    folder = str(tmp_path_factory.mktemp("surgery") / "state")
    pretrained, tau, base = float32_models()
    surgery.train_surgery(features_fn, base, pretrained, tau, batches,
                          dataclasses.replace(RESUMED, steps=4, checkpoint_dir=folder), mesh=mesh())
    return folder


def test_resume_is_bit_identical(stopped, tmp_path):
    """Stopped at step 4 and resumed to 8, the modules and losses equal an uninterrupted run's bit for bit."""
    pretrained, tau, base = float32_models()
    whole = surgery.train_surgery(features_fn, base, pretrained, tau, batches, RESUMED, mesh=mesh())
    folder = tmp_path / "state"
    shutil.copytree(stopped, folder)
    resumed = surgery.train_surgery(features_fn, base, pretrained, tau, batches,
                                    dataclasses.replace(RESUMED, checkpoint_dir=str(folder)), mesh=mesh())
    for part in ("down", "up"):
        assert np.array_equal(np.asarray(getattr(whole.modules, part)), np.asarray(getattr(resumed.modules, part)))
    np.testing.assert_array_equal(whole.history["loss"], resumed.history["loss"])


def _scaled(tree: dict) -> dict:
    return jax.tree_util.tree_map(lambda x: x * 1.01, tree)


CHANGES = {  # (config changes, (θ0, τ, base) -> the run's, batches, what the refusal names)
    "lr": (dict(lr=1e-2), lambda p, t, b: (p, t, b), batches, ["lr 0.001 → 0.01"]),
    "hidden_dim": (dict(hidden_dim=8), lambda p, t, b: (p, t, b), batches,
                   ["hidden_dim 16 → 8", "the coefficient layout differs"]),
    "seed": (dict(seed=4), lambda p, t, b: (p, t, b), batches, ["seed 3 → 4"]),
    "batch_size": (dict(batch_size=2), lambda p, t, b: (p, t, b), batches, ["batch_size 4 → 2"]),
    "base_model": ({}, lambda p, t, b: (p, t, _scaled(b)), batches, ["base_model '"]),
    "pretrained": ({}, lambda p, t, b: (_scaled(p), t, b), batches, ["the pretrained parameters θ0 differ"]),
    "task_vectors": ({}, lambda p, t, b: (p, _scaled(t), b), batches, ["the task vectors differ"]),
    "data": ({}, lambda p, t, b: (p, t, b), lambda step: batches(step + 1), ["the data differ"]),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_checkpoint_of_another_run_is_refused_naming_the_difference(stopped, change):
    """As AdaMerging's resume: a checkpoint written with other settings, another base model, θ0, τ or data is
    refused in one line naming exactly what differs."""
    overrides, inputs, source, fragments = CHANGES[change]
    pretrained, tau, base = inputs(*float32_models())
    with pytest.raises(ValueError, match="checkpoint step 4 in .* was written by another run: ") as error:
        surgery.train_surgery(features_fn, base, pretrained, tau, source,
                              dataclasses.replace(RESUMED, checkpoint_dir=stopped, **overrides), mesh=mesh())
    assert_refused_naming(str(error.value), stopped, fragments)


def head_fn(z: jax.Array, task: int) -> jax.Array:
    """A fixed random linear head per task on the 12-d representation (3 classes)."""
    weights = jax.random.normal(jax.random.PRNGKey(task), (z.shape[-1], 3), z.dtype)
    return z @ weights


SETTINGS = am.MergeSettings(({"name": "surgery", "base": "task_arithmetic", "surgery_steps": 3,
                              "surgery_batch_size": 4},), am.AdaMergingConfig(quiet=True))


def test_registry_surgery_scores_the_base_model_with_each_task_s_module():
    """``{name: surgery, base: task_arithmetic}`` through the protocol: task t's logits are head_t(Surgery_t(z))
    on the base model's z."""
    pretrained, tau, base = float32_models()
    count = fixture()["images"].shape[1]
    models_built, records = build_models(SETTINGS, pretrained, tau, apply_fn=am.SharedBackbone(features_fn, head_fn),
                                         adaptation=batches, features_fn=features_fn, head_fn=head_fn, mesh=mesh(),
                                         log=lambda _: None)
    merged = models_built["surgery"]
    assert merged.history["surgery_loss"].shape == (3, count) and records["surgery"].loss is None
    x = images(1, 2)
    module = merged.per_task(2)["surgery"]
    z = features_fn(base, x)
    expected = head_fn(z - jax.nn.relu(z @ module.down.T) @ module.up.T, 2)
    np.testing.assert_allclose(merged.apply_fn(merged.per_task(2), x, 2), expected, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(module.up))) > 0  # trained
    assert merged.per_task(count) is None


@pytest.mark.parametrize("missing", [("features_fn",), ("head_fn",), ("features_fn", "head_fn")])
def test_a_binding_without_the_representation_is_refused_naming_what_it_lacks(missing):
    """A binding that gives apply_fn but not features_fn (or head_fn) is refused before anything trains, in one
    line that names exactly what is missing and what it must be."""
    pretrained, tau, _ = float32_models()
    given = {name: value for name, value in (("features_fn", features_fn), ("head_fn", head_fn))
             if name not in missing}
    with pytest.raises(ValueError) as error:
        build_models(SETTINGS, pretrained, tau, apply_fn=am.SharedBackbone(features_fn, head_fn), adaptation=batches,
                     mesh=mesh(), log=lambda _: None, **given)
    message = str(error.value)
    assert "\n" not in message
    assert f"method 'surgery' needs the binding's representation: its {' and '.join(missing)} (" in message
    assert "features_fn(params, inputs) -> z and head_fn(z, task) -> logits" in message


@pytest.mark.slow
def test_merge_exports_the_base_model_and_the_modules(world):
    """``merge`` with ``{name: surgery, base: tsv_m}`` on the tiny CLIP: the folder's model is TSV-M's, and
    surgery.safetensors holds every task's trained module under the names the card lists."""
    from test_merge_command import CLASSES, FIXTURE, merge, write_config

    from adamerging_jax.merging.surgery_files import load_surgery_modules, module_names
    from adamerging_jax.models.clip_checkpoint import load_hf_clip

    out = world / "out_surgery"
    merge(write_config(world, "surgery", [{"name": "surgery", "base": "tsv_m", "surgery_steps": 2}]),
          "--output", out)
    tasks = list(CLASSES)
    card = (out / "model" / "README.md").read_text()
    assert all(name in card for task in tasks for name in module_names(task))
    names, modules = load_surgery_modules(out / "model")
    assert names == tasks and modules.down.shape[:2] == (len(tasks), 16) and np.any(modules.up)
    pretrained = load_hf_clip(FIXTURE)[1]["vision"]
    finetuned = [load_hf_clip(str(world / "finetuned" / task))[1]["vision"] for task in tasks]
    tsv = am.method_spec("tsv_m").build(pretrained, am.task_vectors(pretrained, finetuned), view=clip.matrix_view)
    exported = load_hf_clip(str(out / "model"))[1]["vision"]
    assert max(np.max(np.abs(np.asarray(a) - np.asarray(b))) for a, b in
               zip(jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(tsv.params))) <= 1e-5
    result = json.loads((out / "results.json").read_text())
    assert set(result["methods"]["surgery"]["accuracy"]) == set(tasks)


@pytest.mark.slow
def test_merge_runs_surgery_over_layer_wise_adamerging_beside_it(world):
    """``merge`` with ``[{name: surgery, base: layer_wise_adamerging}, layer_wise_adamerging]``: the base learns
    from the unlabeled images inside Surgery (its resumable state under state/surgery/base), to the λ of
    layer-wise AdaMerging run beside it; the folder's model is θ0 + Σ_k clamp(λ_k) τ_k with that λ, written
    out in numpy; both methods are scored on every test folder (one pass over one-shot batches)."""
    from test_merge_command import CLASSES, FIXTURE, STEPS, merge, write_config

    from adamerging_jax.models.clip_checkpoint import load_hf_clip

    out = world / "out_surgery_layer"
    merge(write_config(world, "surgery_layer", [{"name": "surgery", "base": "layer_wise_adamerging",
                                                 "surgery_steps": 2}, "layer_wise_adamerging"]), "--output", out)
    methods = json.loads((out / "results.json").read_text())["methods"]
    surgery, base = methods["surgery"], methods["layer_wise_adamerging"]
    assert surgery["coefficients"] == base["coefficients"] and len(base["entropy"]) == STEPS
    assert surgery["entropy"] is None  # the base's entropy is not Surgery's loss
    assert set(surgery["accuracy"]) == set(base["accuracy"]) == set(CLASSES)
    assert os.listdir(out / "state" / "surgery" / "base") and os.listdir(out / "state" / "surgery" / "surgery")
    pretrained = load_hf_clip(FIXTURE)[1]["vision"]
    finetuned = [load_hf_clip(str(world / "finetuned" / task))[1]["vision"] for task in CLASSES]
    lam = {path: np.clip(np.asarray(value, np.float64), 0.0, 1.0) for path, value in surgery["coefficients"].items()}
    exported = load_hf_clip(str(out / "model"))[1]["vision"]
    for (path, theta0), *leaves in zip(jax.tree_util.tree_flatten_with_path(pretrained)[0],
                                       *(jax.tree_util.tree_leaves(t) for t in [exported, *finetuned])):
        c, theta0 = lam[am.path_str(path)], np.asarray(theta0, np.float64)
        expected = theta0 + sum(c[k].reshape(c[k].shape + (1,) * (theta0.ndim - c[k].ndim)) * (np.asarray(f) - theta0)
                                for k, f in enumerate(leaves[1:]))
        np.testing.assert_allclose(leaves[0], expected, rtol=1e-5, atol=1e-6, err_msg=am.path_str(path))
