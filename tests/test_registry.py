"""The method registry and the one protocol on a tiny pure-pytree binding (no model, no dataset)."""

import dataclasses

import jax
import numpy as np
import pytest

import adamerging_jax as am
from adamerging_jax.core import registry
from adamerging_jax.core.protocol import MergeSettings, build_models, run_methods
from adamerging_jax.report import markdown_table
from tiny_problem import batch_source

ADAMERGING = am.AdaMergingConfig(steps=12, lr=0.02, batches_per_task=1, batch_size=16, quiet=True)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])


@pytest.fixture
def user_method():
    """A method of one's own: θ0 + α · (the task vector of largest norm), registered for the test only."""

    def build(pretrained, task_vectors, alpha):
        norms = sum(np.sum(np.asarray(t, np.float64).reshape(len(t), -1) ** 2, axis=1)
                    for t in jax.tree_util.tree_leaves(task_vectors))
        k = int(np.argmax(norms))
        return am.Merged(params=jax.tree_util.tree_map(lambda p, t: p + alpha * t[k], pretrained, task_vectors))

    method = am.register(am.MergeMethod(
        "largest_task", "Largest task vector", "a test", build,
        (am.Parameter("alpha", 0.5, "its weight", minimum=0.0, maximum=1.0),)))
    yield method
    del registry.REGISTRY[method.name]


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown merge method 'tie'; known: \[.*'ties'.*\]"):
        am.method_spec("tie")
    with pytest.raises(ValueError, match="unknown merge method 'fisher'"):
        MergeSettings(["task_arithmetic", "fisher"])


@pytest.mark.parametrize("name, values, fragment", [
    ("ties", {"density": 1.5}, "parameter 'density' must be ≤ 1.0, got 1.5"),
    ("ties", {"reduce": "max"}, "parameter 'reduce' must be one of ['mean', 'sum'], got 'max'"),
    ("ties", {"densty": 0.1}, "method 'ties' has no parameter 'densty'; its parameters: ['density',"),
    ("task_arithmetic", {"scale": "0.3"}, "parameter 'scale' must be a float, got '0.3'"),
    ("task_arithmetic", {"scale": float("nan")}, "parameter 'scale' must be finite"),
    ("dare", {"seed": 1.5}, "parameter 'seed' must be a int, got 1.5"),
    ("layer_wise_adamerging++", {"granularity": "task"}, "has no parameter 'granularity'"),
])
def test_bad_parameters_say_what_is_allowed(name, values, fragment):
    with pytest.raises(ValueError) as error:
        am.method_spec(name, **values)
    assert fragment in str(error.value)


def test_defaults_and_config_file_entries():
    spec = am.method_spec({"name": "ties", "reduce": "mean", "scale": 1})
    assert spec.params == {"density": 0.2, "reduce": "mean", "scale": 1.0, "scope": "model", "total_size": None}
    assert am.method_spec(spec, density=0.1).params["density"] == 0.1
    with pytest.raises(ValueError, match="listed more than once"):
        MergeSettings(["ties", {"name": "ties", "density": 0.1}])
    with pytest.raises(ValueError, match="already"):
        am.register(registry.REGISTRY["ties"])


def test_the_adamerging_variants_are_one_method_with_data():
    variants = {name: registry.REGISTRY[name] for name in
                ["task_wise_adamerging", "layer_wise_adamerging", "task_wise_adamerging++", "layer_wise_adamerging++"]}
    assert {m.build for m in variants.values()} == {registry.REGISTRY["adamerging"].build}
    assert {name: dict(m.fixed) for name, m in variants.items()} == {
        "task_wise_adamerging": {"granularity": "task"},
        "layer_wise_adamerging": {"granularity": "layer"},
        "task_wise_adamerging++": {"granularity": "task", "task_vectors": "ties"},
        "layer_wise_adamerging++": {"granularity": "layer", "task_vectors": "ties"},
    }
    assert all(m.needs_data for m in variants.values())
    generic = am.method_spec("adamerging", granularity="task", task_vectors="ties")
    assert generic.describe()["params"]["granularity"] == "task"


