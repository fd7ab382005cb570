"""The CLIP family's run of ``merge``: every check before any compute (`prepare_clip`), then the run
(`run_clip_plan`), which writes its output folder (resumable in place):

    OUT/model/               the exported method's model as an HF folder (save_hf_clip), tokenizer files,
                             preprocessor_config.json and the model card README.md; for EMR-Merging the
                             unified model and emr.safetensors, each task's mask and rescaler (merging.emr_files);
                             for Representation Surgery the base model and surgery.safetensors, each task's
                             module (merging.surgery_files)
    OUT/lambdas.json         λ by checkpoint tensor name → one value per task (adaptive methods or --weights)
    OUT/lambdas.safetensors  the same, tensor name → float32 [K]
    OUT/results.json, table.md, *.png   the report (adamerging_jax.report)
    OUT/state/<method>/      AdaMerging's resumable state: a rerun continues it; one with other settings,
                             data or task vectors is refused with the difference named

Everything but ``state/`` is built in a hidden sibling folder and committed as the new ``OUT`` at once
(`adamerging_jax.output.staged_output`; ``state/`` is carried over): a killed run leaves the previous result
or the new one, and no file of an earlier run survives beside the new ones.

A run whose exported method streams (`core.registry.MergeMethod.streaming`), with no method that learns from
data, no test folders and no ``--weights`` (`streaming.streams`, the rule the causal LM shares), and whose
checkpoints are all HF folders or hub ids (`clip_checkpoint.streamable`), loads nothing: `prepare_clip` checks
the checkpoints from their safetensors headers (`merging.binding.open_towers`) and `run_streamed` merges the
image tower tensor by tensor from disk into the same ``OUT/model`` export, in memory a few copies of the
largest tensor times K (`merging.streaming`). Only the exported method is built, and no zero-shot head.

``--weights FILE`` applies given λ with the exported method's task vectors, θ = θ0 + Σ_k clamp(λ_k) τ_k,
without training (FusionBench's ``method.weights=``; read by `merging.checked_run.read_coefficients_file` for every
family): our ``lambdas.json`` / ``lambdas.safetensors``,
FusionBench's layer-wise ``[K, n]`` ``.pt`` / ``.npy`` (columns in the HF parameter order; read without
running pickled code), or the official ``[n, 1 + K]`` layout: rows in the official repository's open_clip
order (the binding's ``official_rows``: 158 rows for ViT-B/32), in the HF parameter order, or one task-wise
row. Every given λ must be finite and, when the exported method has no clamp (the FusionBench preset), within
±``lambda_bound``; errors name the tensor (or row) and the task. Before the model is written, every tensor of
it is checked finite (`check_exported_finite`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

import adamerging_jax as am
from adamerging_jax.core.checkpoint import write_atomic
from adamerging_jax.core.emr import EmrModels
from adamerging_jax.core.protocol import MergeSettings, build_models, records_json, score_models
from adamerging_jax.core.registry import Merged
from adamerging_jax.core.surgery import SurgeryModels
from adamerging_jax.merging.binding import ClipTowers, TaskHeads, clip_binding, load_towers, open_towers
from adamerging_jax.merging.card import emr_lines, model_card, surgery_lines, we_moe_lines
from adamerging_jax.merging.checked_run import CheckedRun, guarded, run_mesh
from adamerging_jax.merging.emr_files import write_emr_file
from adamerging_jax.merging.errors import MergeError
from adamerging_jax.merging.exports import (
    check_exported_finite,
    spec_with_coefficients,
    write_coefficients,
    write_report,
    write_streamed,
)
from adamerging_jax.merging.schema import MergeConfig, TaskConfig, Unlabeled, require
from adamerging_jax.merging.streaming import STREAMED, TaskTensors, TensorStream, binding_placement, streams
from adamerging_jax.merging.surgery_files import module_names, write_surgery_file
from adamerging_jax.merging.we_moe_files import dense_tower, write_we_moe_file
from adamerging_jax.models.clip_checkpoint import (
    ONE_FILE,
    VISION_PREFIX,
    StreamedTowers,
    hf_shapes,
    streamable,
    write_clip_files,
)


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
    """A checked CLIP run: also the checkpoints (loaded, or opened for a streamed run: `streamed`), the heads
    (None when streamed), and the unlabeled and test sources (None when not given)."""

    towers: ClipTowers | StreamedTowers
    heads: TaskHeads | None
    unlabeled: list[Any] | None
    tests: list[Any] | None

    @property
    def streamed(self) -> bool:
        return isinstance(self.towers, StreamedTowers)

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
        if self.given_coefficients is not None:
            lines.append(f"λ given by --weights: {config.exported} applies them, no training")
        how = STREAMED if self.streamed else "built in memory"
        lines.append(f"export: {config.exported} as {config.export} to {self.output / 'model'} ({how})")
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


def prepare_clip(config: MergeConfig, output: Path, coefficients_file: str | None = None,
                 log: Callable[[str], None] = print) -> Plan:
    """The CLIP family's checks (module docstring) once the output is checked (`merging.plan.prepare`): the
    plan, or `MergeError` naming the fault."""
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
    locations = [config.pretrained, config.pretrained_vision, *(task.finetuned for task in config.tasks)]
    if streams(config, settings, coefficients_file, scored=tests is not None) and all(
            streamable(location) for location in locations if location is not None):
        towers, heads = guarded("checkpoints", lambda: open_towers(config, log)), None
        binding = clip_binding(towers.config)
    else:
        towers = guarded("checkpoints", lambda: load_towers(config, log))
        heads = TaskHeads(towers, config.tasks, config.pretrained)
        binding = clip_binding(towers.config, heads, towers.full["visual_projection"]["kernel"])
    settings = binding.merge_settings(settings)
    plan = Plan(config, settings, binding, output, run_mesh(config, settings), towers=towers, heads=heads,
                unlabeled=unlabeled, tests=tests)
    plan.read_given_coefficients(coefficients_file)
    return plan


def adaptation_batches(plan: Plan) -> Any:
    """The unlabeled batches of every task, fingerprinted by the sampler's settings (batch size, batches per
    task, seed), sampled images and every source's files (`source_identity`)."""
    from adamerging_jax.data.pipeline import AdaptationBatches, clip_preprocess

    identity = [source_identity(source) for source in plan.unlabeled]

    class Batches(AdaptationBatches):
        def fingerprint(self, examples_per_source: int = 4) -> str:
            return f"{super().fingerprint(examples_per_source)}-{'.'.join(identity)}"

    settings = plan.settings.adamerging
    size = plan.towers.config.vision.image_size
    return Batches(plan.unlabeled, batch_size=settings.batch_size, n_batches=settings.batches_per_task,
                   seed=plan.config.seed, preprocess=functools.partial(clip_preprocess, size=size),
                   num_threads=min(8, os.cpu_count() or 1))


