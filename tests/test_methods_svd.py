"""TSV-M, Iso-C and Iso-CTS against FusionBench 0.2.33 (tests/fixtures/methods/, made by
scripts/make_method_fixtures.py) in float64 on the tiny CLIP image tower; TSV's per-task parts against the
reference's; the task-vector transforms ``tsv`` and ``iso_cts`` summing to their method (AdaMerging's start);
bad parameters and a missing matrix view refused; float32 in, float32 out; one layer of a stacked leaf merged
alone as in the whole tree (the methods stream tensor by tensor)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_fixtures as fixtures
from adamerging_jax.core import isotropic, tsv
from adamerging_jax.core.coefficients import init_coefficients
from adamerging_jax.core.merge import merge
from adamerging_jax.core.registry import get_method, method_spec
from adamerging_jax.core.task_vector_transforms import get_transform, transform_task_vectors
from adamerging_jax.core.trees import named_leaves
from adamerging_jax.models import clip
from adamerging_jax.models.clip_checkpoint import VISION_PREFIX

BOUND = 1e-10
METHODS = ("tsv_m", "iso_c", "iso_cts")
OTHER_FRACTION = 0.5  # the fraction of the iso_cts_fraction fixture (ISO_CTS_OTHER_FRACTION in the script)


@pytest.fixture
def models(x64):
    return fixtures.models()


def build(method: str, pretrained, task_vectors, **values):
    return method_spec(method, **values).build(pretrained, task_vectors, view=fixtures.VIEW).params


def largest_difference(ours, theirs) -> float:
    """max |ours − theirs| over two trees of the same structure."""
    return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(ours),
                                                            jax.tree_util.tree_leaves(theirs)))


@pytest.mark.parametrize("method, fixture, values", [
    ("tsv_m", "tsv_m", {}), ("iso_c", "iso_c", {}), ("iso_cts", "iso_cts", {}),
    ("iso_cts", "iso_cts_fraction", {"common_space_fraction": OTHER_FRACTION})])
def test_the_merged_model_is_fusionbench_s(models, method, fixture, values):
    pretrained, task_vectors, _ = models
    difference = fixtures.max_difference(build(method, pretrained, task_vectors, **values), fixtures.merged(fixture))
    print(f"{fixture}: max |ours − FusionBench| {difference:.3g}")
    assert difference <= BOUND


def test_the_defaults_are_the_reference_configs():
    assert get_method("tsv_m").parameter("scale").default == fixtures.read("tsv_m")["default/alpha"]
    for method in ("iso_c", "iso_cts"):
        assert get_method(method).parameter("scale").default == fixtures.read(method)["default/scaling_factor"]
    fraction = fixtures.read("iso_cts")["default/common_space_fraction"]
    assert get_method("iso_cts").parameter("common_space_fraction").default == fraction
    assert [p.default for p in get_transform("iso_cts").parameters] == [fraction]


def test_tsv_parts_are_the_reference_s_per_task_parts(models):
    pretrained, task_vectors, k = models
    parts = tsv.tsv_task_vectors(task_vectors, fixtures.VIEW)
    differences = []
    for t in range(k):
        ours = fixtures.hf_tensors(jax.tree_util.tree_map(lambda leaf: leaf[t], parts))
        reference = {name.removeprefix(VISION_PREFIX): value
                     for name, value in fixtures.merged("tsv_m", f"task{t}").items() if value.ndim == 2}
        assert len(reference) == 13  # q, k, v, out, fc1, fc2 of two layers and the position embedding
        differences.append(max(float(np.max(np.abs(ours[name] - value))) for name, value in reference.items()))
    print(f"tsv parts: max |ours − FusionBench| per task {differences}")
    assert max(differences) <= BOUND


@pytest.mark.parametrize("method, transform", [
    ("tsv_m", "tsv"), ("iso_cts", {"name": "iso_cts"}),
    ("iso_cts", {"name": "iso_cts", "common_space_fraction": OTHER_FRACTION})])
def test_adamerging_on_the_transform_starts_from_the_method(models, method, transform):
    """θ0 + Σ_k λ_k τ'_k at λ = α, as layer-wise AdaMerging builds its start, is the method's model at scale α."""
    pretrained, task_vectors, k = models
    scale = 0.7
    spec = method_spec("layer_wise_adamerging", task_vectors=transform)
    parts = transform_task_vectors(spec.params["task_vectors"], task_vectors, fixtures.VIEW, spec.params)
    start = merge(pretrained, parts, init_coefficients(pretrained, k, "layer", scale, clip.stacked))
    values = {key: value for key, value in (transform if isinstance(transform, dict) else {}).items() if key != "name"}
    merged = build(method, pretrained, task_vectors, scale=scale, **values)
    difference = largest_difference(start, merged)
    print(f"{method} from its transform {transform}: max |θ0 + Σ_k α τ'_k − method| {difference:.3g}")
    assert difference <= 1e-12
    assert largest_difference(parts, task_vectors) > 1e-3  # the parts are not τ itself


def test_iso_cts_with_the_whole_rank_common_is_iso_c(models):
    pretrained, task_vectors, _ = models
    difference = largest_difference(build("iso_cts", pretrained, task_vectors, common_space_fraction=1.0),
                                    build("iso_c", pretrained, task_vectors))
    assert difference <= BOUND


def test_a_matrix_of_lower_rank_than_k_gets_no_tsv_part():
    task_vectors = jax.random.normal(jax.random.PRNGKey(0), (6, 5, 7))
    assert tsv.kept_rank(5, 6) == 0 and tsv.kept_rank(5, 4) == 1
    assert not jnp.any(tsv.tsv_matrix(task_vectors)) and not jnp.any(tsv.tsv_parts(task_vectors))


@pytest.mark.parametrize("method, values, parameter", [
    ("iso_cts", {"common_space_fraction": 1.5}, "common_space_fraction"),
    ("iso_cts", {"common_space_fraction": -0.1}, "common_space_fraction"),
    ("iso_cts", {"scale": float("nan")}, "scale"),
    ("iso_c", {"scale": float("inf")}, "scale"),
    ("tsv_m", {"scale": "1"}, "scale"),
    ("tsv_m", {"alpha": 1.0}, "alpha"),
])
def test_bad_parameters_are_refused(method, values, parameter):
    with pytest.raises(ValueError, match=f"method '{method}'.*parameter '{parameter}'"):
        method_spec(method, **values)


@pytest.mark.parametrize("transform, parameter", [
    ({"name": "iso_cts", "common_space_fraction": 2.0}, "common_space_fraction"),
    ({"name": "tsv", "density": 0.5}, "density")])
def test_bad_transform_parameters_are_refused(transform, parameter):
    with pytest.raises(ValueError, match=f"transform '{transform['name']}'.*'{parameter}'"):
        method_spec("layer_wise_adamerging", task_vectors=transform)


def test_a_fraction_that_cannot_size_the_task_blocks_is_refused(models):
    """K = 3, f = 0 on the position embedding (rank 5): n = round(5 / 3) = 2, 3 · 2 > 5."""
    pretrained, task_vectors, _ = models
    three = jax.tree_util.tree_map(lambda tau: tau[:3], task_vectors)
    expected = "parameter 'common_space_fraction' = 0.0 leaves matrix 'pos_embedding' \\(rank 5\\)"
    with pytest.raises(ValueError, match=f"method 'iso_cts': {expected}"):
        build("iso_cts", pretrained, three, common_space_fraction=0.0)
    with pytest.raises(ValueError, match=f"task-vector transform 'iso_cts': {expected}"):
        transform_task_vectors({"name": "iso_cts", "common_space_fraction": 0.0}, three, fixtures.VIEW)


@pytest.mark.parametrize("method", METHODS)
def test_a_binding_without_a_view_is_refused_in_one_line(models, method):
    pretrained, task_vectors, _ = models
    with pytest.raises(ValueError, match=f"method '{method}' reads each weight matrix: the binding declares no "
                                         "matrix view") as refused:
        method_spec(method).build(pretrained, task_vectors)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("transform", ["tsv", "iso_cts"])
def test_a_transform_without_a_view_is_refused(models, transform):
    _, task_vectors, _ = models
    with pytest.raises(ValueError, match=f"transform '{transform}' reads each weight matrix"):
        transform_task_vectors(transform, task_vectors, None)


def test_float32_in_float32_out():
    with jax.enable_x64(True):
        pretrained, task_vectors, _ = fixtures.models()
        pretrained, task_vectors = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, np.float32),
                                                          (pretrained, task_vectors))
    for method in METHODS:
        merged = build(method, pretrained, task_vectors)
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(merged)} == {jnp.dtype(jnp.float32)}
        difference = fixtures.max_difference(merged, fixtures.merged(method))
        print(f"{method} in float32: max |ours − FusionBench (float64)| {difference:.3g}")
        assert difference <= 1e-4
    for transform in ("tsv", "iso_cts"):
        parts = transform_task_vectors(transform, task_vectors, fixtures.VIEW)
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(parts)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("method", METHODS)
def test_one_layer_of_a_stacked_leaf_alone_merges_as_in_the_whole_tree(models, method):
    """What streaming a checkpoint tensor by tensor does (``streaming="tensor"``): a one-leaf tree holding layer 1
    of the stacked fc1 kernel, and one holding a LayerNorm gain."""
    pretrained, task_vectors, _ = models
    whole = dict(named_leaves(build(method, pretrained, task_vectors)))
    kernel = {"layers": {"mlp": {"fc1": {"kernel": pretrained["layers"]["mlp"]["fc1"]["kernel"][1:2]}}}}
    kernel_tau = {"layers": {"mlp": {"fc1": {"kernel": task_vectors["layers"]["mlp"]["fc1"]["kernel"][:, 1:2]}}}}
    alone = build(method, kernel, kernel_tau)["layers"]["mlp"]["fc1"]["kernel"]
    assert largest_difference(alone, whole["layers/mlp/fc1/kernel"][1:2]) <= 1e-12
    gain = build(method, {"post_ln": {"scale": pretrained["post_ln"]["scale"]}},
                 {"post_ln": {"scale": task_vectors["post_ln"]["scale"]}})
    assert largest_difference(gain["post_ln"]["scale"], whole["post_ln/scale"]) <= 1e-12


def test_thin_svd_decomposes_a_stack_one_matrix_per_lapack_call():
    """A stack of matrices is factorised one LAPACK call per matrix (a batched call can stall jaxlib 0.10's CPU
    thread pool), with each matrix's factors equal to NumPy's."""
    from adamerging_jax.core.matrix_merging import thin_svd

    stack = np.random.default_rng(0).normal(size=(2, 3, 5, 4)).astype(np.float32)
    u, s, vh = jax.jit(thin_svd)(stack)
    np.testing.assert_allclose(np.asarray(s), np.linalg.svd(stack, compute_uv=False), rtol=1e-5)
    np.testing.assert_allclose(np.einsum("...ir,...r,...rj->...ij", u, s, vh), stack, atol=1e-5)
    lowered = jax.jit(thin_svd).lower(stack).as_text()
    calls = [line for line in lowered.splitlines() if "gesdd" in line or "gesvd" in line]
    assert calls and all('num_batch_dims = "0"' in line and "tensor<5x4xf32>" in line for line in calls), calls


def test_thin_svd_falls_back_to_qr_iterations_where_divide_and_conquer_does_not_converge(monkeypatch):
    """Where LAPACK's gesdd does not converge (JAX returns NaN factors; it happens to Iso-CTS's residuals of
    ViT-L/14 MLP weights at K = 20), each matrix is decomposed by gesvd instead: the stand-in gesdd below fails
    on the second matrix of the stack only, whose factors are then NumPy's; a NaN input stays NaN."""
    from adamerging_jax.core.matrix_merging import thin_svd

    divide_and_conquer = jnp.linalg.svd

    def fails_on_a_negative_corner(matrix, full_matrices=True):
        u, s, vh = divide_and_conquer(matrix, full_matrices=full_matrices)
        failed = matrix[0, 0] < 0
        return tuple(jnp.where(failed, jnp.nan, x) for x in (u, s, vh))

    monkeypatch.setattr(jnp.linalg, "svd", fails_on_a_negative_corner)
    stack = np.random.default_rng(1).normal(size=(3, 6, 4)).astype(np.float32)
    stack[:, 0, 0] = [1.0, -1.0, 2.0]
    u, s, vh = jax.jit(lambda x: thin_svd(x))(stack)
    assert np.isfinite(np.asarray(s)).all()
    np.testing.assert_allclose(np.asarray(s), np.linalg.svd(stack, compute_uv=False), rtol=1e-5)
    np.testing.assert_allclose(np.einsum("kir,kr,krj->kij", u, s, vh), stack, atol=1e-5)
    nan_input = stack[1].copy()
    nan_input[2, 2] = np.nan
    assert np.isnan(np.asarray(jax.jit(lambda x: thin_svd(x)[1])(nan_input))).all()
