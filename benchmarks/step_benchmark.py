#!/usr/bin/env python3
"""Side-by-side benchmark of one layer-wise AdaMerging step: this project vs FusionBench vs the torch floor.

One step (AdaMerging, Yang et al., ICLR 2024) on a CLIP image tower with K tasks × B unlabeled images:

    θ(λ) = θ0 + Σ_k λ_k τ_k   (one λ per tensor per layer)
    L(λ) = Σ_t mean_x H(softmax(100 · n(f_θ(x) W_proj) h_tᵀ))      (frozen zero-shot heads h_t, FusionBench's eps)
    λ ← Adam(∇_λ L),  lr 1e-3, init 0.3, no clamp                   (FusionBench's CLIP settings)

Rows of the table, all measured in this one run on the same sizes:

- ``project``: `adamerging_jax.make_step` jitted, placed exactly as `adamerging()` places its inputs; variants
  fp32 (matmul precision "highest": true fp32, as the peer's fp32), tf32, bf16 (θ0/τ stored in bf16, model run
  in bf16, λ/softmax/loss in fp32), each fused or with per-task gradient accumulation.
- ``jax-floor``: one plain forward+backward of the unmerged tower on the K·B images as one batch (no merge).
- ``fusion-bench`` / ``torch-floor``: the peer script, run in its own Python (``--peer-python`` or
  ``$ADAMERGING_JAX_PEER_PYTHON``, default this interpreter): FusionBench 0.2.33's own AdaMerging step
  (`LayerWiseMergedModel`, imported from PyPI ``fusion-bench``, not copied) and, with ``--floor``, one plain
  torch forward+backward of the same images.  The script is not part of this repository: give its path with
  ``--peer-script PATH`` or ``$ADAMERGING_JAX_PEER_SCRIPT``; without either, the peer rows are skipped (one
  printed line says so).  Its interface: flags ``--k --batch --steps --warmup --seed [--tiny] [--tf32 | --bf16]
  [--floor] --device cpu|cuda``, a module-level ``vision_config(tiny)`` returning an HF `CLIPVisionConfig` and
  ``main(argv)``; it prints one JSON line starting ``{"bench"`` with ``ms_per_step_median``,
  ``ms_per_step_min``, ``steps`` and optionally ``peak_mem_gb``.  Sizes other than the peer's own (``tiny`` =
  its ``--tiny``, ``B/32`` = its default) are run by patching only its ``vision_config``.

Times are the median (and min) of ``--steps`` (≥ 20 by default) steps after ``--warmup`` untimed steps; the
project's compile time is measured separately (`lower().compile()`). Memory: on GPU the device's
``peak_bytes_in_use``; on CPU the process's peak RSS (`getrusage`, cumulative over the run), and for every
compiled step XLA's own buffer assignment (`memory_analysis()`: arguments + outputs + temporaries).

``--memory-report`` instead compiles (without running, from abstract shapes) the ViT-L/14 step for 8 and 20
task vectors in several memory modes and prints analytic sizes of θ0, τ, merged θ and its gradient beside
XLA's compiled peak estimate; ``--memory-run`` also runs each feasible configuration and measures.

Examples:
    python benchmarks/step_benchmark.py --sizes tiny,small --peer-script PEER --out bench_cpu.json  # CPU
    python benchmarks/step_benchmark.py --sizes B/32,L/14 --peer-script PEER --out bench_gpu.json  # GPU
    python benchmarks/step_benchmark.py --sizes tiny --no-peer --steps 3 --profile prof
    python benchmarks/step_benchmark.py --memory-report --simulate-devices 8 --out memory.json
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
PEER_SCRIPT_ENV = "ADAMERGING_JAX_PEER_SCRIPT"
PEER_PYTHON_ENV = "ADAMERGING_JAX_PEER_PYTHON"

# The 8 tasks of the ViT-B/32 AdaMerging benchmark and their class counts (the peer's TASKS); K > 8 cycles.
CLASS_COUNTS = (397, 196, 45, 10, 10, 43, 10, 47)


@dataclasses.dataclass(frozen=True)
class Size:
    """A CLIP image tower (HF `CLIPVisionConfig` fields) and its projection width."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    projection_dim: int
    peer_flag: str | None  # "--tiny" / "" when the peer script has this size built in, None otherwise

    def hf_config(self) -> dict[str, Any]:
        return dict(hidden_size=self.width, intermediate_size=self.mlp_dim, num_hidden_layers=self.layers,
                    num_attention_heads=self.heads, image_size=self.image_size, patch_size=self.patch_size,
                    projection_dim=self.projection_dim, hidden_act="quick_gelu", layer_norm_eps=1e-5)


