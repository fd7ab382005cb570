"""The AdaMerging optimiser on the tiny multi-task problem: it works, it is data parallel, it resumes."""

import os
import subprocess
import sys
import textwrap

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamerging_jax as am
from adamerging_jax.core.checkpoint import RunCheckpointer
from adamerging_jax.core.optimize import NonFiniteError, _compiled_step
from tiny_problem import batch_source


FAST = dict(steps=60, lr=0.02, batches_per_task=1, quiet=True)


def test_layerwise_adamerging_lowers_entropy_and_beats_task_arithmetic(problem, tv):
    result = am.adamerging(problem.apply, problem.pretrained, tv, batch_source(problem), am.AdaMergingConfig(**FAST))
    loss = result.history["loss"]
    assert loss.shape == (60, 4)
    assert loss[-10:].sum(1).mean() < 0.8 * loss[:10].sum(1).mean()
    ta = am.evaluate(problem.apply, am.task_arithmetic(problem.pretrained, tv, 0.3), problem.test).mean
    ada = am.evaluate(problem.apply, result.params, problem.test).mean
    assert ada > ta + 0.03, (ada, ta)
    # λ of the shared, conflicting leaves moved away from the 0.3 prior.
    assert np.abs(np.asarray(result.coefficients.values["shared/kernel"]) - 0.3).max() > 0.1


def test_taskwise_and_grouped_granularities_run(problem, tv):
    for granularity in ["task", lambda path: path.split("/")[0]]:
        result = am.adamerging(
            problem.apply, problem.pretrained, tv, batch_source(problem), am.AdaMergingConfig(**{**FAST, "steps": 5}, granularity=granularity)
        )
        assert result.history["loss"].shape == (5, 4)


def test_eight_devices_give_the_single_device_trajectory(problem, tv):
    assert jax.device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
    config = am.AdaMergingConfig(**{**FAST, "steps": 20})
    sharded = am.adamerging(problem.apply, problem.pretrained, tv, batch_source(problem), config)
    single = am.adamerging(problem.apply, problem.pretrained, tv, batch_source(problem), config, mesh=am.data_mesh(jax.devices()[:1]))
    np.testing.assert_allclose(sharded.history["loss"], single.history["loss"], atol=1e-6)
    for group, value in sharded.coefficients.values.items():
        np.testing.assert_allclose(value, single.coefficients.values[group], atol=1e-6, err_msg=group)


def test_per_task_accumulation_equals_fused_step(problem, tv):
    fused = am.adamerging(problem.apply, problem.pretrained, tv, batch_source(problem), am.AdaMergingConfig(**{**FAST, "steps": 10}))
    per_task = am.adamerging(
        problem.apply, problem.pretrained, tv, batch_source(problem), am.AdaMergingConfig(**{**FAST, "steps": 10}, accumulate="per_task")
    )
    for group, value in fused.coefficients.values.items():
        np.testing.assert_allclose(value, per_task.coefficients.values[group], atol=1e-6, err_msg=group)


def test_sharded_task_vectors_give_the_replicated_result(problem, tv):
    config = am.AdaMergingConfig(**{**FAST, "steps": 10})
    replicated = am.adamerging(problem.apply, problem.pretrained, tv, batch_source(problem), config)
    sharded = am.adamerging(
        problem.apply, problem.pretrained, tv, batch_source(problem), am.AdaMergingConfig(**{**FAST, "steps": 10}, shard_task_vectors=True)
    )
    for group, value in replicated.coefficients.values.items():
        np.testing.assert_allclose(value, sharded.coefficients.values[group], atol=1e-6, err_msg=group)


def test_presets_and_custom_optimizer():
    official, fusionbench = am.AdaMergingConfig.official(), am.AdaMergingConfig.fusionbench()
    assert (official.steps, official.batches_per_task, official.clamp, official.entropy_eps) == (500, 2, (0.0, 1.0), None)
    assert (fusionbench.steps, fusionbench.batches_per_task, fusionbench.clamp, fusionbench.entropy_eps) == (1000, 1, None, 1e-8)
    sgd = optax.sgd(0.1)
    assert am.AdaMergingConfig(optimizer=sgd).make_optimizer() is sgd


