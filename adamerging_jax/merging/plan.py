"""Every check of a ``merge`` run, before any compute, and the plan it prints (``--dry-run``).

Checked, in order: the output folder can be written, lies outside every input folder (and no input inside
it) and holds nothing a run does not write; the methods and their parameters (by the config
schema); each task's unlabeled images exist, are non-empty and every one decodes; each test folder holds class
folders named as the task's classes, every image decoding; every checkpoint loads and every image tower has
θ0's config; a ``--weights`` file reads and fits the model. A causal language model (``model: causal_lm``)
is checked by :mod:`~adamerging_jax.merging.lm` instead (checkpoints and adapters against θ0, the tokenizer,
the prompts, the candidates). Each failure is a `MergeError` naming the file, task or field,
which the command prints as one line ``error: ...``, never a traceback. A real run makes the same plan and runs from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from adamerging_jax.core.checkpoint import check_writable_folder
from adamerging_jax.core.protocol import MergeSettings
from adamerging_jax.merging.binding import ClipTowers, TaskHeads, clip_binding, load_towers
from adamerging_jax.merging.checked_run import CheckedRun, guarded, run_mesh
from adamerging_jax.merging.config import MergeConfig, TaskConfig, Unlabeled, require
from adamerging_jax.merging.errors import MergeError


def check_writable(output: Path) -> None:
    """``output`` is a folder, or can be made (`check_writable_folder`; nothing is created)."""
    try:
        check_writable_folder(output)
    except ValueError as error:
        raise MergeError(f"--output {error}") from None


def input_paths(config: MergeConfig) -> dict[str, str | None]:
    """Every file or folder the run reads, by config field (tfds names and hub ids are not paths)."""
    paths: dict[str, str | None] = {"pretrained": config.pretrained, "pretrained_vision": config.pretrained_vision}
    for i, task in enumerate(config.tasks):
        where = f"tasks[{i}]"
        paths.update({f"{where}.finetuned": task.finetuned, f"{where}.adapter": task.adapter,
                      f"{where}.test": task.test, f"{where}.prompts": task.prompts.path if task.prompts else None})
        if task.unlabeled is not None:
            kind = task.unlabeled.kind
            paths[f"{where}.unlabeled.{kind}"] = task.unlabeled.path if kind != "tfds" else None
            paths[f"{where}.unlabeled.data_dir"] = task.unlabeled.data_dir
    return paths


def check_output_placement(config: MergeConfig, output: Path) -> None:
    """The output is outside every input and holds nothing a run does not write (`adamerging_jax.output`)."""
    from adamerging_jax.output import check_output_contents, check_placement

    try:
        check_placement(output, input_paths(config))
        check_output_contents(output)
    except ValueError as error:
        raise MergeError(str(error)) from None


def unlabeled_source(task: TaskConfig, unlabeled: Unlabeled) -> Any:
    """The task's unlabeled images as a random-access source (labels, if any, are never read)."""
    from adamerging_jax.data.folder import FolderImages
    from adamerging_jax.data.unlabeled import ImageFileList, UnlabeledFolder

    if unlabeled.kind == "folder":
        return UnlabeledFolder(unlabeled.path, recursive=unlabeled.recursive)
    if unlabeled.kind == "class_folders":
        root, split = os.path.split(os.path.normpath(unlabeled.path))
        return FolderImages(root, split)
    if unlabeled.kind == "file_list":
        return ImageFileList(unlabeled.path)
    require("tensorflow_datasets", "data", f"task {task.name!r}: a tfds source")
    from adamerging_jax.data.tfds_sources import split_source

    if unlabeled.data_dir is None:
        raise ValueError("a tfds source needs data_dir (the folder it was prepared in)")
    return split_source(unlabeled.path, unlabeled.data_dir, unlabeled.split)


def test_source(task: TaskConfig) -> Any:
    """The task's labelled test images: class folders under ``task.test`` named as its classes."""
    from adamerging_jax.data.folder import FolderImages

    root, split = os.path.split(os.path.normpath(task.test))
    return FolderImages(root, split, classes=task.classes)


def _decodes(source: Any, what: str) -> None:
    """Every image of a path-backed source decodes; ValueError naming the first one that does not."""
    from adamerging_jax.data.unlabeled import check_images

    if hasattr(source, "paths") and (bad := check_images(source)):
        path, reason = next(iter(bad.items()))
        raise ValueError(f"{what}: {len(bad)} unreadable image(s), first {path!r}: {reason}")


def source_identity(source: Any) -> str:
    """What identifies a source's data beyond the sampled images the batch fingerprint reads: every file's
    path and size for a path-backed source, else its description and length."""
    if hasattr(source, "paths"):
        entries = [(path, os.path.getsize(path)) for path in source.paths]
    else:
        entries = [repr(source), len(source)]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