SIZES = {
    "tiny": Size(32, 8, 32, 2, 4, 128, 16, "--tiny"),  # the peer script's --tiny
    "small": Size(64, 16, 256, 4, 4, 1024, 128, None),  # a CPU size with ~3M parameters, 17 tokens
    "B/32": Size(224, 32, 768, 12, 12, 3072, 512, ""),  # openai/clip-vit-base-patch32 (peer default)
    "L/14": Size(224, 14, 1024, 24, 16, 4096, 768, None),  # openai/clip-vit-large-patch14
}

# Patches only the peer's size; everything else is the peer script's own code path.
PEER_LAUNCHER = """
import importlib.util, json, os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
spec = importlib.util.spec_from_file_location("peer", sys.argv[1])
peer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer)
from transformers import CLIPVisionConfig
config = json.loads(sys.argv[2])
peer.vision_config = lambda tiny: CLIPVisionConfig(**config)
peer.main(sys.argv[3:])
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help=f"comma list of {sorted(SIZES)} (default: tiny,small on CPU, "
                   "B/32,L/14 on GPU)")
    p.add_argument("--variants", default=None, help="comma list of project variants PRECISION[-per_task] with "
                   "PRECISION in fp32, tf32, bf16 (default: fp32,bf16,fp32-per_task; on GPU also tf32)")
    p.add_argument("--k", type=int, default=8, help="tasks / task vectors (default 8)")
    p.add_argument("--batch", type=int, default=16, help="images per task per step (default 16)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling (default 3)")
    p.add_argument("--rounds", type=int, default=1, help="repeat every measurement of a size this many times, "
                   "interleaved (project, floors, peer, project, ...); a row reports the median of the rounds' "
                   "medians (default 1; use 3+ on a shared machine)")
    p.add_argument("--devices", type=int, default=1, help="devices of the data mesh (default 1)")
    p.add_argument("--shard-task-vectors", action="store_true", help="shard θ0/τ over the mesh")
    p.add_argument("--no-peer", action="store_true", help="skip FusionBench and the torch floor")
    p.add_argument("--no-jax-floor", action="store_true", help="skip the plain JAX forward+backward")
    p.add_argument("--peer-python", default=None, help=f"python of the venv with fusion-bench (default: "
                   f"${PEER_PYTHON_ENV}, else this interpreter)")
    p.add_argument("--peer-script", default=None, help=f"path of the peer script (default: ${PEER_SCRIPT_ENV}; "
                   "without either, the FusionBench and torch-floor rows are skipped)")
    p.add_argument("--peer-modes", default=None, help="comma list of fp32, bf16, tf32, floor-fp32, floor-tf32, "
                   "floor-bf16 (default: fp32,floor-fp32 on CPU; all but tf32 on GPU)")
    p.add_argument("--peer-timeout", type=float, default=1800.0, help="seconds per peer run")
    p.add_argument("--profile", default=None, help="write a JAX profiler trace of a few steps of the first "
                   "project variant at the first size into this directory, and list its top ops")
    p.add_argument("--memory-report", action="store_true", help="ViT-L/14 memory report for K = 8 and 20")
    p.add_argument("--memory-run", action="store_true", help="with --memory-report: also run and measure")
    p.add_argument("--memory-tasks", default="8,20", help="K values of the memory report")
    p.add_argument("--memory-size", default="L/14", help="size of the memory report")
    p.add_argument("--memory-modes", default="fp32-shared,bf16-shared,bf16-per_task,bf16-per_task-sharded",
                   help="comma list of PRECISION-MODE[-sharded] for the memory report (sharded ones need several "
                   "devices, e.g. --simulate-devices 8)")
    p.add_argument("--simulate-devices", type=int, default=None, help="on CPU: number of simulated devices "
                   "(sets XLA_FLAGS before jax is imported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="step_benchmark.json", help="JSON result file (written atomically)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.k < 1 or args.batch < 1 or args.rounds < 1:
        p.error("--steps ≥ 1, --warmup ≥ 0, --k ≥ 1, --batch ≥ 1 and --rounds ≥ 1 are required")
    args.peer_script, args.peer_python = peer_paths(args.peer_script, args.peer_python, os.environ)
    if args.peer_script is not None and not os.path.isfile(args.peer_script):
        p.error(f"peer script {args.peer_script!r} (--peer-script or ${PEER_SCRIPT_ENV}) is not a file")
    return args


# ---------------------------------------------------------------------------------------------- helpers


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def gb(nbytes: float | None) -> float | None:
    return None if nbytes is None else round(nbytes / 2**30, 4)


def time_calls(run: Callable[[], Any], steps: int, warmup: int) -> list[float]:
    """Milliseconds of each of `steps` calls of `run` (which blocks until its result is ready) after warm-up."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def timing_fields(times: list[float]) -> dict[str, Any]:
    return dict(ms_per_step_median=round(statistics.median(times), 3), ms_per_step_min=round(min(times), 3),
                steps=len(times))