def test_interrupted_run_resumes_to_the_bit_identical_lambda(problem, tv, tmp_path):
    config = am.AdaMergingConfig(**{**FAST, "steps": 12}, checkpoint_every=5, checkpoint_dir=str(tmp_path / "run"))
    source = batch_source(problem)

    def crashing(step):
        if step == 8:
            raise RuntimeError("simulated crash")
        return source(step)

    with pytest.raises(RuntimeError, match="simulated crash"):
        am.adamerging(problem.apply, problem.pretrained, tv, crashing, config)
    resumed = am.adamerging(problem.apply, problem.pretrained, tv, source, config)
    straight = am.adamerging(problem.apply, problem.pretrained, tv, source, am.AdaMergingConfig(**{**FAST, "steps": 12}))
    for group, value in straight.coefficients.values.items():
        np.testing.assert_array_equal(np.asarray(resumed.coefficients.values[group]), np.asarray(value), err_msg=group)
    np.testing.assert_array_equal(resumed.history["loss"], straight.history["loss"])


def test_sigkilled_run_resumes_to_the_bit_identical_lambda(problem, tv, tmp_path):
    """A process killed with SIGKILL in the middle of its run, then run again, ends where a clean run ends."""
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal, sys
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            import numpy as np
            import adamerging_jax as am
            from tiny_problem import batch_source, make_problem

            problem = make_problem()
            tv = am.task_vectors(problem.pretrained, problem.finetuned)
            source = batch_source(problem)
            kill_at = int(sys.argv[1])

            def batches(step):
                if step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return source(step)

            config = am.AdaMergingConfig(steps=12, lr=0.02, batches_per_task=1, quiet=True,
                                         checkpoint_every=4, checkpoint_dir={str(tmp_path / "ckpt")!r})
            result = am.adamerging(problem.apply, problem.pretrained, tv, batches, config)
            result.save({str(tmp_path / "out")!r})
            """
        )
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    killed = subprocess.run([sys.executable, str(script), "10"], env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not (tmp_path / "out").exists()
    finished = subprocess.run([sys.executable, str(script), "-1"], env=env, capture_output=True)
    assert finished.returncode == 0, finished.stderr.decode()[-2000:]
    resumed = am.load_coefficients(tmp_path / "out" / "coefficients.npz")
    straight = am.adamerging(
        problem.apply, problem.pretrained, tv, batch_source(problem), am.AdaMergingConfig(**{**FAST, "steps": 12}),
        mesh=am.data_mesh(jax.devices()[:1]),
    )
    for group, value in straight.coefficients.values.items():
        np.testing.assert_array_equal(np.asarray(resumed.values[group]), np.asarray(value), err_msg=group)


def test_checkpoint_from_other_settings_is_refused(problem, tv, tmp_path):
    config = am.AdaMergingConfig(**{**FAST, "steps": 4}, checkpoint_every=2, checkpoint_dir=str(tmp_path))
    am.adamerging(problem.apply, problem.pretrained, tv, batch_source(problem), config)
    other = am.AdaMergingConfig(**{**FAST, "steps": 4, "lr": 0.5}, checkpoint_every=2, checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError, match="written by another run: lr 0.02 → 0.5; to start afresh"):
        am.adamerging(problem.apply, problem.pretrained, tv, batch_source(problem), other)


def test_result_save_and_load_roundtrip(problem, tv, tmp_path):
    result = am.adamerging(problem.apply, problem.pretrained, tv, batch_source(problem), am.AdaMergingConfig(**{**FAST, "steps": 3}))
    result.save(tmp_path)
    for loaded in (am.load_coefficients(tmp_path / "coefficients.npz"), am.load_coefficients(tmp_path)):
        assert loaded.leaf_groups == result.coefficients.leaf_groups
        for group, value in result.coefficients.values.items():
            np.testing.assert_array_equal(loaded.values[group], value)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_bad_batches_are_named(problem, tv):
    config = am.AdaMergingConfig(**{**FAST, "steps": 2})
    good = batch_source(problem)
    missing = lambda step: good(step)[:3]  # noqa: E731
    empty = lambda step: good(step)[:2] + [np.zeros((0, 32), np.float32)] + good(step)[3:]  # noqa: E731
    odd = lambda step: [b[:6] for b in good(step)]  # noqa: E731
    with pytest.raises(ValueError, match="3 tasks.*K = 4"):
        am.adamerging(problem.apply, problem.pretrained, tv, missing, config)
    with pytest.raises(ValueError, match="task 2 has no batch"):
        am.adamerging(problem.apply, problem.pretrained, tv, empty, config)
    with pytest.raises(ValueError, match="task 0: batch of 6 examples.*8 devices"):
        am.adamerging(problem.apply, problem.pretrained, tv, odd, config)
    with pytest.raises(ValueError, match="ran out at step 1"):
        am.adamerging(problem.apply, problem.pretrained, tv, [good(0)], config)


def test_atomic_writes_leave_no_partial_file_and_use_the_usual_mode(tmp_path):
    from adamerging_jax.core.checkpoint import atomic_path, write_atomic

    write_atomic(tmp_path / "a.txt", b"done")
    assert (tmp_path / "a.txt").read_bytes() == b"done"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


RUN_ONLY = {"steps", "granularity", "init_value", "batch_size", "stacked", "shard_task_vectors", "checkpoint_dir",
            "checkpoint_every", "seed", "quiet"}
# One other value per field: the run-only ones must share the compiled step, every other one must not.
OTHER_VALUE = dict(
    steps=3, granularity="task", init_value=0.1, batch_size=8, stacked=lambda path: False, shard_task_vectors=True,
    checkpoint_dir="elsewhere", checkpoint_every=3, seed=4, quiet=True,
    lr=0.5, optimizer=optax.sgd(0.1), clamp=None, lambda_bound=5.0, entropy_eps=1e-8, batches_per_task=3, accumulate="per_task",
    param_dtype="bfloat16", compute_dtype="float16",
)


def test_compiled_step_is_keyed_by_every_field_not_marked_run_only():
    fields = {f.name for f in dataclasses.fields(am.AdaMergingConfig)}
    marked = {f.name for f in dataclasses.fields(am.AdaMergingConfig) if f.metadata.get("run_only")}
    assert marked == RUN_ONLY
    assert set(OTHER_VALUE) == fields, "a new config field needs a row here (and a decision: run-only or not)"
    apply = lambda params, x, task: x  # noqa: E731
    base = am.AdaMergingConfig()
    step = _compiled_step(apply, base)
    for name, value in OTHER_VALUE.items():
        other = _compiled_step(apply, dataclasses.replace(base, **{name: value}))
        assert (other is step) == (name in RUN_ONLY), name


def test_run_only_fields_do_not_change_what_the_step_computes(problem, tv):
    """make_step reads no run-only field: the step of a config and of its `step_settings()` agree bit for bit."""
    config = am.AdaMergingConfig(**{**FAST, **{name: OTHER_VALUE[name] for name in RUN_ONLY}})
    lam = am.init_coefficients(problem.pretrained, 4)
    batches = [jnp.asarray(x) for x in batch_source(problem)(0)]
    outputs = []
    for cfg in (config, config.step_settings()):
        step = jax.jit(am.make_step(problem.apply, cfg.make_optimizer(), cfg))
        outputs.append(jax.tree_util.tree_leaves(step(lam, cfg.make_optimizer().init(lam), problem.pretrained, tv, batches)))
    for a, b in zip(*outputs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("devices", [1, 8])
def test_the_callers_coefficients_are_never_consumed(problem, tv, devices):
    mesh = am.data_mesh(jax.devices()[:devices])
    lam = jax.device_put(am.init_coefficients(problem.pretrained, 4), am.core.parallel.replicated(mesh))
    before = jax.device_get(lam)
    config = am.AdaMergingConfig(**{**FAST, "steps": 3})
    first = am.adamerging(problem.apply, problem.pretrained, tv, batch_source(problem), config, coefficients=lam, mesh=mesh)
    second = am.adamerging(problem.apply, problem.pretrained, tv, batch_source(problem), config, coefficients=lam, mesh=mesh)
    for group, value in before.values.items():
        np.testing.assert_array_equal(np.asarray(lam.values[group]), value)
        np.testing.assert_array_equal(first.coefficients.values[group], second.coefficients.values[group])


def poisoned(problem, task, from_step):
    """An apply_fn whose task `task` logits are NaN from step `from_step` on (its finite inputs carry a flag
    that the model turns into log(-1)), and the batch source that sets the flag."""
    source = batch_source(problem)

    def batches(step):
        return [
            {"x": x, "poison": np.full(len(x), 2.0 if t == task and step >= from_step else 0.0, np.float32)}
            for t, x in enumerate(source(step))
        ]

    def apply(params, inputs, t):
        return problem.apply(params, inputs["x"], t) + jnp.log1p(-inputs["poison"])[:, None]

    return apply, batches


def test_nan_logits_stop_the_run_with_the_last_finite_lambda(problem, tv, tmp_path):
    apply, batches = poisoned(problem, task=1, from_step=3)
    config = am.AdaMergingConfig(**{**FAST, "steps": 8}, checkpoint_every=2, checkpoint_dir=str(tmp_path / "run"))
    with pytest.raises(NonFiniteError, match=r"step 3: the entropy loss of task\(s\) 1 \(nan\) is not finite") as error:
        am.adamerging(apply, problem.pretrained, tv, batches, config)
    assert error.value.step == 3 and error.value.history["loss"].shape == (3, 4)
    clean = am.adamerging(problem.apply, problem.pretrained, tv, batch_source(problem), am.AdaMergingConfig(**{**FAST, "steps": 3}))
    np.testing.assert_array_equal(error.value.history["loss"], clean.history["loss"])
    for group, value in clean.coefficients.values.items():
        np.testing.assert_array_equal(np.asarray(error.value.coefficients.values[group]), np.asarray(value), err_msg=group)
    # The last finite state is checkpointed too (step 3, after the step-2 checkpoint).
    checkpointer = RunCheckpointer(tmp_path / "run", 2)
    assert checkpointer.latest_step() == 3
    (saved, _), metadata = checkpointer.restore(3, (clean.coefficients, config.make_optimizer().init(clean.coefficients)))
    checkpointer.close()
    assert metadata["step"] == 3 and len(metadata["loss"]) == 3
    for group, value in clean.coefficients.values.items():
        np.testing.assert_array_equal(np.asarray(saved.values[group]), np.asarray(value), err_msg=group)


def test_nan_input_batch_is_named(problem, tv):
    source = batch_source(problem)

    def batches(step):
        out = source(step)
        if step == 1:
            out[2] = out[2].copy()
            out[2][5, 7] = np.nan
        return out

    with pytest.raises(NonFiniteError, match=r"step 1: the input batch of task\(s\) 2 holds NaN or inf") as error:
        am.adamerging(problem.apply, problem.pretrained, tv, batches, am.AdaMergingConfig(**{**FAST, "steps": 4}))
    assert error.value.step == 1


def test_nan_in_pretrained_is_named_before_the_first_step(problem, tv):
    pretrained = jax.tree_util.tree_map(np.array, problem.pretrained)
    pretrained["shared"]["kernel"][3, 4] = np.nan
    with pytest.raises(NonFiniteError, match="θ0: leaf 'shared/kernel' holds NaN or inf") as error:
        am.adamerging(problem.apply, pretrained, tv, batch_source(problem), am.AdaMergingConfig(**FAST))
    assert error.value.step == 0


def test_nan_learning_rate_is_refused_at_construction():
    with pytest.raises(ValueError, match="AdaMergingConfig.lr must be a finite number > 0, got nan"):
        am.AdaMergingConfig(lr=float("nan"))


def test_per_task_accumulation_honours_float64(problem, tv):
    """On float64 θ0, τ and inputs (x64 on for this test only), per-task and fused steps agree to 1e-12 over
    20 steps: measured 1.1e-16 (accumulating ∂L/∂θ in float32 put them 2.3e-9 apart) while λ moves by 0.35."""
    to64 = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tree)  # noqa: E731
    source = batch_source(problem)
    batches = lambda step: [x.astype(np.float64) for x in source(step)]  # noqa: E731
    with jax.enable_x64(True):
        runs = [
            am.adamerging(problem.apply, to64(problem.pretrained), to64(tv), batches,
                          am.AdaMergingConfig(**{**FAST, "steps": 20}, accumulate=accumulate))
            for accumulate in ("fused", "per_task")
        ]
    for group, value in runs[0].coefficients.values.items():
        assert value.dtype == np.float64, group
        assert np.abs(np.asarray(value) - 0.3).max() > 0.05, "λ hardly moved: the comparison would be vacuous"
        np.testing.assert_allclose(runs[1].coefficients.values[group], value, rtol=0, atol=1e-12, err_msg=group)
