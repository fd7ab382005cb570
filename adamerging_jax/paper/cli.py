"""The commands behind ``experiments/*.py``: argument parsing onto :mod:`adamerging_jax.paper.settings`, one
run, ``results.json`` + ``table.md`` in ``--output``, the table printed.

``--output`` is checked before any work (outside every input folder and the heads cache, holding nothing an
experiment does not write), locked for the run and replaced whole by each report
(`adamerging_jax.output`); the resumable AdaMerging state in it (``adamerging_state``, ``split*/``) is kept.

    adamerging-jax paper prepare-data --data-dir DIR [--manual-dir DIR] [--local-downloads DIR]
    adamerging-jax paper table1 --tfds-dir DIR --output runs/table1
    adamerging-jax paper table2 --tfds-dir DIR --output runs/table2
    adamerging-jax paper generalization --tfds-dir DIR --output runs/generalization
    adamerging-jax paper robustness --tfds-dir DIR --output runs/robustness
"""
from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from adamerging_jax.command_checks import check_output_dir, locked_output
from adamerging_jax.core.optimize import PRESETS
from adamerging_jax.core.registry import method_specs
from adamerging_jax.merging.errors import MergeError
from adamerging_jax.output import check_output_contents, check_placement, committed_paths, staged_output
from adamerging_jax.paper import published, report
from adamerging_jax.report import write_report
from adamerging_jax.paper.experiments import run_merging, run_robustness
from adamerging_jax.paper.models import checkpoint_location
from adamerging_jax.paper.settings import (
    CHECKPOINTS,
    DEFAULT_CACHE,
    METHODS,
    Checkpoints,
    DataConfig,
    ExperimentConfig,
    merge_settings,
)
from adamerging_jax.paper.tasks import (
    ALL_TASKS,
    GENERALIZATION_SPLITS,
    ROBUSTNESS_TASKS,
    canonical,
    paper_task,
)


def _pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    """``TASK=PATH`` flags as {our task name: path}."""
    out = {}
    for value in values:
        task, sep, path = value.partition("=")
        if not sep or not path:
            raise MergeError(f"{flag} expects TASK=PATH, got {value!r}")
        out[paper_task(task).name] = path
    return out


