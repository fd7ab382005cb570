"""The experiments' outputs: ``results.json`` and ``table.md`` laid out like the paper's tables, with the
published numbers in parentheses beside ours (``adamerging_jax.paper.published``).

Tables are :func:`adamerging_jax.demo.report.markdown_table` (methods × tasks, Avg.) with the paper's column
titles; the generalization table is split into the seen and the unseen tasks, the robustness table into one
block per test condition, as in the paper.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from adamerging_jax.core.checkpoint import write_atomic, write_json_atomic
from adamerging_jax.demo.report import LABELS, markdown_table
from adamerging_jax.paper.published import Reference
from adamerging_jax.paper.tasks import TASKS

COLUMN_TITLES = {name: task.dataset for name, task in TASKS.items()}
CELL_NOTE = "Top-1 accuracy (%) on each test set; in parentheses the published number where there is one."


def mean_comparison(run: dict[str, Any], references: dict[str, Reference]) -> str:
    """Method | ours | one column per reference (e.g. the paper, FusionBench): the average accuracy only."""
    names = list(references)
    lines = ["| Method | ours | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for method, record in run["methods"].items():
        published = [references[n].get(method, {}).get("mean") for n in names]
        cells = [f"{100 * record['mean']:.1f}"] + ["–" if v is None else f"{v:.1f}" for v in published]
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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


def write_outputs(output_dir: str | Path, result: dict[str, Any], markdown: str) -> dict[str, Path]:
    """``results.json`` and ``table.md`` in ``output_dir``, each written atomically."""
    output_dir = Path(output_dir)
    files = {"json": output_dir / "results.json", "table": output_dir / "table.md"}
    write_json_atomic(files["json"], result)
    write_atomic(files["table"], markdown.encode())
    return files
