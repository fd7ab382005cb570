"""Merge methods against independent numpy implementations of their formulas, on random trees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import adamerging_jax as am
from adamerging_jax.core.trees import leaf_paths


def random_tree(rng, k, shapes=((3, 4), (4,), (2, 3, 2))):
    names = ["dense/kernel", "dense/bias", "block/w"]
    pre = {n.split("/")[0]: {} for n in names}
    finetuned = [{n.split("/")[0]: {} for n in names} for _ in range(k)]
    for name, shape in zip(names, shapes):
        outer, inner = name.split("/")
        base = rng.normal(size=shape).astype(np.float32)
        pre[outer][inner] = jnp.asarray(base)
        for t in range(k):
            finetuned[t][outer][inner] = jnp.asarray(base + rng.normal(size=shape).astype(np.float32))
    return pre, finetuned


def flat(tree):
    """Concatenate the leaves in flattening order (numpy)."""
    return np.concatenate([np.asarray(leaf).reshape(-1) for leaf in jax.tree_util.tree_leaves(tree)])


def flat_tasks(stacked, k):
    return np.concatenate([np.asarray(leaf).reshape(k, -1) for leaf in jax.tree_util.tree_leaves(stacked)], axis=1)


def numpy_trim(rows, density, total_size=None):
    """The official code's trim of each row of [R, D] on its own: |x| below the (ref − ⌊ref · density⌋)-th
    smallest magnitude of the row (padded with zeros to ``total_size`` entries) set to 0."""
    r, d = rows.shape
    ref = d if total_size is None else total_size
    padded = np.concatenate([rows, np.zeros((r, ref - d), rows.dtype)], axis=1)
    keep = int(ref * density)
    kth = ref - keep  # torch.kthvalue(k-th smallest), 1-indexed
    trimmed = padded.copy()
    for row in range(r):
        if kth >= 1:
            threshold = np.sort(np.abs(padded[row]))[kth - 1]
            trimmed[row][np.abs(padded[row]) < threshold] = 0
    return trimmed[:, :d]


def numpy_ties(taus, density, reduce, total_size=None):
    """TIES as the official code writes it, on a [K, D] matrix of flattened task vectors."""
    trimmed = numpy_trim(taus, density, total_size)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    selected = np.where(np.where(sign > 0, trimmed > 0, trimmed < 0), trimmed, 0)
    if reduce == "sum":
        return selected, selected.sum(0)
    return selected, selected.sum(0) / np.maximum((selected != 0).sum(0), 1)


@settings(max_examples=15, deadline=None)
@given(k=st.integers(1, 4), seed=st.integers(0, 10_000), scale=st.floats(-1.0, 2.0))
def test_task_arithmetic_and_weight_average_match_numpy(k, seed, scale):
    pre, finetuned = random_tree(np.random.default_rng(seed), k)
    tv = am.task_vectors(pre, finetuned)
    theta0 = flat(pre)
    thetas = np.stack([flat(f) for f in finetuned])
    np.testing.assert_allclose(flat(am.task_arithmetic(pre, tv, scale)), theta0 + scale * (thetas - theta0).sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flat(am.weight_average(pre, tv)), thetas.mean(0), rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    k=st.integers(1, 4),
    seed=st.integers(0, 10_000),
    density=st.sampled_from([0.05, 0.2, 0.5, 0.9, 1.0]),
    reduce=st.sampled_from(["mean", "sum"]),
    pad=st.sampled_from([0, 7]),
)
def test_ties_matches_numpy_official_formula(k, seed, density, reduce, pad):
    pre, finetuned = random_tree(np.random.default_rng(seed), k)
    tv = am.task_vectors(pre, finetuned)
    d = flat(pre).size
    total = d + pad if pad else None
    selected_np, merged_np = numpy_ties(flat_tasks(tv, k), density, reduce, total)
    np.testing.assert_array_equal(flat_tasks(am.ties_task_vectors(tv, density, total_size=total), k), selected_np)
    merged = am.ties_merging(pre, tv, density, reduce=reduce, scale=0.7, total_size=total)
    np.testing.assert_allclose(flat(merged), flat(pre) + 0.7 * merged_np, rtol=1e-5, atol=1e-6)


def test_trim_is_global_over_the_model_not_per_leaf():
    # One leaf holds all the large entries: a global top-50% keeps that leaf whole and, with the official
    # code's off-by-one (entries ≥ the (D − k)-th smallest magnitude: k + 1 of them), the largest other one.
    tv = {"big": jnp.array([[10.0, -9.0, 8.0, 7.0]]), "small": jnp.array([[0.1, -0.2, 0.3, 0.4]])}
    global_trim = am.trim(tv, 0.5, scope="model")
    np.testing.assert_array_equal(global_trim["big"], tv["big"])
    np.testing.assert_array_equal(global_trim["small"], np.float32([[0.0, 0.0, 0.0, 0.4]]))
    per_leaf = am.trim(tv, 0.5, scope="leaf")
    # Per leaf, ⌊0.5·4⌋ = 2 kept plus the official off-by-one: entries ≥ the 2nd smallest magnitude.
    np.testing.assert_array_equal(per_leaf["small"], np.float32([[0.0, -0.2, 0.3, 0.4]]))


STACKED_VIEW = am.MatrixView(lambda path: None, lambda path: path == "block/w")
"""random_tree's "block/w" [2, 3, 2] as a leaf stacking 2 layers of [3, 2]."""


