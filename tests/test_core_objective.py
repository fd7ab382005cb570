"""The entropy objective: values against numpy, and its λ-gradient against central finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adamerging_jax as am
from tiny_problem import features, make_problem


def numpy_entropy(logits, eps=None):
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return -(p * np.log(p if eps is None else p + eps)).sum(-1)


@pytest.mark.parametrize("eps", [None, 1e-8])
def test_entropy_matches_numpy(eps):
    logits = np.random.default_rng(0).normal(0, 5, (7, 11))
    np.testing.assert_allclose(am.entropy(jnp.asarray(logits, jnp.float32), eps), numpy_entropy(logits, eps), rtol=1e-5, atol=1e-6)


def test_entropy_is_stable_for_huge_logits_and_bounded_by_log_classes():
    logits = jnp.array([[1e4, 0.0, -1e4], [0.0, 0.0, 0.0]])
    h = np.asarray(am.entropy(logits))
    assert np.all(np.isfinite(h))
    np.testing.assert_allclose(h, [0.0, np.log(3)], atol=1e-6)
    assert am.entropy(logits.astype(jnp.bfloat16)).dtype == jnp.float32


def test_objective_is_summed_over_tasks_and_counts_batches():
    problem = make_problem()
    batches = [x[:8] for x, _ in problem.test]
    total, per_task = am.entropy_objective(problem.apply, problem.pretrained, batches, batches_per_task=2)
    expected = [2 * numpy_entropy(np.asarray(problem.apply(problem.pretrained, b, t), np.float64)).mean() for t, b in enumerate(batches)]
    np.testing.assert_allclose(per_task, expected, rtol=1e-5)
    np.testing.assert_allclose(total, sum(expected), rtol=1e-5)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_lambda_gradient_matches_central_finite_differences_in_float64(granularity):
    problem = make_problem()
    with jax.enable_x64(True):
        to64 = lambda tree: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)  # noqa: E731
        pre = to64(problem.pretrained)
        tv = am.task_vectors(pre, [to64(f) for f in problem.finetuned])
        batches = [jnp.asarray(x[:16], jnp.float64) for x, _ in problem.test]
        heads = jnp.asarray(problem.heads, jnp.float64)
        apply = lambda p, x, t: features(p, x) @ heads[t]  # noqa: E731
        lam = am.init_coefficients(pre, len(problem.finetuned), granularity)
        rng = np.random.default_rng(0)
        lam = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.uniform(0.1, 0.9, v.shape), jnp.float64), lam)

        def loss(c):
            return am.entropy_objective(apply, am.merge(pre, tv, c), batches)[0]

        grad = jax.grad(loss)(lam)
        h = 1e-6
        for group, value in lam.values.items():
            for index in np.ndindex(value.shape):
                bump = lambda d: {**lam.values, group: value.at[index].add(d)}  # noqa: E731
                plus = am.Coefficients(bump(h), lam.leaf_groups)
                minus = am.Coefficients(bump(-h), lam.leaf_groups)
                numeric = (float(loss(plus)) - float(loss(minus))) / (2 * h)
                np.testing.assert_allclose(float(grad.values[group][index]), numeric, rtol=1e-5, atol=1e-8, err_msg=f"{group}{index}")



def test_shared_backbone_objective_equals_separate_task_forwards():
    problem = make_problem()
    batches = [x[8 * t : 8 * t + 8 + 4 * t] for t, (x, _) in enumerate(problem.test)]  # unequal batch sizes
    shared = am.SharedBackbone(features, lambda f, t: f @ problem.heads[t])
    total, per_task = am.entropy_objective(shared, problem.pretrained, batches, batches_per_task=2)
    separate_total, separate = am.entropy_objective(problem.apply, problem.pretrained, batches, batches_per_task=2)
    np.testing.assert_allclose(per_task, separate, rtol=1e-6)
    np.testing.assert_allclose(total, separate_total, rtol=1e-6)
    grad = lambda fn: jax.grad(lambda p: am.entropy_objective(fn, p, batches)[0])(problem.pretrained)  # noqa: E731
    for a, b in zip(jax.tree_util.tree_leaves(grad(shared)), jax.tree_util.tree_leaves(grad(problem.apply))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