@dataclasses.dataclass
class Plan(CheckedRun):
    """A checked CLIP run: also the loaded checkpoints, the heads, and the unlabeled and test sources (None
    when not given)."""

    towers: ClipTowers
    heads: TaskHeads
    unlabeled: list[Any] | None
    tests: list[Any] | None

    @property
    def pretrained(self) -> Any:
        return self.towers.pretrained

    def describe(self) -> str:
        """The plan as text: model, tasks with their data, methods with their λ count per task, output."""
        config, vision = self.config, self.towers.config.vision
        lines = [f"pretrained: {config.pretrained} (image tower {vision.width} wide, {vision.layers} layers, "
                 f"{vision.image_size} px)"]
        for k, task in enumerate(config.tasks):
            data = f"{len(self.unlabeled[k])} unlabeled images" if self.unlabeled else "no unlabeled images"
            test = f", {len(self.tests[k])} test images" if self.tests else ""
            lines.append(f"task {task.name}: {task.finetuned}; {len(task.classes)} classes; {data}{test}")
        lines += self.method_lines()
        if self.settings.adaptation.mode == "held_out":
            lines.append(f"adaptation: held out, {self.settings.adaptation.fraction} of each task's test images "
                         "adapted on (its unlabeled images above), the rest scored (its test images above)")
        adamerging = self.settings.adamerging
        lines.append(f"AdaMerging: {config.preset} preset, {adamerging.steps} steps, lr {adamerging.lr}, "
                     f"{adamerging.batches_per_task}x{adamerging.batch_size} images per task and step, clamp "
                     f"{adamerging.clamp}, precision {config.precision}")
        if self.weights is not None:
            lines.append(f"λ given by --weights: {config.exported} applies them, no training")
        lines.append(f"export: {config.exported} as {config.export} to {self.output / 'model'}")
        return "\n".join(lines)


def held_out_split(settings: MergeSettings, tasks: list[TaskConfig] | tuple[TaskConfig, ...], tests: list[Any]
                   ) -> tuple[list[Any], list[Any]]:
    """Per task, the test images adapted on and those scored, as `settings.adaptation` splits each test folder
    (`core.protocol.Adaptation.split`: disjoint, seeded); one line naming a task too small to split."""
    from adamerging_jax.data.pipeline import SourceSubset

    adapted, scored = [], []
    for t, (task, source) in enumerate(zip(tasks, tests)):
        adapt_indices, score_indices = guarded(f"task {task.name!r} test",
                                               lambda: settings.adaptation.split(len(source), t))
        adapted.append(SourceSubset(source, adapt_indices))
        scored.append(SourceSubset(source, score_indices))
    return adapted, scored


def prepare(config: MergeConfig, output: str | os.PathLike, weights: str | None = None,
            log: Callable[[str], None] = print) -> Any:
    """Check everything (module docstring) and return the plan (a `Plan`, or for a causal LM an
    `adamerging_jax.merging.lm.LmPlan`); `MergeError` naming the fault on a failure."""
    require("flax", "models", "the merge command")
    require("transformers", "models", "the merge command")
    require("safetensors", "models", "the merge command")
    output = Path(output)
    check_writable(output)
    check_output_placement(config, output)
    if config.model == "causal_lm":
        from adamerging_jax.merging.lm import prepare_lm

        return prepare_lm(config, output, weights, log)
    settings = guarded(config.source, config.settings)
    unlabeled = tests = None
    if any(task.unlabeled for task in config.tasks):
        if missing := [task.name for task in config.tasks if not task.unlabeled]:
            raise MergeError(f"{config.source}: tasks {missing} have no unlabeled images; give them to every task or none")
        require("grain", "data", "reading unlabeled images")
        unlabeled = []
        for task in config.tasks:
            what = f"task {task.name!r} unlabeled"
            source = guarded(what, lambda task=task: unlabeled_source(task, task.unlabeled))
            guarded(what, lambda: _decodes(source, what))
            unlabeled.append(source)
    if any(task.test for task in config.tasks):
        if missing := [task.name for task in config.tasks if not task.test]:
            raise MergeError(f"{config.source}: tasks {missing} have no test folder; give one to every task or to none")
        tests = []
        for task in config.tasks:
            what = f"task {task.name!r} test"
            source = guarded(what, lambda task=task: test_source(task))
            guarded(what, lambda: _decodes(source, what))
            tests.append(source)
    if settings.adaptation.mode == "held_out":
        unlabeled, tests = held_out_split(settings, config.tasks, tests)
    towers = guarded("checkpoints", lambda: load_towers(config, log))
    heads = TaskHeads(towers, config.tasks, config.pretrained)
    binding = clip_binding(towers, heads)
    settings = binding.merge_settings(settings)
    plan = Plan(config, settings, binding, output, run_mesh(config, settings), towers=towers, heads=heads,
                unlabeled=unlabeled, tests=tests)
    plan.read_given_weights(weights)
    return plan