# ------------------------------------------------------------------------------------------ the problem


def parse_variant(name: str) -> tuple[str, str]:
    """"PRECISION[-MODE]" → (precision, mode). Modes: "shared" (default: fused step, the K task batches through
    the backbone as one batch via `SharedBackbone`), "generic" (fused step with a plain apply_fn: K separate
    forwards), "per_task" (per-task gradient accumulation: one task's activations alive at a time)."""
    precision, _, mode = name.partition("-")
    if precision not in ("fp32", "tf32", "bf16") or mode not in ("", "shared", "generic", "per_task"):
        raise ValueError(f"unknown variant {name!r}: use PRECISION[-MODE], PRECISION in fp32, tf32, bf16 and MODE "
                         "in shared, generic, per_task")
    return precision, mode or "shared"


def matmul_precision(precision: str) -> str:
    """fp32 means true fp32 (as the peer's fp32 with TF32 off); tf32 lets XLA use TF32 on GPUs."""
    return {"fp32": "highest", "tf32": "tensorfloat32", "bf16": "default"}[precision]


class Problem:
    """θ0 (a random CLIP tower), K stacked task vectors (N(0, noise²) "fine-tuning"), frozen zero-shot heads."""

    def __init__(self, size: Size, k: int, batch: int, seed: int, noise: float = 1e-3, abstract: bool = False):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from adamerging_jax.models import clip

        self.size, self.k, self.batch = size, k, batch
        self.vision = clip.VisionConfig(image_size=size.image_size, patch_size=size.patch_size, width=size.width,
                                        layers=size.layers, heads=size.heads, mlp_dim=size.mlp_dim)
        key = jax.random.key(seed)
        init = lambda: clip.init_params(clip.ClipConfig(self.vision), key)["vision"]  # noqa: E731
        self.pretrained = jax.eval_shape(init) if abstract else init()
        rng = np.random.default_rng(seed)
        projection = rng.normal(0, size.width**-0.5, (size.width, size.projection_dim)).astype(np.float32)
        heads = []
        for t in range(k):
            h = rng.normal(size=(CLASS_COUNTS[t % len(CLASS_COUNTS)], size.projection_dim)).astype(np.float32)
            heads.append(h / np.linalg.norm(h, axis=-1, keepdims=True))
        self.projection, self.heads = jnp.asarray(projection), [jnp.asarray(h) for h in heads]
        self.noise, self.seed = noise, seed
        self.stacked = clip.stacked
        self._clip = clip

    def task_vectors(self, dtype):
        """τ[k] ~ N(0, noise²) per leaf, made on the device in `dtype` (what `task_vectors` gives for θ_k = θ0 + ε)."""
        import jax

        leaves, treedef = jax.tree_util.tree_flatten(self.pretrained)
        keys = jax.random.split(jax.random.key(self.seed + 1), len(leaves))
        make = jax.jit(lambda key, shape: (self.noise * jax.random.normal(key, (self.k, *shape))).astype(dtype),
                       static_argnums=1)
        return jax.tree_util.tree_unflatten(treedef, [make(key, leaf.shape) for key, leaf in zip(keys, leaves)])

    def images(self):
        """K batches of B float32 NHWC images, one per task."""
        import jax

        shape = (self.batch, self.size.image_size, self.size.image_size, 3)
        keys = jax.random.split(jax.random.key(self.seed + 2), self.k)
        return [jax.random.normal(key, shape) for key in keys]

    def features(self, params, images):
        """L2-normalised image embeddings, run in the dtype of the (merged) parameters."""
        import jax.numpy as jnp

        dtype = params["patch_embed"]["kernel"].dtype
        pooled = self._clip.vision_forward(params, images.astype(dtype), self.vision)[1]
        embeds = pooled.astype(jnp.float32) @ self.projection
        return embeds / jnp.linalg.norm(embeds, axis=-1, keepdims=True)

    def head(self, features, task: int):
        """FusionBench's CLIP logits: logit_scale 100 · n(embed) @ head_tᵀ, in fp32."""
        return 100.0 * features @ self.heads[task].T

    def apply_fn(self, mode: str):
        """`SharedBackbone` (one backbone pass for all tasks) unless mode is "generic" (K separate forwards)."""
        import adamerging_jax as am

        if mode == "generic":
            return lambda params, images, task: self.head(self.features(params, images), task)
        return am.SharedBackbone(self.features, self.head)


