"""float64 honoured: with x64 on and float64 inputs, λ is float64 and the merge, the data-free methods and the
transforms compute in float64, matching float64 numpy to 1e-12 (float32 arithmetic would be ~1e-8 off, and
would flip TIES signs whose task sum cancels below float32 resolution).

x64 is switched on per test by the `x64` fixture and restored afterwards, so other test files are unaffected.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adamerging_jax as am
from test_core_merge import STACKED, named, numpy_merge
from test_core_merge import tree as float32_tree
from test_core_methods import flat, flat_tasks, numpy_ties

TOL = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(autouse=True)
def x64():
    before = jax.config.jax_enable_x64
    with jax.enable_x64(True):
        yield
    assert jax.config.jax_enable_x64 == before


def f64(tree):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)


def problem(k=3, seed=0):
    """θ0 ≈ 1 and τ ≈ 1e-3 with float64 detail below float32 resolution (2^-24 relative) in every entry."""
    rng = np.random.default_rng(seed)
    shapes = {"dense": {"kernel": (3, 4), "bias": (4,)}, "block": {"w": (2, 3, 2)}}
    make = lambda scale, offset: jax.tree_util.tree_map(  # noqa: E731
        lambda s: jnp.asarray(offset + rng.normal(0, scale, s) + rng.normal(0, 1e-11, s), jnp.float64),
        shapes, is_leaf=lambda s: isinstance(s, tuple),
    )
    pre = make(0.1, 1.0)
    finetuned = [jax.tree_util.tree_map(lambda p, d: p + d, pre, make(1e-3, 0.0)) for _ in range(k)]
    return pre, finetuned


def assert_float64_close(got, expected):
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, **TOL)


def test_init_coefficients_dtype_follows_the_parameters():
    pre = f64(float32_tree(0))
    for granularity in ("task", "layer"):
        values = am.init_coefficients(pre, 2, granularity, stacked=STACKED).values
        assert {v.dtype for v in values.values()} == {jnp.dtype(jnp.float64)}, granularity
    assert am.init_coefficients(float32_tree(0), 2).values["embed/bias"].dtype == jnp.float32
    bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), float32_tree(0))
    assert am.init_coefficients(bf16, 2, "task").values["*"].dtype == jnp.float32
    numpy64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), float32_tree(0))
    with jax.enable_x64(False):  # float64 numpy arrays without x64: jax has no float64, λ stays float32
        assert am.init_coefficients(numpy64, 2, "task").values["*"].dtype == jnp.float32


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_merge_in_float64_matches_numpy(granularity):
    pre, finetuned = f64(float32_tree(0)), [f64(float32_tree(s)) for s in (1, 2, 3)]
    tv = am.task_vectors(pre, finetuned)
    lam = am.init_coefficients(pre, 3, granularity, stacked=STACKED)
    rng = np.random.default_rng(1)
    lam = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.uniform(-0.5, 1.5, v.shape) + 1e-10, jnp.float64), lam)
    merged = named(am.merge(pre, tv, lam))
    expected = numpy_merge(pre, finetuned, lam.per_leaf())
    for name in expected:
        assert_float64_close(merged[name], expected[name])
    grads = jax.grad(lambda c: sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(am.merge(pre, tv, c))))(lam)
    assert {g.dtype for g in grads.values.values()} == {jnp.dtype(jnp.float64)}


def test_task_arithmetic_and_weight_average_in_float64():
    pre, finetuned = problem()
    tv = am.task_vectors(pre, finetuned)
    theta0, thetas = flat(pre), np.stack([flat(f) for f in finetuned])
    assert_float64_close(flat(am.task_arithmetic(pre, tv, 0.3)), theta0 + 0.3 * (thetas - theta0).sum(0))
    assert_float64_close(flat(am.weight_average(pre, tv)), theta0 + (thetas - theta0).mean(0))


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_ties_in_float64_matches_numpy(density, reduce):
    pre, finetuned = problem(k=4, seed=int(density * 10))
    tv = am.task_vectors(pre, finetuned)
    selected, merged = numpy_ties(flat_tasks(tv, 4), density, reduce)
    got = flat_tasks(am.ties_task_vectors(tv, density), 4)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, selected)
    assert_float64_close(flat(am.ties_merging(pre, tv, density, reduce=reduce, scale=0.7)), flat(pre) + 0.7 * merged)


def test_ties_sign_of_a_sum_that_cancels_below_float32_resolution():
    # Entry 0: 1 + 2^-30 and −1 sum to +2^-30 in float64 (0 in float32, which would give it the majority
    # sign, −, from entries 1 and 2): TIES keeps task 0's value there, not task 1's.
    tiny = 2.0**-30
    tv = {"w": jnp.asarray([[1.0 + tiny, -2.0, -3.0], [-1.0, -1.0, -1.0]], jnp.float64)}
    pre = {"w": jnp.zeros(3, jnp.float64)}
    signs = am.elect_sign(tv)["w"]
    np.testing.assert_array_equal(signs, [1.0, -1.0, -1.0])
    selected, merged = numpy_ties(np.asarray(tv["w"]), 1.0, "mean")
    assert selected[0, 0] == 1.0 + tiny and selected[1, 0] == 0.0
    assert_float64_close(flat(am.ties_merging(pre, tv, 1.0, reduce="mean", scale=1.0)), merged)
    assert_float64_close(np.asarray(am.disjoint_reduce(tv, "sum")["w"]), np.asarray(tv["w"]).sum(0))


def test_dare_in_float64_rescales_survivors_exactly():
    pre, finetuned = problem(k=2)
    tv = am.task_vectors(pre, finetuned)
    p = 0.7
    dropped = am.dare(tv, p, seed=5)
    tau, out = flat_tasks(tv, 2), flat_tasks(dropped, 2)
    assert out.dtype == np.float64
    kept = out != 0
    assert 0 < kept.sum() < kept.size
    assert_float64_close(out[kept], tau[kept] / (1 - p))
    expected = flat(pre) + 0.3 * out.sum(0)
    assert_float64_close(flat(am.dare_task_arithmetic(pre, tv, p=p, seed=5)), expected)
