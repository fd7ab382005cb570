"""The report of a merging run, for every scenario: a markdown table (methods × tasks with the average,
published numbers beside ours where given), ``results.json``, and plots (accuracy per method and task, summed
entropy per step, λ heatmaps task × tensor). Every file is written atomically.

A *run* is the JSON-able dict a binding returns: ``{"tasks": [...], "methods": {name: MethodRecord.to_json()},
...}``; several runs (seeds) give mean ± standard deviation.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from adamerging_jax.core.checkpoint import write_atomic, write_json_atomic
from adamerging_jax.core.protocol import file_stem
from adamerging_jax.core.registry import REGISTRY

Reference = Mapping[str, Mapping[str, float]]
"""Published numbers (%): method → {task or "mean": value}."""


def _label(run: Mapping[str, Any], method: str) -> str:
    """The row title: the record's label, else the registered method's, else the name."""
    registered = REGISTRY.get(method)
    return run["methods"][method].get("label") or (registered.label if registered else method)


def _column_value(accuracy: Mapping[str, float], tasks: Sequence[str], column: str) -> float | None:
    """Accuracy on `column` (a task, or "mean" over `tasks`); None where the method has no number."""
    if column != "mean":
        return accuracy.get(column)
    values = [accuracy.get(t) for t in tasks]
    return None if None in values else float(np.mean(values))


def markdown_table(
    runs: Sequence[Mapping[str, Any]],
    tasks: Sequence[str] | None = None,
    *,
    reference: Reference | None = None,
    task_labels: Mapping[str, str] | None = None,
) -> str:
    """Methods × tasks accuracy (%) with Avg.; over several runs (seeds), mean ± standard deviation.

    ``tasks``: the columns (default: the first run's tasks); Avg. is the unweighted mean over them, "–" when a
    method was not evaluated on one of them. ``reference``: published numbers in parentheses after ours.
    ``task_labels``: column titles.
    """
    tasks = list(tasks if tasks is not None else runs[0]["tasks"])
    labels = task_labels or {}
    lines = ["| Method | " + " | ".join(labels.get(t, t) for t in tasks) + " | Avg. |", "|" + "---|" * (len(tasks) + 2)]
    for method in runs[0]["methods"]:
        cells = []
        for column in [*tasks, "mean"]:
            values = [_column_value(run["methods"][method]["accuracy"], tasks, column) for run in runs]
            cell = "–" if None in values else f"{100 * np.mean(values):.1f}"
            if len(runs) > 1 and None not in values:
                cell += f" ± {100 * np.std(values):.1f}"
            published = (reference or {}).get(method, {}).get(column)
            if published is not None:
                cell += f" ({published:.1f})"
            cells.append(cell)
        lines.append(f"| {_label(runs[0], method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mean_comparison(run: Mapping[str, Any], references: Mapping[str, Reference]) -> str:
    """Method | ours | one column per reference (e.g. the paper, FusionBench): the average accuracy only."""
    names = list(references)
    lines = ["| Method | ours | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for method, record in run["methods"].items():
        published = [references[n].get(method, {}).get("mean") for n in names]
        cells = [f"{100 * record['mean']:.1f}"] + ["–" if v is None else f"{v:.1f}" for v in published]
        lines.append(f"| {_label(run, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_finite(runs: Sequence[Mapping[str, Any]]) -> None:
    """Refuse to report a run whose accuracies or entropies are not finite: the table would mislead."""
    for run in runs:
        for method, record in run["methods"].items():
            values = list(record["accuracy"].values()) + list(record.get("entropy") or [])
            if not np.all(np.isfinite(np.asarray(values, np.float64))):
                raise ValueError(f"method {method!r} has non-finite results; no report is written")


def write_report(
    output_dir: str | Path,
    result: Mapping[str, Any],
    markdown: str,
    *,
    plot_run: Mapping[str, Any] | None = None,
    clamp: tuple[float, float] | None = None,
) -> dict[str, Path]:
    """``results.json`` (`result`), ``table.md`` (`markdown`) and, given `plot_run`, its plots (needs
    matplotlib), in `output_dir`; returns the paths written."""
    output_dir = Path(output_dir)
    files = {"json": output_dir / "results.json", "table": output_dir / "table.md"}
    write_json_atomic(files["json"], result)
    write_atomic(files["table"], markdown.encode())
    if plot_run is not None:
        files.update(plots(plot_run, output_dir, clamp))
    return files


def coefficient_matrix(coefficients: Mapping[str, Any]) -> np.ndarray:
    """λ as a [K, tensors] matrix in leaf order (a stacked leaf's [K, L] gives L columns)."""
    columns = [np.asarray(value, np.float64) for value in coefficients.values()]
    k = columns[0].shape[0]
    return np.concatenate([c.reshape(k, -1) for c in columns], axis=1)


def plots(run: Mapping[str, Any], output_dir: Path, clamp: tuple[float, float] | None = None) -> dict[str, Path]:
    """Accuracy per method and task (when any was evaluated), summed entropy per step, and a λ heatmap per
    layer-wise method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, Path] = {}
    methods, tasks = list(run["methods"]), list(run["tasks"])

    if any(run["methods"][m]["accuracy"] for m in methods):
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(methods)), 4))
        width = 0.8 / len(tasks)
        for i, task in enumerate(tasks):
            heights = [100 * run["methods"][m]["accuracy"].get(task, np.nan) for m in methods]
            ax.bar(np.arange(len(methods)) + i * width, heights, width, label=task)
        ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, [_label(run, m) for m in methods], rotation=30,
                      ha="right")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.legend(fontsize=8)
        files["accuracy_plot"] = _save(fig, output_dir / "accuracy.png")

    adaptive = [m for m in methods if run["methods"][m].get("entropy")]
    if adaptive:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in adaptive:
            ax.plot(run["methods"][m]["entropy"], label=_label(run, m))
        ax.set_xlabel("step")
        ax.set_ylabel("summed entropy over tasks")
        ax.legend(fontsize=8)
        files["entropy_plot"] = _save(fig, output_dir / "entropy.png")

    merged_tasks = list(run.get("merged_tasks", tasks))
    for m in adaptive:
        record = run["methods"][m]
        if record.get("params", {}).get("granularity") != "layer" or not record.get("coefficients"):
            continue
        matrix = coefficient_matrix(record["coefficients"])
        if clamp:
            matrix = np.clip(matrix, *clamp)
        fig, ax = plt.subplots(figsize=(10, 0.6 * len(merged_tasks) + 1.5))
        image = ax.imshow(matrix, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(merged_tasks)), merged_tasks)
        ax.set_xlabel("parameter tensor (network order)")
        ax.set_title(f"λ learned by {_label(run, m)}")
        fig.colorbar(image, ax=ax)
        files[f"coefficient_heatmap_{m}"] = _save(fig, output_dir / f"lambda_{file_stem(m)}.png")
    return files


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
    return path