def test_variants_build_what_the_core_computes(problem, tv):
    """layer-wise AdaMerging++ through the registry = the core's adamerging on ties_task_vectors."""
    settings = MergeSettings(["layer_wise_adamerging++", {"name": "task_wise_adamerging"}], ADAMERGING)
    models, records = build_models(settings, problem.pretrained, tv, apply_fn=problem.apply,
                                   adaptation=batch_source(problem), probe=batch_source(problem)(999), log=lambda _: None)
    direct = am.adamerging(problem.apply, problem.pretrained, am.ties_task_vectors(tv, 0.2), batch_source(problem),
                           dataclasses.replace(ADAMERGING, granularity="layer"))
    np.testing.assert_array_equal(_flat(models["layer_wise_adamerging++"].params), _flat(direct.params))
    assert set(models["task_wise_adamerging"].coefficients.values) == {"*"}  # one λ per task
    assert len(records["layer_wise_adamerging++"].coefficients) == len(jax.tree_util.tree_leaves(tv))
    before, after = records["layer_wise_adamerging++"].probe_entropy
    assert after < before
    assert np.asarray(records["task_wise_adamerging"].loss).shape == (12, 4)


def test_a_user_method_runs_through_the_protocol_like_a_built_in(problem, tv, user_method):
    settings = MergeSettings(["pretrained", "individual", {"name": "largest_task", "alpha": 0.25},
                              "task_arithmetic", "layer_wise_adamerging"], ADAMERGING)
    names = [f"t{k}" for k in range(len(problem.test))]
    records = run_methods(settings, problem.pretrained, tv, apply_fn=problem.apply, test_sets=problem.test,
                          task_names=names, adaptation=batch_source(problem), log=lambda _: None)
    assert list(records) == ["pretrained", "individual", "largest_task", "task_arithmetic", "layer_wise_adamerging"]
    # Each record's accuracy is the core's evaluate of the model the method builds.
    norms = [sum(np.sum(np.asarray(leaf[k]) ** 2) for leaf in jax.tree_util.tree_leaves(tv)) for k in range(4)]
    k = int(np.argmax(norms))
    own = jax.tree_util.tree_map(lambda p, t: p + 0.25 * t[k], problem.pretrained, tv)
    assert records["largest_task"].accuracy == am.evaluate(problem.apply, own, problem.test, names).per_task
    assert records["largest_task"].params == {"alpha": 0.25}
    ta = am.task_arithmetic(problem.pretrained, tv, 0.3)
    assert records["task_arithmetic"].accuracy == am.evaluate(problem.apply, ta, problem.test, names).per_task
    for t, name in enumerate(names):  # individual: θ0 + τ_t on its own task
        own_t = jax.tree_util.tree_map(lambda p, d: np.asarray(p) + np.asarray(d)[t], problem.pretrained, tv)
        head_t = lambda p, x, _, t=t: problem.apply(p, x, t)  # noqa: E731
        assert records["individual"].accuracy[name] == am.evaluate(head_t, own_t, [problem.test[t]]).mean
    table = markdown_table([{"tasks": names, "methods": {n: r.to_json() for n, r in records.items()}}])
    assert "| Largest task vector |" in table and "| Layer-wise AdaMerging |" in table


def test_adaptive_methods_need_batches(problem, tv):
    with pytest.raises(ValueError, match=r"methods \['layer_wise_adamerging'\] learn from unlabeled data"):
        run_methods(MergeSettings(["layer_wise_adamerging"], ADAMERGING), problem.pretrained, tv,
                    apply_fn=problem.apply, test_sets=problem.test, task_names=list("abcd"), log=lambda _: None)


