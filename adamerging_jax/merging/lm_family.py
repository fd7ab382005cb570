"""The causal-LM family of ``merge`` (``model: causal_lm``): its YAML (a task's full fine-tuned folder or PEFT LoRA
adapter, its prompts and candidate answers), its rules across fields, and its run, checked and run by
`merging.lm` (θ0 and τ loaded, read by shards or streamed from the safetensors files,
`merging.lm_binding.causal_lm_binding`, the HF causal-LM export and its card).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from adamerging_jax.core.protocol import MergeSettings
from adamerging_jax.merging.family import Log, ModelFamily
from adamerging_jax.merging.schema import (
    ConfigError,
    MergeConfig,
    Prompts,
    TaskConfig,
    boolean,
    config_path,
    keys_of,
    nonempty_string,
    one_kind,
    string_list,
)


PROMPT_OPTIONS = {"file": (), "jsonl": ("field",)}


LM_TASK_KEYS = {"name", "finetuned", "adapter", "factored", "prompts", "candidates"}


LM_ONLY_KEYS = {"max_length", "mesh", "dtype"}


def _prompts(where: str, value: Any, base: Path) -> Prompts:
    kind, fields = one_kind(where, value, PROMPT_OPTIONS, "file")
    path = config_path(base, nonempty_string(f"{where}.{kind}", fields[kind]))
    if kind == "file":
        return Prompts(path)
    if not path.endswith(".jsonl"):
        raise ConfigError(f"{where}.jsonl must name a .jsonl file, got {path!r}")
    if "field" not in fields:
        raise ConfigError(f"{where}.field is required: the JSONL key that holds the prompt")
    return Prompts(path, nonempty_string(f"{where}.field", fields["field"]))


def _lm_task(where: str, value: Any, base: Path) -> TaskConfig:
    fields = keys_of(where, value, LM_TASK_KEYS)
    if "name" not in fields:
        raise ConfigError(f"{where}.name is required")
    if ("finetuned" in fields) == ("adapter" in fields):
        raise ConfigError(f"{where} needs exactly one of 'finetuned' (a full model folder) or 'adapter' (a PEFT "
                          "LoRA folder)")
    factored = boolean(f"{where}.factored", fields.get("factored", False))
    if factored and "adapter" not in fields:
        raise ConfigError(f"{where}.factored applies to an adapter; a full fine-tuned model has no factors")
    candidates = fields.get("candidates")
    if candidates is not None:
        candidates = string_list(f"{where}.candidates", candidates)
        if len(candidates) < 2 or len(set(candidates)) < len(candidates):
            raise ConfigError(f"{where}.candidates must be at least 2 distinct answers, got {list(candidates)}")
    return TaskConfig(
        name=nonempty_string(f"{where}.name", fields["name"]),
        finetuned=config_path(base, nonempty_string(f"{where}.finetuned", fields["finetuned"])) if "finetuned" in fields else None,
        adapter=config_path(base, nonempty_string(f"{where}.adapter", fields["adapter"])) if "adapter" in fields else None,
        factored=factored,
        prompts=_prompts(f"{where}.prompts", fields["prompts"], base) if fields.get("prompts") else None,
        candidates=candidates,
    )


def _check_lm(where: str, fields: Mapping[str, Any], tasks: Sequence[TaskConfig], settings: MergeSettings) -> None:
    """The causal-LM rules that span fields: candidates and factored adapters for every task or none, factored
    τ only with AdaMerging on raw τ, prompts for every task when a method learns from them."""
    if any(task.candidates for task in tasks) and not all(task.candidates for task in tasks):
        missing = [task.name for task in tasks if not task.candidates]
        raise ConfigError(f"{where}: tasks {missing} have no candidates; give candidates to every task or none")
    if any(task.factored for task in tasks):
        if unfactored := [task.name for task in tasks if not task.factored]:
            raise ConfigError(f"{where}: tasks {unfactored} are not factored adapters; factored: true needs every "
                              "task to be an adapter with factored: true")
        dense = [spec.name for spec in settings.methods
                 if not (spec.method.learns_coefficients and spec.describe()["params"].get("task_vectors") == "raw")]
        if dense:
            raise ConfigError(f"{where}: methods {dense} need dense task vectors; factored: true works with "
                              "AdaMerging on raw τ only (drop factored, or those methods)")
    if settings.needs_data:
        needing = [spec.name for spec in settings.methods if spec.method.needs_data]
        for i, task in enumerate(tasks):
            if task.prompts is None:
                raise ConfigError(f"{where}: tasks[{i}].prompts is required: {needing} learn from unlabeled prompts")
    if fields.get("mesh") is not None and fields.get("devices") is not None:
        raise ConfigError(f"{where}: give mesh or devices, not both")


def _prepare(config: MergeConfig, output: Path, coefficients_file: str | None, log: Log) -> Any:
    from adamerging_jax.merging.lm import prepare_lm

    return prepare_lm(config, output, coefficients_file, log)


def _run(plan: Any, log: Log) -> dict[str, Any]:
    from adamerging_jax.merging.lm import run_lm_plan

    return run_lm_plan(plan, log)


CAUSAL_LM = ModelFamily(name="causal_lm", title="causal_lm", own_keys=frozenset(LM_ONLY_KEYS),
                        task_keys=frozenset(LM_TASK_KEYS), parse_task=_lm_task, pretrained=config_path,
                        check_config=_check_lm, unified_exports=(), prepare=_prepare, run=_run)
