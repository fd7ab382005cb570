"""`docs/methods.md` is generated from the method registry (name, paper, formula, parameters, data, per-task
models, reference implementation) and from `FIDELITY` below, which names the test that compares each method
with its reference and the bound that test asserts. Regenerate it with ``python tests/test_methods_doc.py``."""
from __future__ import annotations

from pathlib import Path

from adamerging_jax.core import registry
from adamerging_jax.core.task_vector_transforms import TRANSFORMS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "methods.md"
NUMPY = "≤ 1e-12 in float64 against the formula written out in numpy"
FIDELITY = {
    "weight_average": ("test_float64.py", NUMPY, "am.weight_average("),
    "task_arithmetic": ("test_float64.py", NUMPY, "am.task_arithmetic("),
    "ties": ("test_float64.py", NUMPY + " (the official code's trim, elect and disjoint merge)", "am.ties_merging("),
    "dare": ("test_float64.py", "survivors rescaled exactly in float64; drop rate within sampling error", "am.dare("),
    "adamerging": ("test_core_optimize.py", "FusionBench's per-task accumulated step equals the official fused "
                   "step to ≤ 1e-12 in float64 over 20 steps", '"per_task"'),
    "regmean": ("test_methods_regmean.py", "Gram matrices and merged weights ≤ 1e-10 against FusionBench 0.2.33 in "
                "float64 on the same unlabeled images", 'method_spec("regmean"'),
    "regmean_plusplus": ("test_methods_regmean.py", "Gram matrices and merged weights ≤ 1e-10 against FusionBench "
                         "0.2.33 in float64 on the same unlabeled images", 'method_spec("regmean_plusplus"'),
    **{name: ("test_methods_masks.py", "≤ 1e-10 in float64 against FusionBench 0.2.33 (per-task models too)",
              f'method_spec("{name}")') for name in ("tall_masks", "consensus", "emr")},
    "wudi": ("test_methods_wudi_magmax_stock_slerp.py", "≤ 1e-10 in float64 against FusionBench 0.2.33 at the same "
             "number of Adam steps; the exact solver zeroes the objective's gradient", 'build("wudi"'),
    **{name: ("test_methods_wudi_magmax_stock_slerp.py", "≤ 1e-10 in float64 against FusionBench 0.2.33",
              f'build("{name}"') for name in ("magmax", "model_stock", "slerp")},
    **{name: ("test_methods_sparsify.py", "≤ 1e-10 in float64 against mergekit 0.1.5 (its merge_tensors; the "
              "sparsified τ too)", "def test_breadcrumbs_match_mergekit") for name in ("breadcrumbs", "breadcrumbs_ties")},
    **{name: ("test_methods_sparsify.py", "keep probabilities, L1 rescaling and the merge given mergekit's masks "
              "≤ 1e-10 in float64 against mergekit 0.1.5; our draws keep each magnitude rank at its probability",
              "methods.masked_task_vectors(") for name in ("della", "della_linear")},
    **{name: ("test_methods_svd.py", "≤ 1e-10 in float64 against FusionBench 0.2.33 (TSV's per-task parts too)",
              f'"{name}"') for name in ("tsv_m", "iso_c", "iso_cts")},
    "surgery": ("test_methods_surgery.py", "step 0's L1 losses and gradients and the modules after 20 Adam steps ≤ "
                "1e-10 in float64 against FusionBench 0.2.33's SurgeryModelWrapper loop", "surgery.train_surgery("),
    "we_moe": ("test_methods_we_moe.py", "step 0's routing weights and entropies, every loss and the routers after 20 "
               "Adam steps ≤ 1e-10 in float64 against FusionBench 0.2.33's WeightEnsemblingMoE (its "
               "construct_moe_model and adaptation loop), the trained model's per-example-routed logits ≤ 1e-9",
               "we_moe.train_we_moe("),
}
"""method → (the test file that compares it with its reference, what that test asserts, a call the file must make);
the AdaMerging variants share the ``adamerging`` entry."""


