#!/usr/bin/env python3
"""Peak memory of real streamed CLIP merges at ViT-L/14 width with K = 20 float32 task vectors, at several
depths: a streamed merge holds a few tensors at a time, so its peak must not grow with the number of layers.

For every depth (``--layers``, default 2 and 4 layers of ViT-L/14's blocks: width 1024, MLP 4096, 16 heads,
patch 14, 224² images) the script writes, tensor by tensor (`ShardedWriter`, little memory), θ0 as a full
``CLIPModel`` folder (ViT-L/14's text tower and projections, the image tower at that depth; the tokenizer
files of the tiny test fixture, which a streamed run only copies) and ``--tasks`` fine-tuned
``CLIPVisionModel`` towers θ_k = θ0 + 0.05·N(0, 1) per entry (θ0: 0.2·N(0, 1), LayerNorm gains
1 + 0.2·N(0, 1), as `methods_benchmark.random_models`), seeded per tensor. Then, for every method
(``--methods``, default TSV-M, Iso-CTS and WUDI), it runs ``adamerging-jax merge`` (no test folders, no
unlabeled images: the run streams) in a fresh interpreter that reports, from ``/proc/self/status``:

- ``peak_rss_bytes``: VmHWM, the process's peak resident memory over the whole run (imports, checks, merge,
  export). Not ``ru_maxrss``: across fork + exec it keeps the parent's peak.
- ``rss_after_imports_bytes``: VmRSS once JAX and the package are imported, before the merge.
- ``rise_bytes``: the peak minus that.

These are measured. Computed from shapes, not measured (``abstract``), per method: what the stream holds for
the tensor that needs most (`per_tensor_figure`): θ0's and the K fine-tuned tensors read for it and for the
next one (the reader thread reads ahead), θ0's and τ's leaves handed to the method, and XLA's buffer
assignment of the method's own compiled program on that one-tensor tree (its arguments are those leaves;
outputs + temporaries counted). Beside it, the whole tower in memory at 24 layers:
``benchmarks/results/methods_memory_l14.json``.

``--params`` sets method parameters (default ``wudi.iterations=1``: WUDI's Adam steps run in a scan that
reuses its buffers, so one step has the memory of 300 and takes 1/300 of their time; the abstract figure is
compiled with the same parameters).

Run single-threaded on a shared machine (LAPACK's spinning threads; benchmarks/README.md):

    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false OPENBLAS_NUM_THREADS=1 \\
        nice -n 10 python benchmarks/clip_streamed_memory.py --out benchmarks/results/clip_streamed_memory_l14.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "clip" / "ti8"
MEASURE_LINE = '{"measured"'
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS")
TAU_STD = 0.05


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="tsv_m,iso_cts,wudi", help="comma list of streaming methods")
    p.add_argument("--layers", default="2,4", help="comma list of depths (ViT-L/14 blocks; default 2,4)")
    p.add_argument("--tasks", type=int, default=20, help="fine-tuned towers K (default 20)")
    p.add_argument("--params", default="wudi.iterations=1", help="METHOD.PARAM=VALUE,... (default: one WUDI step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="where the checkpoints are written (default: a "
                   "temporary folder, removed at the end)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "clip_streamed_memory_l14.json")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- checkpoints


def clip_config(layers: int) -> Any:
    """ViT-L/14 (text tower, projections, image tower) with ``layers`` image blocks."""
    from adamerging_jax.models import clip

    config = clip.get_config("L/14")
    return dataclasses.replace(config, vision=dataclasses.replace(config.vision, layers=layers))


def theta0_tensor(name: str, shape: tuple[int, ...], index: int, seed: int) -> np.ndarray:
    """θ0's tensor ``name``, seeded by its index (a LayerNorm gain around 1, every other entry 0.2·N(0, 1))."""
    from methods_benchmark import is_norm_gain

    rng = np.random.default_rng([seed, 0, index])
    return ((1.0 if is_norm_gain(name) else 0.0) + 0.2 * rng.standard_normal(shape, np.float32)).astype(np.float32)


def write_checkpoint(folder: Path, config_json: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                     tensor: Any) -> None:
    """An HF folder: config.json and one model.safetensors written tensor by tensor (``tensor(i, name, shape)``)."""
    from adamerging_jax.core.checkpoint import write_json_atomic
    from adamerging_jax.models.clip_checkpoint import ONE_FILE
    from adamerging_jax.models.safetensors_stream import ShardedWriter

    folder.mkdir(parents=True)
    write_json_atomic(folder / "config.json", config_json)
    names = sorted(shapes)
    writer = ShardedWriter(folder, {name: (np.float32, shapes[name]) for name in names}, ONE_FILE)
    for index, name in enumerate(names):
        writer.write(name, tensor(index, name, shapes[name]))
    writer.close()