def numpy_per_tensor_trim(stacked, k, density, layered):
    """[K, D] (`flat_tasks` order): each task's each checkpoint tensor trimmed on its own (`numpy_trim`), a leaf
    with a layer axis (``layered[i]``) as one tensor per layer."""
    parts = []
    for leaf, has_layers in zip(jax.tree_util.tree_leaves(stacked), layered):
        leaf = np.asarray(leaf)
        layers = leaf.shape[1] if has_layers else 1
        rows = leaf.reshape(k * layers, -1)  # row k·L + l: task k's layer l
        parts.append(numpy_trim(rows, density).reshape(k, -1))
    return np.concatenate(parts, axis=1)


@settings(max_examples=15, deadline=None)
@given(
    k=st.integers(1, 4),
    seed=st.integers(0, 10_000),
    density=st.sampled_from([0.1, 0.2, 0.5, 0.9, 1.0]),
    reduce=st.sampled_from(["mean", "sum"]),
)
def test_per_tensor_ties_trims_each_layer_of_a_stacked_leaf_on_its_own(k, seed, density, reduce):
    """scope "leaf": each task's top-k per checkpoint tensor, a stacked leaf's layers each one tensor (written
    out in numpy), then TIES's elected sign and disjoint merge over the whole model."""
    pre, finetuned = random_tree(np.random.default_rng(seed), k)
    tv = am.task_vectors(pre, finetuned)
    layered = [path == "block/w" for path in leaf_paths(tv)]
    trimmed = numpy_per_tensor_trim(tv, k, density, layered)
    selected_np, merged_np = numpy_ties(trimmed, 1.0, reduce)  # density 1: trimmed already, sign and merge only
    np.testing.assert_array_equal(flat_tasks(am.trim(tv, density, "leaf", view=STACKED_VIEW), k), trimmed)
    np.testing.assert_array_equal(flat_tasks(am.ties_task_vectors(tv, density, "leaf", view=STACKED_VIEW), k),
                                  selected_np)
    expected = flat(pre) + 0.7 * merged_np
    merged = am.ties_merging(pre, tv, density, reduce, 0.7, "leaf", view=STACKED_VIEW)
    np.testing.assert_allclose(flat(merged), expected, rtol=1e-5, atol=1e-6)
    spec = am.method_spec("ties", density=density, reduce=reduce, scale=0.7, scope="leaf")
    np.testing.assert_allclose(flat(spec.build(pre, tv, view=STACKED_VIEW).params), expected, rtol=1e-5, atol=1e-6)
    # without a view no leaf stacks layers: "block/w" is one tensor
    unstacked = numpy_per_tensor_trim(tv, k, density, [False] * len(layered))
    np.testing.assert_array_equal(flat_tasks(am.trim(tv, density, "leaf"), k), unstacked)


