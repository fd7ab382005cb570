"""Model Breadcrumbs and DELLA against mergekit 0.1.5 (tests/fixtures/methods/breadcrumbs.npz and della.npz, made by
scripts/make_mergekit_fixtures.py with mergekit's own merge_tensors) in float64 on the tiny CLIP image tower: the
merged models, the sparsified task vectors, DELLA's keep probabilities and its merge given mergekit's masks; our
DELLA's own draws follow those probabilities rank by rank; bad parameters are refused naming method and parameter."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_fixtures as fixtures
from adamerging_jax.core import methods, transforms
from adamerging_jax.core.matrix_view import MatrixView
from adamerging_jax.core.registry import REGISTRY, method_spec
from adamerging_jax.core.task_vector_transforms import transform_task_vectors

BOUND = 1e-10
VIEW = fixtures.VIEW


@pytest.fixture
def models(x64):
    return fixtures.models()


@functools.lru_cache(maxsize=None)
def reference(fixture: str) -> dict[str, np.ndarray]:
    return fixtures.read(fixture)


def section(fixture: str, prefix: str) -> dict[str, np.ndarray]:
    """The reference's tensors ``prefix/NAME`` by NAME."""
    return {key[len(prefix) + 1:]: value for key, value in reference(fixture).items() if key.startswith(prefix + "/")}


def settings(fixture: str) -> dict[str, dict]:
    """{variant: {"method": name, parameter: value}} as the fixture was made."""
    return json.loads(str(reference(fixture)["settings"]))


def configured(setting: dict) -> dict:
    """Every argument the registered method's build gets: the setting's values, defaults, fixed ones; ``lambda``
    as the functions' ``lambda_``."""
    spec = method_spec(setting["method"], **{k: v for k, v in setting.items() if k != "method"})
    values = {**spec.params, **dict(spec.method.fixed)}
    values["lambda_"] = values.pop("lambda")
    return values


def per_task_difference(stacked, fixture: str, prefix: str, num_tasks: int) -> float:
    """max over tasks k of max |ours_k − reference ``prefix/task{k}``|."""
    return max(fixtures.max_difference(jax.tree_util.tree_map(lambda leaf: np.asarray(leaf[k], np.float64), stacked),
                                       section(fixture, f"{prefix}/task{k}")) for k in range(num_tasks))


def reference_masks(variant: str, num_tasks: int):
    """mergekit's DELLA keep masks of `variant` as our stacked tree (bool)."""
    as_float = lambda masks: {name: mask.astype(np.float64) for name, mask in masks.items()}  # noqa: E731
    trees = [fixtures.tower(as_float(section("della", f"mask/{variant}/task{k}"))) for k in range(num_tasks)]
    return jax.tree_util.tree_map(lambda *masks: np.stack(masks) > 0.5, *trees)


def test_our_defaults_are_mergekits():
    """Every parameter default of mergekit's four methods (its own spec, saved in the fixtures) is ours; ``weight``
    (no default there) is our ``scale``, ``int8_mask`` only picks the dtype of mergekit's sign mask."""
    for fixture in ("breadcrumbs", "della"):
        for name, defaults in json.loads(str(reference(fixture)["defaults"])).items():
            ours = {p.name: p.default for p in REGISTRY[name].parameters}
            assert set(defaults) - set(ours) == {"int8_mask"}, name
            assert {key: ours[key] for key in defaults if key != "int8_mask"} == {
                key: value for key, value in defaults.items() if key != "int8_mask"}, name
            assert dict(REGISTRY[name].fixed)["consensus"] == (name in ("breadcrumbs_ties", "della"))


def test_breadcrumbs_match_mergekit(models):
    pretrained, task_vectors, k = models
    for variant, setting in settings("breadcrumbs").items():
        spec = method_spec(setting["method"], **{key: v for key, v in setting.items() if key != "method"})
        merged = spec.build(pretrained, task_vectors, view=VIEW).params
        difference = fixtures.max_difference(merged, section("breadcrumbs", f"merged/{variant}"))
        print(f"{variant}: max |ours − mergekit| {difference:.2e}")
        assert difference <= BOUND, variant


