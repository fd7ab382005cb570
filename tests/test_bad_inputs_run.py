"""Every bad input the optimiser guards, one row each: what it is, the exception, and the part of the one-line
message that names the culprit (field, task, leaf, step or part of the run that differs).

`CASES` doubles as documentation: `description` is one line a README can show.
"""
from __future__ import annotations

import dataclasses
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamerging_jax as am
from adamerging_jax.core.checkpoint import CorruptCheckpointError
from adamerging_jax.core.optimize import LambdaBoundError, NonFiniteError
from tiny_problem import batch_source
from bad_inputs import Case

FAST = dict(lr=0.02, batches_per_task=1, quiet=True, steps=4)


@dataclasses.dataclass
class Context:
    problem: Any
    tv: Any
    finished: Any  # the checkpoint directory of a finished 4-step run (settings FAST, checkpoint every 2)
    tmp_path: Any

    def run(self, batches=None, tv=None, pretrained=None, apply=None, coefficients=None, **overrides):
        config = am.AdaMergingConfig(**{**FAST, **overrides})
        return am.adamerging(apply or self.problem.apply, self.problem.pretrained if pretrained is None else pretrained,
                             self.tv if tv is None else tv, batches or batch_source(self.problem), config,
                             coefficients=coefficients)

    def resume(self, **kwargs):
        """Resume (a copy of) the finished run's checkpoint with something changed."""
        directory = self.tmp_path / "resumed"
        shutil.copytree(self.finished, directory)
        return self.run(checkpoint_dir=str(directory), checkpoint_every=2, **kwargs)


def config_case(id, description, expected, fragment, **fields):
    return Case(id, description, expected, fragment, lambda ctx: am.AdaMergingConfig(**fields))


def with_nan_leaf(tree, path):
    tree = jax.tree_util.tree_map(np.array, tree)
    leaf = tree
    for key in path[:-1]:
        leaf = leaf[key]
    leaf[path[-1]].flat[3] = np.nan
    return tree


def nan_lambda(pretrained, group, task):
    """Layer-wise λ = 0.3 for the 4 tasks with a NaN at `task` of `group`."""
    like = am.init_coefficients(pretrained, 4)
    values = {g: np.array(v) for g, v in like.values.items()}
    values[group][task] = np.nan
    return am.Coefficients({g: jnp.asarray(v) for g, v in values.items()}, like.leaf_groups)


def nan_input_at(problem, step, task):
    source = batch_source(problem)

    def batches(s):
        out = source(s)
        if s == step:
            out[task] = np.where(np.arange(out[task].size).reshape(out[task].shape) == 5, np.nan, out[task])
        return out

    return batches


def nan_logits_from(problem, step, task):
    """An apply_fn whose task `task` logits are NaN from `step` on (finite inputs carry a flag, log(1 − 2))."""
    source = batch_source(problem)

    def batches(s):
        return [{"x": x, "flag": np.full(len(x), 2.0 if t == task and s >= step else 0.0, np.float32)}
                for t, x in enumerate(source(s))]

    def apply(params, inputs, t):
        return problem.apply(params, inputs["x"], t) + jnp.log1p(-inputs["flag"])[:, None]

    return apply, batches


def nan_logits_run(ctx, step, task):
    apply, batches = nan_logits_from(ctx.problem, step, task)
    return ctx.run(batches, apply=apply, steps=6)


def corrupt_every_step(ctx):
    directory = ctx.tmp_path / "corrupt"
    shutil.copytree(ctx.finished, directory)
    for step in (p for p in directory.iterdir() if p.name.isdigit()):
        shutil.rmtree(step)
        step.mkdir()
    return ctx.run(checkpoint_dir=str(directory), checkpoint_every=2)


