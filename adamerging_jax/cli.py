"""The command line, one entry point: ``adamerging-jax demo | merge | paper <command>``.

- ``adamerging-jax merge CONFIG.yaml --output DIR``: a user's own CLIP checkpoints and unlabeled images, or
  causal language models (full fine-tunes or LoRA adapters) and unlabeled prompts, in; the merged Hugging Face
  model, named λ and a report out (``--dry-run`` checks and prints the plan);
- ``adamerging-jax demo``: the offline real benchmark (EfficientNet-Lite0 on packaged tasks; see README);
- ``adamerging-jax paper {prepare-data,table1,table2,generalization,robustness}``: the paper's CLIP
  experiments (``experiments/*.py`` call these).

Settings are validated, and the output folder checked and locked, before any compute; results are written after
each seed, so an interrupt loses only the unfinished one. Every refusal is one ``error:`` line; Ctrl-C exits with
130 and commits nothing half written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from adamerging_jax.cache import cache_dir
from adamerging_jax.command_checks import check_cache_root, check_output_dir, locked_output, start_compilation_cache


def error_line(message: Any) -> SystemExit:
    """The command's one-line error."""
    return SystemExit("error: " + " ".join(str(message).split()))


def comma_list(text: str | None) -> list[str] | None:
    return None if text is None else [item for item in text.split(",") if item]


