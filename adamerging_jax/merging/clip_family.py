"""The CLIP family of ``merge`` (``model: clip``, the default): its YAML (a task's fine-tuned image tower, class
names, templates, unlabeled images, test folder), its rules across fields, and its run, checked and run by
`merging.clip_run` (θ0 and τ of the image towers, the zero-shot heads, `merging.binding.clip_binding`, the HF
CLIP export and its card).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from adamerging_jax.core.protocol import MergeSettings
from adamerging_jax.data.strict_text import text_lines, visible
from adamerging_jax.merging.family import Log, ModelFamily
from adamerging_jax.merging.schema import (
    ConfigError,
    MergeConfig,
    TaskConfig,
    Unlabeled,
    boolean,
    checkpoint_location,
    config_path,
    keys_of,
    nonempty_string,
    one_kind,
    string_list,
)


SOURCE_OPTIONS = {"folder": ("recursive",), "class_folders": (), "tfds": ("split", "data_dir"), "file_list": ()}


TASK_KEYS = {"name", "finetuned", "unlabeled", "classes", "classes_file", "templates", "test"}


CLIP_ONLY_KEYS = {"pretrained_vision", "export", "trust_pickle", "offline", "eval_batch_size", "adaptation",
                  "held_out_fraction"}


UNIFIED_EXPORTS = ("emr", "surgery")
"""Methods with one model per task that ``merge`` exports for CLIP as a unified model plus what makes each task's
model from it (EMR-Merging: `merging.emr_files`; Representation Surgery: `merging.surgery_files`)."""


def _unlabeled(where: str, value: Any, base: Path) -> Unlabeled:
    kind, fields = one_kind(where, value, SOURCE_OPTIONS, "source")
    path = nonempty_string(f"{where}.{kind}", fields[kind])
    data_dir = fields.get("data_dir")
    return Unlabeled(kind, path if kind == "tfds" else config_path(base, path),
                     split=nonempty_string(f"{where}.split", fields["split"]) if "split" in fields else None,
                     data_dir=config_path(base, nonempty_string(f"{where}.data_dir", data_dir)) if data_dir is not None else None,
                     recursive=boolean(f"{where}.recursive", fields.get("recursive", False)))


def _classes(where: str, fields: dict[str, Any], base: Path) -> tuple[str, ...]:
    """The task's class names: each with a visible character, none twice; from ``classes`` or one a line of
    ``classes_file`` (blank lines skipped), the error naming the entry or line."""
    if ("classes" in fields) == ("classes_file" in fields):
        raise ConfigError(f"{where} needs exactly one of 'classes' or 'classes_file'")
    if "classes" in fields:
        field = f"{where}.classes"
        entries = [(f"{field}[{i}]", name.strip()) for i, name in enumerate(string_list(field, fields["classes"]))]
    else:
        field = f"{where}.classes_file"
        path = config_path(base, nonempty_string(field, fields["classes_file"]))
        if not os.path.isfile(path):
            raise ConfigError(f"{field}: {path!r} is missing")
        try:
            lines = text_lines(path)
        except ValueError as error:
            raise ConfigError(f"{field}: {error}") from None
        entries = [(f"{field} {path} line {number}", line.strip()) for number, line in enumerate(lines, start=1)
                   if line.strip()]
        if not entries:
            raise ConfigError(f"{field}: {path!r} names no class")
    first: dict[str, str] = {}
    for entry, name in entries:
        if not visible(name):
            raise ConfigError(f"{entry}: class name {name!r} has no visible character")
        if name in first:
            raise ConfigError(f"{entry}: class {name!r} is listed twice in the task (first at {first[name]})")
        first[name] = entry
    return tuple(name for _, name in entries)


def _templates(where: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    templates = string_list(where, value)
    for i, template in enumerate(templates):
        if template.count("{}") != 1:
            raise ConfigError(f"{where}[{i}] must hold one {{}} where the class name goes, got {template!r}")
    return templates


def _task(where: str, value: Any, base: Path) -> TaskConfig:
    fields = keys_of(where, value, TASK_KEYS)
    for key in ("name", "finetuned"):
        if key not in fields:
            raise ConfigError(f"{where}.{key} is required")
    return TaskConfig(
        name=nonempty_string(f"{where}.name", fields["name"]),
        finetuned=checkpoint_location(base, nonempty_string(f"{where}.finetuned", fields["finetuned"])),
        classes=_classes(where, fields, base),
        templates=_templates(f"{where}.templates", fields.get("templates")),
        unlabeled=_unlabeled(f"{where}.unlabeled", fields["unlabeled"], base) if fields.get("unlabeled") else None,
        test=config_path(base, nonempty_string(f"{where}.test", fields["test"])) if fields.get("test") is not None else None,
    )


def _check_held_out(where: str, tasks: Sequence[TaskConfig]) -> None:
    """Held-out adaptation adapts on part of each task's test folder: every task needs one, and none gives
    unlabeled images (they would not be read)."""
    for i, task in enumerate(tasks):
        if task.test is None:
            raise ConfigError(f"{where}: tasks[{i}].test is required: adaptation: held_out adapts on part of each "
                              "task's test images and scores the rest")
        if task.unlabeled is not None:
            raise ConfigError(f"{where}: tasks[{i}].unlabeled is not read with adaptation: held_out (it adapts on "
                              "part of the test images); remove it, or use adaptation: transductive")


def _check_config(where: str, fields: Mapping[str, Any], tasks: Sequence[TaskConfig], settings: MergeSettings
                  ) -> None:
    """Held-out adaptation's rules (`_check_held_out`); otherwise every task needs unlabeled images when a method
    learns from them."""
    if settings.adaptation.mode == "held_out":
        _check_held_out(where, tasks)
    elif settings.needs_data:
        needing = [spec.name for spec in settings.methods if spec.method.needs_data]
        for i, task in enumerate(tasks):
            if task.unlabeled is None:
                raise ConfigError(f"{where}: tasks[{i}].unlabeled is required: {needing} learn from unlabeled images")


def _prepare(config: MergeConfig, output: Path, coefficients_file: str | None, log: Log) -> Any:
    from adamerging_jax.merging.clip_run import prepare_clip

    return prepare_clip(config, output, coefficients_file, log)


def _run(plan: Any, log: Log) -> dict[str, Any]:
    from adamerging_jax.merging.clip_run import run_clip_plan

    return run_clip_plan(plan, log)


CLIP = ModelFamily(name="clip", title="CLIP", own_keys=frozenset(CLIP_ONLY_KEYS), task_keys=frozenset(TASK_KEYS),
                   parse_task=_task, pretrained=checkpoint_location, check_config=_check_config,
                   unified_exports=UNIFIED_EXPORTS, prepare=_prepare, run=_run)
