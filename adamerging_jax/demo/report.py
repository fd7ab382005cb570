"""Tables, JSON and plots of demo runs: a Table-1-like markdown table, λ heatmaps, accuracy bars, entropy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from adamerging_jax.core.checkpoint import write_atomic, write_json_atomic

LABELS = {
    "pretrained": "Pretrained (frozen head)",
    "individual": "Individual (fine-tuned)",
    "weight_average": "Weight averaging",
    "task_arithmetic": "Task arithmetic",
    "ties": "TIES-merging",
    "task_wise_adamerging": "Task-wise AdaMerging",
    "layer_wise_adamerging": "Layer-wise AdaMerging",
    "task_wise_adamerging++": "Task-wise AdaMerging++",
    "layer_wise_adamerging++": "Layer-wise AdaMerging++",
}


def markdown_table(
    runs: Sequence[dict[str, Any]],
    tasks: Sequence[str] | None = None,
    *,
    reference: dict[str, dict[str, float]] | None = None,
    task_labels: dict[str, str] | None = None,
) -> str:
    """Methods × tasks accuracy (%) with the average; over several runs (seeds), mean ± standard deviation.

    ``tasks``: the columns (default: the first run's tasks); Avg. is the unweighted mean over them, "–" when a
    method was not evaluated on one of them.  ``reference``: published numbers (%) per method and task (or
    "mean" for Avg.), shown in parentheses after ours where given.  ``task_labels``: column titles.
    """
    tasks = list(tasks if tasks is not None else runs[0]["tasks"])
    methods = list(runs[0]["methods"])
    labels = task_labels or {}
    header = "| Method | " + " | ".join(labels.get(t, t) for t in tasks) + " | Avg. |"
    lines = [header, "|" + "---|" * (len(tasks) + 2)]
    for method in methods:
        cells = []
        for column in tasks + ["mean"]:
            values = [_column_value(run["methods"][method]["accuracy"], tasks, column) for run in runs]
            cell = "–" if None in values else f"{100 * np.mean(values):.1f}"
            if len(runs) > 1 and None not in values:
                cell += f" ± {100 * np.std(values):.1f}"
            published = (reference or {}).get(method, {}).get(column)
            if published is not None:
                cell += f" ({published:.1f})"
            cells.append(cell)
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _column_value(accuracy: dict[str, float], tasks: Sequence[str], column: str) -> float | None:
    """Accuracy on ``column`` (a task, or "mean" over ``tasks``); None where the method has no number."""
    if column != "mean":
        return accuracy.get(column)
    values = [accuracy.get(t) for t in tasks]
    return None if None in values else float(np.mean(values))


def write_report(runs: Sequence[dict[str, Any]], output_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write `results.json`, `table.md` and (with matplotlib) the plots; every file atomically."""
    output_dir = Path(output_dir)
    files = {"json": output_dir / "results.json", "table": output_dir / "table.md"}
    write_json_atomic(files["json"], {"runs": list(runs)})
    seeds = [run["settings"]["seed"] for run in runs]
    title = f"Mean top-1 accuracy (%) over seeds {seeds}" if len(runs) > 1 else f"Top-1 accuracy (%), seed {seeds[0]}"
    write_atomic(files["table"], (f"{title}\n\n" + markdown_table(runs)).encode())
    if plots:
        files.update(_plots(runs[0], output_dir))
    return files


def _plots(run: dict[str, Any], output_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    methods, tasks = list(run["methods"]), run["tasks"]

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(methods)), 4))
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        ax.bar(np.arange(len(methods)) + i * width, [100 * run["methods"][m]["accuracy"][task] for m in methods], width, label=task)
    ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, [LABELS.get(m, m) for m in methods], rotation=30, ha="right")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend(fontsize=8)
    files["accuracy_plot"] = _save(fig, output_dir / "accuracy.png")

    adaptive = [m for m in methods if run["methods"][m].get("entropy")]
    if adaptive:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in adaptive:
            ax.plot(run["methods"][m]["entropy"], label=LABELS.get(m, m))
        ax.set_xlabel("step")
        ax.set_ylabel("summed entropy over tasks")
        ax.legend(fontsize=8)
        files["entropy_plot"] = _save(fig, output_dir / "entropy.png")

    layer_wise = [m for m in adaptive if m.startswith("layer_wise")]
    clamp = run["settings"].get("clamp")
    for m in layer_wise:
        lam = run["methods"][m]["coefficients"]
        matrix = np.array([np.ravel(lam[leaf]) for leaf in run["leaves"]]).T  # [K, leaves]
        if clamp:
            matrix = np.clip(matrix, *clamp)
        fig, ax = plt.subplots(figsize=(10, 0.6 * len(tasks) + 1.5))
        image = ax.imshow(matrix, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("parameter tensor (network order)")
        ax.set_title(f"λ learned by {LABELS.get(m, m)}")
        fig.colorbar(image, ax=ax)
        files[f"lambda_heatmap_{m}"] = _save(fig, output_dir / f"lambda_{m.replace('+', 'p')}.png")
    return files


def _save(fig, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
    return path
