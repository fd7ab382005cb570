"""The merge θ0 + Σ λ τ, coefficients' granularity, clamping, and the errors on bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adamerging_jax as am
from adamerging_jax.core.task_vectors import check_stacked


def tree(seed, stacked_layers=3):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))  # noqa: E731
    return {"embed": {"kernel": f(4, 5), "bias": f(5)}, "layers": {"w": f(stacked_layers, 5, 5), "b": f(stacked_layers, 5)}}


STACKED = lambda path: path.startswith("layers/")  # noqa: E731


def numpy_merge(pre, finetuned, lam_per_leaf):
    out = {}
    for (path, theta0), *thetas in zip(
        jax.tree_util.tree_flatten_with_path(pre)[0], *[jax.tree_util.tree_leaves(f) for f in finetuned]
    ):
        name = am.path_str(path)
        lam = np.asarray(lam_per_leaf[name])
        tau = np.stack([np.asarray(t) - np.asarray(theta0) for t in thetas])
        lam = lam.reshape(lam.shape + (1,) * (tau.ndim - lam.ndim))
        out[name] = np.asarray(theta0) + (lam * tau).sum(0)
    return out


def named(tree_):
    return {am.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree_)[0]}


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_merge_matches_numpy(granularity):
    pre, finetuned = tree(0), [tree(s) for s in (1, 2, 3)]
    tv = am.task_vectors(pre, finetuned)
    lam = am.init_coefficients(pre, 3, granularity, stacked=STACKED)
    rng = np.random.default_rng(9)
    lam = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.uniform(-0.5, 1.5, v.shape), jnp.float32), lam)
    merged = named(am.merge(pre, tv, lam))
    expected = numpy_merge(pre, finetuned, lam.per_leaf())
    for name in expected:
        np.testing.assert_allclose(merged[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_coefficient_counts_per_granularity():
    pre = tree(0, stacked_layers=3)
    assert {k: v.shape for k, v in am.init_coefficients(pre, 2, "task").values.items()} == {"*": (2,)}
    layer = am.init_coefficients(pre, 2, "layer", stacked=STACKED)
    assert {k: v.shape for k, v in layer.values.items()} == {
        "embed/bias": (2,), "embed/kernel": (2,), "layers/b": (2, 3), "layers/w": (2, 3)
    }
    # Unstacked, a stacked leaf shares one λ over its layers.
    assert am.init_coefficients(pre, 2, "layer").values["layers/w"].shape == (2,)
    grouped = am.init_coefficients(pre, 2, lambda path: path.split("/")[0], stacked=STACKED)
    assert {k: v.shape for k, v in grouped.values.items()} == {"embed": (2,), "layers": (2, 3)}
    np.testing.assert_allclose(grouped.values["layers"], 0.3)
    custom = am.init_coefficients(pre, 2, "task", value=np.array([0.5, 0.25]))
    np.testing.assert_allclose(custom.values["*"], [0.5, 0.25])


def test_lambda_zero_is_pretrained_and_single_task_lambda_one_is_finetuned():
    pre, ft = tree(0), tree(1)
    tv = am.task_vectors(pre, [ft])
    zero = am.init_coefficients(pre, 1, "layer", value=0.0, stacked=STACKED)
    one = am.init_coefficients(pre, 1, "layer", value=1.0, stacked=STACKED)
    for got, want in [(am.merge(pre, tv, zero), pre), (am.merge(pre, tv, one), ft)]:
        for (name, a), (_, b) in zip(named(got).items(), named(want).items()):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)


def test_clamp_clips_lambda_and_zeroes_its_gradient_outside():
    pre, finetuned = tree(0), [tree(1), tree(2)]
    tv = am.task_vectors(pre, finetuned)
    lam = am.init_coefficients(pre, 2, "task", value=np.array([1.7, -0.4]))
    clipped = am.init_coefficients(pre, 2, "task", value=np.array([1.0, 0.0]))
    for a, b in zip(jax.tree_util.tree_leaves(am.merge(pre, tv, lam, clamp=(0.0, 1.0))), jax.tree_util.tree_leaves(am.merge(pre, tv, clipped))):
        np.testing.assert_allclose(a, b, rtol=1e-6)

    def total(c, clamp):
        return sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(am.merge(pre, tv, c, clamp=clamp)))

    grad_clamped = jax.grad(total)(lam, (0.0, 1.0)).values["*"]
    np.testing.assert_array_equal(grad_clamped, [0.0, 0.0])
    inside = am.init_coefficients(pre, 2, "task", value=np.array([0.5, 0.2]))
    assert np.all(np.asarray(jax.grad(total)(inside, (0.0, 1.0)).values["*"]) != 0)
    assert np.all(np.asarray(jax.grad(total)(lam, None).values["*"]) != 0)


def test_bfloat16_storage_merges_in_float32():
    pre, finetuned = tree(0), [tree(1), tree(2)]
    tv16 = am.task_vectors(pre, finetuned, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(tv16))
    lam = am.init_coefficients(pre, 2, "task")
    merged = am.merge(pre, tv16, lam)
    exact = am.merge(pre, am.task_vectors(pre, finetuned), lam)
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(exact)):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, atol=0.02)


# ---- bad input: clear errors naming the leaf -------------------------------------------------------------


def test_no_finetuned_models():
    with pytest.raises(ValueError, match="K = 0"):
        am.task_vectors(tree(0), [])


def test_mismatched_structure_names_the_leaf():
    ft = tree(1)
    del ft["embed"]["bias"]
    with pytest.raises(ValueError, match="fine-tuned model 0.*embed/bias"):
        am.task_vectors(tree(0), [ft])


def test_mismatched_shape_and_dtype_name_the_leaf():
    ft = tree(1)
    ft["layers"]["w"] = jnp.zeros((3, 5, 4))
    with pytest.raises(ValueError, match="'layers/w'.*shape"):
        am.task_vectors(tree(0), [tree(2), ft])
    ft = tree(1)
    ft["embed"]["kernel"] = ft["embed"]["kernel"].astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="'embed/kernel'.*dtype"):
        am.task_vectors(tree(0), [ft])


def test_nan_in_task_vector_names_leaf_and_task():
    ft = tree(1)
    ft["layers"]["b"] = ft["layers"]["b"].at[1, 2].set(jnp.nan)
    with pytest.raises(ValueError, match="task 1.*'layers/b'"):
        am.task_vectors(tree(0), [tree(2), ft])


def test_integer_leaf_is_rejected():
    pre = {"w": jnp.ones(3), "step": jnp.array(3)}
    with pytest.raises(ValueError, match="'step'.*non-float"):
        am.task_vectors(pre, [pre])


def test_coefficients_for_another_tree():
    pre, other = tree(0), {"x": jnp.ones(3)}
    tv = am.task_vectors(pre, [tree(1), tree(2)])
    with pytest.raises(ValueError, match="another tree"):
        am.merge(pre, tv, am.init_coefficients(other, 2, "layer"))
    with pytest.raises(ValueError, match="K = 3"):
        am.merge(pre, tv, am.init_coefficients(pre, 3, "layer"))
    with pytest.raises(ValueError, match="num_tasks"):
        am.init_coefficients(pre, 0)


# ---- the stacking contract: every τ leaf is [K, *θ0_leaf.shape], one K for the tree ------------------------


def _misstacked(kind):
    """(θ0, τ) pairs that a leading-axis check alone lets through, and that would broadcast into a wrong θ."""
    pre = {"a": jnp.ones((2, 3)), "b": jnp.ones(3)}
    if kind == "trailing_axis":  # τ_a [K, 1, 3] for θ0_a [2, 3] broadcasts to [2, 3]
        return pre, {"a": jnp.ones((2, 1, 3)), "b": jnp.ones((2, 3))}
    if kind == "unstacked":  # one fine-tuned tree passed as τ: its leading axes happen to be K = 2
        return pre, {"a": jnp.ones((2, 3)), "b": jnp.ones(2)}
    return pre, {"a": jnp.ones((2, 2, 3)), "b": jnp.ones((3, 3))}  # K = 2 and K = 3


MISSTACKED = {
    "trailing_axis": r"'a': task vectors have shape \(2, 1, 3\), expected .* = \(2, 2, 3\)",
    "unstacked": r"'a': task vectors have shape \(2, 3\), expected .* = \(2, 2, 3\)",
    "two_k": r"'b' of the task vectors has leading axis 3 .* K = 2",
}
CALLERS = {
    "merge": lambda pre, tv: am.merge(pre, tv, am.init_coefficients(pre, 2, "task")),
    "task_arithmetic": am.task_arithmetic,
    "weight_average": am.weight_average,
    "ties_merging": am.ties_merging,
    "dare_task_arithmetic": am.dare_task_arithmetic,
}


@pytest.mark.parametrize("kind", list(MISSTACKED))
@pytest.mark.parametrize("caller", list(CALLERS))
def test_every_merge_refuses_task_vectors_not_stacked_for_the_pretrained_tree(caller, kind):
    pre, tv = _misstacked(kind)
    with pytest.raises(ValueError, match=MISSTACKED[kind]):
        CALLERS[caller](pre, tv)


def test_check_stacked_returns_k_and_the_transforms_check_one_k():
    pre = tree(0)
    assert check_stacked(pre, am.task_vectors(pre, [tree(1), tree(2), tree(3)])) == 3
    _, two_k = _misstacked("two_k")
    for transform in (lambda tv: am.trim(tv, 0.5), am.elect_sign, am.disjoint_reduce, lambda tv: am.dare(tv, 0.5), am.ties_task_vectors):
        with pytest.raises(ValueError, match=MISSTACKED["two_k"]):
            transform(two_k)
