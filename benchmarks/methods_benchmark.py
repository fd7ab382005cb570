#!/usr/bin/env python3
"""Wall time of every registered data-free merge method, side by side with FusionBench's own implementation,
and the host memory of the SVD-based methods at CLIP ViT-L/14 size.

Speed (the default mode). For every registered method that needs no data (`MergeMethod.needs_data` False;
the reference rows ``pretrained`` and ``individual`` left out), at every size (a random CLIP image tower,
float32, K task vectors):

- ours: ``spec.build(θ0, τ, view=clip.matrix_view)`` with the method's default parameters (``--params``
  changes some where the reference fixture departs from them in a way that changes the work: by default
  WUDI's 20 Adam steps, the fixture's, instead of 300), jitted as a whole;
  the compile time (``lower().compile()``) is reported apart from the steady-state run (median of
  ``--repeats`` runs, each ended by ``block_until_ready``). A method that cannot be traced as a whole is run
  eagerly: its compile time is then the first call minus the median run.
- FusionBench: the method's fixture function in ``scripts/make_method_fixtures.py`` (FusionBench's own code
  called on HF ``CLIPVisionModel``s), run in a separate interpreter (``--peer-python``, default
  ``$ADAMERGING_JAX_PEER_PYTHON``) by this script's ``peer-worker`` mode: median of the same number of runs,
  each on fresh copies of the models (the copying is not timed), after one untimed call on the fixture's tiny
  models (imports, first-call set-up). Its time includes what the fixture does besides merging (τ = θ_k − θ0,
  the result as float64 arrays). A method without a fixture function is timed on our side only.

Both sides read the same weights: this script draws them once (seeded, float32, HF tensor names) into a
temporary ``.npz``; ours converts them to its tree, the peer loads them into ``CLIPVisionModel``s, so the
inputs are byte-identical. Each side stops repeating a method once ``--max-seconds`` are spent (at least one
run). The ratio is ours run / FusionBench. On a shared machine run both sides single-threaded (LAPACK's
spinning worker threads slow SVDs many times over under load; benchmarks/README.md has the variables); the
JSON records the thread variables and the peer's torch threads.

Memory (``--memory-report``): for ``--memory-methods`` (default tsv_m, iso_cts, wudi) at ViT-L/14 shapes (HF
``CLIPVisionModel``: width 1024, 24 layers, MLP 4096, patch 14, image 224; q, k, v separate) with K = 8 and
20 task vectors in float32, the whole jitted method compiled from abstract shapes (``jax.ShapeDtypeStruct``,
nothing allocated): XLA's buffer assignment, arguments + outputs + temporaries. To show that figure is
honest, each method is also run for real at a size that fits (``--memory-measure``, default L/14 shapes with
2 layers, K = 8) in a subprocess that reports its peak RSS beside the abstract figure of the same program.
``--memory-params`` sets method parameters for the measured run only (e.g. fewer iterations of an
iterative method: its loop reuses its buffers, so the memory is that of the default).

Examples:
    python benchmarks/methods_benchmark.py --peer-python PEER_VENV/bin/python \\
        --out benchmarks/results/methods_cpu.json
    python benchmarks/methods_benchmark.py --quick --methods ties,dare --out /tmp/methods.json
    python benchmarks/methods_benchmark.py --memory-report --out benchmarks/results/methods_memory_l14.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PEER_PYTHON_ENV = "ADAMERGING_JAX_PEER_PYTHON"
PEER_LINE = '{"peer"'
MEASURE_LINE = '{"measured"'
FLOAT32 = 4
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS")
FIXTURE_PARAMS = "wudi.iterations=20"  # scripts/make_method_fixtures.py's WUDI_ITERATIONS


@dataclasses.dataclass(frozen=True)
class Size:
    """A CLIP image tower, as HF `CLIPVisionConfig` fields name it."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int

    def hf_config(self) -> dict[str, Any]:
        return dict(hidden_size=self.width, intermediate_size=self.mlp_dim, num_hidden_layers=self.layers,
                    num_attention_heads=self.heads, image_size=self.image_size, patch_size=self.patch_size)


