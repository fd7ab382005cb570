"""AdaMerging of a tiny Llama on a 2-D data × fsdp mesh of 8 simulated CPU devices: the 1-device λ trajectory
(dense and factored LoRA τ, fused and per-task accumulation, remat), θ0, τ and the merged parameters sharded
along "fsdp" (never replicated), the mesh and its errors."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_lm_adamerging import CONFIG, lm_config, lm_problem, one_device

import adamerging_jax as am
from adamerging_jax.core.parallel import (
    FSDP_AXIS,
    make_mesh,
    parameter_sharding,
    tree_shardings,
)
from adamerging_jax.core.trees import named_leaves
from adamerging_jax.merging.lm_binding import causal_lm_binding


@pytest.fixture(scope="module")
def lm():
    return lm_problem()


def run(lm, mesh, task_vectors="dense", remat=False, **config):
    apply_fn = causal_lm_binding(CONFIG, remat=remat).apply_fn
    return am.adamerging(apply_fn, lm.pretrained, getattr(lm, task_vectors), lm.batches, lm_config(**config),
                         mesh=mesh)


def assert_same_run(got, want, atol=1e-5):
    np.testing.assert_allclose(got.history["loss"], want.history["loss"], atol=atol, rtol=atol)
    for group, value in want.coefficients.values.items():
        np.testing.assert_allclose(got.coefficients.values[group], value, atol=atol, err_msg=group)


def test_make_mesh_lays_out_data_by_fsdp():
    mesh = make_mesh(data=2, fsdp=4)
    assert mesh.axis_names == ("data", "fsdp") and mesh.devices.shape == (2, 4)
    assert list(mesh.devices[0]) == jax.devices()[:4]  # an fsdp group is consecutive devices
    assert make_mesh(fsdp=2).devices.shape == (4, 2)
    for kwargs, message in [(dict(data=3, fsdp=4), "data=3 × fsdp=4 must equal the 8 devices"),
                            (dict(fsdp=3), "fsdp=3 must be a positive divisor of the 8 devices")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            make_mesh(**kwargs)


def test_parameters_shard_on_their_largest_fsdp_divisible_axis():
    mesh = make_mesh(data=2, fsdp=4)
    assert parameter_sharding(mesh, (3, 2, 32, 64), skip_leading=1).spec == P(None, None, None, FSDP_AXIS)
    assert parameter_sharding(mesh, (8, 2, 6), skip_leading=1).spec == P()  # K is never sharded
    assert parameter_sharding(mesh, (64, 32)).spec == P(FSDP_AXIS, None)


@pytest.fixture(scope="module")
def single(lm):
    return run(lm, one_device())


def test_data_by_fsdp_mesh_gives_the_one_device_trajectory(lm, single):
    mesh = make_mesh(data=2, fsdp=4)
    sharded = run(lm, mesh)
    assert_same_run(sharded, single)
    assert np.abs(np.asarray(single.coefficients.values["layers/attn/q/kernel"]) - 0.3).max() > 1e-3
    expected = tree_shardings(lm.pretrained, mesh, True)
    for (path, leaf), (_, sharding) in zip(named_leaves(sharded.params), named_leaves(expected)):
        assert FSDP_AXIS in sharding.spec, path  # every leaf of the tiny Llama has an axis 4 divides
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (path, leaf.sharding)
        assert leaf.addressable_shards[0].data.size == leaf.size // 4, path  # a quarter per device


def test_merged_parameters_are_sharded_inside_the_step(lm):
    """The compiled step's merged tree: each merged leaf of the jitted merge+constraint comes out fsdp-sharded,
    and the step's HLO holds the sharding constraint on the merge output."""
    mesh = make_mesh(data=2, fsdp=4)
    config = lm_config()
    step = am.make_step(causal_lm_binding(CONFIG).apply_fn, config.make_optimizer(), config, mesh=mesh)
    pretrained = am.core.parallel.place_tree(lm.pretrained, mesh, True)
    tau = am.core.parallel.place_tree(lm.dense, mesh, True, skip_leading=1)
    batches = am.core.parallel.shard_batches(lm.batches(0), mesh)
    lam = am.init_coefficients(lm.pretrained, 3, "layer", 0.3, config.stacked)
    text = jax.jit(step).lower(lam, config.make_optimizer().init(lam), pretrained, tau, batches).as_text()
    assert text.count("sharding_constraint") >= len(named_leaves(lm.pretrained))
    assert "fsdp" in text


@pytest.mark.parametrize("changes", [dict(task_vectors="factored"), dict(accumulate="per_task", remat=True)],
                         ids=["factored", "per_task_remat"])
def test_variants_on_the_mesh_give_the_one_device_trajectory(lm, single, changes):
    assert_same_run(run(lm, make_mesh(data=2, fsdp=4), **changes), single)


def test_bfloat16_storage_on_the_mesh_follows_the_one_device_bfloat16_run(lm):
    one = run(lm, one_device(), param_dtype="bfloat16", steps=2)
    sharded = run(lm, make_mesh(data=2, fsdp=4), param_dtype="bfloat16", steps=2)
    assert_same_run(sharded, one, atol=2e-3)
    assert all(leaf.dtype == np.dtype("bfloat16") for leaf in jax.tree_util.tree_leaves(sharded.params))
