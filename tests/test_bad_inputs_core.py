"""Bad input to the core is refused with the culprit named: one row per guarded case (``CASES``), one test.

Each case builds a small tree, task vectors, coefficients or an `apply_fn` with one thing wrong and states the
exception and the part of its message that names the leaf, tensor shape, task or argument at fault. The
objective's cases run under `jax.jit`: the `apply_fn` contract is checked when the step is traced.
"""
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adamerging_jax as am
from adamerging_jax.core.objective import Predictions
from bad_inputs import Case


PRE = {"a": jnp.ones((2, 3)), "b": jnp.ones(3)}
TV = {"a": jnp.ones((2, 2, 3)), "b": jnp.ones((2, 3))}  # K = 2, stacked for PRE


def with_tv(**leaves) -> dict:
    return {**TV, **leaves}


def merged(pretrained=PRE, task_vectors=TV, coefficients=None) -> Callable[[], Any]:
    """Merge with λ = 0.3 for K = 2 tasks unless `coefficients` are given."""
    return lambda: am.merge(pretrained, task_vectors, coefficients or am.init_coefficients(PRE, 2, "task"))


def finetuned(**leaves) -> Callable[[], Any]:
    """task_vectors(PRE, [PRE, PRE with `leaves` replaced])."""
    return lambda: am.task_vectors(PRE, [PRE, {**PRE, **leaves}])


def given_lambda(granularity: str, group: str, task: int, value: float) -> am.Coefficients:
    """λ = 0.3 for K = 2 tasks with `value` at `task` of `group`."""
    like = am.init_coefficients(PRE, 2, granularity)
    values = {g: np.array(v) for g, v in like.values.items()}
    values[group][task] = value
    return am.Coefficients({g: jnp.asarray(v) for g, v in values.items()}, like.leaf_groups)


X = np.zeros((8, 3), np.float32)  # every task's batch: N = 8 examples


def objective(output: Callable[[int], Any]) -> Callable[[], Any]:
    """The jitted two-task objective of an apply_fn whose task t returns `output(t)` (task 0 is well formed)."""
    good = jnp.zeros((8, 4))
    apply = lambda params, x, t: output(t) if t == 1 else good + jnp.sum(x)  # noqa: E731
    return lambda: jax.jit(lambda xs: am.entropy_objective(apply, {}, xs))([X, X])


def shared_objective(head: Callable[[jax.Array, int], Any]) -> Callable[[], Any]:
    """The jitted two-task objective of a SharedBackbone (features = inputs) with this head."""
    backbone = am.SharedBackbone(lambda params, x: x, head)
    return lambda: jax.jit(lambda xs: am.entropy_objective(backbone, {}, xs))([X, X[:5]])