def run_clip_plan(plan: Plan, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build every method's model (AdaMerging resumable under ``OUT/state``), evaluate them on the test
    folders when given, export the chosen one and write the report; returns ``results.json``'s content. A
    streamed plan runs through `run_streamed`."""
    if plan.streamed:
        return run_streamed(plan, log)
    config, output = plan.config, plan.output
    output.mkdir(parents=True, exist_ok=True)
    plan.heads.build(log)
    towers = plan.towers
    task_vectors = am.task_vectors(towers.pretrained, towers.finetuned)
    settings = plan.settings.with_changes(quiet=True)
    adaptation = None
    if plan.given_coefficients is not None:
        settings = settings.with_changes([spec_with_coefficients(plan.export_spec, plan.given_coefficients, plan, plan.mesh)])
    elif settings.needs_data:
        adaptation = adaptation_batches(plan)
    names = [task.name for task in config.tasks]
    try:
        models, records = build_models(settings, towers.pretrained, task_vectors, adaptation=adaptation,
                                       state_dir=output / "state", mesh=plan.mesh,
                                       **plan.binding.protocol_arguments(), log=log)
    except ValueError as error:
        raise MergeError(str(error)) from None
    finally:
        if adaptation is not None:
            adaptation.close()  # no image decoded ahead for steps that will not run
    if plan.tests is not None:
        from adamerging_jax.data.pipeline import clip_preprocess, evaluation_batches

        size = towers.config.vision.image_size
        test_sets = [evaluation_batches(source, config.eval_batch_size, functools.partial(clip_preprocess, size=size))
                     for source in plan.tests]
        score_models(plan.binding.apply_fn, models, records, test_sets, names, config.eval_batch_size, log=log)
    run = {"tasks": names, "merged_tasks": names, "methods": records_json(records), "export": config.exported,
           "weights": plan.coefficients_file, "settings": settings.describe(), "config": config.source}
    return write_outputs(plan, models[config.exported], run, log)


def surgery_section(surgery: SurgeryModels | None, tasks: list[str]) -> list[str]:
    """The card's Surgery section (empty for another method): the modules' tensor names."""
    return surgery_lines(sorted(name for task in tasks for name in module_names(task))) if surgery else []


def write_outputs(plan: Plan, merged: Merged, run: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """The model folder with its card, the named λ and the report (module docstring), built in a sibling folder
    and committed as the whole output at once (`adamerging_jax.output.staged_output`): a kill leaves the
    previous result or the new one, and nothing of an earlier run survives beside the new files."""
    from adamerging_jax import report
    from adamerging_jax.models.clip_checkpoint import save_hf_clip
    from adamerging_jax.output import staged_output

    config, output, towers = plan.config, plan.output, plan.towers
    emr = merged.per_task if isinstance(merged.per_task, EmrModels) else None
    surgery = merged.per_task if isinstance(merged.per_task, SurgeryModels) else None
    routed = merged.params if isinstance(merged.params, dict) and "routers" in merged.params else None
    dense = dense_tower(jax.device_get(routed["frozen"])) if routed else merged.params
    vision = jax.tree_util.tree_map(np.asarray, jax.device_get(emr.unified if emr else dense))
    check_exported_finite(vision, plan.binding.tensor_names)
    tested = plan.tests is not None
    table = report.markdown_table([run]) if tested else None
    markdown = table or "No test folders were given: no accuracy.\n"
    with staged_output(output) as stage:
        write_coefficients(plan, merged, run, stage)
        files = write_report(plan, run, markdown, log, stage)
        card = model_card(config, plan.exported_method(run), run["settings"], run["lambda_summary"], table,
                          run.get("weights"), emr_lines(config) if emr else we_moe_lines() if routed else
                          surgery_section(surgery, run["tasks"]))
        folder = stage / "model"
        folder.mkdir()
        save_hf_clip(str(folder), vision, towers.full, towers.config, kind=config.export,
                     tokenizer_dir=towers.tokenizer_dir)
        if emr:
            write_emr_file(str(folder), emr, run["tasks"])
        if surgery:
            write_surgery_file(str(folder), surgery, run["tasks"])
        if routed:
            write_we_moe_file(str(folder), routed["frozen"], routed["routers"], run["tasks"])
        write_atomic(folder / "README.md", card.encode())
    log(f"[merge] wrote {output / 'model'} ({config.exported}, {config.export}), " + ", ".join(
        str(output / path.relative_to(stage)) for path in files.values()))
    return run


def run_streamed(plan: Plan, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The exported method merged tensor by tensor from disk into ``OUT/model`` (`exports.write_streamed`): the
    image tower's tensors merged, the export's others (the projection, or for ``export: clip`` the text tower,
    projections and ``logit_scale``) copied from the pretrained CLIP, all in float32 in one
    ``model.safetensors``, as `write_outputs` exports them; with config.json, preprocessor_config.json, the
    tokenizer files and the card, then ``results.json`` and ``table.md``. Returns ``results.json``'s content."""
    config, towers = plan.config, plan.towers
    names = hf_shapes(towers.config, config.export)
    merged = sorted(name for name in names if name.startswith(VISION_PREFIX))
    tasks = [TaskTensors(task.name, f"task {task.name!r} fine-tuned tower {task.finetuned}", checkpoint=tower)
             for task, tower in zip(config.tasks, towers.finetuned)]
    theta0 = " and ".join(filter(None, [config.pretrained, config.pretrained_vision]))
    stream = TensorStream(towers.pretrained, f"pretrained {theta0}", tasks, merged, binding_placement(plan.binding),
                          kept=sorted(set(names) - set(merged)))

    def model_files(folder: Path, run: dict[str, Any]) -> None:
        write_clip_files(folder, towers.config, config.export, tokenizer_dir=towers.tokenizer_dir)
        card = model_card(config, plan.exported_method(run), run["settings"], None, None, None)
        write_atomic(folder / "README.md", card.encode())

    return write_streamed(plan, stream, dict.fromkeys(names, np.dtype(np.float32)), {}, model_files,
                          "No test folders were given: no accuracy.\n", max_shard_bytes=ONE_FILE, log=log)
