"""The paper's table layouts over the shared report (:mod:`adamerging_jax.report`): the paper's column
titles and published numbers in parentheses beside ours (``adamerging_jax.paper.published``); the
generalization table split into the seen and the unseen tasks, the robustness table into one block per test
condition, as in the paper.
"""
from __future__ import annotations

from typing import Any

from adamerging_jax.paper.published import Reference
from adamerging_jax.paper.tasks import TASKS
from adamerging_jax.report import markdown_table, mean_comparison

COLUMN_TITLES = {name: task.dataset for name, task in TASKS.items()}
CELL_NOTE = "Top-1 accuracy (%) on each test set; in parentheses the published number where there is one."


def table_markdown(run: dict[str, Any], title: str, reference: Reference,
                   averages: dict[str, Reference] | None = None) -> str:
    """Table 1 / Table 2: methods × the 8 tasks with Avg.; optionally a table of averages against several sources."""
    text = f"## {title}\n\n{CELL_NOTE}\n\n" + markdown_table([run], reference=reference, task_labels=COLUMN_TITLES)
    if averages:
        text += "\nAverage accuracy (%) beside the published ones:\n\n" + mean_comparison(run, averages)
    return text


def generalization_markdown(run: dict[str, Any], title: str, reference: Reference) -> str:
    """Seen tasks (merged) and unseen tasks (only evaluated), each with its own Avg., as the paper's Table 3."""
    seen = run["merged_tasks"]
    unseen = [t for t in run["tasks"] if t not in seen]
    return (f"## {title}\n\n{CELL_NOTE}\n\n### Seen tasks (merged)\n\n"
            + markdown_table([run], seen, task_labels=COLUMN_TITLES)
            + "\n### Unseen tasks\n\n" + markdown_table([run], unseen, reference=reference, task_labels=COLUMN_TITLES))


def robustness_markdown(result: dict[str, Any], title: str, references: dict[str, Reference]) -> str:
    """One block per test condition: methods × the 4 tasks with Avg. (the published Avg. in parentheses)."""
    text = f"## {title}\n\n{CELL_NOTE} Corruption severity {result['severity']}.\n"
    for condition, run in result["conditions"].items():
        heading = "Clean test sets" if condition == "clean" else condition.replace("_", " ").capitalize()
        text += f"\n### {heading}\n\n" + markdown_table(
            [run], result["tasks"], reference=references.get(condition), task_labels=COLUMN_TITLES)
    return text