SIZES = {
    "tiny": Size(16, 8, 24, 2, 2, 40),  # the reference fixtures' tower (scripts/make_method_fixtures.py)
    "small": Size(64, 16, 256, 4, 4, 1024),  # step_benchmark's small: seconds per method on 2 CPU cores
    "B/32": Size(224, 32, 768, 12, 12, 3072),  # openai/clip-vit-base-patch32
    "L/14": Size(224, 14, 1024, 24, 16, 4096),  # openai/clip-vit-large-patch14
    "L/14-2l": Size(224, 14, 1024, 2, 16, 4096),  # L/14's matrices, 2 layers: a real run fits a small host
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=None, help="comma list of registered data-free methods (default: all)")
    p.add_argument("--sizes", default=None, help=f"comma list of {list(SIZES)} (default tiny,small)")
    p.add_argument("--tasks", type=int, default=4, help="task vectors K (default 4; a method for exactly n "
                   "models gets n)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per method and side (default 5)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop repeating a method once its runs took "
                   "this long (at least one run; default 60)")
    p.add_argument("--quick", action="store_true", help="tiny size, 2 repeats")
    p.add_argument("--params", default=FIXTURE_PARAMS, help="METHOD.PARAM=VALUE,... for our side, where the "
                   f"reference fixture departs from the defaults in a way that changes the work (default "
                   f"{FIXTURE_PARAMS!r}: the fixture's Adam steps)")
    p.add_argument("--peer-python", default=None, help=f"python of an environment with torch, transformers and "
                   f"fusion-bench (default ${PEER_PYTHON_ENV}; without one the FusionBench column is empty)")
    p.add_argument("--peer-timeout", type=float, default=3600.0, help="seconds for the peer's whole run per size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-report", action="store_true", help="the memory report instead of the speed table")
    p.add_argument("--memory-methods", default="tsv_m,iso_cts,wudi")
    p.add_argument("--memory-size", default="L/14", help="size of the abstract figures (default L/14)")
    p.add_argument("--memory-tasks", default="8,20", help="K of the abstract figures (default 8,20)")
    p.add_argument("--memory-measure", default="L/14-2l:8", help="SIZE:K of the measured runs ('' for none)")
    p.add_argument("--memory-params", default="wudi.iterations=1", help="METHOD.PARAM=VALUE,... for the measured "
                   "runs only (default: one WUDI step; its steps run in a scan, which reuses its buffers)")
    p.add_argument("--out", type=Path, default=None, help="JSON result (written atomically; default "
                   "benchmarks/results/methods_cpu.json, or methods_memory.json with --memory-report)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = args.sizes or "tiny", 2
    args.sizes = (args.sizes or "tiny,small").split(",")
    for size in [*args.sizes, args.memory_size, args.memory_measure.partition(":")[0] or "tiny"]:
        if size not in SIZES:
            p.error(f"unknown size {size!r}; known: {list(SIZES)}")
    if min(args.tasks, args.repeats) < 1 or args.max_seconds <= 0:
        p.error("--tasks and --repeats must be >= 1, --max-seconds > 0")
    if args.peer_python is None:
        args.peer_python = os.environ.get(PEER_PYTHON_ENV) or None
    if args.out is None:
        args.out = REPO / "benchmarks" / "results" / ("methods_memory.json" if args.memory_report
                                                      else "methods_cpu.json")
    return args


# ----------------------------------------------------------------------------------------------- helpers


def timed_runs(run: Callable[..., Any], repeats: int, max_seconds: float,
               fresh_inputs: Callable[[], tuple] = tuple) -> list[float]:
    """Seconds of each of up to `repeats` calls ``run(*fresh_inputs())`` (`run` returns when its work is done;
    `fresh_inputs` is not timed), stopping once the calls took `max_seconds` together (at least one call)."""
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < max_seconds):
        inputs = fresh_inputs()
        start = time.perf_counter()
        run(*inputs)
        times.append(time.perf_counter() - start)
    return times


def one_line(error: Exception) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


def time_fields(times: list[float]) -> dict[str, Any]:
    return dict(run_s=round(statistics.median(times), 6), runs_s=[round(t, 6) for t in times])