def write_models(root: Path, layers: int, tasks: int, seed: int) -> tuple[Path, list[Path]]:
    """θ0 (a full CLIPModel with the fixture's tokenizer files) and ``tasks`` CLIPVisionModel towers."""
    from adamerging_jax.models.clip import ClipConfig
    from adamerging_jax.models.clip_checkpoint import hf_config, hf_shapes

    config = clip_config(layers)
    shapes = hf_shapes(config)
    index = {name: i for i, name in enumerate(sorted(shapes))}
    pretrained = root / "pretrained"
    write_checkpoint(pretrained, hf_config(config, "clip"), shapes,
                     lambda i, name, shape: theta0_tensor(name, shape, i, seed))
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(FIXTURE / name, pretrained / name)
    vision = {name: shape for name, shape in shapes.items() if name.startswith("vision_model.")}
    towers = []
    for k in range(tasks):
        def finetuned(i: int, name: str, shape: tuple[int, ...], k: int = k) -> np.ndarray:
            noise = np.random.default_rng([seed, k + 1, index[name]]).standard_normal(shape, np.float32)
            return theta0_tensor(name, shape, index[name], seed) + np.float32(TAU_STD) * noise

        towers.append(root / f"task{k}")
        write_checkpoint(towers[-1], hf_config(ClipConfig(config.vision), "vision"), vision, finetuned)
    return pretrained, towers


# ------------------------------------------------------------------------------------------ measurement


def status_bytes(field: str) -> int:
    """A memory field of this process's /proc/self/status (VmRSS: resident now, VmHWM: its peak)."""
    with open("/proc/self/status") as status:
        return int(status.read().split(f"{field}:")[1].split()[0]) * 1024


def measure_one(argv: list[str]) -> None:
    """Child: ``merge CONFIG --output OUT`` in this fresh interpreter; one JSON line with its memory."""
    config, output = argv
    import jax  # noqa: F401  (imported before the baseline is read)

    from adamerging_jax.cli import main

    rss_after_imports = status_bytes("VmRSS")
    started = time.perf_counter()
    try:
        main(["merge", config, "--output", output])
        outcome = {"streamed": json.loads((Path(output) / "results.json").read_text())["streamed"]}
    except SystemExit as refused:  # the merge's one error line; the peak up to it is still this run's
        outcome = {"error": str(refused.code)}
    seconds = time.perf_counter() - started
    peak = status_bytes("VmHWM")
    print(json.dumps({"measured": True, "peak_rss_bytes": peak, "rss_after_imports_bytes": rss_after_imports,
                      "rise_bytes": peak - rss_after_imports, "seconds": round(seconds, 1), **outcome}), flush=True)


def run_merge(root: Path, pretrained: Path, towers: list[Path], method: dict[str, Any]) -> dict[str, Any]:
    """One streamed merge in a fresh interpreter; its JSON line (or the error)."""
    import yaml

    tasks = [{"name": f"task{k}", "finetuned": str(tower), "classes": ["a", "b"]} for k, tower in enumerate(towers)]
    config = root / f"{method['name']}.yaml"
    config.write_text(yaml.safe_dump({"pretrained": str(pretrained), "tasks": tasks, "methods": [method],
                                      "devices": 1}))
    output = root / f"out_{method['name']}"
    command = [sys.executable, str(Path(__file__).resolve()), "measure-one", str(config), str(output)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    shutil.rmtree(output, ignore_errors=True)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith(MEASURE_LINE)]
    if done.returncode != 0 or not lines:
        return {"error": f"exit {done.returncode}: {done.stderr[-2000:]}"}
    record = lines[-1]
    record.pop("measured")
    if f"to {output / 'model'} (streamed tensor by tensor" not in done.stdout:
        return {"error": "the run did not stream: " + done.stdout[-2000:]}
    return record


def per_tensor_figure(method: dict[str, Any], layers: int, tasks: int) -> dict[str, Any]:
    """What the stream holds for one tensor, from shapes (module docstring), for the tensor that needs most:
    2 (K + 1) tensors read (this one and the next), θ0's and τ's leaves (K + 1), and XLA's outputs +
    temporaries of the method compiled on the one-tensor tree."""
    import jax

    from adamerging_jax.core.registry import method_spec
    from adamerging_jax.merging.binding import clip_binding
    from adamerging_jax.merging.streaming import binding_placement, one_leaf_tree
    from adamerging_jax.models.clip_checkpoint import hf_shapes

    config = clip_config(layers)
    binding = clip_binding(config)
    placement = binding_placement(binding)
    params = {key: value for key, value in method.items() if key != "name"}
    spec = method_spec(method["name"], **params)
    rows = {}
    for name, shape in hf_shapes(config, "vision").items():
        place = placement(name)
        leaf = shape[::-1] if place.transpose else shape  # a 2-D matrix's kernel layout
        leaf = (1, *leaf) if place.stacked else leaf
        key = (binding.matrix_view.matrix(place.path) is not None, place.stacked, leaf)
        if key in rows:
            continue

        def build(base: Any, tau: Any, path: str = place.path) -> Any:
            return spec.build(one_leaf_tree(path, base), one_leaf_tree(path, tau), view=binding.matrix_view).params

        base = jax.ShapeDtypeStruct(leaf, np.float32)
        tau = jax.ShapeDtypeStruct((tasks, *leaf), np.float32)
        analysis = jax.jit(build).lower(base, tau).compile().memory_analysis()
        tensor_bytes = int(np.prod(shape)) * 4
        read = 2 * (tasks + 1) * tensor_bytes
        leaves = (tasks + 1) * tensor_bytes
        method_bytes = analysis.output_size_in_bytes + analysis.temp_size_in_bytes
        rows[key] = dict(tensor=name, shape=list(shape), read_bytes=read, leaves_bytes=leaves,
                         method_output_temp_bytes=method_bytes, total_bytes=read + leaves + method_bytes)
    return max(rows.values(), key=lambda row: row["total_bytes"])