def _demo_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="fine-tune ImageNet EfficientNet-Lite0 on real packaged tasks, merge, evaluate (offline)",
        description="The offline real benchmark: EfficientNet-Lite0 (ImageNet) fine-tuned on MNIST-5k, "
        "Fashion-MNIST, Animal-MNIST and scikit-learn digits, merged by every method, evaluated on each test split.",
    )
    p.add_argument("--quick", action="store_true", help="small and fast (32 px, few images and steps): a smoke test")
    p.add_argument("--config", type=Path, help="JSON file of DemoConfig fields (merge: {methods, adamerging}); flags override it")
    p.add_argument("--tasks", help="comma-separated packaged tasks (mnist, fashion_mnist, animal_mnist, digits, textures)")
    p.add_argument("--task-folder", action="append", default=[], metavar="NAME=PATH",
                   help="add a user task from a folder of class subfolders (or train/ and test/ with class subfolders)")
    p.add_argument("--resolution", type=int)
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--steps", type=int, help="AdaMerging steps")
    p.add_argument("--lr", type=float, help="AdaMerging learning rate (Adam)")
    p.add_argument("--methods", help="comma-separated registry methods or groups (all, data_free, adaptive); "
                   "default: the paper's Table 1 rows")
    p.add_argument("--adaptation", choices=["transductive", "held_out"],
                   help="test-time methods adapt on the test images they are scored on (transductive, the default) "
                   "or on a held-out fraction of each test split, scored on the rest")
    p.add_argument("--held-out-fraction", type=float, help="share of each test split adapted on when held out (0.5)")
    p.add_argument("--head", choices=["prototype", "logistic"])
    p.add_argument("--shots", type=int)
    p.add_argument("--head-scale", type=float)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed; the table gives mean ± std")
    p.add_argument("--output", type=Path, default=Path("runs/demo"))
    p.add_argument("--cache", type=Path, help="cache of fine-tuned backbones (default: $ADAMERGING_JAX_CACHE/finetuned, "
                   "$ADAMERGING_JAX_CACHE defaulting to ~/.cache/adamerging_jax)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def demo_config(args: argparse.Namespace) -> Any:
    """The `DemoConfig` of the command line: defaults (or ``--quick``'s), then ``--config``, then the flags."""
    from adamerging_jax.demo.pipeline import DemoConfig

    fields = read_demo_config(args.config) if args.config else {}
    for name in ("resolution", "n_train", "n_test", "head", "shots", "head_scale"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.tasks:
        fields["tasks"] = comma_list(args.tasks)
    if isinstance(fields.get("tasks"), list):
        fields["tasks"] = tuple(fields["tasks"])
    known = {f.name for f in dataclasses.fields(DemoConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise SystemExit(f"error: unknown demo settings {unknown} in {args.config}; known: {sorted(known)}")
    base = DemoConfig.quick() if args.quick else DemoConfig()
    merge = fields.pop("merge", {}) or {}
    adamerging = dict(merge.get("adamerging", {}))
    adamerging.update({k: v for k, v in [("steps", args.steps), ("lr", args.lr)] if v is not None})
    if isinstance(adamerging.get("clamp"), list):
        adamerging["clamp"] = tuple(adamerging["clamp"])
    methods = comma_list(args.methods) or merge.get("methods")
    try:
        adaptation = demo_adaptation(args, merge, base.merge.adaptation)
        return dataclasses.replace(base, **fields, merge=base.merge.with_changes(methods, adaptation=adaptation,
                                                                                 **adamerging))
    except (TypeError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


def demo_adaptation(args: argparse.Namespace, merge: dict[str, Any], default: Any) -> Any:
    """The run's `Adaptation`: ``--adaptation`` / ``--held-out-fraction``, else the config's ``merge: {adaptation,
    held_out_fraction}``, else `default`."""
    from adamerging_jax.core.protocol import Adaptation

    mode = args.adaptation or merge.get("adaptation", default.mode)
    fraction = args.held_out_fraction if args.held_out_fraction is not None else merge.get("held_out_fraction",
                                                                                             default.fraction)
    return Adaptation(mode, fraction)


def adaptation_note(settings: dict[str, Any]) -> str:
    """How the table's methods were adapted and scored, from a run's merge settings."""
    adaptation = settings.get("adaptation", {"mode": "transductive"})
    if adaptation["mode"] == "held_out":
        return (f"adaptation held out: test-time methods adapted on {100 * adaptation['fraction']:.0f}% of each test "
                "split; every method scored on the rest")
    return "adaptation transductive: test-time methods adapted on the test images they are scored on"


DEMO_FILES = ("results.json", "table.md", "*.png")


def read_demo_config(path: Path) -> dict[str, Any]:
    """``--config``'s JSON object; one line naming the file when it is missing, not JSON or not an object."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise error_line(f"--config {path}: {getattr(error, 'strerror', None) or error}") from None
    try:
        fields = json.loads(text)
    except ValueError as error:
        raise error_line(f"--config {path} is not JSON: {error}") from None
    if not isinstance(fields, dict):
        raise error_line(f"--config {path} must hold one JSON object of DemoConfig fields, got {type(fields).__name__}")
    return fields


def demo_task_folders(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``--task-folder NAME=PATH`` pairs, each PATH an existing folder."""
    folders = []
    for spec in specs:
        name, _, path = spec.partition("=")
        if not name or not path:
            raise error_line(f"--task-folder expects NAME=PATH, got {spec!r}")
        if not os.path.isdir(path):
            raise error_line(f"--task-folder {name}={path}: {path} is not a folder")
        folders.append((name, path))
    return folders


def check_demo_arguments(args: argparse.Namespace, config: Any) -> list[tuple[str, str]]:
    """Everything the command line decides, before any data loads: seeds, task names and count, task
    folders, the output and cache folders; returns the task folders."""
    from adamerging_jax.data import packaged

    if negative := [seed for seed in args.seeds if seed < 0]:
        raise error_line(f"--seeds must be non-negative integers, got {negative}")
    if len(set(args.seeds)) != len(args.seeds):
        raise error_line(f"--seeds names a seed more than once: {args.seeds}")
    if unknown := [name for name in config.tasks if name not in packaged.SOURCES]:
        raise error_line(f"unknown tasks {unknown}; packaged tasks are {sorted(packaged.SOURCES)} (add your own "
                         "with --task-folder NAME=PATH)")
    folders = demo_task_folders(args.task_folder)
    names = [*config.tasks, *(name for name, _ in folders)]
    if len(names) < 2:
        raise error_line(f"the demo merges at least 2 tasks, got {names}")
    if len(set(names)) != len(names):
        raise error_line(f"a task is named more than once: {names}")
    check_output_dir(args.output)
    if not args.no_cache:
        check_cache_root(args.cache)
    check_demo_output(args, folders)
    return folders


def check_demo_output(args: argparse.Namespace, folders: Sequence[tuple[str, str]]) -> None:
    """The demo's output lies outside the task folders and the cache (and they outside it: a commit replaces
    the whole output folder), and holds nothing but an earlier demo's report."""
    from adamerging_jax.output import check_output_contents, check_placement

    cache = {} if args.no_cache else {"--cache": args.cache or cache_dir("finetuned")}
    try:
        check_placement(args.output, {f"--task-folder {name}": path for name, path in folders})
        check_placement(args.output, cache, skip_missing=False)
        check_output_contents(args.output, DEMO_FILES)
    except ValueError as error:
        raise error_line(error) from None


def run_demo_command(args: argparse.Namespace) -> int:
    config = demo_config(args)
    folders = check_demo_arguments(args, config)
    start_compilation_cache()
    with locked_output(args.output):
        return run_demo_seeds(args, config, folders)


def run_demo_seeds(args: argparse.Namespace, config: Any, folders: Sequence[tuple[str, str]]) -> int:
    from adamerging_jax.data import packaged
    from adamerging_jax.demo.pipeline import run_demo
    from adamerging_jax.output import interrupted

    cache = None if args.no_cache else (args.cache or cache_dir("finetuned"))
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    for seed in args.seeds:
        seeded = dataclasses.replace(config, seed=seed)
        tasks = packaged.load_tasks(seeded.tasks, seed, seeded.n_train, seeded.n_test, skip_unavailable=True)
        for name, path in folders:
            tasks.append(packaged.task_from_folder(path, name=name, image_size=max(seeded.resolution, 28), seed=seed))
        if len(tasks) < 2:
            raise error_line(f"the demo merges at least 2 tasks; only {[t.name for t in tasks]} could be loaded")
        print(f"[demo] seed {seed}: tasks {[t.name for t in tasks]}, {seeded.resolution} px", flush=True)
        run = run_demo(seeded, tasks=tasks, cache_dir=cache, quiet=args.quiet)
        runs.append(run)
        if interrupted():
            raise KeyboardInterrupt
        files = write_demo_report(runs, args.output, plots=not args.no_plots)
        print(f"[demo] seed {seed} done in {run['seconds']['total']:.0f} s; results so far in {args.output}", flush=True)
    print(files["table"].read_text())
    print(f"[demo] {len(runs)} run(s) in {time.perf_counter() - started:.0f} s; wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def write_demo_report(runs: Sequence[dict[str, Any]], output: Path, plots: bool = True) -> dict[str, Path]:
    """``results.json`` with every run so far, ``table.md`` (mean ± std over seeds) and the first run's plots,
    committed as one new output folder (`adamerging_jax.output.staged_output`)."""
    from adamerging_jax import report
    from adamerging_jax.output import staged_output

    report.check_finite(runs)
    seeds = [run["settings"]["seed"] for run in runs]
    title = f"Mean top-1 accuracy (%) over seeds {seeds}" if len(runs) > 1 else f"Top-1 accuracy (%), seed {seeds[0]}"
    clamp = runs[0]["settings"]["merge"]["adamerging"]["clamp"]
    with staged_output(output) as stage:
        note = adaptation_note(runs[0]["settings"]["merge"])
        files = report.write_report(stage, {"runs": list(runs)}, f"{title}; {note}\n\n" + report.markdown_table(runs),
                                    plot_run=runs[0] if plots else None, clamp=tuple(clamp) if clamp else None)
    return {key: Path(output) / path.relative_to(stage) for key, path in files.items()}


def _merge_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "merge", help="merge your own CLIP or causal-LM checkpoints (YAML config) into one Hugging Face model",
        description="Merge a pretrained CLIP and K fine-tuned image towers, or (model: causal_lm) a Llama / Qwen2 "
        "and K fine-tuned models or LoRA adapters, with the config's methods (AdaMerging learns λ on each task's "
        "unlabeled images or prompts); write OUT/model (Hugging Face), OUT/lambdas.json and .safetensors, "
        "results.json, table.md, plots, and resumable state under OUT/state. Flags override the config's fields.")
    p.add_argument("config", type=Path, help="the YAML config (see examples/merge.yaml, examples/merge_llm.yaml)")
    p.add_argument("--output", type=Path, required=True, help="output folder (a rerun resumes in it)")
    p.add_argument("--methods", help="comma-separated registry methods (parameters as in the config: use the YAML)")
    p.add_argument("--steps", type=int, help="AdaMerging steps")
    p.add_argument("--lr", type=float, help="AdaMerging learning rate (Adam)")
    p.add_argument("--preset", choices=["official", "fusionbench"])
    p.add_argument("--seed", type=int)
    p.add_argument("--devices", type=int, help="AdaMerging runs on the first N devices")
    p.add_argument("--precision", choices=["float32", "bfloat16"], help="θ0 and τ storage during AdaMerging")
    p.add_argument("--export", choices=["vision_with_projection", "clip"], help="the exported CLIP model's kind")
    p.add_argument("--max-length", type=int, help="causal LM: prompts are cut to this many tokens")
    p.add_argument("--weights", help="apply these λ (lambdas.json / .safetensors, FusionBench .pt, official "
                   "layout) with the exported AdaMerging method, no training")
    p.add_argument("--dry-run", action="store_true", help="check everything and print the plan; no compute")
    p.add_argument("--trust-pickle", action="store_true", default=None,
                   help="allow open_clip files that are pickled modules (they run code when loaded)")
    p.add_argument("--offline", action="store_true", default=None, help="never download from the Hugging Face hub")


def run_merge_command(args: argparse.Namespace) -> int:
    from adamerging_jax.merging.config import load_config
    from adamerging_jax.merging.plan import prepare

    overrides = {name: getattr(args, name) for name in
                 ("steps", "lr", "preset", "seed", "devices", "precision", "export", "trust_pickle", "offline",
                  "max_length")}
    overrides["methods"] = comma_list(args.methods)
    config = load_config(args.config, overrides)

    if args.dry_run:
        plan = prepare(config, args.output, args.weights)
        print(plan.describe(), flush=True)
        print("[merge] dry run: every check passed; nothing was computed", flush=True)
        return 0
    check_output_dir(args.output)
    check_cache_root()
    with locked_output(args.output):
        plan = prepare(config, args.output, args.weights)
        print(plan.describe(), flush=True)
        start_compilation_cache()
        from adamerging_jax.merging.run import run_plan

        run_plan(plan)
    return 0


PAPER_COMMANDS = ("prepare-data", "table1", "table2", "generalization", "robustness")


def _paper_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "paper", help="the paper's CLIP experiments (Table 1, Table 2, generalization, robustness)",
        description="The paper's experiments on CLIP; `adamerging-jax paper COMMAND --help` lists each one's flags.")
    p.add_argument("experiment", choices=PAPER_COMMANDS, help="which experiment")
    p.add_argument("arguments", nargs=argparse.REMAINDER, help="its flags")


FAST_CPU_REDUCTIONS = "--xla_cpu_experimental_ynn_fusion_type="


def prefer_fast_cpu_reductions() -> None:
    """Unless XLA_FLAGS says otherwise, turn off XLA:CPU's YNNPACK fusions: with them a sum over the task axis
    (3 × 4M float32) takes 176 ms here, without them 3 ms, and the merges are such sums. Acts only before
    JAX's CPU backend starts, i.e. at the start of a command."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_CPU_REDUCTIONS}".strip()


def main(argv: Sequence[str] | None = None) -> int:
    prefer_fast_cpu_reductions()
    parser = argparse.ArgumentParser(prog="adamerging-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _demo_parser(subparsers)
    _merge_parser(subparsers)
    _paper_parser(subparsers)
    args = parser.parse_args(argv)
    from adamerging_jax.output import honour_interrupts, interrupted

    with honour_interrupts():
        try:
            with disk_errors():
                code = refusals_as_error_line(run_command, args)
        except KeyboardInterrupt:
            code = INTERRUPTED
        if interrupted() or code == INTERRUPTED:
            print(f"[{args.command}] interrupted: nothing half written (the output holds the previous result, or "
                  "the new one when the interrupt came during its commit)", file=sys.stderr, flush=True)
            return INTERRUPTED
    return code


INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C


def refusals_as_error_line(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``command(args)``, a library's refusal (`MergeError`) printed as the one ``error:`` line it names, with
    exit status 1."""
    from adamerging_jax.merging.errors import MergeError

    try:
        return command(args)
    except MergeError as error:
        raise error_line(error) from None


def run_command(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return run_demo_command(args)
    if args.command == "merge":
        return run_merge_command(args)
    from adamerging_jax.paper.cli import COMMANDS

    start_compilation_cache()
    return COMMANDS[args.experiment](args.arguments)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _no_space(error: BaseException) -> OSError | str | None:
    """The full-disk cause of ``error``: an OSError ENOSPC / EDQUOT in its chain, or the OS's words for it in
    a library's own error (safetensors, orbax); None when the disk is not full."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE:
            return seen
        if any(f"os error {code}" in str(seen) or os.strerror(code) in str(seen) for code in NO_SPACE):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def disk_errors() -> Iterator[None]:
    """A full disk or quota, anywhere in a command, as one line (outputs are committed whole, so the previous
    result stays as it was)."""
    try:
        yield
    except Exception as error:
        cause = _no_space(error)
        if cause is None:
            raise
        if isinstance(cause, OSError):
            where, cause = (f" writing {cause.filename}" if cause.filename else ""), cause.strerror
        else:
            where = ""
        raise error_line(f"no space left on the device{where} ({cause}); the previous output, if any, is "
                         "unchanged; free some space and run again") from None


if __name__ == "__main__":
    sys.exit(main())