def random_models(size: Size, k: int, seed: int) -> dict[str, np.ndarray]:
    """θ0 and K fine-tuned towers θ_k = θ0 + τ_k as float32 HF tensors, ``pretrained/NAME`` and ``task{k}/NAME``.

    The reference fixtures' distributions, drawn with NumPy: every entry of θ0 ~ 0.2·N(0, 1) (LayerNorm gains
    1 + 0.2·N(0, 1)), every entry of τ_k ~ 0.05·N(0, 1); names in sorted order, one seeded generator.
    """
    shapes = hf_shapes(size)
    rng = np.random.default_rng(seed)
    pretrained = {name: ((1.0 if is_norm_gain(name) else 0.0) + 0.2 * rng.standard_normal(shape)).astype(np.float32)
                  for name, shape in sorted(shapes.items())}
    arrays = {f"pretrained/{name}": value for name, value in pretrained.items()}
    for task in range(k):
        arrays.update({f"task{task}/{name}": (value + 0.05 * rng.standard_normal(value.shape)).astype(np.float32)
                       for name, value in pretrained.items()})
    return arrays


def is_norm_gain(name: str) -> bool:
    return name.endswith(".weight") and ("norm" in name or "layrnorm" in name)


def hf_shapes(size: Size) -> dict[str, tuple[int, ...]]:
    """The HF ``CLIPVisionModel`` state-dict names and shapes of `size` (from our tower's shapes, nothing drawn)."""
    import jax

    from adamerging_jax.models import clip_checkpoint

    abstract = jax.eval_shape(lambda: vision_tree(size, jax.random.PRNGKey(0)))
    zeros = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, np.float32), abstract)
    return {name.removeprefix(clip_checkpoint.VISION_PREFIX): value.shape
            for name, value in clip_checkpoint.hf_state_dict(zeros, None, "vision").items()}


def vision_tree(size: Size, key: Any) -> dict:
    from adamerging_jax.models import clip

    config = clip.VisionConfig(image_size=size.image_size, patch_size=size.patch_size, width=size.width,
                               layers=size.layers, heads=size.heads, mlp_dim=size.mlp_dim)
    return clip.init_params(clip.ClipConfig(config), key)["vision"]