def parser(description: str, variant: str, methods: Sequence[str]) -> argparse.ArgumentParser:
    """The flags every experiment shares."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("checkpoints")
    g.add_argument("--variant", default=variant, choices=sorted(CHECKPOINTS),
                   help="CLIP size of the default checkpoints")
    g.add_argument("--pretrained", help="full HF CLIP dir or hub id (θ0, projection, text tower); default: openai's")
    g.add_argument("--finetuned", help="fine-tuned tower per task: HF dir/hub id or open_clip .pt, with {task} "
                   "(FusionBench name) or {dataset} (task_vectors name); default: tanganke/clip-vit-*_{task}")
    g.add_argument("--pretrained-vision", help="θ0's image tower from another file (e.g. task_vectors zeroshot.pt)")
    g.add_argument("--trust-pickle", action="store_true", help="allow pickled open_clip modules (runs their code)")
    g.add_argument("--offline", action="store_true", help="never download; hub ids must be in the HF cache")
    g = p.add_argument_group("data")
    g.add_argument("--tfds-dir", help="data_dir of the tfds ArrayRecord datasets (experiments/prepare_data.py)")
    g.add_argument("--task-vectors-data", help="task_vectors' data location: SUN397, EuroSAT and DTD test splits "
                   "are read from its class folders (sun397/val, EuroSAT_splits/test, dtd/val)")
    g.add_argument("--folder", action="append", default=[], metavar="TASK=PATH",
                   help="read TASK's test set from a split folder of class subfolders instead of tfds")
    g.add_argument("--file-list", action="append", default=[], metavar="TASK=PATH",
                   help="select a published test file list from TASK's tfds split (e.g. resisc45-test.txt)")
    g.add_argument("--no-image-cache", action="store_true", help="decode every visited image again each time")
    g.add_argument("--eval-batch-size", type=int, default=256)
    g.add_argument("--num-threads", type=int, default=8, help="decoding threads")
    g.add_argument("--max-test-images", type=int, help="smoke test: first N images of each test set only")
    g = p.add_argument_group("methods")
    g.add_argument("--methods", default=",".join(methods),
                   help=f"comma-separated registry methods or groups (all, data_free, adaptive); default: {','.join(methods)}")
    g.add_argument("--preset", default="official", choices=PRESETS, help="AdaMerging settings")
    g.add_argument("--steps", type=int, help="AdaMerging steps (preset: official 500, fusionbench 1000)")
    g.add_argument("--lr", type=float, help="AdaMerging learning rate (preset: 1e-3)")
    g.add_argument("--batch-size", type=int, help="AdaMerging images per batch (preset: 16)")
    g.add_argument("--ties-total-size", type=int,
                   help="count the TIES top-k over this many entries (the official open_clip model's, text side included)")
    g.add_argument("--accumulate", choices=["fused", "per_task"],
                   help="per_task: one task's activations alive at a time (less memory, e.g. ViT-L/14 on one GPU)")
    g.add_argument("--param-dtype", choices=["float32", "bfloat16"], help="θ0 and τ storage during AdaMerging")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--devices", type=int, help="split AdaMerging's batches over the first N devices (default: all)")
    g = p.add_argument_group("output")
    g.add_argument("--output", type=Path, required=True, help="directory for results.json and table.md")
    g.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="zero-shot heads cache")
    g.add_argument("--no-resume", action="store_true", help="do not checkpoint/resume AdaMerging runs in --output")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace, name: str, merge_tasks: Sequence[str],
                     eval_tasks: Sequence[str]) -> ExperimentConfig:
    overrides = {k: v for k, v in [("pretrained", args.pretrained), ("finetuned", args.finetuned)] if v}
    checkpoints = Checkpoints.fusionbench(
        args.variant, pretrained_vision=args.pretrained_vision, trust_pickle=args.trust_pickle,
        allow_download=not args.offline, **overrides)
    data = DataConfig(
        tfds_dir=args.tfds_dir, task_vectors_dir=args.task_vectors_data, folders=_pairs(args.folder, "--folder"),
        file_lists=_pairs(args.file_list, "--file-list"),
        cache_images=not args.no_image_cache, eval_batch_size=args.eval_batch_size, num_threads=args.num_threads,
        max_test_images=args.max_test_images)
    adamerging = {k: v for k, v in [("steps", args.steps), ("lr", args.lr), ("batch_size", args.batch_size),
                                     ("accumulate", args.accumulate), ("param_dtype", args.param_dtype)] if v is not None}
    try:
        merge = merge_settings(args.preset, [m for m in args.methods.split(",") if m], args.ties_total_size,
                               **adamerging)
        config = ExperimentConfig(name, canonical(merge_tasks), canonical(eval_tasks), checkpoints, data, merge,
                                  seed=args.seed, devices=args.devices, cache_dir=args.cache_dir,
                                  checkpoint_runs=not args.no_resume, quiet=args.quiet)
    except (TypeError, ValueError) as error:
        raise MergeError(str(error)) from None
    check_output_dir(args.output)
    return config


STATE_FOLDERS = ("adamerging_state", *(f"split{split}" for split in GENERALIZATION_SPLITS))
PAPER_FILES = ("results.json", "table.md", *STATE_FOLDERS)


def input_paths(config: ExperimentConfig) -> dict[str, str | None]:
    """Every file or folder an experiment reads, by flag (hub ids are not paths and are skipped later)."""
    checkpoints, data = config.checkpoints, config.data
    paths = {"--pretrained": checkpoints.pretrained, "--pretrained-vision": checkpoints.pretrained_vision,
             "--tfds-dir": data.tfds_dir, "--task-vectors-data": data.task_vectors_dir}
    paths.update({f"--finetuned ({task})": checkpoint_location(checkpoints.finetuned, task)
                  for task in config.merge_tasks})
    paths.update({f"--folder {task}": path for task, path in data.folders.items()})
    paths.update({f"--file-list {task}": path for task, path in data.file_lists.items()})
    return paths


def check_paper_output(output: Path, configs: Sequence[ExperimentConfig]) -> None:
    """``output`` lies outside every input and the heads cache (and they outside it: each report replaces the
    whole folder), and holds nothing an experiment does not write; `MergeError` otherwise."""
    try:
        for config in configs:
            check_placement(output, input_paths(config))
            check_placement(output, {"--cache-dir": config.cache_dir or None}, skip_missing=False)
        check_output_contents(output, PAPER_FILES)
    except ValueError as error:
        raise MergeError(str(error)) from None


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """A library's refusal (a task without test data, a checkpoint or file that is missing or does not fit)
    as a `MergeError`, which the command line prints as one ``error:`` line, not a traceback."""
    try:
        yield
    except MergeError:
        raise
    except (ValueError, FileNotFoundError) as error:
        raise MergeError(str(error)) from None


def commit_report(output: Path, result: dict[str, Any], markdown: str) -> dict[str, Path]:
    """``results.json`` and ``table.md`` committed as the new ``output`` at once (`staged_output`), the
    resumable state folders carried over."""
    with staged_output(output, STATE_FOLDERS) as stage:
        files = write_report(stage, result, markdown)
    return committed_paths(files, stage, output)


def _finish(args: argparse.Namespace, result: dict[str, Any], markdown: str, started: float) -> int:
    files = commit_report(args.output, result, markdown)
    print(markdown)
    print(f"[done] {time.perf_counter() - started:.0f} s; wrote {files['json']} and {files['table']}", flush=True)
    return 0


def _table(argv: Sequence[str] | None, number: int, variant: str, reference: published.Reference,
           fusionbench: published.Reference) -> int:
    args = parser(f"AdaMerging Table {number}: every method on the 8 tasks (CLIP {variant}).", variant,
                  METHODS).parse_args(argv)
    started = time.perf_counter()
    config = config_from_args(args, f"table{number}", ALL_TASKS, ALL_TASKS)
    check_paper_output(args.output, [config])
    with locked_output(args.output, STATE_FOLDERS), one_line_errors():
        result = run_merging(config, output_dir=args.output)
        title = f"Table {number}: multi-task merging of CLIP ViT-{args.variant} on 8 tasks"
        averages = {"paper": reference, "FusionBench": fusionbench}
        return _finish(args, result, report.table_markdown(result, title, reference, averages), started)


def table1(argv: Sequence[str] | None = None) -> int:
    """Table 1 (ViT-B/32)."""
    return _table(argv, 1, "B/32", published.TABLE1_VIT_B32, published.FUSIONBENCH_VIT_B32)


def table2(argv: Sequence[str] | None = None) -> int:
    """Table 2 (ViT-L/14)."""
    return _table(argv, 2, "L/14", published.TABLE2_VIT_L14, published.FUSIONBENCH_VIT_L14)


GENERALIZATION_METHODS = ("task_arithmetic", "ties", "layer_wise_adamerging", "layer_wise_adamerging++")


def generalization(argv: Sequence[str] | None = None) -> int:
    """Merge 6 tasks, evaluate on them and on the 2 unseen ones; both of the paper's splits by default."""
    p = parser("AdaMerging generalization: merge 6 seen tasks, test on 2 unseen tasks (CLIP ViT-B/32).", "B/32",
               GENERALIZATION_METHODS)
    p.add_argument("--split", choices=[*GENERALIZATION_SPLITS, "both"], default="both",
                   help="1: unseen MNIST, EuroSAT; 2: unseen RESISC45, SVHN")
    args = p.parse_args(argv)
    try:
        specs = method_specs(m for m in args.methods.split(",") if m)
    except ValueError as error:
        raise MergeError(str(error)) from None
    per_task = [spec.name for spec in specs if spec.method.per_task_models]
    if per_task:
        raise MergeError(f"{per_task} have no model for the unseen tasks; leave them out of --methods "
                         "(name the methods one by one instead of a group that holds them)")
    started = time.perf_counter()
    splits = list(GENERALIZATION_SPLITS) if args.split == "both" else [args.split]
    configs = {split: config_from_args(args, f"generalization{split}", *_seen_and_all(split)) for split in splits}
    check_paper_output(args.output, list(configs.values()))
    with locked_output(args.output, STATE_FOLDERS), one_line_errors():
        results, markdown = {}, ""
        for split, config in configs.items():
            seen, unseen = GENERALIZATION_SPLITS[split]
            results[split] = run_merging(config, output_dir=args.output / f"split{split}")
            title = (f"Generalization {split}: merged {', '.join(map(report.COLUMN_TITLES.get, seen))}; "
                     f"unseen {', '.join(map(report.COLUMN_TITLES.get, unseen))}")
            markdown += report.generalization_markdown(results[split], title, published.GENERALIZATION[split]) + "\n"
            commit_report(args.output, {"experiment": "generalization", "splits": results}, markdown)  # each split
        return _finish(args, {"experiment": "generalization", "splits": results}, markdown, started)


