"""WEMoE against FusionBench 0.2.33 (tests/fixtures/methods/we_moe.npz, made by scripts/make_method_fixtures.py
with its ``CLIPWeightEnsemblingMoEAlgorithm.construct_moe_model``, ``compute_logits``, ``entropy_loss`` and Adam
loop) on the tiny float64 CLIP image tower: step 0's routing weights and losses, every loss and the routers
after 20 steps, the trained model's per-example-routed logits; then resume, refusal, top-k and bf16 τ, and the
registry method through the protocol."""
from __future__ import annotations

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from method_fixtures import models, read
from test_resume import assert_refused_naming

import adamerging_jax as am
from adamerging_jax.core import we_moe
from adamerging_jax.core.methods import task_arithmetic
from adamerging_jax.core.protocol import MergeSettings, build_models
from adamerging_jax.models import clip

TINY = clip.VisionConfig(image_size=16, patch_size=8, width=24, layers=2, heads=2, mlp_dim=40)
"""The fixture script's ``tiny_clip_vision``."""
BOUND = 1e-10
LR = 1e-3  # the fixture's WE_MOE_LR


@functools.lru_cache(maxsize=1)
def fixture() -> dict[str, np.ndarray]:
    return read("we_moe")


def mixture() -> we_moe.ExpertMixture:
    return clip.expert_mixture(TINY, jnp.asarray(fixture()["projection"]).T)


def head_fn(z: jax.Array, task: int) -> jax.Array:
    """The reference's compute_logits after the features: 100 · z · text_tᵀ."""
    return z @ (100.0 * jnp.asarray(fixture()["heads"][task], z.dtype)).T


def batches(step: int) -> list[np.ndarray]:
    """Step s's batches as the reference saw them (NHWC; the distinct batches cycled)."""
    images = fixture()["images"]
    return [images[step % images.shape[0], t].transpose(0, 2, 3, 1) for t in range(images.shape[1])]


def routers(prefix: str) -> dict:
    """The reference's routers (torch Linear weights [out, in]) as ours: Dense kernels [in, out], stacked over
    the layers."""
    arrays = fixture()
    layers = range(TINY.layers)
    return {fc: {"kernel": jnp.stack([arrays[f"{prefix}/{i}/{fc}.weight"].T for i in layers]),
                 "bias": jnp.stack([arrays[f"{prefix}/{i}/{fc}.bias"] for i in layers])} for fc in ("fc1", "fc2")}


def frozen_model(top_k: int = TINY.layers, expert_dtype=None) -> dict:
    pretrained, tau, _ = models()
    return clip.moe_vision_params(pretrained, task_arithmetic(pretrained, tau, 0.3), tau, top_k, expert_dtype)


def mesh() -> jax.sharding.Mesh:
    """4 of the test session's devices: each task's batch of 4 split over them (data parallel)."""
    return am.data_mesh(jax.devices()[:4])


def test_step_0_routing_weights_and_losses_are_fusionbench_s(x64):
    """Every router's weights and L_t at the initial routers equal the reference's (training: each block's
    weights the mean over the task's batch of the per-example token means the fixture holds)."""
    frozen, initial = frozen_model(), routers("initial")
    for task, images in enumerate(batches(0)):
        _, weights = clip.moe_vision_forward(frozen, initial, images, TINY, groups=1, with_routing=True)
        reference = fixture()["step0_routing"][task].mean(axis=1, keepdims=True)
        assert np.max(np.abs(np.asarray(weights) - reference)) <= BOUND
    losses = we_moe.task_losses(mixture(), head_fn, initial, frozen, [jnp.asarray(b) for b in batches(0)])
    assert np.max(np.abs(np.asarray(losses) - fixture()["losses"][0])) <= BOUND
    assert np.ptp(fixture()["step0_routing"]) > 1e-3  # routing weights that differ between examples


def _train(steps: int, checkpoint_dir=None, lr: float = LR, batch_size: int = 4, initial=None, frozen=None,
           source=None, sequential_tasks: bool = False) -> we_moe.WEMoEResult:
    config = we_moe.WEMoEConfig(steps=steps, lr=lr, batch_size=batch_size, sequential_tasks=sequential_tasks,
                                checkpoint_dir=checkpoint_dir, checkpoint_every=2, quiet=True)
    return we_moe.train_we_moe(mixture(), head_fn, frozen_model() if frozen is None else frozen,
                               routers("initial") if initial is None else initial, source or batches, config,
                               mesh=mesh())