def section(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {key[len(prefix) + 1:]: value for key, value in arrays.items() if key.startswith(prefix + "/")}


# ------------------------------------------------------------------------------------------------- ours


def data_free_methods(requested: list[str] | None) -> list[str]:
    """Registered methods that need no data (reference rows left out), or `requested` checked against them."""
    from adamerging_jax.core.registry import REFERENCE_ROWS, REGISTRY

    known = [name for name, method in REGISTRY.items() if not method.needs_data and name not in REFERENCE_ROWS]
    if requested is None:
        return known
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise SystemExit(f"not registered data-free methods: {unknown}; registered: {known}")
    return requested


def tasks_of(name: str, k: int) -> int:
    """K for `name`: `k`, or the exact count of a method that merges a fixed number of models (SLERP: 2)."""
    from adamerging_jax.core.registry import get_method

    return get_method(name).num_tasks or k


def merged_outputs(name: str, k: int, params: dict[str, Any] | None = None) -> Callable[[Any, Any], Any]:
    """``(θ0, τ) -> merged tree`` (a list of K trees for a method with one model per task), default parameters
    unless `params`, CLIP's matrix view."""
    from adamerging_jax.core.registry import method_spec
    from adamerging_jax.models import clip

    spec = method_spec(name, **(params or {}))

    def outputs(pretrained: Any, task_vectors: Any) -> Any:
        merged = spec.build(pretrained, task_vectors, view=clip.matrix_view)
        return merged.params if merged.per_task is None else [merged.for_task(t) for t in range(k)]

    return outputs


def our_inputs(arrays: dict[str, np.ndarray], k: int) -> tuple[Any, Any]:
    """(θ0, stacked τ) of our tower from the HF tensors of `random_models`, float32."""
    import adamerging_jax as am
    from adamerging_jax.models import clip_checkpoint

    def tower(prefix: str) -> dict:
        return clip_checkpoint.params_from_hf_state_dict(section(arrays, prefix), dtype=np.float32)["vision"]

    pretrained = tower("pretrained")
    return pretrained, am.task_vectors(pretrained, [tower(f"task{t}") for t in range(k)])


def time_ours(name: str, pretrained: Any, task_vectors: Any, k: int, params: dict[str, Any], repeats: int,
              max_seconds: float) -> dict[str, Any]:
    """Compile time and steady-state run times of the method jitted as a whole (or eagerly, see the module
    docstring)."""
    import jax

    outputs = merged_outputs(name, k, params)
    start = time.perf_counter()
    try:
        compiled = jax.jit(outputs).lower(pretrained, task_vectors).compile()
    except Exception as error:  # not traceable as a whole: time it eagerly
        first = time.perf_counter()
        jax.block_until_ready(outputs(pretrained, task_vectors))
        first = time.perf_counter() - first
        times = timed_runs(lambda: jax.block_until_ready(outputs(pretrained, task_vectors)), repeats, max_seconds)
        return dict(compile_s=round(max(first - statistics.median(times), 0.0), 6), **time_fields(times),
                    compile_measure=f"first call − median run (not jittable as a whole: {type(error).__name__})")
    compile_s = time.perf_counter() - start
    times = timed_runs(lambda: jax.block_until_ready(compiled(pretrained, task_vectors)), repeats, max_seconds)
    return dict(compile_s=round(compile_s, 6), **time_fields(times), compile_measure="lower + compile")


# ------------------------------------------------------------------------------------------------- peer


def peer_worker(argv: list[str]) -> None:
    """The FusionBench side, run in the peer's interpreter: one JSON line per method (see `run_peer`)."""
    import torch
    import transformers

    p = argparse.ArgumentParser(prog="methods_benchmark.py peer-worker")
    p.add_argument("--models", required=True)
    p.add_argument("--size", required=True, choices=list(SIZES))
    p.add_argument("--methods", required=True, help="comma list of NAME:K")
    p.add_argument("--repeats", type=int, required=True)
    p.add_argument("--max-seconds", type=float, required=True)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "scripts"))
    import make_method_fixtures as references

    with np.load(args.models) as data:
        arrays = {key: data[key] for key in data.files}
    config = transformers.CLIPVisionConfig(**SIZES[args.size].hf_config())

    def model(prefix: str) -> torch.nn.Module:
        module = transformers.CLIPVisionModel(config).eval()
        module.load_state_dict({name: torch.from_numpy(value) for name, value in section(arrays, prefix).items()})
        return module

    tiny = references.tiny_clip_vision(), references.finetuned_copies(references.tiny_clip_vision())
    versions = {package: _version(package) for package in ("fusion-bench", "torch", "transformers")}
    print(json.dumps({"peer": "versions", **versions, "torch_threads": torch.get_num_threads()}), flush=True)
    for entry in args.methods.split(","):
        name, k = entry.split(":")
        record: dict[str, Any] = dict(method=name, status="no fixture")
        if name in references.FIXTURES:
            models = model("pretrained"), [model(f"task{t}") for t in range(int(k))]
            with contextlib.redirect_stdout(sys.stderr):
                record.update(time_reference(references.FIXTURES[name], (tiny[0], tiny[1][:int(k)]), models,
                                             args.repeats, args.max_seconds))
        print(json.dumps({"peer": "method", **record}), flush=True)