def project_config(precision: str, mode: str, shard: bool):
    import adamerging_jax as am

    bf16 = precision == "bf16"
    return am.AdaMergingConfig.fusionbench(accumulate="per_task" if mode == "per_task" else "fused",
                                           param_dtype="bfloat16" if bf16 else None, shard_task_vectors=shard,
                                           quiet=True)


def placed_inputs(problem: Problem, config, mesh):
    """(λ, opt_state, θ0, τ, batches) on the mesh, as `adamerging()` places them."""
    import jax
    import jax.numpy as jnp

    import adamerging_jax as am
    from adamerging_jax.core.parallel import place_tree, replicated, shard_batches

    dtype = jnp.dtype(config.param_dtype or "float32")
    pretrained = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), problem.pretrained)
    pretrained = place_tree(pretrained, mesh, config.shard_task_vectors)
    task_vectors = place_tree(problem.task_vectors(dtype), mesh, config.shard_task_vectors, skip_leading=1)
    coefficients = am.init_coefficients(problem.pretrained, problem.k, "layer", config.init_value, problem.stacked)
    coefficients = jax.device_put(coefficients, replicated(mesh))
    opt_state = jax.device_put(config.make_optimizer().init(coefficients), replicated(mesh))
    batches = shard_batches(problem.images(), mesh)
    return coefficients, opt_state, pretrained, task_vectors, batches


def count_coefficients(coefficients) -> int:
    return sum(int(v.size) for v in coefficients.values.values())


def memory_analysis(compiled) -> dict[str, Any]:
    """XLA's buffer assignment for one call: argument, output, temporary bytes, and their live total."""
    try:
        stats = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - backends without it
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    if stats is None:
        return {"error": "memory_analysis() returned None"}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    out = {f.replace("_size_in_bytes", "_bytes"): int(getattr(stats, f, 0)) for f in fields}
    out["peak_estimate_bytes"] = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                                  + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
    return out


def cost_analysis(compiled) -> dict[str, Any]:
    try:
        cost = compiled.cost_analysis()
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return {"gflops": round(float(cost.get("flops", 0.0)) / 1e9, 3),
            "gbytes_accessed": round(float(cost.get("bytes accessed", 0.0)) / 1e9, 3)}


def device_peak_gb() -> float | None:
    """The accelerator's peak bytes in use (None on CPU, where jax keeps no such statistic)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return gb(stats.get("peak_bytes_in_use"))


def bench_project(problem: Problem, variant: str, args, mesh, profile_dir: str | None) -> dict[str, Any]:
    """Compile and time the project's step for one variant."""
    import jax

    import adamerging_jax as am

    precision, mode = parse_variant(variant)
    config = project_config(precision, mode, args.shard_task_vectors)
    with jax.default_matmul_precision(matmul_precision(precision)):
        state = list(placed_inputs(problem, config, mesh))
        step = jax.jit(am.make_step(problem.apply_fn(mode), config.make_optimizer(), config), donate_argnums=(0, 1))
        n_coefficients = count_coefficients(state[0])
        start = time.perf_counter()
        compiled = step.lower(*state).compile()
        compile_s = time.perf_counter() - start

        def run():
            state[0], state[1], losses = compiled(*state)
            return jax.block_until_ready(losses)

        first = [float(x) for x in run()]
        times = time_calls(run, args.steps, max(args.warmup - 1, 0))
        last = [float(x) for x in run()]
        profile = write_profile(profile_dir, run, compiled.as_text()) if profile_dir else None
    result = dict(impl="project", variant=variant, precision=precision, mode=mode, accumulate=config.accumulate,
                  param_dtype=config.param_dtype or "float32", shard_task_vectors=args.shard_task_vectors,
                  devices=mesh.devices.size, compile_s=round(compile_s, 3), **timing_fields(times),
                  loss_first=round(sum(first), 5), loss_last=round(sum(last), 5), n_coefficients=n_coefficients,
                  xla_memory=memory_analysis(compiled), cost=cost_analysis(compiled),
                  peak_device_gb=device_peak_gb(), peak_rss_gb=round(peak_rss_gb(), 3))
    if profile is not None:
        result["profile"] = profile
    return result


def bench_jax_floor(problem: Problem, args) -> dict[str, Any]:
    """One plain fp32 forward+backward of θ0 on the K·B images as one batch, the same heads and loss."""
    import jax
    import jax.numpy as jnp

    from adamerging_jax.core.objective import entropy

    images = jnp.concatenate(problem.images())
    b = problem.batch

    def loss(params):
        features = problem.features(params, images)
        return sum(jnp.mean(entropy(problem.head(features[t * b:(t + 1) * b], t), 1e-8)) for t in range(problem.k))

    with jax.default_matmul_precision("highest"):
        grad = jax.jit(jax.grad(loss))
        start = time.perf_counter()
        compiled = grad.lower(problem.pretrained).compile()
        compile_s = time.perf_counter() - start
        times = time_calls(lambda: jax.block_until_ready(compiled(problem.pretrained)), args.steps, args.warmup)
    return dict(impl="jax-floor", variant="fp32", precision="fp32", compile_s=round(compile_s, 3),
                **timing_fields(times), xla_memory=memory_analysis(compiled), cost=cost_analysis(compiled))


