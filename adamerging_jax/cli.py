"""Command line: `adamerging-jax demo` runs the offline real benchmark (see README)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence


def _enable_compilation_cache() -> None:
    import jax

    cache = os.environ.get("ADAMERGING_JAX_CACHE", str(Path.home() / ".cache" / "adamerging_jax" / "jax"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _demo_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="fine-tune ImageNet EfficientNet-Lite0 on real packaged tasks, merge, evaluate (offline)",
        description="The offline real benchmark: EfficientNet-Lite0 (ImageNet) fine-tuned on MNIST-5k, "
        "Fashion-MNIST, Animal-MNIST and scikit-learn digits, merged by every method, evaluated on each test split.",
    )
    p.add_argument("--quick", action="store_true", help="small and fast (32 px, few images and steps): a smoke test")
    p.add_argument("--config", type=Path, help="JSON file of DemoConfig fields; flags override it")
    p.add_argument("--tasks", help="comma-separated packaged tasks (mnist, fashion_mnist, animal_mnist, digits, textures)")
    p.add_argument("--task-folder", action="append", default=[], metavar="NAME=PATH",
                   help="add a user task from a folder of class subfolders (or train/ and test/ with class subfolders)")
    p.add_argument("--resolution", type=int)
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--steps", type=int, dest="adamerging_steps", help="AdaMerging steps")
    p.add_argument("--lr", type=float, dest="adamerging_lr", help="AdaMerging learning rate (Adam)")
    p.add_argument("--methods", help="comma-separated subset of the methods")
    p.add_argument("--head", choices=["prototype", "logistic"])
    p.add_argument("--shots", type=int)
    p.add_argument("--head-scale", type=float)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed; the table gives mean ± std")
    p.add_argument("--output", type=Path, default=Path("runs/demo"))
    p.add_argument("--cache", type=Path, help="cache of fine-tuned backbones (default ~/.cache/adamerging_jax/demo)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _demo_config(args):
    from adamerging_jax.demo.pipeline import DemoConfig

    fields = json.loads(args.config.read_text()) if args.config else {}
    for name in ("resolution", "n_train", "n_test", "adamerging_steps", "adamerging_lr", "head", "shots", "head_scale"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.tasks:
        fields["tasks"] = tuple(t for t in args.tasks.split(",") if t)
    if args.methods:
        fields["methods"] = tuple(m for m in args.methods.split(",") if m)
    for key in ("tasks", "methods", "clamp"):
        if isinstance(fields.get(key), list):
            fields[key] = tuple(fields[key])
    known = {f.name for f in dataclasses.fields(DemoConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise SystemExit(f"error: unknown demo settings {unknown} in {args.config}; known: {sorted(known)}")
    return DemoConfig.quick(**fields) if args.quick else DemoConfig(**fields)


def run_demo_command(args) -> int:
    _enable_compilation_cache()
    from adamerging_jax.data import packaged
    from adamerging_jax.demo.pipeline import DEFAULT_CACHE, run_demo
    from adamerging_jax.demo.report import write_report

    base = _demo_config(args)
    cache = None if args.no_cache else (args.cache or DEFAULT_CACHE)
    runs = []
    started = time.perf_counter()
    for seed in args.seeds:
        config = dataclasses.replace(base, seed=seed)
        tasks = packaged.load_tasks(config.tasks, seed, config.n_train, config.n_test, skip_unavailable=True)
        for spec in args.task_folder:
            name, _, path = spec.partition("=")
            if not path:
                raise SystemExit(f"error: --task-folder expects NAME=PATH, got {spec!r}")
            tasks.append(packaged.task_from_folder(path, name=name, image_size=max(config.resolution, 28), seed=seed))
        print(f"[demo] seed {seed}: tasks {[t.name for t in tasks]}, {config.resolution} px", flush=True)
        run = run_demo(config, tasks=tasks, cache_dir=cache, quiet=args.quiet)
        runs.append(run)
        print(f"[demo] seed {seed} done in {run['seconds']['total']:.0f} s", flush=True)
    files = write_report(runs, args.output, plots=not args.no_plots)
    print(files["table"].read_text())
    print(f"[demo] {len(runs)} run(s) in {time.perf_counter() - started:.0f} s; wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adamerging-jax", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _demo_parser(subparsers)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo_command(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