def time_reference(make: Callable[..., Any], tiny: tuple[Any, list], models: tuple[Any, list], repeats: int,
                   max_seconds: float) -> dict[str, Any]:
    """One untimed call of the fixture function `make` on the tiny float64 fixture models, then `timed_runs` on
    fresh copies of `models` (float32); a fixture that fails in float32 is timed on float64 copies instead
    (``dtype`` and ``float32_error`` say so)."""
    import torch

    def runs(pretrained: Any, finetuned: list) -> list[float]:
        return timed_runs(make, repeats, max_seconds, lambda: (copy.deepcopy(pretrained),
                                                               [copy.deepcopy(m) for m in finetuned]))

    record: dict[str, Any] = {}
    try:
        with default_dtype(torch.float64):  # no torch.no_grad(): some references use autograd (WUDI's Adam)
            start = time.perf_counter()
            make(*copy.deepcopy(tiny))  # imports, first call
            record["warmup_tiny_s"] = round(time.perf_counter() - start, 6)
        try:
            return dict(record, status="measured", dtype="float32", **time_fields(runs(*models)))
        except Exception as error:
            record["float32_error"] = one_line(error)
        pretrained, finetuned = models
        with default_dtype(torch.float64):
            times = runs(copy.deepcopy(pretrained).double(), [copy.deepcopy(m).double() for m in finetuned])
        return dict(record, status="measured", dtype="float64", **time_fields(times))
    except Exception as error:  # one failing reference is a row, not the end of the run
        return dict(record, status="error", error=one_line(error))


@contextlib.contextmanager
def default_dtype(dtype: Any) -> Any:
    """torch's default dtype set to `dtype` inside the block."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_peer(args: argparse.Namespace, models_path: str, size: str, methods: list[tuple[str, int]]
             ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(versions, {method: record}) from the peer worker on `size`; an unusable peer gives one error record per
    method."""
    command = [args.peer_python, str(Path(__file__).resolve()), "peer-worker", "--models", models_path,
               "--size", size, "--methods", ",".join(f"{name}:{k}" for name, k in methods),
               "--repeats", str(args.repeats), "--max-seconds", str(args.max_seconds)]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.peer_timeout, env=env)
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith(PEER_LINE)]
        failure = None if done.returncode == 0 else f"peer exited {done.returncode}: {done.stderr[-1500:]}"
    except (OSError, subprocess.TimeoutExpired) as error:
        lines, failure = [], f"{type(error).__name__}: {error}"
    versions = next(({k: v for k, v in line.items() if k != "peer"} for line in lines
                     if line["peer"] == "versions"), {})
    records = {line["method"]: line for line in lines if line["peer"] == "method"}
    for name, _ in methods:
        records.setdefault(name, dict(method=name, status="error", error=failure or "no record from the peer"))
    return versions, records


# ------------------------------------------------------------------------------------------ speed table


def run_speed(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import jax

    from adamerging_jax.core.checkpoint import write_npz_atomic
    from step_benchmark import machine

    names = data_free_methods(args.methods.split(",") if args.methods else None)
    params = method_params(args.params)
    methods = [(name, tasks_of(name, args.tasks)) for name in names]
    if args.peer_python is None:
        print(f"[methods_benchmark] no peer python (--peer-python or ${PEER_PYTHON_ENV}): the FusionBench "
              "column is empty", file=sys.stderr)
    rows, peer_versions, sizes = [], {}, {}
    for size_name in args.sizes:
        size = SIZES[size_name]
        arrays = random_models(size, max(k for _, k in methods), args.seed)
        sizes[size_name] = dict(dataclasses.asdict(size),
                                n_params=sum(v.size for key, v in arrays.items() if key.startswith("pretrained/")))
        peer: dict[str, dict[str, Any]] = {}
        if args.peer_python is not None:
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "models.npz")
                write_npz_atomic(path, arrays)
                peer_versions, peer = run_peer(args, path, size_name, methods)
        rows += [speed_row(args, size_name, name, k, arrays, peer.get(name), params.get(name, {}))
                 for name, k in methods]
        jax.clear_caches()
    return dict(bench="data_free_methods", machine=machine(), command=recorded_command(argv), dtype="float32",
                tasks=args.tasks, repeats=args.repeats, max_seconds=args.max_seconds, sizes=sizes,
                thread_variables={name: os.environ.get(name) for name in THREAD_VARIABLES},
                peer=dict(python_given=args.peer_python is not None, **peer_versions), rows=rows)