# ------------------------------------------------------------------------------------------- profiling


def write_profile(directory: str, run: Callable[[], Any], hlo_text: str, steps: int = 3) -> dict[str, Any]:
    """Trace `steps` calls with the JAX profiler into `directory`; summarise where the compiled step spent time."""
    import jax

    Path(directory).mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for _ in range(steps):
            run()
    traces = sorted(Path(directory).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    summary = summarize_trace(traces[-1], steps, hlo_text) if traces else {}
    return dict(directory=str(directory), steps=steps, trace=str(traces[-1]) if traces else None, **summary)


def hlo_sources(hlo_text: str) -> tuple[str, dict[str, str]]:
    """The module name of a compiled HLO text and, per instruction, the JAX operation it came from."""
    module = re.search(r"HloModule\s+([\w.\-]+)", hlo_text)
    sources = {}
    for match in re.finditer(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]+)\"", hlo_text,
                             re.MULTILINE):
        sources[match.group(1)] = match.group(2)
    return (module.group(1) if module else ""), sources


def summarize_trace(trace: Path, steps: int, hlo_text: str, limit: int = 12) -> dict[str, Any]:
    """Self time (an op's duration minus the ops nested in it, e.g. a scan's `while` minus its body) of every
    HLO op of the step in a Chrome/Perfetto trace, per step: the top ops, the totals per op kind (the name
    without its number), and the busy time summed over XLA's threads.
    """
    module, sources = hlo_sources(hlo_text)
    with gzip.open(trace, "rt") as f:
        data = json.load(f)
    events = data.get("traceEvents", []) if isinstance(data, dict) else data
    by_thread: dict[Any, list[dict]] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and "hlo_op" in args and (not module or args.get("hlo_module") == module):
            by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    self_ms: dict[str, list[float]] = {}
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [end time, op name, self time]
        def close(entry):
            total = self_ms.setdefault(entry[1], [0.0, 0])
            total[0] += entry[2] / 1e3
            total[1] += 1
        for e in thread_events:
            while stack and stack[-1][0] <= e["ts"]:
                close(stack.pop())
            if stack:
                stack[-1][2] -= e["dur"]
            stack.append([e["ts"] + e["dur"], e["args"]["hlo_op"], float(e["dur"])])
        while stack:
            close(stack.pop())
    kinds: dict[str, float] = {}
    for name, (ms, _) in self_ms.items():
        kind = re.sub(r"\.\d+$", "", name)
        kinds[kind] = kinds.get(kind, 0.0) + ms
    ranked = sorted(self_ms.items(), key=lambda item: -item[1][0])[:limit]
    return dict(
        busy_ms_per_step=round(sum(ms for ms, _ in self_ms.values()) / steps, 3),
        top_ops=[dict(name=name, self_ms_per_step=round(ms / steps, 4), calls_per_step=round(n / steps, 2),
                      source=sources.get(name, "")[-160:]) for name, (ms, n) in ranked],
        top_kinds=[dict(kind=kind, self_ms_per_step=round(ms / steps, 4))
                   for kind, ms in sorted(kinds.items(), key=lambda item: -item[1])[:limit]],
    )


# ------------------------------------------------------------------------------------------------ peer


def peer_paths(script: str | None, python: str | None, environ: Mapping[str, str]) -> tuple[str | None, str]:
    """(peer script, its python): each flag when given, else its environment variable; the script has no default
    (None: no peer rows), the python defaults to this interpreter."""
    return script or environ.get(PEER_SCRIPT_ENV) or None, python or environ.get(PEER_PYTHON_ENV) or sys.executable


def peer_modes_to_run(args: argparse.Namespace, modes: list[str]) -> list[str]:
    """``modes``, or none (printing one line that says how to point at the peer) when no peer script is given."""
    if args.no_peer:
        return []
    if args.peer_script is None:
        print(f"peer rows skipped: no peer script; pass --peer-script PATH or set ${PEER_SCRIPT_ENV} (the script "
              "runs FusionBench's AdaMerging step and a plain torch forward+backward in its own venv, "
              f"--peer-python or ${PEER_PYTHON_ENV})", file=sys.stderr)
        return []
    return modes


