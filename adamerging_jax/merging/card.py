"""The model card (``model/README.md``) of a merged model: method, settings, tasks, λ per task, results."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from adamerging_jax.merging.config import MergeConfig


def lambda_summary(named: Mapping[str, Sequence[float]], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per task, mean / min / max of its λ over the checkpoint tensors (``named``: tensor → K values)."""
    matrix = np.asarray(list(named.values()), np.float64)  # [tensors, K]
    return {task: {"mean": float(matrix[:, k].mean()), "min": float(matrix[:, k].min()),
                   "max": float(matrix[:, k].max())} for k, task in enumerate(tasks)}


def model_card(config: MergeConfig, method: Mapping[str, Any], settings: Mapping[str, Any],
               summary: Mapping[str, Mapping[str, float]] | None, table: str | None, weights: str | None) -> str:
    """Markdown: what was merged and how, λ per task (mean/min/max over tensors), accuracy when tested."""
    lines = ["---", "library_name: transformers", "tags: [clip, model-merging, adamerging]", "---", "",
             f"# {method['label']} of {len(config.tasks)} CLIP image towers", "",
             f"Merged with adamerging_jax: θ = θ0 + Σ_k λ_k τ_k, τ_k = θ_k − θ0 over the image tower; "
             f"method `{method['name']}` ({method['paper']}), parameters `{method['params']}`.", "",
             f"- pretrained (θ0, text tower, projection): `{config.pretrained}`"]
    if config.pretrained_vision:
        lines.append(f"- θ0 image tower: `{config.pretrained_vision}`")
    lines.append(f"- export: `{config.export}`, precision during AdaMerging: `{config.precision}`")
    if weights:
        lines.append(f"- λ given by `{weights}`, not trained")
    adamerging = settings["adamerging"]
    lines += [f"- AdaMerging ({config.preset} preset): steps {adamerging['steps']}, lr {adamerging['lr']}, "
              f"{adamerging['batches_per_task']}×{adamerging['batch_size']} unlabeled images per task and step, "
              f"clamp {adamerging['clamp']}, seed {adamerging['seed']}", "", "## Tasks", "",
              "| Task | Fine-tuned tower | Classes |", "|---|---|---|"]
    lines += [f"| {task.name} | `{task.finetuned}` | {len(task.classes)} |" for task in config.tasks]
    if summary:
        lines += ["", "## λ per task (over the checkpoint tensors)", "", "| Task | mean | min | max |",
                  "|---|---|---|---|"]
        lines += [f"| {task} | {s['mean']:.4f} | {s['min']:.4f} | {s['max']:.4f} |" for task, s in summary.items()]
    if table:
        lines += ["", "## Top-1 accuracy (%) on the given test folders", "", table.rstrip()]
    return "\n".join(lines) + "\n"