def speed_row(args: argparse.Namespace, size: str, name: str, k: int, arrays: dict[str, np.ndarray],
              reference: dict[str, Any] | None, params: dict[str, Any]) -> dict[str, Any]:
    """One method at one size: our times (or the error), the peer's record and the ratio of the medians."""
    from adamerging_jax.core.registry import get_method

    pretrained, task_vectors = our_inputs(arrays, k)
    try:
        ours = time_ours(name, pretrained, task_vectors, k, params, args.repeats, args.max_seconds)
    except Exception as error:  # one failing method is a row, not the end of the run
        ours = dict(error=one_line(error))
    both = "run_s" in ours and reference is not None and reference["status"] == "measured"
    print(f"[methods_benchmark] {size} {name}: ours {_seconds(ours)}; FusionBench "
          f"{_seconds(reference) if reference else 'no peer'}", file=sys.stderr)
    return dict(method=name, label=get_method(name).label, size=size, k=k, params=params, ours=ours,
                fusion_bench=reference, peer_status=reference["status"] if reference else "no peer",
                ratio=round(ours["run_s"] / reference["run_s"], 4) if both else None)


def recorded_command(argv: list[str]) -> str:
    """The command line for the record, the peer's interpreter (a path on this machine) written PEER_PYTHON."""
    words = ["python", "benchmarks/methods_benchmark.py"]
    for word in argv:
        after_flag = words[-1] == "--peer-python"
        words.append("PEER_PYTHON" if after_flag else
                     "--peer-python=PEER_PYTHON" if word.startswith("--peer-python=") else word)
    return " ".join(words)


def _seconds(record: dict[str, Any]) -> str:
    if "run_s" not in record:
        return record.get("error") or record.get("status", "")
    compile_s = f"compile {record['compile_s']:.3f} s, " if "compile_s" in record else ""
    return f"{compile_s}run {record['run_s']:.4f} s"


def speed_table(report: dict[str, Any]) -> str:
    lines = ["| size | method | K | ours compile s | ours run s | FusionBench s | ratio (ours run / FusionBench) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        ours, reference = row["ours"], row["fusion_bench"] or {}
        timed = f"{ours['compile_s']:.3f} | {ours['run_s']:.4f}" if "run_s" in ours else "error | error"
        fusion = f"{reference['run_s']:.4f}" if "run_s" in reference else "—"
        fusion += " (float64)" if reference.get("dtype") == "float64" else ""
        ratio = f"{row['ratio']:.3g}" if row["ratio"] is not None else "—"
        lines.append(f"| {row['size']} | {row['method']} | {row['k']} | {timed} | {fusion} | {ratio} |")
    notes = sorted({f"{row['method']} (ours): {row['ours']['error']}" for row in report["rows"]
                    if "error" in row["ours"]}
                   | {f"{row['method']} (FusionBench): {row['fusion_bench'].get('error', row['peer_status'])}"
                      for row in report["rows"] if row["peer_status"] not in ("measured", "no peer", "no fixture")})
    notes += sorted({f"{row['method']}: ours with{_params_note(row['params'])}, as the reference fixture"
                     for row in report["rows"] if row.get("params")})
    in_float64 = {row["method"]: row["fusion_bench"]["float32_error"] for row in report["rows"]
                  if (row["fusion_bench"] or {}).get("dtype") == "float64"}
    notes += [f"{name} (FusionBench): timed in float64, its fixture fails in float32 ({error})"
              for name, error in sorted(in_float64.items())]
    if not report["peer"]["python_given"]:
        notes.insert(0, f"FusionBench column empty: no peer python given (--peer-python or ${PEER_PYTHON_ENV})")
    elif any(row["peer_status"] == "no fixture" for row in report["rows"]):
        notes.append("—: no fixture function for the method in scripts/make_method_fixtures.py")
    return "\n".join(lines + [f"- {note}" for note in notes]) + "\n"


# ------------------------------------------------------------------------------------------ memory report


def abstract_inputs(size: Size, k: int) -> tuple[Any, Any]:
    """(θ0, τ) of our tower at `size` as float32 `jax.ShapeDtypeStruct`s."""
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(lambda: vision_tree(size, jax.random.PRNGKey(0)))
    pretrained = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), shapes)
    return pretrained, jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((k, *x.shape), jnp.float32), shapes)


