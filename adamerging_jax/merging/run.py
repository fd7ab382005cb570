"""Run a checked plan and write its output folder: its model family runs it (`merging.families.FAMILIES`; the
CLIP family's output folder is described in `merging.clip_run`, the causal LM's in `merging.lm`).
"""

from __future__ import annotations

from typing import Any, Callable

from adamerging_jax.merging.families import FAMILIES


def run_plan(plan: Any, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build every method's model (AdaMerging resumable under ``OUT/state``), evaluate them on the test
    folders when given, export the chosen one and write the report; returns ``results.json``'s content.
    The plan's model family runs it (its ``run``: `merging.clip_run.run_clip_plan`, `merging.lm.run_lm_plan`)."""
    return FAMILIES[plan.config.model].run(plan, log)
