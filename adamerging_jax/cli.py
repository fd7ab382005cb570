"""The command line, one entry point: ``adamerging-jax demo | merge | paper <command>``.

- ``adamerging-jax merge CONFIG.yaml --output DIR``: a user's own CLIP checkpoints and unlabeled images, or
  causal language models (full fine-tunes or LoRA adapters) and unlabeled prompts, in; the merged Hugging Face
  model, named λ and a report out (``--dry-run`` checks and prints the plan);
- ``adamerging-jax demo``: the offline real benchmark (EfficientNet-Lite0 on packaged tasks; see README);
- ``adamerging-jax paper {prepare-data,table1,table2,generalization,robustness}``: the paper's CLIP
  experiments (``experiments/*.py`` call these).

Settings are validated, and the output folder checked, before any compute; results are written after each
seed, so an interrupt loses only the unfinished one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from adamerging_jax.cache import cache_dir, enable_compilation_cache


def check_output_dir(path: Path) -> None:
    """Refuse an output that is a file or cannot be written, before any work starts."""
    from adamerging_jax.core.checkpoint import check_writable_folder

    try:
        check_writable_folder(path)
    except ValueError as error:
        raise SystemExit(f"error: --output {error}") from None


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

    fields = json.loads(args.config.read_text()) if args.config else {}
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
        return dataclasses.replace(base, **fields, merge=base.merge.with_changes(methods, **adamerging))
    except (TypeError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


def run_demo_command(args: argparse.Namespace) -> int:
    config = demo_config(args)
    check_output_dir(args.output)
    enable_compilation_cache(1.0)
    from adamerging_jax.data import packaged
    from adamerging_jax.demo.pipeline import run_demo

    cache = None if args.no_cache else (args.cache or cache_dir("finetuned"))
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    for seed in args.seeds:
        seeded = dataclasses.replace(config, seed=seed)
        tasks = packaged.load_tasks(seeded.tasks, seed, seeded.n_train, seeded.n_test, skip_unavailable=True)
        for spec in args.task_folder:
            name, _, path = spec.partition("=")
            if not path:
                raise SystemExit(f"error: --task-folder expects NAME=PATH, got {spec!r}")
            tasks.append(packaged.task_from_folder(path, name=name, image_size=max(seeded.resolution, 28), seed=seed))
        print(f"[demo] seed {seed}: tasks {[t.name for t in tasks]}, {seeded.resolution} px", flush=True)
        run = run_demo(seeded, tasks=tasks, cache_dir=cache, quiet=args.quiet)
        runs.append(run)
        files = write_demo_report(runs, args.output, plots=not args.no_plots)
        print(f"[demo] seed {seed} done in {run['seconds']['total']:.0f} s; results so far in {args.output}", flush=True)
    print(files["table"].read_text())
    print(f"[demo] {len(runs)} run(s) in {time.perf_counter() - started:.0f} s; wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def write_demo_report(runs: Sequence[dict[str, Any]], output: Path, plots: bool = True) -> dict[str, Path]:
    """``results.json`` with every run so far, ``table.md`` (mean ± std over seeds) and the first run's plots."""
    from adamerging_jax import report

    report.check_finite(runs)
    seeds = [run["settings"]["seed"] for run in runs]
    title = f"Mean top-1 accuracy (%) over seeds {seeds}" if len(runs) > 1 else f"Top-1 accuracy (%), seed {seeds[0]}"
    clamp = runs[0]["settings"]["merge"]["adamerging"]["clamp"]
    return report.write_report(output, {"runs": list(runs)}, f"{title}\n\n" + report.markdown_table(runs),
                               plot_run=runs[0] if plots else None, clamp=tuple(clamp) if clamp else None)


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
    from adamerging_jax.merging.config import ConfigError, load_config
    from adamerging_jax.merging.plan import fail

    overrides = {name: getattr(args, name) for name in
                 ("steps", "lr", "preset", "seed", "devices", "precision", "export", "trust_pickle", "offline",
                  "max_length")}
    overrides["methods"] = comma_list(args.methods)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        raise fail(error) from None
    from adamerging_jax.merging.plan import prepare

    plan = prepare(config, args.output, args.weights)
    print(plan.describe(), flush=True)
    if args.dry_run:
        print("[merge] dry run: every check passed; nothing was computed", flush=True)
        return 0
    check_output_dir(args.output)
    enable_compilation_cache(1.0)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adamerging-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _demo_parser(subparsers)
    _merge_parser(subparsers)
    _paper_parser(subparsers)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo_command(args)
    if args.command == "merge":
        return run_merge_command(args)
    from adamerging_jax.paper.cli import COMMANDS

    enable_compilation_cache(1.0)
    return COMMANDS[args.experiment](args.arguments)


if __name__ == "__main__":
    sys.exit(main())