def compiled_memory(name: str, size: Size, k: int, params: dict[str, Any] | None = None) -> tuple[Any, dict]:
    """The method jitted as a whole, compiled from abstract shapes, and XLA's buffer assignment of it."""
    import jax

    start = time.perf_counter()
    compiled = jax.jit(merged_outputs(name, k, params)).lower(*abstract_inputs(size, k)).compile()
    analysis = compiled.memory_analysis()
    fields = dict(argument_bytes=analysis.argument_size_in_bytes, output_bytes=analysis.output_size_in_bytes,
                  temp_bytes=analysis.temp_size_in_bytes, alias_bytes=analysis.alias_size_in_bytes)
    fields["peak_bytes"] = fields["argument_bytes"] + fields["output_bytes"] + fields["temp_bytes"]
    return compiled, dict(fields, compile_s=round(time.perf_counter() - start, 3))


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure_one(argv: list[str]) -> None:
    """Subprocess: compile METHOD at SIZE with K task vectors from shapes, then allocate random inputs and run
    it; print the abstract figure and the RSS before the inputs, after them and at the peak. The measured
    figure, peak RSS − RSS before the inputs, is the run's arguments + outputs + temporaries when the run's
    peak is above the compiler's (``run_peak_visible``)."""
    import jax

    name, size_name, k, params = argv[0], argv[1], int(argv[2]), json.loads(argv[3])
    size = SIZES[size_name]
    compiled, abstract = compiled_memory(name, size, k, params)
    rss_before_inputs, peak_after_compile = current_rss_bytes(), peak_rss_bytes()
    rng = np.random.default_rng(0)  # numpy draws: no XLA compile between the two RSS readings
    pretrained, task_vectors = jax.tree_util.tree_map(
        lambda x: jax.device_put(rng.standard_normal(x.shape, np.float32)), abstract_inputs(size, k))
    rss_with_inputs, peak_before_run = current_rss_bytes(), peak_rss_bytes()
    start = time.perf_counter()
    jax.block_until_ready(compiled(pretrained, task_vectors))
    run_s = time.perf_counter() - start
    peak = peak_rss_bytes()
    print(json.dumps({"measured": name, "size": size_name, "k": k, "params": params, "abstract": abstract,
                      "rss_before_inputs_bytes": rss_before_inputs, "rss_with_inputs_bytes": rss_with_inputs,
                      "peak_rss_bytes": peak, "peak_after_compile_bytes": peak_after_compile,
                      "peak_before_run_bytes": peak_before_run, "run_s": round(run_s, 3),
                      "measured_bytes": peak - rss_before_inputs,
                      "run_peak_visible": peak > max(peak_before_run, peak_after_compile)}), flush=True)


def method_params(spec: str) -> dict[str, dict[str, Any]]:
    """``METHOD.PARAM=VALUE,...`` → {method: {param: value}} (values read as JSON, else kept as text)."""
    chosen: dict[str, dict[str, Any]] = {}
    for item in filter(None, spec.split(",")):
        target, _, text = item.partition("=")
        method, _, parameter = target.partition(".")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        chosen.setdefault(method, {})[parameter] = value
    return chosen


def fusion_bench_tsv_bytes(n_params: int, k: int) -> int:
    """FusionBench TSV-M's live float32 tensors at its peak, computed from shapes: `TaskSingularVectorMerging.run`
    holds θ0, the K task vectors it built (state_dict_sub) and the merged task vector when `state_dict_add`
    builds the merged state dict: (K + 3) model-sized tensors. Per-key SVD buffers (u, s, vh and their sums,
    at most a few MB at L/14) and the interpreter, torch and model loading are not counted."""
    return (k + 3) * n_params * FLOAT32


