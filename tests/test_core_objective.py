"""The entropy objective: values against numpy, and its λ-gradient against central finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adamerging_jax as am
from adamerging_jax.core.objective import Predictions, task_entropy
from tiny_problem import features


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


def test_objective_is_summed_over_tasks_and_counts_batches(problem):
    batches = [x[:8] for x, _ in problem.test]
    total, per_task = am.entropy_objective(problem.apply, problem.pretrained, batches, batches_per_task=2)
    expected = [2 * numpy_entropy(np.asarray(problem.apply(problem.pretrained, b, t), np.float64)).mean() for t, b in enumerate(batches)]
    np.testing.assert_allclose(per_task, expected, rtol=1e-5)
    np.testing.assert_allclose(total, sum(expected), rtol=1e-5)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_lambda_gradient_matches_central_finite_differences_in_float64(granularity, problem):
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



def test_shared_backbone_objective_equals_separate_task_forwards(problem):
    batches = [x[8 * t : 8 * t + 8 + 4 * t] for t, (x, _) in enumerate(problem.test)]  # unequal batch sizes
    shared = am.SharedBackbone(features, lambda f, t: f @ problem.heads[t])
    total, per_task = am.entropy_objective(shared, problem.pretrained, batches, batches_per_task=2)
    separate_total, separate = am.entropy_objective(problem.apply, problem.pretrained, batches, batches_per_task=2)
    np.testing.assert_allclose(per_task, separate, rtol=1e-6)
    np.testing.assert_allclose(total, separate_total, rtol=1e-6)
    grad = lambda fn: jax.grad(lambda p: am.entropy_objective(fn, p, batches)[0])(problem.pretrained)  # noqa: E731
    for a, b in zip(jax.tree_util.tree_leaves(grad(shared)), jax.tree_util.tree_leaves(grad(problem.apply))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ---- per-prediction weights (sequence models) and the apply_fn contract ----------------------------------


def numpy_weighted_entropy(logits, weights, eps=None):
    """Σ_i w_i H(p_i) / Σ_i w_i over every prediction i, in float64."""
    h = numpy_entropy(np.asarray(logits, np.float64), eps)
    w = np.asarray(weights, np.float64)
    return (w * h).sum() / w.sum()


@pytest.mark.parametrize("eps", [None, 1e-8])
@pytest.mark.parametrize("kind", ["mask", "real"])
def test_weighted_task_entropy_matches_numpy(eps, kind):
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (6, 5, 7)).astype(np.float32)  # N = 6 sequences, T = 5 positions, C = 7
    if kind == "mask":  # right padding: sequence i has 5 − i % 4 real positions
        weights = (np.arange(5)[None, :] < (5 - np.arange(6) % 4)[:, None]).astype(np.int32)
    else:
        weights = rng.uniform(0, 2, (6, 5)).astype(np.float32)
    apply = lambda params, x, t: Predictions(jnp.asarray(logits), jnp.asarray(weights))  # noqa: E731
    got = task_entropy(apply, {}, np.zeros((6, 3)), 0, eps, batches_per_task=2)
    np.testing.assert_allclose(float(got), 2 * numpy_weighted_entropy(logits, weights, eps), rtol=1e-6)


def test_unit_weights_give_the_unweighted_mean_and_plain_logits_are_unchanged():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(0, 3, (8, 5)), jnp.float32)
    plain = task_entropy(lambda p, x, t: logits, {}, np.zeros((8, 1)), 0, batches_per_task=2)
    assert np.asarray(plain) == np.asarray(2 * jnp.mean(am.entropy(logits)))  # bit for bit the former formula
    ones = task_entropy(lambda p, x, t: Predictions(logits, jnp.ones(8)), {}, np.zeros((8, 1)), 0, batches_per_task=2)
    np.testing.assert_allclose(float(ones), float(plain), rtol=1e-6)
    seq = jnp.asarray(rng.normal(0, 3, (4, 3, 5)), jnp.float32)
    ones_seq = task_entropy(lambda p, x, t: Predictions(seq, jnp.ones((4, 3))), {}, np.zeros((4, 2)), 0)
    np.testing.assert_allclose(float(ones_seq), numpy_entropy(np.asarray(seq, np.float64)).mean(), rtol=1e-6)


def test_masked_predictions_neither_count_nor_receive_gradient_under_jit():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(4, 3, 6)), jnp.float32)  # [N, T, features]
    mask = jnp.asarray([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]])

    def apply(params, inputs, t):
        return Predictions(inputs @ params["w"], mask)

    loss = jax.jit(lambda p, xs: am.entropy_objective(apply, p, [xs])[0])
    params = {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
    noisy = x.at[1, 2].set(100.0).at[2, 1:].set(-50.0)  # change only masked positions
    np.testing.assert_array_equal(np.asarray(loss(params, x)), np.asarray(loss(params, noisy)))
    grads = [jax.grad(loss)(params, xs)["w"] for xs in (x, noisy)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6, atol=1e-7)
    assert np.all(np.isfinite(grads[0])) and np.any(np.asarray(grads[0]) != 0)
    empty = task_entropy(lambda p, xs, t: Predictions(xs @ p["w"], jnp.zeros((4, 3))), params, x, 0)
    assert float(empty) == 0.0
    zero_grad = jax.grad(lambda p: task_entropy(lambda q, xs, t: Predictions(xs @ q["w"], jnp.zeros((4, 3))), p, x, 0))(params)
    np.testing.assert_array_equal(zero_grad["w"], 0.0)


def test_shared_backbone_with_weighted_heads_equals_separate_forwards(problem):
    batches = [x[:6 + t] for t, (x, _) in enumerate(problem.test)]
    weights = [jnp.asarray(np.random.default_rng(t).uniform(0, 1, 6 + t), jnp.float32) for t in range(len(batches))]
    head = lambda f, t: Predictions(f @ problem.heads[t], weights[t])  # noqa: E731
    separate = lambda p, x, t: head(features(p, x), t)  # noqa: E731
    _, shared = am.entropy_objective(am.SharedBackbone(features, head), problem.pretrained, batches)
    _, alone = am.entropy_objective(separate, problem.pretrained, batches)
    np.testing.assert_allclose(shared, alone, rtol=1e-6)
    expected = [
        numpy_weighted_entropy(np.asarray(problem.apply(problem.pretrained, b, t)), weights[t]) for t, b in enumerate(batches)
    ]
    np.testing.assert_allclose(shared, expected, rtol=1e-5)