def test_breadcrumbs_trim_keeps_the_middle_band_of_each_tensor_like_mergekit(models):
    _, task_vectors, k = models
    setting = configured(settings("breadcrumbs")["breadcrumbs"])
    sparse = transforms.trim_outliers(task_vectors, setting["density"], setting["gamma"], VIEW)
    difference = per_task_difference(sparse, "breadcrumbs", "sparse/breadcrumbs", k)
    print(f"breadcrumbs trim: max |ours − mergekit| {difference:.2e}")
    assert difference <= BOUND
    # each layer's q kernel (one torch tensor of n = 576 entries) keeps ⌊0.3 n⌋ = 172, dropping the ⌊0.05 n⌋ = 28
    # largest magnitudes: what is kept lies strictly between the dropped small and the dropped large ones
    tau, kept = task_vectors["layers"]["attn"]["q"]["kernel"], sparse["layers"]["attn"]["q"]["kernel"]
    for task in range(k):
        for layer in range(tau.shape[1]):
            magnitudes = np.sort(np.abs(np.asarray(tau[task, layer])).ravel())
            survivors = np.abs(np.asarray(kept[task, layer]))[np.asarray(kept[task, layer]) != 0]
            assert survivors.size == 172
            np.testing.assert_array_equal(np.sort(survivors), magnitudes[576 - 28 - 172:576 - 28])


def test_della_keep_probabilities_match_mergekit(models):
    _, task_vectors, k = models
    for variant, setting in settings("della").items():
        values = configured(setting)
        probabilities = transforms.rank_keep_probabilities(task_vectors, values["density"], values["epsilon"], VIEW)
        difference = per_task_difference(probabilities, "della", f"keep_probability/{variant}", k)
        print(f"{variant} keep probabilities: max |ours − mergekit| {difference:.2e}")
        assert difference <= BOUND, variant
        low, high = values["density"] - values["epsilon"], values["density"] + values["epsilon"]
        leaves = jax.tree_util.tree_leaves(probabilities)
        assert min(float(jnp.min(q)) for q in leaves) == pytest.approx(low)
        assert max(float(jnp.max(q)) for q in leaves) == pytest.approx(high)


def test_della_rescaling_and_merge_given_mergekits_masks_match_mergekit(models):
    pretrained, task_vectors, k = models
    for variant, setting in settings("della").items():
        values = configured(setting)
        masks = reference_masks(variant, k)
        sparse = methods.masked_task_vectors(task_vectors, masks, values["rescale"], VIEW)
        if f"sparse/{variant}/task0/post_layernorm.bias" in reference("della"):
            difference = per_task_difference(sparse, "della", f"sparse/{variant}", k)
            print(f"{variant} rescaled τ: max |ours − mergekit| {difference:.2e}")
            assert difference <= BOUND, variant
        merged = methods.sparse_task_arithmetic(pretrained, sparse, values["scale"], values["lambda_"],
                                                values["normalize"], values["consensus"])
        difference = fixtures.max_difference(merged, section("della", f"merged/{variant}"))
        print(f"{variant} merged given mergekit's masks: max |ours − mergekit| {difference:.2e}")
        assert difference <= BOUND, variant


def test_della_draws_drop_each_rank_with_its_probability(x64):
    """20 000 rows of 6 entries in shuffled magnitude order: the kept fraction at magnitude rank r is
    q_r = (ρ − ε) + 2ε r / 5 ∈ {0.2, 0.32, …, 0.8} within 0.015 (≥ 4σ of the sampling error; neighbouring ranks
    differ by 0.12, a uniform drop by up to 0.3); two seeds draw different masks, one seed the same."""
    rows, m, density, epsilon = 5000, 6, 0.5, 0.3
    magnitudes = np.stack([np.stack([np.random.default_rng(4 * r + k).permutation(m) + 1.0 for r in range(rows)])
                           for k in range(4)])
    signs = np.where(np.random.default_rng(0).random(magnitudes.shape) < 0.5, -1.0, 1.0)
    tau = {"w": jnp.asarray(signs * magnitudes)}
    view = MatrixView.stored_2d({"w": tau["w"][0]}, transpose=False)
    kept = np.asarray(transforms.drop_by_rank(tau, density, epsilon, 7, view)["w"] != 0)
    ranks = magnitudes.astype(int) - 1
    rates = np.array([kept[ranks == r].mean() for r in range(m)])
    expected = density - epsilon + 2 * epsilon * np.arange(m) / (m - 1)
    print(f"kept fraction by rank {np.round(rates, 4)}, expected {expected}")
    np.testing.assert_allclose(rates, expected, atol=0.015)
    again = np.asarray(transforms.drop_by_rank(tau, density, epsilon, 7, view)["w"] != 0)
    other = np.asarray(transforms.drop_by_rank(tau, density, epsilon, 8, view)["w"] != 0)
    np.testing.assert_array_equal(kept, again)
    assert (kept != other).mean() > 0.3


