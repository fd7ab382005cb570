"""The model card (``model/README.md``) of a merged model (CLIP image tower or causal LM): method, settings,
tasks, λ per task, results."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from adamerging_jax.core.registry import REGISTRY
from adamerging_jax.merging.schema import MergeConfig


def coefficient_summary(named: Mapping[str, Sequence[float]], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per task, mean / min / max of its λ over the checkpoint tensors (``named``: tensor → K values)."""
    matrix = np.asarray(list(named.values()), np.float64)  # [tensors, K]
    return {task: {"mean": float(matrix[:, k].mean()), "min": float(matrix[:, k].min()),
                   "max": float(matrix[:, k].max())} for k, task in enumerate(tasks)}


def model_card(config: MergeConfig, method: Mapping[str, Any], settings: Mapping[str, Any],
               summary: Mapping[str, Mapping[str, float]] | None, table: str | None, coefficients_file: str | None,
               sections: Sequence[str] = ()) -> str:
    """Markdown: what was merged and how, `sections` (lines, e.g. `emr_lines`), λ per task (mean/min/max over
    tensors), accuracy when tested."""
    lines = ["---", "library_name: transformers", "tags: [clip, model-merging, adamerging]", "---", "",
             f"# {method['label']} of {len(config.tasks)} CLIP image towers", "",
             f"Merged with adamerging_jax, method `{method['name']}` ({method['paper']}): {_formula(method)}, "
             f"τ_k = θ_k − θ0 over the image tower; parameters `{method['params']}`.", "",
             f"- pretrained (θ0, text tower, projection): `{config.pretrained}`"]
    if config.pretrained_vision:
        lines.append(f"- θ0 image tower: `{config.pretrained_vision}`")
    precision = f", precision during AdaMerging: `{config.precision}`" if _learns(method) else ""
    lines.append(f"- export: `{config.export}`{precision}")
    lines += _how(config, method, settings, coefficients_file, "images")
    lines += sections
    lines += ["", "## Tasks", "", "| Task | Fine-tuned tower | Classes |", "|---|---|---|"]
    lines += [f"| {task.name} | `{task.finetuned}` | {len(task.classes)} |" for task in config.tasks]
    lines += coefficient_lines(summary)
    if table:
        lines += ["", "## Top-1 accuracy (%) on the given test folders", "", table.rstrip()]
    return "\n".join(lines) + "\n"


def _formula(method: Mapping[str, Any]) -> str:
    """The registered method's formula (docs/methods.md), or the task-arithmetic form for one not registered."""
    registered = REGISTRY.get(method["name"])
    return f"`{registered.formula}`" if registered is not None and registered.formula else "θ = θ0 + Σ_k λ_k τ_k"


def _learns(method: Mapping[str, Any]) -> bool:
    """Whether the exported method learns λ (AdaMerging; a method given λ by a file is not registered as such)."""
    registered = REGISTRY.get(method["name"])
    return registered is None or registered.learns_coefficients


def _how(config: MergeConfig, method: Mapping[str, Any], settings: Mapping[str, Any], coefficients_file: str | None,
         unlabeled: str) -> list[str]:
    """The card's lines on where λ came from (given by a file, or AdaMerging's settings); none for a method
    that learns no λ."""
    if not _learns(method):
        return []
    lines = [f"- λ given by `{coefficients_file}`, not trained"] if coefficients_file else []
    adamerging = settings["adamerging"]
    return lines + [f"- AdaMerging ({config.preset} preset): steps {adamerging['steps']}, lr {adamerging['lr']}, "
                    f"{adamerging['batches_per_task']}×{adamerging['batch_size']} unlabeled {unlabeled} per task and "
                    f"step, clamp {adamerging['clamp']}, seed {adamerging['seed']}"]


def emr_lines(config: MergeConfig) -> list[str]:
    """The card's section on an EMR-Merging export: how to build each task's model from this folder."""
    pretrained = config.pretrained_vision or config.pretrained
    return ["", "## One model per task (EMR-Merging)", "",
            "This folder's model is the unified θ_uni = θ0 + τ_uni. `emr.safetensors` holds, per task t, the mask "
            "m_t (uint8, `mask/<task>/<tensor name>`, torch layout) and the rescaler s_t (`rescalers`, in the order "
            "of its metadata's `tasks`). Task t's image tower is θ_t = θ0 + s_t · m_t ⊙ τ_uni, τ_uni = θ_uni − θ0:",
            "", "```python", "from adamerging_jax.merging.emr_files import load_emr_task",
            "from adamerging_jax.models.clip_checkpoint import load_hf_clip", "",
            f'theta0 = load_hf_clip("{pretrained}")[1]["vision"]',
            f'tower = load_emr_task("<this folder>", theta0, "{config.tasks[0].name}")', "```"]


