"""WUDI, MagMax, Model Stock and SLERP against FusionBench 0.2.33 (tests/fixtures/methods/, made by
scripts/make_method_fixtures.py) in float64 on the tiny CLIP image tower, WUDI's Adam path against its exact
minimiser, and their refusals."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_fixtures as fixtures
from adamerging_jax.core import slerp as core_slerp
from adamerging_jax.core import wudi as core_wudi
from adamerging_jax.core.matrix_view import to_matrices
from adamerging_jax.core.model_stock import model_stock
from adamerging_jax.core.registry import method_spec
from adamerging_jax.core.trees import named_leaves

BOUND = 1e-10
WUDI_FIXTURE_ITERATIONS = 20  # scripts/make_method_fixtures.py's WUDI_ITERATIONS


def first_two(task_vectors):
    return jax.tree_util.tree_map(lambda leaf: leaf[:2], task_vectors)


def build(name: str, pretrained, task_vectors, **values):
    return method_spec(name, **values).build(pretrained, task_vectors, view=fixtures.VIEW).params


def assert_matches(name: str, merged, key: str = "merged") -> float:
    difference = fixtures.max_difference(merged, fixtures.merged(name, key))
    print(f"{name} {key}: max |ours − FusionBench| = {difference:.3g}")
    assert difference <= BOUND
    return difference


def test_wudi_equals_the_reference_at_the_same_iteration_count(x64):
    pretrained, task_vectors, _ = fixtures.models()
    assert_matches("wudi", build("wudi", pretrained, task_vectors, iterations=WUDI_FIXTURE_ITERATIONS))
    # the Adam steps moved the matrices away from their start Σ_k τ_k (which the other leaves do not have)
    start = jax.tree_util.tree_map(lambda p, t: p + jnp.sum(t, axis=0), pretrained, task_vectors)
    assert fixtures.max_difference(start, fixtures.merged("wudi")) > 1e-6


def test_wudi_defaults_are_the_reference_defaults():
    reference = fixtures.read("wudi")
    defaults = method_spec("wudi").params
    assert defaults["iterations"] == int(reference["default/iter_num"])
    assert defaults["lr"] == float(reference["default/lr"])
    assert defaults["solver"] == "adam"


def _matrices(tree, pretrained=None):
    """{path: [L', (K,) out, in]} of the view's matrices (of tree − pretrained when given, unstacked)."""
    view = fixtures.VIEW
    if pretrained is None:
        return {p: to_matrices(leaf, view.matrix(p)) for p, leaf in named_leaves(tree) if view.matrix(p)}
    theta0 = dict(named_leaves(pretrained))
    return {p: to_matrices(leaf - theta0[p], view.matrix(p), task_axis=False)
            for p, leaf in named_leaves(tree) if view.matrix(p)}


def test_wudi_exact_solver_is_the_minimiser_of_the_objective(x64):
    pretrained, task_vectors, _ = fixtures.models()
    exact = _matrices(build("wudi", pretrained, task_vectors, solver="exact"), pretrained)
    gradient = jax.jit(jax.vmap(jax.grad(core_wudi.interference_loss)))
    singular = []
    for path, taus in _matrices(task_vectors).items():
        start = jnp.sum(taus, axis=1)
        assert float(jnp.max(jnp.abs(gradient(exact[path], taus)))) <= 1e-10 * float(
            jnp.max(jnp.abs(gradient(start, taus)))), path
        # the normal equations (Σ_k τ_kᵀ τ_k / ‖τ_k‖²) Xᵀ = Σ_k τ_kᵀ τ_k τ_kᵀ / ‖τ_k‖², solved where regular
        taus = np.asarray(taus)
        weights = 1 / np.sum(taus**2, axis=(2, 3))
        normal = np.einsum("lkoi,lkoj,lk->lij", taus, taus, weights)
        if np.linalg.matrix_rank(normal[0]) < normal.shape[-1]:
            singular.append(path)  # the minimisers form an affine family: the minimum-norm one is taken
            continue
        right = np.einsum("lkoi,lkoj,lkpj,lk->lip", taus, taus, taus, weights)
        solved = np.swapaxes(np.linalg.solve(normal, right), -1, -2)
        assert np.max(np.abs(solved - np.asarray(exact[path]))) <= 1e-10, path
    assert singular == ["pos_embedding"]  # 5 rows, K = 4: Σ_k rank τ_k = 20 < 24 columns


def test_wudi_adam_approaches_the_exact_minimiser_as_iterations_grow(x64):
    task_vectors = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 3)))
    exact = core_wudi.exact_minimiser(task_vectors)
    adam = jax.jit(core_wudi.adam_minimiser, static_argnums=1)
    distances = [float(jnp.linalg.norm(adam(task_vectors, n, 1e-3) - exact)) for n in (300, 3000, 30000)]
    start = float(jnp.linalg.norm(jnp.sum(task_vectors, axis=0) - exact))
    print(f"‖Adam − exact‖ after 0/300/3000/30000 steps (lr 1e-3): {start:.3g} / "
          + " / ".join(f"{d:.3g}" for d in distances))
    assert start > distances[0] > distances[1] > distances[2]
    assert distances[2] <= 1e-4 * start


def test_magmax_equals_the_reference(x64):
    pretrained, task_vectors, _ = fixtures.models()
    assert_matches("magmax", build("magmax", pretrained, task_vectors))
    assert method_spec("magmax").params["scale"] == float(fixtures.read("magmax")["default/scaling_factor"])


def test_magmax_ties_go_to_the_later_task(x64):
    tau = np.array([[1.0, -2.0, 3.0, 0.5], [-1.0, 2.0, -1.0, -0.5], [0.5, -2.0, 1.0, 0.5]])
    chosen = tau[0].copy()
    for later in tau[1:]:  # the authors' fold: a later task wins where |τ| is at least as large
        chosen = np.where(np.abs(later) >= np.abs(chosen), later, chosen)
    merged = build("magmax", {"w": jnp.zeros(4)}, {"w": jnp.asarray(tau)}, scale=1.0)
    np.testing.assert_array_equal(np.asarray(merged["w"]), chosen)


def test_model_stock_equals_the_reference(x64):
    pretrained, task_vectors, _ = fixtures.models()
    assert_matches("model_stock", build("model_stock", pretrained, task_vectors))
    assert_matches("model_stock", build("model_stock", pretrained, first_two(task_vectors)), "pair")
    ignored = build("model_stock", pretrained, task_vectors, ignore=["pos_embedding", "post_ln/scale"])
    assert_matches("model_stock", ignored, "ignoring")
    assert fixtures.max_difference(ignored, fixtures.merged("model_stock")) > 1e-3
    # FusionBench as published takes its cosines in float32: the same merge up to that rounding
    published = fixtures.max_difference(build("model_stock", pretrained, task_vectors),
                                         fixtures.merged("model_stock", "float32_cosines"))
    print(f"model_stock vs FusionBench's float32 cosines: {published:.3g}")
    assert published <= 1e-7


def test_slerp_equals_the_reference_on_the_first_two_models(x64):
    pretrained, task_vectors, _ = fixtures.models()
    pair = first_two(task_vectors)
    assert_matches("slerp", build("slerp", pretrained, pair))
    mixed = build("slerp", pretrained, pair, t=0.3, dot_threshold=0.995)
    assert_matches("slerp", mixed, "mix")
    # at that threshold some tensors (the LayerNorm gains) were interpolated linearly, the rest spherically
    spherical = build("slerp", pretrained, pair, t=0.3, dot_threshold=1.0)
    assert fixtures.max_difference(spherical, fixtures.merged("slerp", "mix")) > 1e-8
    defaults, reference = method_spec("slerp").params, fixtures.read("slerp")
    assert (defaults["dot_threshold"], defaults["epsilon"]) == (float(reference["default/DOT_THRESHOLD"]),
                                                                float(reference["default/epsilon"]))


def test_slerp_refuses_another_number_of_models(x64):
    pretrained, task_vectors, k = fixtures.models()
    with pytest.raises(ValueError, match=rf"'slerp' merges exactly 2 models; got {k} task vectors"):
        build("slerp", pretrained, task_vectors)
    with pytest.raises(ValueError, match=r"'slerp' merges exactly 2 models; got K = 1"):
        core_slerp.slerp(pretrained, jax.tree_util.tree_map(lambda leaf: leaf[:1], task_vectors))


def test_model_stock_refuses_one_model_and_unknown_leaves(x64):
    pretrained, task_vectors, _ = fixtures.models()
    with pytest.raises(ValueError, match=r"'model_stock' needs at least 2 task vectors.*K = 1"):
        model_stock(pretrained, jax.tree_util.tree_map(lambda leaf: leaf[:1], task_vectors))
    with pytest.raises(ValueError, match=r"method 'model_stock': parameter 'ignore'.*\['no/such/leaf'\]"):
        build("model_stock", pretrained, task_vectors, ignore="no/such/leaf")


def test_wudi_needs_a_matrix_view(x64):
    pretrained, task_vectors, _ = fixtures.models()
    with pytest.raises(ValueError, match=r"method 'wudi' reads each weight matrix: the binding declares no matrix view"):
        method_spec("wudi").build(pretrained, task_vectors, view=None)


@pytest.mark.parametrize("method, parameter, value", [
    ("wudi", "iterations", 0), ("wudi", "iterations", 2.5), ("wudi", "lr", -1e-5), ("wudi", "solver", "sgd"),
    ("magmax", "scale", "half"), ("model_stock", "ignore", 3), ("model_stock", "ignore", ["a", 1]),
    ("slerp", "t", 1.5), ("slerp", "t", -0.1), ("slerp", "dot_threshold", 1.01), ("slerp", "epsilon", -1e-8),
])
def test_bad_parameters_are_refused_naming_method_and_parameter(method, parameter, value):
    with pytest.raises(ValueError, match=rf"method '{method}': parameter '{parameter}'"):
        method_spec(method, **{parameter: value})


def test_wudi_matrix_a_task_left_unchanged_stays_finite(x64):
    task_vectors = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 3))).at[1].set(0.0)
    kept = task_vectors[jnp.array([0, 2])]
    for solver in ("adam", "exact"):
        merged = core_wudi.merged_matrix(task_vectors, solver, 50, 1e-3)
        # a zero τ_k adds nothing to the objective: the same as merging the other tasks alone
        assert float(jnp.max(jnp.abs(merged - core_wudi.merged_matrix(kept, solver, 50, 1e-3)))) <= 1e-12, solver
    assert not bool(jnp.any(core_wudi.merged_matrix(jnp.zeros((2, 4, 3)), "exact", 1, 1e-3)))


def test_wudi_closed_form_gradient_is_the_gradient_of_its_loss(x64):
    """2 (X A − B) from `loss_gradient_terms` = ∇ Σ_k ‖(X − τ_k) τ_kᵀ‖² / ‖τ_k‖² by autodiff, at a random X."""
    rng = np.random.default_rng(3)
    tau = jnp.asarray(rng.normal(size=(5, 7, 4)))
    merged = jnp.asarray(rng.normal(size=(7, 4)))
    a, b = core_wudi.loss_gradient_terms(tau)
    np.testing.assert_allclose(2 * (merged @ a - b), jax.grad(core_wudi.interference_loss)(merged, tau),
                               rtol=1e-12, atol=1e-12)