def in_memory_reference(tasks: int) -> list[dict[str, Any]]:
    """The whole ViT-L/14 image tower merged in memory (methods_memory_l14.json: abstract, 24 layers) at K."""
    path = REPO / "benchmarks" / "results" / "methods_memory_l14.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())["rows"]
    return [dict(method=row["method"], layers=24, k=row["k"], kind="abstract (methods_memory_l14.json)",
                 inputs_bytes=row["inputs_bytes"], peak_bytes=row["peak_bytes"])
            for row in rows if row["kind"] == "abstract" and row["k"] == tasks]


def method_params(spec: str) -> dict[str, dict[str, Any]]:
    from methods_benchmark import method_params as parse

    return parse(spec)


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from step_benchmark import machine

    overrides = method_params(args.params)
    methods = [{"name": name, **overrides.get(name, {})} for name in args.methods.split(",")]
    depths = [int(layers) for layers in args.layers.split(",")]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="clip_streamed_memory."))
    rows = []
    try:
        for layers in depths:
            root = workdir / f"layers{layers}"
            started = time.perf_counter()
            pretrained, towers = write_models(root, layers, args.tasks, args.seed)
            size = sum(path.stat().st_size for path in root.rglob("*.safetensors"))
            print(f"[clip_streamed_memory] {layers} layers: wrote {size / 2**30:.2f} GiB of checkpoints "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
            for method in methods:
                record = run_merge(root, pretrained, towers, method)
                rows.append(dict(method=method["name"], params=method, layers=layers, k=args.tasks,
                                 kind="measured", checkpoint_bytes=size, **record))
                peak = record.get("peak_rss_bytes")
                print(f"[clip_streamed_memory] {method['name']} at {layers} layers: "
                      + (f"peak {peak / 2**30:.2f} GiB, rise {record['rise_bytes'] / 2**30:.2f} GiB "
                         f"({record['seconds']} s)" if peak else "") + record.get("error", "")[-500:],
                      file=sys.stderr, flush=True)
            shutil.rmtree(root)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    for method in methods:
        figure = per_tensor_figure(method, min(depths), args.tasks)
        rows.append(dict(method=method["name"], params=method, k=args.tasks, kind="abstract per tensor", **figure))
    return dict(bench="clip_streamed_memory", machine=machine(), command=" ".join(
        ["python", "benchmarks/clip_streamed_memory.py", *argv]), dtype="float32", width="ViT-L/14",
        threads={name: os.environ.get(name) for name in THREAD_VARIABLES}, rows=rows,
        in_memory=in_memory_reference(args.tasks))


def table(report: dict[str, Any]) -> str:
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    lines = ["| method | layers | K | figure | GiB |", "|---|---:|---:|---|---:|"]
    for row in report["rows"]:
        if row["kind"] == "measured":
            if "peak_rss_bytes" not in row:
                lines.append(f"| {row['method']} | {row['layers']} | {row['k']} | measured: error (see the JSON) | |")
                continue
            stopped = ", the merge refused (see the JSON)" if "error" in row else ""
            lines.append(f"| {row['method']} | {row['layers']} | {row['k']} | measured: peak RSS (VmHWM){stopped} | "
                         f"{gib(row['peak_rss_bytes'])} |")
            lines.append(f"| {row['method']} | {row['layers']} | {row['k']} | measured: rise over RSS after imports | "
                         f"{gib(row['rise_bytes'])} |")
        else:
            lines.append(f"| {row['method']} | any | {row['k']} | abstract per tensor ({row['tensor']}) | "
                         f"{gib(row['total_bytes'])} |")
    for row in report["in_memory"]:
        lines.append(f"| {row['method']} | 24 | {row['k']} | in memory, abstract (methods_memory_l14.json) | "
                     f"{gib(row['peak_bytes'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # methods_benchmark, step_benchmark
    if argv[:1] == ["measure-one"]:
        return measure_one(argv[1:])
    args = parse_args(argv)
    report = run(args, argv)
    print(table(report))
    from adamerging_jax.core.checkpoint import write_json_atomic

    write_json_atomic(args.out, report)
    print(f"wrote {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