CASES = [
    config_case("steps_negative", "a negative step count", ValueError,
                "AdaMergingConfig.steps must be >= 0, got -1", steps=-1),
    config_case("steps_string", "a step count given as text", TypeError,
                "AdaMergingConfig.steps must be an integer, got '10'", steps="10"),
    config_case("steps_float", "a fractional step count", TypeError,
                "AdaMergingConfig.steps must be an integer, got 2.5", steps=2.5),
    config_case("batches_per_task_zero", "no batch per task", ValueError,
                "AdaMergingConfig.batches_per_task must be >= 1, got 0", batches_per_task=0),
    config_case("batch_size_zero", "an empty batch size", ValueError,
                "AdaMergingConfig.batch_size must be >= 1, got 0", batch_size=0),
    config_case("clamp_reversed", "a clamp whose low end is above its high end", ValueError,
                "AdaMergingConfig.clamp must have lo < hi, got (1.0, 0.0)", clamp=(1.0, 0.0)),
    config_case("clamp_infinite", "an infinite clamp bound", ValueError,
                "AdaMergingConfig.clamp must be a finite number, got inf", clamp=(0.0, float("inf"))),
    config_case("clamp_not_a_pair", "a clamp that is not a pair", TypeError,
                "AdaMergingConfig.clamp must be None or a pair (lo, hi), got 1.0", clamp=1.0),
    config_case("lr_nan", "a NaN learning rate", ValueError,
                "AdaMergingConfig.lr must be a finite number > 0, got nan", lr=float("nan")),
    config_case("lr_zero", "a zero learning rate", ValueError,
                "AdaMergingConfig.lr must be a finite number > 0, got 0", lr=0),
    config_case("lr_string", "a learning rate given as text", TypeError,
                "AdaMergingConfig.lr must be a number, got '1e-3'", lr="1e-3"),
    config_case("entropy_eps_zero", "a zero entropy epsilon", ValueError,
                "AdaMergingConfig.entropy_eps must be a finite number > 0, got 0.0", entropy_eps=0.0),
    config_case("init_value_inf", "an infinite initial λ", ValueError,
                "AdaMergingConfig.init_value must be a finite number, got inf", init_value=float("inf")),
    config_case("init_value_bool", "a boolean initial λ", TypeError,
                "AdaMergingConfig.init_value must be a number, got True", init_value=True),
    config_case("accumulate_unknown", "an unknown accumulation mode", ValueError,
                "AdaMergingConfig.accumulate must be 'fused' or 'per_task', got 'both'", accumulate="both"),
    config_case("granularity_unknown", "an unknown granularity", ValueError,
                "AdaMergingConfig.granularity must be 'task', 'layer' or a callable", granularity="block"),
    config_case("checkpoint_every_zero", "a checkpoint interval of zero steps", ValueError,
                "AdaMergingConfig.checkpoint_every must be >= 1, got 0", checkpoint_every=0),
    config_case("checkpoint_dir_number", "a checkpoint directory given as a number", TypeError,
                "AdaMergingConfig.checkpoint_dir must be None or a path, got 3", checkpoint_dir=3),
    config_case("checkpoint_dir_empty", "an empty checkpoint directory name", ValueError,
                "AdaMergingConfig.checkpoint_dir must be None or a non-empty path, got ''", checkpoint_dir=""),
    config_case("param_dtype_unknown", "an unknown storage dtype", TypeError,
                "AdaMergingConfig.param_dtype must be a floating dtype name such as 'bfloat16', got 'bf17'", param_dtype="bf17"),
    config_case("compute_dtype_integer", "an integer compute dtype", ValueError,
                "AdaMergingConfig.compute_dtype must be a floating dtype, got 'int8'", compute_dtype="int8"),
    config_case("seed_negative", "a negative seed", ValueError, "AdaMergingConfig.seed must be >= 0, got -1", seed=-1),
    config_case("quiet_string", "quiet given as text", TypeError,
                "AdaMergingConfig.quiet must be True or False, got 'no'", quiet="no"),
    config_case("shard_task_vectors_int", "shard_task_vectors given as a number", TypeError,
                "AdaMergingConfig.shard_task_vectors must be True or False, got 1", shard_task_vectors=1),
    config_case("optimizer_string", "an optimiser given by name", TypeError,
                "AdaMergingConfig.optimizer must be an optax.GradientTransformation or None, got 'adam'", optimizer="adam"),
    config_case("stacked_bool", "stacked given as a boolean", TypeError,
                "AdaMergingConfig.stacked must be None or a callable path -> bool, got True", stacked=True),
    config_case("lambda_bound_zero", "a zero bound on |λ|", ValueError,
                "AdaMergingConfig.lambda_bound must be a finite number > 0, got 0", lambda_bound=0),
    config_case("lambda_bound_text", "a bound on |λ| given as text", TypeError,
                "AdaMergingConfig.lambda_bound must be a number, got '1e3'", lambda_bound="1e3"),
    Case("lambda_past_bound", "an unclamped run whose update takes λ past lambda_bound", LambdaBoundError,
         "step 0: the update took |λ| to", lambda ctx: ctx.run(clamp=None, optimizer=optax.scale(-1e6))),
    Case("lambda_past_own_bound", "an unclamped run past a lambda_bound of 0.35 (Adam, lr 0.02)", LambdaBoundError,
         "past lambda_bound = 0.35 with no clamp", lambda ctx: ctx.run(clamp=None, lambda_bound=0.35, steps=8)),
    Case("coefficients_nan", "initial λ given with a NaN for task 2", ValueError,
         "adamerging: coefficients: λ of group 'embed/task2' for task 2 is nan",
         lambda ctx: ctx.run(coefficients=nan_lambda(ctx.problem.pretrained, "embed/task2", 2))),
    Case("batch_python_list", "a task's batch given as a Python list of examples", TypeError,
         "step 0: task 1's batch is a Python list of 16 items",
         lambda ctx: ctx.run(lambda step: [list(b) if t == 1 else b for t, b in enumerate(batch_source(ctx.problem)(step))])),
    Case("config_not_a_config", "settings given as a dict instead of an AdaMergingConfig", TypeError,
         "adamerging: config must be an AdaMergingConfig, got dict",
         lambda ctx: am.adamerging(ctx.problem.apply, ctx.problem.pretrained, ctx.tv, batch_source(ctx.problem), FAST)),
    Case("nan_logits", "a model whose logits turn NaN at step 3 (task 1)", NonFiniteError,
         "step 3: the entropy loss of task(s) 1 (nan) is not finite",
         lambda ctx: nan_logits_run(ctx, step=3, task=1)),
    Case("nan_input", "a NaN pixel in task 2's batch at step 1", NonFiniteError,
         "step 1: the input batch of task(s) 2 holds NaN or inf", lambda ctx: ctx.run(nan_input_at(ctx.problem, 1, 2))),
    Case("nan_pretrained", "a NaN in a leaf of θ0", NonFiniteError, "θ0: leaf 'shared/kernel' holds NaN or inf",
         lambda ctx: ctx.run(pretrained=with_nan_leaf(ctx.problem.pretrained, ("shared", "kernel")))),
    Case("nan_task_vectors", "a NaN in a leaf of τ", NonFiniteError, "τ: leaf 'embed/task2' holds NaN or inf",
         lambda ctx: ctx.run(tv=with_nan_leaf(ctx.tv, ("embed", "task2")))),
    Case("lambda_overflow", "an optimiser whose update overflows λ", NonFiniteError,
         "step 0: every task's loss is finite but the update made λ non-finite",
         lambda ctx: ctx.run(optimizer=optax.scale(float("inf")))),
    Case("corrupt_checkpoints", "every checkpoint step folder empty", CorruptCheckpointError,
         "no usable checkpoint in", corrupt_every_step),
    Case("resume_batch_size", "a resume with another batch size", ValueError, "batch_size 16 → 8",
         lambda ctx: ctx.resume(batches=batch_source(ctx.problem, batch=8), batch_size=8)),
    Case("resume_data", "a resume on other data", ValueError, "was written by another run: the data differ",
         lambda ctx: ctx.resume(batches=batch_source(ctx.problem, seed=1))),
    Case("resume_task_vectors", "a resume with other task vectors", ValueError, "the task vectors differ",
         lambda ctx: ctx.resume(tv=jax.tree_util.tree_map(lambda x: x * 2, ctx.tv))),
    Case("resume_past_steps", "a resume with fewer steps than the checkpoint holds", ValueError,
         "is at step 4, past steps=2", lambda ctx: ctx.resume(steps=2)),
    Case("source_ran_out", "a batch source that runs out", ValueError, "the batch source ran out at step 1 of 4",
         lambda ctx: ctx.run([batch_source(ctx.problem)(0)])),
    Case("wrong_task_count", "batches for 3 tasks where τ holds 4", ValueError,
         "step 0: got batches for 3 tasks, the task vectors hold K = 4",
         lambda ctx: ctx.run(lambda step: batch_source(ctx.problem)(step)[:3])),
    Case("empty_task_batch", "an empty batch for task 2", ValueError, "step 0: task 2 has no batch",
         lambda ctx: ctx.run(lambda step: [b if t != 2 else b[:0] for t, b in enumerate(batch_source(ctx.problem)(step))])),
    Case("batch_not_divisible", "a batch of 6 over 8 devices", ValueError, "task 0: batch of 6 examples",
         lambda ctx: ctx.run(lambda step: [b[:6] for b in batch_source(ctx.problem)(step)])),
    Case("task_vector_tree", "task vectors missing a leaf of θ0", ValueError, "missing leaves ['embed_bias']",
         lambda ctx: ctx.run(tv={k: v for k, v in ctx.tv.items() if k != "embed_bias"})),
    Case("coefficients_file_missing", "λ loaded from a folder without coefficients.npz", FileNotFoundError,
         "no such file (AdaMergingResult.save writes coefficients.npz", lambda ctx: am.load_coefficients(ctx.tmp_path)),
]


@pytest.fixture(scope="module")
def finished(problem, tv, tmp_path_factory):
    directory = tmp_path_factory.mktemp("finished") / "run"
    am.adamerging(problem.apply, problem.pretrained, tv, batch_source(problem),
                  am.AdaMergingConfig(**FAST, checkpoint_every=2, checkpoint_dir=str(directory)))
    return directory


def test_case_ids_are_unique_and_described():
    assert len({case.id for case in CASES}) == len(CASES)
    assert all(case.description and "\n" not in case.description for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_naming_the_culprit(case, problem, tv, finished, tmp_path):
    with pytest.raises(case.expected) as error:
        case.run(Context(problem, tv, finished, tmp_path))
    message = str(error.value)
    assert type(error.value) is case.expected, f"{type(error.value).__name__}: {message}"
    assert case.fragment in message, message
    assert "\n" not in message, message