def test_leaf_scope_trims_a_stacked_leaf_layer_by_layer_not_as_one_tensor():
    # Layer 0 holds all the large entries: trimmed as one tensor of 8 entries, layer 1 keeps only its largest.
    tv = {"block": {"w": jnp.array([[[10.0, -9.0, 8.0, 7.0], [0.1, -0.2, 0.3, 0.4]]])}}  # K = 1, L = 2
    per_layer = am.trim(tv, 0.5, scope="leaf", view=STACKED_VIEW)["block"]["w"]
    # Per layer, ⌊0.5·4⌋ = 2 kept plus the official off-by-one: entries ≥ the layer's 2nd smallest magnitude.
    np.testing.assert_array_equal(per_layer, np.float32([[[10.0, -9.0, 8.0, 0.0], [0.0, -0.2, 0.3, 0.4]]]))
    one_tensor = am.trim(tv, 0.5, scope="leaf")["block"]["w"]
    np.testing.assert_array_equal(one_tensor, np.float32([[[10.0, -9.0, 8.0, 7.0], [0.0, 0.0, 0.0, 0.4]]]))


def test_elected_sign_zero_goes_to_the_majority():
    # Entry 0: +1 −1 sums to 0 → majority sign; the model's elected signs are mostly negative.
    tv = {"w": jnp.array([[1.0, -3.0, -2.0, -1.0], [-1.0, -1.0, -1.0, 2.0]])}
    signs = am.elect_sign(tv, "sum")["w"]
    np.testing.assert_array_equal(signs, [-1.0, -1.0, -1.0, 1.0])
    merged = am.disjoint_reduce(am.keep_agreeing(tv, am.elect_sign(tv)), "mean")["w"]
    np.testing.assert_allclose(merged, [-1.0, -2.0, -1.5, 2.0])


def test_sign_by_count_differs_from_sign_by_sum():
    tv = {"w": jnp.array([[5.0], [-1.0], [-1.0]])}
    assert float(am.elect_sign(tv, "sum")["w"][0]) == 1.0
    assert float(am.elect_sign(tv, "count")["w"][0]) == -1.0


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9])
def test_dare_drops_at_rate_p_and_rescales_survivors(p):
    rng = np.random.default_rng(0)
    tau = {"w": jnp.asarray(rng.normal(size=(2, 200, 50)).astype(np.float32) + 5.0)}  # no exact zeros
    dropped = np.asarray(am.dare(tau, p, seed=3)["w"])
    kept = dropped != 0
    assert abs(1.0 - kept.mean() - p) < 0.02
    np.testing.assert_allclose(dropped[kept], np.asarray(tau["w"])[kept] / (1.0 - p), rtol=1e-6)
    np.testing.assert_array_equal(dropped, np.asarray(am.dare(tau, p, seed=3)["w"]))
    if p > 0:
        assert not np.array_equal(dropped, np.asarray(am.dare(tau, p, seed=4)["w"]))
    # In expectation DARE preserves the task vector: the mean survives the drop-and-rescale.
    assert abs(dropped.mean() - float(tau["w"].mean())) < 0.15


def test_dare_task_arithmetic_is_task_arithmetic_on_dropped_vectors():
    pre, finetuned = random_tree(np.random.default_rng(1), 3)
    tv = am.task_vectors(pre, finetuned)
    expected = flat(pre) + 0.3 * flat_tasks(am.dare(tv, 0.5, 7), 3).sum(0)
    np.testing.assert_allclose(flat(am.dare_task_arithmetic(pre, tv, p=0.5, seed=7)), expected, rtol=1e-5, atol=1e-5)


def test_bad_method_arguments_are_rejected():
    tv = {"w": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match="density"):
        am.trim(tv, 0.0)
    with pytest.raises(ValueError, match="scope"):
        am.trim(tv, 0.5, scope="block")
    with pytest.raises(ValueError, match="drop rate"):
        am.dare(tv, 1.0)
    with pytest.raises(ValueError, match="reduce"):
        am.disjoint_reduce(tv, "max")