def peer_command(args, size_name: str, mode: str) -> list[str]:
    size = SIZES[size_name]
    precision = mode.removeprefix("floor-")
    flags = ["--k", str(args.k), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
             str(args.warmup), "--seed", str(args.seed)]
    flags += {"fp32": [], "tf32": ["--tf32"], "bf16": ["--bf16"]}[precision]
    if mode.startswith("floor-"):
        flags.append("--floor")
    if args.k > len(CLASS_COUNTS):
        raise ValueError(f"the peer supports at most {len(CLASS_COUNTS)} tasks, got --k {args.k}")
    if size.peer_flag is not None:
        return [args.peer_python, args.peer_script, *([size.peer_flag] if size.peer_flag else []), *flags]
    return [args.peer_python, "-c", PEER_LAUNCHER, str(Path(args.peer_script).resolve()),
            json.dumps(size.hf_config()), *flags]


def bench_peer(args, size_name: str, mode: str, device: str) -> dict[str, Any]:
    """Run the peer script (FusionBench or the torch floor) in its own interpreter; parse its JSON line."""
    command = peer_command(args, size_name, mode) + ["--device", device]
    impl = "torch-floor" if mode.startswith("floor-") else "fusion-bench"
    row = dict(impl=impl, variant=mode.removeprefix("floor-"), precision=mode.removeprefix("floor-"))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.peer_timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {**row, "error": f"{type(e).__name__}: {e}"[:300]}
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"bench"')]
    if done.returncode or not lines:
        return {**row, "error": f"exit {done.returncode}: {(done.stderr or done.stdout)[-600:]}"}
    peer = json.loads(lines[-1])
    row.update(ms_per_step_median=peer["ms_per_step_median"], ms_per_step_min=peer["ms_per_step_min"],
               steps=peer["steps"], peak_device_gb=peer.get("peak_mem_gb"), peer=peer)
    return row


# ----------------------------------------------------------------------------------------- the report