def test_with_changes_keeps_a_bindings_parameters():
    settings = MergeSettings([{"name": "ties", "reduce": "mean", "scale": 1.0}, "task_arithmetic"], ADAMERGING)
    changed = settings.with_changes(["ties", "weight_average"], steps=3)
    assert [s.name for s in changed.methods] == ["ties", "weight_average"]
    assert changed.methods[0].params["reduce"] == "mean" and changed.adamerging.steps == 3
    with pytest.raises(ValueError, match=r"unknown AdaMerging settings \['step'\]"):
        settings.with_changes(step=3)


def test_a_method_outside_the_rows_takes_the_bindings_named_parameters():
    """``named`` gives a method its parameters when it is named later (by name or through a group), without
    making it a default row; a method in both takes its row's parameters; the settings keep ``named``."""
    settings = MergeSettings(["task_arithmetic"], ADAMERGING,
                             named=[{"name": "surgery", "surgery_lr": 2e-4}, {"name": "task_arithmetic", "scale": 1.0}])
    assert [s.name for s in settings.methods] == ["task_arithmetic"]
    changed = settings.with_changes(["surgery", "task_arithmetic"])
    assert changed.methods[0].params["surgery_lr"] == 2e-4
    assert changed.methods[1].params["scale"] == registry.method_spec("task_arithmetic").params["scale"] != 1.0
    grouped = {s.name: s for s in changed.with_changes(["all"]).methods}
    assert grouped["surgery"].params["surgery_lr"] == 2e-4 and grouped["surgery"].from_group
    assert MergeSettings(["surgery"]).methods[0].params["surgery_lr"] == 1e-3


def test_groups_expand_to_registered_methods_wherever_methods_are_named():
    data_free = registry.group_members("data_free")
    assert {"weight_average", "task_arithmetic", "ties", "dare"} <= set(data_free)
    assert not {"pretrained", "individual"} & set(data_free)
    assert all(not registry.REGISTRY[name].needs_data for name in data_free)
    adaptive = registry.group_members("adaptive")
    assert "layer_wise_adamerging++" in adaptive and all(registry.REGISTRY[n].needs_data for n in adaptive)
    every = registry.group_members("all")
    assert "adamerging" not in every, "the generic method repeats layer-wise AdaMerging's defaults"
    exact_k = {name for name, m in registry.REGISTRY.items() if m.num_tasks is not None}
    assert set(every) == set(registry.REGISTRY) - {"adamerging"} - exact_k
    names = [spec.name for spec in MergeSettings(["ties", "data_free"]).methods]
    assert names == ["ties"] + [n for n in data_free if n != "ties"]
    kept = MergeSettings([{"name": "ties", "density": 0.1}]).with_changes(["data_free"])
    assert {s.name: s for s in kept.methods}["ties"].params["density"] == 0.1
    with pytest.raises(ValueError, match="'data_free' names a group of methods"):
        am.register(dataclasses.replace(registry.REGISTRY["ties"], name="data_free"))