def _fidelity(name: str) -> tuple[str, str, str] | None:
    if name in FIDELITY:
        return FIDELITY[name]
    shares_adamerging = registry.REGISTRY[name].build is registry.REGISTRY["adamerging"].build
    return FIDELITY["adamerging"] if shares_adamerging else None


def _parameters(method: registry.MergeMethod) -> str:
    if not method.parameters and not method.fixed:
        return "—"
    declared = [f"`{p.name}` = `{p.default!r}`: {p.help}" for p in method.parameters]
    fixed = [f"`{name}` fixed to `{value!r}`" for name, value in method.fixed]
    return "<br>".join(declared + fixed)


def _row(name: str) -> str:
    method = registry.REGISTRY[name]
    test, bound, _ = _fidelity(name) if name not in registry.REFERENCE_ROWS else ("", "—", "")
    fidelity = f"{bound} (`tests/{test}`)" if test else bound
    cells = [f"`{name}`", method.label, method.paper, f"`{method.formula}`", _parameters(method),
             "yes" if method.needs_data else "no", "yes" if method.per_task_models else "no",
             method.reference or "—", fidelity]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def render() -> str:
    rows = "\n".join(_row(name) for name in registry.REGISTRY)
    groups = "\n".join(f"- `{group}`: {', '.join(f'`{n}`' for n in registry.group_members(group))}"
                       for group in registry.GROUPS)
    transforms = "\n".join(f"| `{t.name}` | {t.label} | {t.paper} | "
                           f"{', '.join(f'`{p.name}` = `{p.default!r}`' for p in t.parameters) or '—'} |"
                           for t in TRANSFORMS.values())
    return (
        "# Merge methods\n\n"
        "Every method of the registry, as `adamerging-jax demo --methods`, the `merge` config's `methods:`, "
        "`adamerging-jax paper --methods` and `adamerging_jax.method_spec` name them. θ0 is the pretrained model, "
        "τ_k = θ_k − θ0 the K task vectors; matrix methods read each weight as the reference does (a torch "
        "`nn.Linear` weight [out, in], q, k and v separate, one matrix per layer), as the model's binding declares. "
        "Generated from the registry by `python tests/test_methods_doc.py`; a test keeps it in step.\n\n"
        "| name | label | paper | formula | parameters (defaults) | needs data | per-task models | reference "
        "implementation | fidelity (test) |\n|---|---|---|---|---|---|---|---|---|\n"
        f"{rows}\n\n"
        "## Groups\n\nA group name stands for its methods wherever methods are named:\n\n"
        f"{groups}\n\n"
        "## What AdaMerging's λ scales\n\n"
        "AdaMerging learns θ = θ0 + Σ_k λ_k ⊙ T(τ)_k; the transform T is its `task_vectors` parameter, a name or "
        "`{name: ..., parameters}`:\n\n"
        "| transform | τ' | paper | parameters (defaults) |\n|---|---|---|---|\n"
        f"{transforms}\n")


def test_the_document_is_the_registry():
    assert DOC.read_text() == render(), "docs/methods.md is stale: run python tests/test_methods_doc.py"


def test_every_method_has_a_formula_and_a_fidelity_test_that_names_it():
    for name, method in registry.REGISTRY.items():
        assert method.formula, f"method {name!r} has no formula"
        if name in registry.REFERENCE_ROWS:
            continue
        assert method.reference, f"method {name!r} names no reference implementation"
        found = _fidelity(name)
        assert found is not None, f"method {name!r} has no fidelity entry in FIDELITY"
        test, _, call = found
        assert call in (ROOT / "tests" / test).read_text(), f"tests/{test} does not call {call!r} ({name})"


def test_the_readme_points_to_it():
    assert "docs/methods.md" in (ROOT / "README.md").read_text()


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render())