@pytest.mark.parametrize("sequential_tasks", [False, True], ids=["joint", "sequential"])
def test_routers_after_20_steps_are_fusionbench_s(x64, sequential_tasks):
    """The jitted, data-parallel Adam loop gives the reference's losses at every step, its routers after 20
    steps, and the trained model (every example routed on its own) its logits, whether the tasks' batches go
    through the model at once or one after another."""
    result = _train(fixture()["losses"].shape[0], sequential_tasks=sequential_tasks)
    assert np.max(np.abs(result.history["loss"] - fixture()["losses"])) <= BOUND
    final, initial = routers("final"), routers("initial")
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), final, initial)
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-3
    differences = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), result.routers, final)
    assert max(jax.tree_util.tree_leaves(differences)) <= BOUND
    apply_fn = we_moe.we_moe_apply_fn(mixture(), head_fn)
    model = {"frozen": frozen_model(), "routers": result.routers}
    for task, images in enumerate(batches(0)):
        logits = apply_fn(model, jnp.asarray(images), task)
        assert np.max(np.abs(np.asarray(logits) - fixture()["final_logits"][task])) <= 1e-9


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> str:
    """The checkpoint folder of a 4-step run stopped after 2 steps."""
    folder = str(tmp_path_factory.mktemp("we_moe") / "run")
    _train(2, folder)
    return folder


def test_resume_is_bit_identical(stopped, tmp_path):
    """A run stopped after 2 steps and resumed to 4 equals a straight 4-step run bit for bit."""
    straight = _train(4)
    shutil.copytree(stopped, tmp_path / "run")
    resumed = _train(4, str(tmp_path / "run"))
    assert np.array_equal(resumed.history["loss"], straight.history["loss"])
    for a, b in zip(jax.tree_util.tree_leaves(resumed.routers), jax.tree_util.tree_leaves(straight.routers)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


CHANGES = {  # _train's arguments that differ from the stopped run's, and what the refusal names
    "lr": (lambda: dict(lr=2 * LR), ["lr 0.001 → 0.002"]),
    "batch_size": (lambda: dict(batch_size=2), ["batch_size 4 → 2"]),
    "initial_routers": (lambda: dict(initial=routers("final")), ["initial_routers '"]),
    "routed_model": (lambda: dict(frozen=jax.tree_util.tree_map(lambda x: x * 1.01, frozen_model())),
                     ["routed_model '"]),
    "data": (lambda: dict(source=lambda step: batches(step + 1)), ["the data differ"]),
    "sequential_tasks": (lambda: dict(sequential_tasks=True), ["sequential_tasks False → True"]),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_checkpoint_of_another_run_is_refused_naming_the_difference(stopped, change):
    """As AdaMerging's resume: a checkpoint written with another learning rate or batch size, other initial
    routers, another routed model (θ_merged, W_0, τ or the layers upscaled), other data or the other task order
    (sequential_tasks) is refused in one line naming exactly what differs."""
    overrides, fragments = CHANGES[change]
    with pytest.raises(ValueError, match="checkpoint step 2 in .* was written by another run: ") as error:
        _train(4, stopped, **overrides())
    assert_refused_naming(str(error.value), stopped, fragments)


def test_a_task_order_that_is_not_a_bool_is_refused():
    with pytest.raises(ValueError, match="WEMoEConfig.sequential_tasks must be a bool, got 1"):
        we_moe.WEMoEConfig(sequential_tasks=1)


def test_top_k_and_bf16_task_vectors():
    """upscale_top_k = 1 routes the last block alone (the first keeps the merged MLP); bf16 τ are stored in bf16
    and, at the routers' constant λ (depth 0), the routed tower is task arithmetic within bf16's rounding."""
    pretrained, tau, count = models()
    pretrained, tau = (jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), t) for t in (pretrained, tau))
    merged = task_arithmetic(pretrained, tau, 0.3)
    frozen = clip.moe_vision_params(pretrained, merged, tau, 1, jnp.bfloat16)
    assert frozen["layers"]["ln1"]["scale"].shape[0] == 1
    assert np.array_equal(frozen["layers"]["mlp"]["fc1"]["kernel"], merged["layers"]["mlp"]["fc1"]["kernel"][:1])
    experts = clip.moe_expert_leaves(frozen)
    assert experts["routed_layers/mlp/fc1/expert_kernel"].shape == (1, count, TINY.width, TINY.mlp_dim)
    assert {x.dtype for x in experts.values()} == {jnp.dtype(jnp.bfloat16)}
    constant = mixture().init_routers(jax.random.PRNGKey(0), pretrained, 1, we_moe.Routing(count, 0, 0.3))
    images = jnp.asarray(batches(0)[0], jnp.float32)
    routed = clip.moe_vision_forward(frozen, constant, images, TINY)[1]
    plain = clip.vision_forward(merged, images, TINY)[1]
    assert 0 < float(jnp.max(jnp.abs(routed - plain))) < 1e-2 * float(jnp.max(jnp.abs(plain)))