def _seen_and_all(split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    seen, unseen = GENERALIZATION_SPLITS[split]
    return tuple(seen), tuple(seen) + tuple(unseen)


def robustness(argv: Sequence[str] | None = None) -> int:
    """Merge Cars, EuroSAT, RESISC45, GTSRB; adapt and evaluate on each corruption of their test sets."""
    p = parser("AdaMerging robustness: merging adapted on corrupted test data (CLIP ViT-B/32).", "B/32",
               ("task_arithmetic", "layer_wise_adamerging"))
    p.add_argument("--conditions", help="comma-separated subset of clean and the corruptions (default: all)")
    p.add_argument("--severity", type=int, default=5, choices=range(1, 6), help="ImageNet-C severity")
    p.add_argument("--corruption-size", type=int, default=224,
                   help="corrupt the image resized (short side) and centre-cropped to this size; 0: native size")
    args = p.parse_args(argv)
    started = time.perf_counter()
    config = config_from_args(args, "robustness", ROBUSTNESS_TASKS, ROBUSTNESS_TASKS)
    check_paper_output(args.output, [config])
    chosen = [c for c in args.conditions.split(",") if c] if args.conditions else None
    with locked_output(args.output, STATE_FOLDERS), one_line_errors():
        result = run_robustness(config, chosen, severity=args.severity,
                                corruption_size=args.corruption_size or None, output_dir=args.output)
        title = "Robustness: CLIP ViT-B/32 merged on Cars, EuroSAT, RESISC45, GTSRB, tested under corruptions"
        return _finish(args, result, report.robustness_markdown(result, title, published.ROBUSTNESS), started)


def prepare_data(argv: Sequence[str] | None = None) -> int:
    """Download (or take from --local-downloads) and prepare the tasks' tfds ArrayRecord datasets."""
    from adamerging_jax.data import tfds_sources

    p = argparse.ArgumentParser(description="Prepare the paper's 8 datasets as tfds ArrayRecord (no tensorflow).")
    p.add_argument("--data-dir", required=True, help="tfds data_dir to write (pass it as --tfds-dir later)")
    p.add_argument("--tasks", default=",".join(ALL_TASKS))
    p.add_argument("--manual-dir", help="folder holding NWPU-RESISC45/ (RESISC45 is a manual download)")
    p.add_argument("--local-downloads", help="folder of already-downloaded source files, named as their URLs end")
    p.add_argument("--download-dir", help="where tfds keeps downloads and extractions (default: DATA_DIR/downloads)")
    p.add_argument("--offline", action="store_true", help="never download; every file must be in --local-downloads")
    args = p.parse_args(argv)
    for task in canonical(t for t in args.tasks.split(",") if t):
        started = time.perf_counter()
        print(f"[prepare] {task} ...", flush=True)
        tfds_sources.prepare(task, args.data_dir, local_downloads=args.local_downloads, manual_dir=args.manual_dir,
                download_dir=args.download_dir, offline=args.offline)
        print(f"[prepare] {task} ready in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


COMMANDS = {
    "prepare-data": prepare_data,
    "table1": table1,
    "table2": table2,
    "generalization": generalization,
    "robustness": robustness,
}
"""``adamerging-jax paper COMMAND``: each takes its own flags (``--help`` lists them)."""