def run_memory(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from adamerging_jax.core.registry import REGISTRY
    from step_benchmark import machine

    wanted = args.memory_methods.split(",")
    methods = [name for name in wanted if name in REGISTRY]
    if missing := [name for name in wanted if name not in REGISTRY]:
        print(f"[methods_benchmark] not registered, left out: {missing}", file=sys.stderr)
    size = SIZES[args.memory_size]
    n_params = sum(int(np.prod(shape)) for shape in hf_shapes(size).values())
    rows = []
    for name in methods:
        for k in map(int, args.memory_tasks.split(",")):
            _, abstract = compiled_memory(name, size, k)
            row = dict(method=name, size=args.memory_size, k=k, kind="abstract", **abstract,
                       inputs_bytes=(k + 1) * n_params * FLOAT32)
            if name == "tsv_m":
                row["fusion_bench_computed_bytes"] = fusion_bench_tsv_bytes(n_params, k)
            rows.append(row)
            print(f"[methods_benchmark] {name} K={k}: {abstract['peak_bytes'] / 2**30:.2f} GiB "
                  f"(compile {abstract['compile_s']:.1f} s)", file=sys.stderr)
    overrides = method_params(args.memory_params)
    if args.memory_measure:
        measure_size, _, measure_k = args.memory_measure.partition(":")
        for name in methods:
            rows.append(measured_row(name, measure_size, int(measure_k or 8), overrides.get(name, {})))
    return dict(bench="data_free_methods_memory", machine=machine(), command=" ".join(
        ["python", "benchmarks/methods_benchmark.py", *argv]), dtype="float32", size=args.memory_size,
        sizes={args.memory_size: dict(dataclasses.asdict(size), n_params=n_params)}, rows=rows)


def measured_row(name: str, size: str, k: int, params: dict[str, Any]) -> dict[str, Any]:
    """`measure_one` in a fresh interpreter (its peak RSS is this one run's)."""
    command = [sys.executable, str(Path(__file__).resolve()), "measure-one", name, size, str(k), json.dumps(params)]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith(MEASURE_LINE)]
    if done.returncode != 0 or not lines:
        return dict(method=name, size=size, k=k, kind="measured", params=params,
                    error=f"exit {done.returncode}: {done.stderr[-1500:]}")
    record = lines[-1]
    print(f"[methods_benchmark] {name} measured at {size} K={k}: {record['measured_bytes'] / 2**30:.2f} GiB "
          f"(abstract {record['abstract']['peak_bytes'] / 2**30:.2f} GiB)", file=sys.stderr)
    return dict(method=name, size=size, k=k, kind="measured", **{key: value for key, value in record.items()
                                                                  if key not in ("measured", "size", "k")})


def memory_table(report: dict[str, Any]) -> str:
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    lines = ["| method | size | K | figure | arguments (θ0 + τ) GiB | outputs GiB | temporaries GiB | peak GiB | "
             "FusionBench TSV GiB (computed from shapes) |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        start = f"| {row['method']} | {row['size']} | {row['k']} |"
        if "error" in row:
            lines.append(f"{start} measured: error (see the JSON) | | | | | |")
            continue
        abstract = row if row["kind"] == "abstract" else row["abstract"]
        cells = " | ".join(gib(abstract[key]) for key in ("argument_bytes", "output_bytes", "temp_bytes",
                                                            "peak_bytes"))
        if row["kind"] == "abstract":
            reference = gib(row["fusion_bench_computed_bytes"]) if "fusion_bench_computed_bytes" in row else ""
            lines.append(f"{start} abstract (XLA buffer assignment) | {cells} | {reference} |")
            continue
        hidden = "" if row["run_peak_visible"] else "; the run's peak is below the compiler's"
        lines.append(f"{start} abstract, the measured program{_params_note(row['params'])} | {cells} | |")
        lines.append(f"{start} measured: peak RSS − RSS before the inputs{hidden} | | | | "
                     f"{gib(row['measured_bytes'])} | |")
    return "\n".join(lines) + "\n"


def _params_note(params: dict[str, Any]) -> str:
    return f" ({', '.join(f'{key}={value}' for key, value in params.items())})" if params else ""


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["peer-worker"]:
        return peer_worker(argv[1:])
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_benchmark's machine()
    if argv[:1] == ["measure-one"]:
        return measure_one(argv[1:])
    args = parse_args(argv)
    report = run_memory(args, argv) if args.memory_report else run_speed(args, argv)
    print(memory_table(report) if args.memory_report else speed_table(report))
    from adamerging_jax.core.checkpoint import write_json_atomic

    write_json_atomic(args.out, report)
    print(f"wrote {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