def test_registered_della_is_the_composition_and_rescales_to_the_l1_norm(models):
    pretrained, task_vectors, k = models
    merged = method_spec("della", density=0.4, seed=5).build(pretrained, task_vectors, view=VIEW).params
    sparse = methods.della_task_vectors(task_vectors, 0.4, 0.15, 5, True, VIEW)
    expected = methods.sparse_task_arithmetic(pretrained, sparse, 0.3, 1.0, True, True)
    assert fixtures.max_difference(merged, fixtures.hf_tensors(expected)) == 0
    tau, rescaled = task_vectors["layers"]["mlp"]["fc1"]["kernel"], sparse["layers"]["mlp"]["fc1"]["kernel"]
    np.testing.assert_allclose(jnp.sum(jnp.abs(rescaled), axis=(2, 3)), jnp.sum(jnp.abs(tau), axis=(2, 3)), rtol=1e-12)
    assert 0.3 < float(jnp.mean(rescaled != 0)) < 0.5


def test_task_vector_transforms_breadcrumbs_and_della(models):
    """What AdaMerging's λ scales with ``task_vectors: breadcrumbs / della``; density inherited from AdaMerging's."""
    _, task_vectors, _ = models
    crumbs = transform_task_vectors({"name": "breadcrumbs", "gamma": 0.05}, task_vectors, VIEW, {"density": 0.3})
    expected = methods.breadcrumbs_task_vectors(task_vectors, 0.3, 0.05, False, VIEW)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), crumbs, expected))
    della = transform_task_vectors({"name": "della", "seed": 3}, task_vectors, VIEW, {"density": 0.4})
    expected = methods.della_task_vectors(task_vectors, 0.4, 0.15, 3, True, VIEW)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), della, expected))
    with pytest.raises(ValueError, match="task-vector transform 'della': parameter 'epsilon'"):
        transform_task_vectors({"name": "della", "epsilon": 0.3}, task_vectors, VIEW, {"density": 0.2})
    with pytest.raises(ValueError, match="transform 'breadcrumbs' reads each weight matrix"):
        transform_task_vectors("breadcrumbs", task_vectors, None)


def test_float32_keeps_the_dtypes(models):
    pretrained, task_vectors, _ = models
    as32 = lambda tree: jax.tree_util.tree_map(lambda leaf: leaf.astype(jnp.float32), tree)  # noqa: E731
    merged = method_spec("breadcrumbs_ties", density=0.3, gamma=0.05).build(as32(pretrained), as32(task_vectors),
                                                                             view=VIEW).params
    in64 = method_spec("breadcrumbs_ties", density=0.3, gamma=0.05).build(pretrained, task_vectors, view=VIEW).params
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(merged)} == {np.dtype(np.float32)}
    assert fixtures.max_difference(merged, fixtures.hf_tensors(in64)) < 1e-5


@pytest.mark.parametrize("name, values, fragment", [
    ("breadcrumbs", dict(density=1.5), "method 'breadcrumbs': parameter 'density' must be ≤ 1.0"),
    ("breadcrumbs", dict(gamma=-0.1), "method 'breadcrumbs': parameter 'gamma' must be ≥ 0.0"),
    ("breadcrumbs_ties", dict(normalize="yes"), "method 'breadcrumbs_ties': parameter 'normalize' must be a bool"),
    ("breadcrumbs_ties", dict(scale=float("nan")), "method 'breadcrumbs_ties': parameter 'scale' must be finite"),
    ("della", dict(epsilon=0.6), "method 'della': parameter 'epsilon' must be ≤ 0.5"),
    ("della", dict(seed=1.5), "method 'della': parameter 'seed' must be a int"),
    ("della_linear", dict(rescale=1), "method 'della_linear': parameter 'rescale' must be a bool"),
    ("della_linear", dict(consensus=True), "method 'della_linear' has no parameter 'consensus'"),
    ("layer_wise_adamerging", dict(task_vectors={"name": "della", "epsilon": -0.1}),
     "transform 'della': parameter 'epsilon' must be ≥ 0.0"),
    ("layer_wise_adamerging", dict(task_vectors={"name": "breadcrumbs", "gamma": 2.0}),
     "transform 'breadcrumbs': parameter 'gamma' must be ≤ 1.0"),
])
def test_bad_parameters_are_refused_naming_method_and_parameter(name, values, fragment):
    with pytest.raises(ValueError, match=fragment):
        method_spec(name, **values)


def test_della_band_outside_zero_one_is_refused_at_build(models):
    pretrained, task_vectors, _ = models
    for name in ("della", "della_linear"):
        with pytest.raises(ValueError, match=f"method '{name}': parameter 'epsilon' = 0.15 with density 0.1"):
            method_spec(name, density=0.1).build(pretrained, task_vectors, view=VIEW)
    with pytest.raises(ValueError, match="rank_keep_probabilities: parameter 'epsilon' = 0.3 with density 0.8"):
        transforms.rank_keep_probabilities(task_vectors, 0.8, 0.3, VIEW)
    with pytest.raises(ValueError, match="density must be in"):
        transforms.trim_outliers(task_vectors, 1.2, 0.01, VIEW)