def print_table(rows: list[dict[str, Any]]) -> None:
    """The rows as a Markdown table (ms per step: median over rounds of the per-round medians, and min)."""
    print("| size | impl | variant | ms/step (median) | min | compile s | XLA step peak GB | device peak GB "
          "| speed-up vs FusionBench |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['size']} | {r['impl']} | {r['variant']} | error: {r['error'][:80]} | | | | | |")
            continue
        xla = gb((r.get("xla_memory") or {}).get("peak_estimate_bytes"))
        cells = [f"{r['ms_per_step_median']:.2f}", f"{r['ms_per_step_min']:.2f}",
                 f"{r['compile_s']:.2f}" if "compile_s" in r else "",
                 f"{xla:.4f}" if xla is not None else "",
                 f"{r['peak_device_gb']:.3f}" if r.get("peak_device_gb") is not None else "",
                 f"{r['speedup_vs_fusion_bench']:.1f}×" if r.get("speedup_vs_fusion_bench") else ""]
        print(f"| {r['size']} | {r['impl']} | {r['variant']} | " + " | ".join(cells) + " |")


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_fusion_bench = FusionBench's fp32 median / this row's median, per size."""
    for size in {r["size"] for r in rows}:
        peer = [r for r in rows if r["size"] == size and r["impl"] == "fusion-bench" and r["variant"] == "fp32"
                and "error" not in r]
        if not peer:
            continue
        for r in rows:
            if r["size"] == size and "error" not in r:
                r["speedup_vs_fusion_bench"] = round(peer[0]["ms_per_step_median"] / r["ms_per_step_median"], 2)


def machine() -> dict[str, Any]:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(platform=jax.default_backend(), devices=[str(d) for d in jax.devices()],
                device_kind=jax.devices()[0].device_kind, cpu=cpu, cpu_count=os.cpu_count(),
                python=platform.python_version(), jax=jax.__version__, hostname=platform.node())


def run_benchmark(args) -> dict[str, Any]:
    import jax

    from adamerging_jax.core.parallel import data_mesh

    gpu = jax.default_backend() == "gpu"
    sizes = (args.sizes or ("B/32,L/14" if gpu else "tiny,small")).split(",")
    variants = (args.variants or ("fp32,tf32,bf16,fp32-generic,fp32-per_task" if gpu
                                  else "fp32,bf16,fp32-generic,fp32-per_task")).split(",")
    peer_modes = peer_modes_to_run(args, (args.peer_modes or ("fp32,bf16,floor-fp32,floor-tf32,floor-bf16" if gpu
                                                               else "fp32,floor-fp32")).split(","))
    for name in sizes:
        if name not in SIZES:
            raise ValueError(f"unknown size {name!r}; known: {sorted(SIZES)}")
    for variant in variants:
        parse_variant(variant)
    if args.devices > len(jax.devices()):
        raise ValueError(f"--devices {args.devices} but only {len(jax.devices())} devices are visible")
    mesh = data_mesh(jax.devices()[: args.devices])

    round_rows = []
    for size_index, name in enumerate(sizes):
        problem = Problem(SIZES[name], args.k, args.batch, args.seed)
        for round_index in range(args.rounds):
            def record(row):
                round_rows.append(dict(size=name, round=round_index, **row))
                print(f"[{name} round {round_index}] {row['impl']} {row['variant']}: "
                      f"{row.get('ms_per_step_median', row.get('error'))} ms", file=sys.stderr)

            for variant_index, variant in enumerate(variants):
                profiled = size_index == 0 and variant_index == 0 and round_index == 0
                try:
                    record(bench_project(problem, variant, args, mesh, args.profile if profiled else None))
                except Exception as e:  # noqa: BLE001 - e.g. out of device memory: report it, go on
                    record(dict(impl="project", variant=variant, error=f"{type(e).__name__}: {e}"[:300]))
            if not args.no_jax_floor:
                record(bench_jax_floor(problem, args))
            for mode in peer_modes:
                record(bench_peer(args, name, mode, "cuda" if gpu else "cpu"))
        del problem
    rows = combine_rounds(round_rows)
    add_speedups(rows)
    return dict(bench="adamerging_layerwise_step", machine=machine(), k=args.k, batch_per_task=args.batch,
                steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                sizes={n: dataclasses.asdict(SIZES[n]) for n in sizes}, rows=rows, round_rows=round_rows,
                load_average=list(os.getloadavg()), peak_rss_gb=round(peak_rss_gb(), 3),
                command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))


def combine_rounds(round_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (size, impl, variant): the first round's details, the median over rounds of the per-round
    medians, the min over rounds of the minima, and every round's median in `rounds_ms`."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in round_rows:
        groups.setdefault((row["size"], row["impl"], row["variant"]), []).append(row)
    rows = []
    for group in groups.values():
        ok = [r for r in group if "error" not in r]
        row = {key: value for key, value in (ok or group)[0].items() if key != "round"}
        if ok:
            row["rounds_ms"] = [r["ms_per_step_median"] for r in ok]
            row["ms_per_step_median"] = round(statistics.median(row["rounds_ms"]), 3)
            row["ms_per_step_min"] = min(r["ms_per_step_min"] for r in ok)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ memory report


def analytic_memory(problem: Problem, param_bytes: int, k: int) -> dict[str, Any]:
    """Bytes of what a step must hold regardless of implementation: θ0, τ (K copies), the merged θ and ∂L/∂θ
    (float32, as the merge accumulates), and the activations saved for the backward pass of one task and of all
    K tasks (ViT: per layer and token ≈ (10·W + 2·mlp) floats plus heads·tokens attention probabilities, float32).
    """
    import jax

    n = sum(int(x.size) for x in jax.tree_util.tree_leaves(problem.pretrained))
    size = problem.size
    tokens = (size.image_size // size.patch_size) ** 2 + 1
    per_image = size.layers * tokens * (10 * size.width + 2 * size.mlp_dim + size.heads * tokens) * 4
    return dict(n_params=n, theta0_bytes=n * param_bytes, task_vectors_bytes=k * n * param_bytes,
                merged_fp32_bytes=n * 4, merged_grad_fp32_bytes=n * 4,
                activations_one_task_bytes=per_image * problem.batch,
                activations_all_tasks_bytes=per_image * problem.batch * k)


def memory_report(args) -> dict[str, Any]:
    """Compile the step from abstract shapes for K in --memory-tasks and several modes; report XLA's peak."""
    import jax
    import jax.numpy as jnp

    import adamerging_jax as am
    from adamerging_jax.core.parallel import batch_sharding, data_mesh, parameter_sharding, replicated

    devices = jax.devices()
    modes = []
    for name in args.memory_modes.split(","):
        shard = name.endswith("-sharded")
        precision, mode = parse_variant(name.removesuffix("-sharded"))
        if shard and len(devices) == 1:
            continue  # nothing to shard over
        modes.append((precision, mode, shard))
    rows = []
    for k in [int(x) for x in args.memory_tasks.split(",")]:
        problem = Problem(SIZES[args.memory_size], k, args.batch, args.seed, abstract=True)
        for precision, mode, shard in modes:
            mesh = data_mesh(devices if shard else devices[:1])
            config = project_config(precision, mode, shard)
            dtype = jnp.dtype(config.param_dtype or "float32")

            def spec(x, skip, dtype=dtype):
                sharding = parameter_sharding(mesh, x.shape, skip) if shard else replicated(mesh)
                return jax.ShapeDtypeStruct(x.shape, dtype, sharding=sharding)

            pretrained = jax.tree_util.tree_map(lambda x: spec(x, 0), problem.pretrained)
            tau = jax.tree_util.tree_map(
                lambda x: spec(jax.ShapeDtypeStruct((k, *x.shape), x.dtype), 1), problem.pretrained)
            coefficients = am.init_coefficients(problem.pretrained, k, "layer", 0.3, problem.stacked)
            opt_state = config.make_optimizer().init(coefficients)
            image = (args.batch, problem.size.image_size, problem.size.image_size, 3)
            batches = [jax.ShapeDtypeStruct(image, jnp.float32, sharding=batch_sharding(mesh)) for _ in range(k)]
            step = jax.jit(am.make_step(problem.apply_fn(mode), config.make_optimizer(), config), donate_argnums=(0, 1))
            start = time.perf_counter()
            compiled = step.lower(coefficients, opt_state, pretrained, tau, batches).compile()
            row = dict(k=k, precision=precision, mode=mode, accumulate=config.accumulate, shard_task_vectors=shard,
                       devices=mesh.devices.size, batch_per_task=args.batch,
                       compile_s=round(time.perf_counter() - start, 2),
                       xla_memory_per_device=memory_analysis(compiled),
                       analytic=analytic_memory(problem, dtype.itemsize, k))
            if args.memory_run:
                row["measured"] = measure_memory_run(problem, config, mode, mesh)
            rows.append(row)
            print(f"[memory] K={k} {precision} {mode} shard={shard}: "
                  f"{gb(row['xla_memory_per_device'].get('peak_estimate_bytes'))} GB (XLA)", file=sys.stderr)
    return dict(bench="adamerging_memory_report", size=args.memory_size, machine=machine(), rows=rows,
                command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                note="xla_memory_per_device is XLA's buffer assignment of the compiled step (estimated without "
                     "running); analytic sizes are computed from the shapes; 'measured' rows ran the step.")