def surgery_lines(names: Sequence[str]) -> list[str]:
    """The card's section on a Representation Surgery export: the modules' file and tensor names."""
    return ["", "## Representation Surgery modules", "",
            "This folder's model is the base model. `surgery.safetensors` holds each task's module (torch "
            "`Linear.weight` layout, FusionBench's `SurgeryModelWrapper` names); task t's prediction is its head on "
            "z − W_up,t ReLU(W_down,t z), z the normalised image embedding. Tensors:", "",
            *[f"- `{name}`" for name in names], "",
            "`adamerging_jax.merging.surgery_files.load_surgery_modules(\"<this folder>\")` reads them."]


def we_moe_lines() -> list[str]:
    """The card's section on a WEMoE export: why a plain HF folder cannot hold it, and how to load it."""
    return ["", "## WEMoE: routers and task vectors", "",
            "A plain HF folder cannot hold this model: the MLPs of its upscaled blocks are W_0 + Σ_k r_k(h) τ_k, "
            "weights that change with every input. `model.safetensors` is the dense part only (task arithmetic, "
            "with the upscaled MLPs at the pretrained W_0: not a usable model on its own); `we_moe.safetensors` holds "
            "the routers (`router/...`) and the upscaled MLPs' task vectors (`expert/...`).", "",
            "```python", "from adamerging_jax.merging.we_moe_files import load_we_moe",
            "from adamerging_jax.models import clip, clip_checkpoint", "",
            'vision = clip_checkpoint.load_hf_clip("<this folder>")[1]["vision"]',
            'tasks, frozen, routers = load_we_moe("<this folder>", vision)',
            "pooled = clip.moe_vision_forward(frozen, routers, images, config)[1]", "```"]


def coefficient_lines(summary: Mapping[str, Mapping[str, float]] | None) -> list[str]:
    """The card's "λ per task" section (none without λ)."""
    if not summary:
        return []
    lines = ["", "## λ per task (over the checkpoint tensors)", "", "| Task | mean | min | max |", "|---|---|---|---|"]
    return lines + [f"| {task} | {s['mean']:.4f} | {s['min']:.4f} | {s['max']:.4f} |" for task, s in summary.items()]


def lm_model_card(config: MergeConfig, method: Mapping[str, Any], settings: Mapping[str, Any],
                  summary: Mapping[str, Mapping[str, float]] | None, entropy_table: str | None,
                  coefficients_file: str | None, dtype: str) -> str:
    """Markdown for a merged causal LM: what was merged and how, its weights' dtype, λ per task, the prompts'
    entropy per method."""
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [model-merging, adamerging]", "---", "",
             f"# {method['label']} of {len(config.tasks)} fine-tuned language models", "",
             f"Merged with adamerging_jax, method `{method['name']}` ({method['paper']}): {_formula(method)}, "
             f"τ_k = θ_k − θ0 (a LoRA adapter's τ = s (B A)ᵀ); parameters `{method['params']}`.", "",
             f"- pretrained (θ0, tokenizer): `{config.pretrained}`",
             f"- weights stored as {dtype}",
             f"- precision during AdaMerging: `{config.precision}`, prompts cut to {config.max_length} tokens"]
    lines += _how(config, method, settings, coefficients_file, "prompts")
    lines += ["", "## Tasks", "", "| Task | Fine-tuned model or adapter | Prompts | Answers |", "|---|---|---|---|"]
    for task in config.tasks:
        kind = "adapter" + (", factored" if task.factored else "") if task.adapter else "full"
        prompts = f"`{task.prompts.path}`" if task.prompts else "–"
        answers = ", ".join(repr(c) for c in task.candidates) if task.candidates else "next token"
        lines.append(f"| {task.name} | `{task.checkpoint}` ({kind}) | {prompts} | {answers} |")
    lines += coefficient_lines(summary)
    if entropy_table:
        lines += ["", "## Entropy of the predictions on the unlabeled prompts", "", entropy_table.rstrip()]
    return "\n".join(lines) + "\n"