def test_adamerging_learns_lambda_on_any_registered_transform(problem, tv):
    """{task_vectors: {name: dare, ...}} = the core's adamerging on DARE's τ, bit for bit; a transform of one's
    own runs once registered; bad transforms are refused naming the method and the parameter."""
    spec = am.method_spec("task_wise_adamerging", task_vectors={"name": "dare", "p": 0.5, "seed": 3})
    models, _ = build_models(MergeSettings([spec], ADAMERGING), problem.pretrained, tv, apply_fn=problem.apply,
                             adaptation=batch_source(problem), log=lambda _: None)
    direct = am.adamerging(problem.apply, problem.pretrained, am.dare(tv, 0.5, 3), batch_source(problem),
                           dataclasses.replace(ADAMERGING, granularity="task"))
    np.testing.assert_array_equal(_flat(models["task_wise_adamerging"].params), _flat(direct.params))

    with pytest.raises(ValueError, match="parameter 'task_vectors': unknown task-vector transform 'tsvx'; known:"):
        am.method_spec("layer_wise_adamerging", task_vectors="tsvx")
    with pytest.raises(ValueError, match="transform 'dare': parameter 'p' must be ≤ 0.999"):
        am.method_spec("layer_wise_adamerging", task_vectors={"name": "dare", "p": 1.0})
    with pytest.raises(ValueError, match=r"transform 'dare' has no parameters \['q'\]"):
        am.method_spec("layer_wise_adamerging", task_vectors={"name": "dare", "q": 1})

    from adamerging_jax.core import task_vector_transforms as transforms
    doubled = transforms.register_transform(transforms.TaskVectorTransform(
        "doubled_test", "2τ", "a test", lambda tau: jax.tree_util.tree_map(lambda t: 2 * t, tau)))
    needs_view = transforms.register_transform(transforms.TaskVectorTransform(
        "viewed_test", "τ", "a test", lambda tau, view: tau, uses_view=True))
    try:
        spec = am.method_spec("task_wise_adamerging", task_vectors="doubled_test")
        models, _ = build_models(MergeSettings([spec], ADAMERGING), problem.pretrained, tv, apply_fn=problem.apply,
                                 adaptation=batch_source(problem), log=lambda _: None)
        twice = am.adamerging(problem.apply, problem.pretrained, jax.tree_util.tree_map(lambda t: 2 * t, tv),
                              batch_source(problem), dataclasses.replace(ADAMERGING, granularity="task"))
        np.testing.assert_array_equal(_flat(models["task_wise_adamerging"].params), _flat(twice.params))
        with pytest.raises(ValueError, match="transform 'viewed_test' reads each weight matrix: the binding declares no matrix view"):
            build_models(MergeSettings([am.method_spec("task_wise_adamerging", task_vectors=needs_view.name)], ADAMERGING),
                         problem.pretrained, tv, apply_fn=problem.apply, adaptation=batch_source(problem),
                         log=lambda _: None)
    finally:
        del transforms.TRANSFORMS[doubled.name], transforms.TRANSFORMS[needs_view.name]


def test_a_method_for_exactly_k_models_refuses_another_k_and_stays_out_of_groups(problem, tv):
    pair = am.register(am.MergeMethod("pair_test", "Pair", "a test", lambda p, t: am.Merged(params=p), num_tasks=2))
    try:
        assert "pair_test" not in registry.group_members("all")
        with pytest.raises(ValueError, match="method 'pair_test' merges exactly 2 models; got 4 task vectors"):
            am.method_spec("pair_test").build(problem.pretrained, tv)
        two = jax.tree_util.tree_map(lambda t: t[:2], tv)
        assert am.method_spec("pair_test").build(problem.pretrained, two).params is problem.pretrained
    finally:
        del registry.REGISTRY[pair.name]


def test_a_method_this_binding_cannot_run_is_skipped_from_a_group_and_refused_by_name(problem, tv):
    """`requires` says why a binding cannot run a method: through a group it is skipped with that reason logged,
    named by itself it is refused with it (RegMean++ on a model whose blocks are not stacked, say)."""
    picky = am.register(am.MergeMethod("picky_test", "Picky", "a test", lambda p, t: am.Merged(params=p),
                                       requires=lambda context, view: None if view else "needs a matrix view"))
    try:
        logged = []
        models, records = build_models(MergeSettings(["task_arithmetic", "data_free"]), problem.pretrained, tv,
                                       apply_fn=problem.apply, log=logged.append)
        assert "picky_test" not in records and "task_arithmetic" in records and "ties" in records
        assert "[merge] picky_test: skipped, it needs a matrix view" in logged
        with pytest.raises(ValueError, match="method 'picky_test' needs a matrix view"):
            build_models(MergeSettings(["picky_test"]), problem.pretrained, tv, apply_fn=problem.apply,
                         log=lambda _: None)
        view = am.MatrixView.stored_2d(problem.pretrained)
        _, records = build_models(MergeSettings(["data_free"]).with_changes(["picky_test"]), problem.pretrained, tv,
                                  apply_fn=problem.apply, view=view, log=lambda _: None)
        assert list(records) == ["picky_test"]
    finally:
        del registry.REGISTRY[picky.name]