def measure_memory_run(problem: Problem, config, mode: str, mesh) -> dict[str, Any]:
    """Build real arrays and run two steps; peak device memory (GPU) or peak process RSS (CPU)."""
    import jax

    import adamerging_jax as am

    real = Problem(problem.size, problem.k, problem.batch, problem.seed)
    state = list(placed_inputs(real, config, mesh))
    step = jax.jit(am.make_step(real.apply_fn(mode), config.make_optimizer(), config), donate_argnums=(0, 1))
    times = []
    for _ in range(2):
        start = time.perf_counter()
        state[0], state[1], losses = step(*state)
        jax.block_until_ready(losses)
        times.append(round(time.perf_counter() - start, 3))
    del state
    return dict(step_s=times, peak_device_gb=device_peak_gb(), peak_rss_gb=round(peak_rss_gb(), 3))


def print_memory_table(report: dict[str, Any]) -> None:
    """Analytic sizes and XLA's compiled per-device peak, as a Markdown table (GB = 2^30 bytes)."""
    print(f"memory report: CLIP {report['size']}")
    print("| K | mode | devices | θ0 GB | τ GB | activations 1 task GB | activations K tasks GB | XLA args GB "
          "| XLA temp GB | XLA peak GB / device | measured peak GB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in report["rows"]:
        a = {key: gb(value) for key, value in r["analytic"].items()}
        x = {key: gb(value) for key, value in r["xla_memory_per_device"].items() if key != "error"}
        mode = f"{r['precision']}-{r['mode']}" + ("-sharded" if r["shard_task_vectors"] else "")
        measured = r.get("measured", {})
        peak = measured.get("peak_device_gb") or measured.get("peak_rss_gb")
        print(f"| {r['k']} | {mode} | {r['devices']} | {a['theta0_bytes']:.3f} | {a['task_vectors_bytes']:.3f} "
              f"| {a['activations_one_task_bytes']:.3f} | {a['activations_all_tasks_bytes']:.3f} "
              f"| {x.get('argument_bytes') or 0:.3f} | {x.get('temp_bytes') or 0:.3f} "
              f"| {x.get('peak_estimate_bytes') or 0:.3f} | " + (f"{peak:.3f}" if peak else "") + " |")


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.simulate_devices:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.simulate_devices}".strip()
    sys.path.insert(0, str(REPO))
    if args.memory_report:
        report = memory_report(args)
        print_memory_table(report)
    else:
        report = run_benchmark(args)
        print_table(report["rows"])
    # imported here, not at the top: it imports jax, which must load after --simulate-devices set XLA_FLAGS
    from adamerging_jax.core.checkpoint import write_json_atomic

    write_json_atomic(args.out, report)
    print(f"wrote {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
