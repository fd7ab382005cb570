"""`docs/bad-inputs.md` is generated from the bad-input tables the tests run (their ``CASES``), so what the
documentation promises is what the tests check. Regenerate it with ``python tests/test_bad_inputs_doc.py``."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad-inputs.md"
TABLES = {
    "test_bad_inputs_core": "The core: task vectors, coefficients, the merge, the objective",
    "test_bad_inputs_run": "The optimiser: settings, non-finite steps, checkpoints and resume",
    "test_bad_inputs_protocol": "Evaluation, the method registry and the commands' settings",
    "test_bad_inputs_files": "Files: torch pickles, images, unlabeled folders, caches",
    "test_bad_inputs_clip": "CLIP checkpoints and their config.json",
    "test_merge_config": "`adamerging-jax merge` configs (checked by `--dry-run` and before every run)",
    "test_merge_lm": "`adamerging-jax merge` for causal language models (checked by `--dry-run`)",
    "test_merge_lm_streaming": "The output folder of a causal-LM merge: a kill, a full disk",
}
OUTCOMES = {"warning+None": "warned cache miss (recomputed)", "handled": "read correctly",
            "previous-kept": "the previous result whole (or none), nothing half-written left; the rerun completes",
            "no-space": "one-line `error:` (exit); the previous result whole, nothing left beside it; the rerun "
                        "completes once space is freed"}


def _outcome(expected) -> str:
    if isinstance(expected, str):
        return OUTCOMES[expected]
    if isinstance(expected, type):
        return f"`{expected.__name__}`"
    return "one-line `error:` (exit)"  # a merge config case: the command stops with one line


def render() -> str:
    sys.path.insert(0, str(Path(__file__).parent))
    sections, total = [], 0
    for module, title in TABLES.items():
        cases = importlib.import_module(module).CASES
        total += len(cases)
        rows = "\n".join(f"| `{case.id}` | {case.description} | {_outcome(case.expected)} |" for case in cases)
        sections.append(f"## {title}\n\n| case | input | what happens |\n|---|---|---|\n{rows}\n")
    header = (
        "# What happens on bad input\n\n"
        f"Every row below is a test ({total} in all): the input is built, the call is made, and the test checks "
        "the outcome and that the message names the culprit (the leaf, tensor, file, task or field). Errors are "
        "one line; nothing half-written is left behind. Generated from the tests' tables by "
        "`python tests/test_bad_inputs_doc.py`.\n\n")
    return header + "\n".join(sections)


def test_the_document_is_the_tests_tables():
    assert DOC.read_text() == render(), "docs/bad-inputs.md is stale: run python tests/test_bad_inputs_doc.py"


def test_the_readme_points_to_it_and_the_tables_are_large():
    readme = (ROOT / "README.md").read_text()
    assert "## What happens on bad input" in readme and "docs/bad-inputs.md" in readme
    assert render().count("\n| `") >= 30


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render())
    print(f"wrote {DOC}")