SETTINGS = MergeSettings([{"name": "we_moe", "we_moe_steps": 3, "we_moe_lr": LR, "upscale_top_k": 1}],
                         am.AdaMergingConfig(batch_size=4, quiet=True))


def routed_apply_fn() -> am.SharedBackbone:
    return am.SharedBackbone(features=lambda p, x: mixture().features(p["frozen"], p["routers"], x, None),
                             head=head_fn)


def test_registry_method_runs_through_the_protocol(x64):
    """``we_moe`` through `build_models`: trained on the binding's mixture, scored with its own forward
    (every example routed)."""
    pretrained, tau, count = models()
    built, records = build_models(SETTINGS, pretrained, tau, apply_fn=routed_apply_fn(), adaptation=batches,
                                  mesh=mesh(), head_fn=head_fn, mixture=mixture(), log=lambda line: None)
    model = built["we_moe"]
    assert model.params["frozen"]["routed_layers"]["ln1"]["scale"].shape[0] == 1
    assert np.asarray(records["we_moe"].loss).shape == (3, count)
    logits = model.apply_fn(model.params, jnp.asarray(batches(0)[0]), 0)
    assert logits.shape == (4, fixture()["heads"].shape[1]) and bool(jnp.all(jnp.isfinite(logits)))


def test_batches_for_another_number_of_tasks_are_refused(x64):
    """Batches for fewer tasks than the routers weigh (K experts) are refused at step 0, naming both counts,
    rather than training the routers on a subset of the tasks."""
    pretrained, tau, count = models()
    fewer = lambda step: batches(step)[:-1]  # noqa: E731
    with pytest.raises(ValueError, match=f"step 0: got batches for {count - 1} tasks, the task vectors hold K = {count}"):
        build_models(SETTINGS, pretrained, tau, apply_fn=routed_apply_fn(), adaptation=fewer, mesh=mesh(),
                     head_fn=head_fn, mixture=mixture(), log=lambda line: None)


@pytest.mark.parametrize("missing", [("mixture",), ("head_fn",), ("mixture", "head_fn")])
def test_a_binding_without_the_mixture_is_refused_naming_what_it_lacks(missing):
    """A binding without its weight-ensembling form (or its heads) is refused before anything is built, in one
    line that names exactly what is missing and what it must be."""
    pretrained, tau, _ = models()
    given = {name: value for name, value in (("mixture", mixture()), ("head_fn", head_fn)) if name not in missing}
    with pytest.raises(ValueError) as error:
        build_models(SETTINGS, pretrained, tau, apply_fn=routed_apply_fn(), adaptation=batches, mesh=mesh(),
                     log=lambda line: None, **given)
    message = str(error.value)
    assert "\n" not in message
    assert f"method 'we_moe' needs the binding's weight-ensembling form: its {' and '.join(missing)} (" in message
    assert "core.we_moe.ExpertMixture" in message


def test_export_round_trip(tmp_path, x64):
    """we_moe.safetensors beside the dense tower rebuilds the routed model: the same leaves, the same forward."""
    from adamerging_jax.merging.we_moe_files import dense_tower, load_we_moe, write_we_moe_file

    frozen, trained = frozen_model(top_k=1), jax.tree_util.tree_map(lambda x: x[1:], routers("final"))
    names = write_we_moe_file(tmp_path, frozen, trained, ["a", "b", "c", "d"])
    assert "router/fc1/kernel" in names and "expert/routed_layers/mlp/fc2/expert_bias" in names
    dense = dense_tower(frozen)
    assert dense["layers"]["ln1"]["scale"].shape[0] == TINY.layers
    tasks, loaded, loaded_routers = load_we_moe(tmp_path, jax.tree_util.tree_map(np.asarray, dense))
    assert tasks == ["a", "b", "c", "d"]
    images = jnp.asarray(batches(0)[0])
    ours = mixture().features(frozen, trained, images, None)
    theirs = mixture().features(loaded, loaded_routers, images, None)
    assert np.max(np.abs(np.asarray(ours) - np.asarray(theirs))) <= 1e-6  # τ stored in float32
    with pytest.raises(FileNotFoundError, match="we_moe.safetensors"):
        load_we_moe(tmp_path / "absent", dense)