CASES = [
    # ---- task vectors from fine-tuned models
    Case("no-finetuned", "no fine-tuned model (K = 0)", ValueError, "at least one fine-tuned model (K = 0)",
         lambda: am.task_vectors(PRE, [])),
    Case("finetuned-structure", "a fine-tuned model without a leaf of θ0", ValueError,
         "fine-tuned model 0 does not have the structure of the pretrained tree: missing leaves ['b']",
         lambda: am.task_vectors(PRE, [{"a": PRE["a"]}])),
    Case("finetuned-shape", "a fine-tuned leaf of another shape", ValueError,
         "leaf 'a': fine-tuned model 1 has shape (3, 2), pretrained has (2, 3)", finetuned(a=jnp.ones((3, 2)))),
    Case("finetuned-dtype", "a fine-tuned leaf of another dtype", ValueError,
         "leaf 'b': fine-tuned model 1 has dtype bfloat16, pretrained has float32",
         finetuned(b=jnp.ones(3, jnp.bfloat16))),
    Case("finetuned-nan", "NaN in a fine-tuned model (a non-finite task vector)", ValueError,
         "task vector of task 1 has NaN or inf values in leaf 'b'", finetuned(b=jnp.array([1.0, jnp.nan, 1.0]))),
    Case("finetuned-inf", "inf in a fine-tuned model", ValueError,
         "task vector of task 1 has NaN or inf values in leaf 'a'", finetuned(a=jnp.full((2, 3), jnp.inf))),
    Case("finetuned-one-tree", "one fine-tuned tree where the list of them belongs", TypeError,
         "task_vectors: finetuned must be a sequence of fine-tuned trees (one per task), got a dict",
         lambda: am.task_vectors(PRE, PRE)),
    Case("finetuned-python-lists", "a fine-tuned model given as Python lists", TypeError,
         "task_vectors: fine-tuned model 0: leaf 'b/0' is a float", lambda: am.task_vectors(PRE, [{**PRE, "b": [1.0] * 3}])),
    Case("tau-integer-dtype", "an integer storage dtype for τ", TypeError, "task_vectors: dtype must be a floating dtype",
         lambda: am.task_vectors(PRE, [PRE], dtype=jnp.int32)),
    Case("integer-leaf", "an integer buffer (e.g. a step counter) in the merged tree", ValueError,
         "leaf 'step' of the pretrained tree has non-float dtype int32",
         lambda: am.task_vectors({**PRE, "step": jnp.array(3)}, [{**PRE, "step": jnp.array(3)}])),
    # ---- stacked task vectors: every leaf [K, *θ0 leaf shape], one K
    Case("tau-trailing-axis", "a τ leaf [K, 1, 3] for a θ0 leaf [2, 3] (would broadcast)", ValueError,
         "leaf 'a': task vectors have shape (2, 1, 3), expected [K, *pretrained shape] = (2, 2, 3)",
         merged(task_vectors=with_tv(a=jnp.ones((2, 1, 3))))),
    Case("tau-unstacked", "an unstacked tree whose leading axes happen to equal K", ValueError,
         "leaf 'a': task vectors have shape (2, 3), expected [K, *pretrained shape] = (2, 2, 3)",
         lambda: am.task_arithmetic(PRE, {"a": jnp.ones((2, 3)), "b": jnp.ones(2)})),
    Case("tau-two-k", "task-vector leaves with different K", ValueError,
         "leaf 'b' of the task vectors has leading axis 3 (shape (3, 3)), expected K = 2 as in leaf 'a'",
         lambda: am.weight_average(PRE, with_tv(b=jnp.ones((3, 3))))),
    Case("tau-scalar", "a scalar task-vector leaf", ValueError, "leaf 'b' of the task vectors is a scalar",
         lambda: am.ties_task_vectors(with_tv(b=jnp.ones(())))),
    Case("tau-structure", "task vectors without a leaf of θ0", ValueError,
         "the task-vector tree does not have the structure of the pretrained tree: missing leaves ['b']",
         lambda: am.ties_merging(PRE, {"a": TV["a"]})),
    Case("tau-empty", "an empty task-vector tree", ValueError, "the task-vector tree has no leaves",
         lambda: am.dare({}, 0.5)),
    # ---- coefficients
    Case("lambda-k", "λ for K = 3 tasks, task vectors for K = 2", ValueError,
         "leaf 'a': coefficients hold K = 3 tasks, task vectors K = 2",
         merged(coefficients=am.init_coefficients(PRE, 3, "layer"))),
    Case("lambda-tree", "λ made for another tree", ValueError, "coefficients were made for another tree",
         merged(coefficients=am.init_coefficients({"c": jnp.ones(2)}, 2))),
    Case("lambda-layers", "per-layer λ [K, 3] for a leaf stacking 2 layers", ValueError,
         "leaf 'a': per-layer coefficients of shape (2, 3) need a stacked leaf [K, 3, ...]",
         merged(coefficients=am.init_coefficients({"a": jnp.ones((3, 3)), "b": PRE["b"]}, 2, stacked=lambda p: p == "a"))),
    Case("lambda-type", "a dict instead of Coefficients", TypeError, "coefficients must be a Coefficients",
         merged(coefficients={"*": jnp.ones(2)})),
    Case("lambda-value", "an initial λ vector of the wrong length", ValueError,
         "value must be a scalar or have shape (2,), got (3,)", lambda: am.init_coefficients(PRE, 2, value=np.ones(3))),
    Case("lambda-granularity", "an unknown granularity", ValueError, "granularity must be 'task', 'layer' or a callable",
         lambda: am.init_coefficients(PRE, 2, "block")),
    Case("lambda-zero-tasks", "K = 0 coefficients", ValueError, "init_coefficients: num_tasks must be >= 1, got 0",
         lambda: am.init_coefficients(PRE, 0)),
    Case("lambda-tasks-float", "a float number of tasks", TypeError,
         "init_coefficients: num_tasks must be an integer, got 2.0", lambda: am.init_coefficients(PRE, 2.0)),
    Case("lambda-init-nan", "an initial λ that is NaN for one task", ValueError,
         "init_coefficients: value for task 1 is nan", lambda: am.init_coefficients(PRE, 2, value=[0.3, np.nan])),
    Case("lambda-init-text", "an initial λ given as text", TypeError, "init_coefficients: value must be a number",
         lambda: am.init_coefficients(PRE, 2, value="0.3")),
    Case("lambda-python-tree", "θ0 given as Python lists to init_coefficients", TypeError,
         "init_coefficients: pretrained: leaf 'a/0/0' is a float", lambda: am.init_coefficients({"a": [[1.0], 2.0]}, 2)),
    # ---- given λ and the merge's own arguments
    Case("merge-lambda-nan", "merge: a NaN λ (layer-wise)", ValueError,
         "coefficients: λ of group 'b' for task 1 is nan", merged(coefficients=given_lambda("layer", "b", 1, np.nan))),
    Case("merge-lambda-inf", "merge: an inf λ (task-wise)", ValueError, "λ of group '*' for task 0 is inf",
         merged(coefficients=given_lambda("task", "*", 0, np.inf))),
    Case("merge-lambda-bound", "merge without a clamp: |λ| = 5000, past the bound 1e3", ValueError,
         "λ of group 'a' for task 0 is -5000.0, beyond ±1000 (lambda_bound",
         merged(coefficients=given_lambda("layer", "a", 0, -5000.0))),
    Case("merge-clamp-reversed", "merge: a clamp with lo > hi", ValueError, "merge: clamp must have lo < hi, got (1.0, 0.0)",
         lambda: am.merge(PRE, TV, am.init_coefficients(PRE, 2), clamp=(1.0, 0.0))),
    Case("merge-clamp-scalar", "merge: a clamp that is one number", TypeError,
         "merge: clamp must be None or a pair (lo, hi), got 1.0", lambda: am.merge(PRE, TV, am.init_coefficients(PRE, 2), clamp=1.0)),
    Case("merge-dtype", "merge: an output dtype that is not floating", TypeError, "merge: dtype must be a floating dtype",
         lambda: am.merge(PRE, TV, am.init_coefficients(PRE, 2), dtype="int8")),
    Case("merge-python-tree", "merge: θ0 given as Python lists", TypeError, "merge: pretrained: leaf 'b/0' is a float",
         lambda: am.merge({**PRE, "b": [1.0, 1.0, 1.0]}, TV, am.init_coefficients(PRE, 2))),
    # ---- method arguments
    Case("trim-density", "TIES density 0", ValueError, "density must be in (0, 1], got 0.0", lambda: am.trim(TV, 0.0)),
    Case("trim-scope", "an unknown trim scope", ValueError, "scope must be 'model' or 'leaf'",
         lambda: am.trim(TV, 0.5, scope="block")),
    Case("trim-total-size", "total_size below the task vectors' size", ValueError,
         "total_size 5 is smaller than the task vectors' 9 entries", lambda: am.trim(TV, 0.5, total_size=5)),
    Case("dare-rate", "DARE drop rate 1", ValueError, "drop rate p must be in [0, 1), got 1.0", lambda: am.dare(TV, 1.0)),
    Case("sign-method", "an unknown sign election", ValueError, "method must be 'sum' or 'count', got 'max'",
         lambda: am.elect_sign(TV, "max")),
    Case("reduce", "an unknown disjoint reduction", ValueError, "reduce must be 'mean' or 'sum', got 'max'",
         lambda: am.disjoint_reduce(TV, "max")),
    # ---- the apply_fn contract, checked at trace time
    Case("logits-integer", "integer logits", ValueError, "task 1: logits of shape (8, 4) have dtype int32",
         objective(lambda t: jnp.zeros((8, 4), jnp.int32))),
    Case("logits-vector", "logits [N] (one score per example)", ValueError, "task 1: logits have shape (8,)",
         objective(lambda t: jnp.zeros(8))),
    Case("logits-trailing-one", "logits [N, C, 1]", ValueError, "task 1: logits have shape (8, 4, 1)",
         objective(lambda t: jnp.zeros((8, 4, 1)))),
    Case("logits-rows", "logits for another number of examples than the batch's", ValueError,
         "task 1: logits have shape (7, 4), N = 7 rows for a batch of N = 8 examples", objective(lambda t: jnp.zeros((7, 4)))),
    Case("logits-one-class", "a one-class task (its entropy is always 0)", ValueError,
         "task 1: logits have shape (8, 1), C = 1 class", objective(lambda t: jnp.zeros((8, 1)))),
    Case("logits-not-array", "apply_fn returning a tuple", ValueError, "task 1: apply_fn returned a tuple",
         objective(lambda t: (jnp.zeros((8, 4)),))),
    Case("weights-shape", "Predictions weights [N] for logits [N, T, C]", ValueError,
         "task 1: Predictions.weights have shape (8,), expected logits.shape[:-1] = (8, 5)",
         objective(lambda t: Predictions(jnp.zeros((8, 5, 4)), jnp.ones(8)))),
    Case("predictions-integer", "Predictions with integer logits", ValueError,
         "task 1: Predictions.logits of shape (8, 5, 4) have dtype int32",
         objective(lambda t: Predictions(jnp.zeros((8, 5, 4), jnp.int32), jnp.ones((8, 5))))),
    Case("predictions-rank", "Predictions logits [N, T, S, C]", ValueError,
         "task 1: Predictions.logits have shape (8, 5, 2, 4)",
         objective(lambda t: Predictions(jnp.zeros((8, 5, 2, 4)), jnp.ones((8, 5, 2))))),
    Case("shared-head-rows", "a SharedBackbone head that drops examples of its slice", ValueError,
         "task 1: logits have shape (4, 3), N = 4 rows for a batch of N = 5 examples",
         shared_objective(lambda f, t: f[:4] if t else f)),
    Case("shared-head-one-class", "a SharedBackbone one-class head", ValueError,
         "task 0: logits have shape (8, 1), C = 1 class", shared_objective(lambda f, t: f[:, :1])),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_naming_the_culprit(case):
    with pytest.raises(case.expected, match=re.escape(case.fragment)):
        case.run()


def test_cases_are_well_formed():
    assert len({c.id for c in CASES}) == len(CASES)
    assert all(c.description and "\n" not in c.description for c in CASES)
