#!/usr/bin/env python3
"""Per-device memory of one layer-wise AdaMerging step of a Llama-3-8B-shaped decoder on a data × fsdp mesh.

The step (Yang et al., ICLR 2024) is the one `adamerging` runs, built by `make_step` / `guarded_step` with the
mesh, its inputs placed as `adamerging` places them (`core.parallel`): θ0 and τ stored in bf16 and sharded
along "fsdp" on their largest divisible axis (never τ's task axis K), each task's batch along "data", λ and
Adam's state replicated, the merged θ(λ) constrained to θ0's sharding. It is compiled from abstract shapes
(`jax.ShapeDtypeStruct` with shardings; nothing is allocated) on simulated CPU devices
(``--xla_force_host_platform_device_count``, one subprocess per device count), and XLA's buffer assignment
gives the per-device peak: arguments + outputs + temporaries − aliased (donated λ and optimiser state).

Cases: K = 4 and K = 8 full task vectors, and K = 8 LoRA adapters (r = 16 on q, k, v, o, gate, up, down,
kept factored: `core.low_rank`), each with and without remat of the scanned block, with fused or per-task
accumulation; B prompts × T tokens per task (default 8 × 512). The Markdown table says which memory sizes
(16, 32, 80 GiB) each peak fits, with 10 % headroom left for the runtime.

The merge is compiled in the formulation accelerators run (`core.merge.weighted_sum_by_reduction`, a fused
reduction over K), not XLA:CPU's contraction, which would hold a float32 copy of each bf16 τ shard.

Caveat: this is XLA:CPU's schedule and buffer assignment of the partitioned program; TPU and GPU compilers
schedule differently (typically lower peaks: better rematerialisation and fusion), so read the numbers as
estimates of the right order, and check a real run with the device's own memory statistics.

Examples:
    python benchmarks/lm_memory.py                                   # 8B shapes on 8, 64, 256 devices
    python benchmarks/lm_memory.py --size tiny --devices 8 --out /tmp/lm_memory_tiny.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
FITS = (16, 32, 80)  # device memory sizes in GiB
HEADROOM = 0.9  # the share of device memory a step may use

# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json) and a tiny model of the same family for the test.
SIZES: dict[str, dict[str, Any]] = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
               num_kv_heads=8, head_dim=128, rope_theta=500000.0),
    "tiny": dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8),
}
# devices → (data, fsdp): data ≤ the 8 prompts per task, fsdp as large as the divisibility allows.
MESHES = {8: (1, 8), 64: (8, 8), 256: (8, 32)}
LORA_TARGETS = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down")
CASES = {"full4": ("full", 4), "full8": ("full", 8), "lora8": ("lora", 8)}


def abstract_inputs(config, k: int, kind: str, rank: int, mesh, batch: int, length: int):
    """(θ0, τ, batches) as `jax.ShapeDtypeStruct`s placed as `adamerging` places them (bf16 storage)."""
    import jax
    import jax.numpy as jnp

    from adamerging_jax.core.low_rank import LoraFactors, zero_task_vector
    from adamerging_jax.core.parallel import batch_sharding, tree_shardings
    from adamerging_jax.core.trees import map_with_path
    from adamerging_jax.models import llama

    bf16 = jnp.bfloat16
    shapes = jax.eval_shape(lambda: llama.init_params(config, jax.random.PRNGKey(0), bf16))

    def task_vector(path, x):
        if kind == "full":
            return jax.ShapeDtypeStruct((k, *x.shape), bf16)
        if any(path == f"layers/{target}/kernel" for target in LORA_TARGETS):
            lead, (d_in, d_out) = x.shape[:-2], x.shape[-2:]
            return LoraFactors(jax.ShapeDtypeStruct((k, *lead, rank, d_in), bf16),
                               jax.ShapeDtypeStruct((k, *lead, d_out, rank), bf16),
                               jax.ShapeDtypeStruct((k, *lead), jnp.float32))
        return jax.eval_shape(lambda: zero_task_vector(x.shape, k, int(llama.stacked(path)), bf16))

    def placed(tree, skip_leading):
        return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      tree, tree_shardings(tree, mesh, True, skip_leading))

    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=batch_sharding(mesh))
    batches = [{"input_ids": tokens, "attention_mask": tokens} for _ in range(k)]
    return placed(shapes, 0), placed(map_with_path(task_vector, shapes), 1), batches


def compile_case(config, mesh, k: int, kind: str, rank: int, remat: bool, accumulate: str, batch: int,
                 length: int) -> dict[str, Any]:
    """Compile one step from abstract shapes; XLA's per-device memory and the compile time."""
    import jax
    from step_benchmark import memory_analysis

    import adamerging_jax as am
    from adamerging_jax.core import merge
    from adamerging_jax.core.optimize import guarded_step
    from adamerging_jax.core.parallel import replicated
    from adamerging_jax.merging.lm_binding import causal_lm_binding
    from adamerging_jax.models import llama

    merge.cpu_weighted_sum = merge.weighted_sum_by_reduction  # accelerators' formulation (module docstring)
    settings = am.AdaMergingConfig(param_dtype="bfloat16", granularity="layer", stacked=llama.stacked,
                                   batches_per_task=1, batch_size=batch, accumulate=accumulate)
    pretrained, tau, batches = abstract_inputs(config, k, kind, rank, mesh, batch, length)
    optimizer = settings.make_optimizer()
    coefficients = am.init_coefficients(pretrained, k, "layer", 0.3, llama.stacked)
    replicate = lambda tree: jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)), tree)
    lam, opt_state = replicate(coefficients), replicate(jax.eval_shape(optimizer.init, coefficients))
    healthy = jax.ShapeDtypeStruct((), bool, sharding=replicated(mesh))
    step = am.make_step(causal_lm_binding(config, remat=remat).apply_fn, optimizer, settings, mesh=mesh)
    started = time.perf_counter()
    compiled = jax.jit(guarded_step(step), donate_argnums=(0, 1)).lower(
        lam, opt_state, healthy, pretrained, tau, batches).compile()
    return dict(compile_s=round(time.perf_counter() - started, 1), xla=memory_analysis(compiled),
                frozen_bytes_per_device=frozen_bytes(pretrained, tau))


def frozen_bytes(*trees) -> int:
    """Bytes of θ0 and τ held by one device (each leaf's shard)."""
    import jax
    import numpy as np

    return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                   for tree in trees for x in jax.tree_util.tree_leaves(tree)))


def worker(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every case on this process's simulated devices (XLA_FLAGS set by the parent before jax is imported)."""
    import jax

    from adamerging_jax.core.parallel import make_mesh
    from adamerging_jax.models import llama

    config = llama.LlamaConfig(**SIZES[args.size])
    devices = len(jax.devices())
    data, fsdp = mesh_shape(args, devices)
    mesh = make_mesh(data=data, fsdp=fsdp)
    rows = []
    for kind, k in (CASES[name] for name in args.cases.split(",")):
        for remat in (answer == "yes" for answer in args.remat.split(",")):
            for accumulate in args.accumulate.split(","):
                result = compile_case(config, mesh, k, kind, args.rank, remat, accumulate, args.batch, args.length)
                row = dict(size=args.size, devices=devices, data=data, fsdp=fsdp, k=k, task_vectors=kind,
                           rank=args.rank if kind == "lora" else None, remat=remat, accumulate=accumulate,
                           batch_per_task=args.batch, tokens=args.length, **result)
                print(f"[lm_memory] {devices} devices {data}x{fsdp} K={k} {kind} remat={remat} {accumulate}: "
                      f"{row['xla'].get('peak_estimate_bytes', 0) / GIB:.2f} GiB, compiled in {row['compile_s']} s",
                      file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def mesh_shape(args: argparse.Namespace, devices: int) -> tuple[int, int]:
    if args.mesh:
        data, fsdp = (int(x) for x in args.mesh.lower().split("x"))
        return data, fsdp
    return MESHES.get(devices, (1, devices))


def fits(peak_bytes: int) -> list[int]:
    """The memory sizes (GiB) in `FITS` that hold `peak_bytes` with `HEADROOM`."""
    return [size for size in FITS if peak_bytes <= HEADROOM * size * GIB]


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table row per compiled case: mesh, τ, K, remat, accumulation, frozen and peak GiB, fits."""
    header = ("| devices (data × fsdp) | τ | K | remat | accumulate | θ0 + τ per device (GiB) | peak per device (GiB) "
              "| fits (GiB, 90 %) |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        peak = row["xla"].get("peak_estimate_bytes")
        tau = f"LoRA r={row['rank']}" if row["task_vectors"] == "lora" else "full"
        cells = [f"{row['devices']} ({row['data']} × {row['fsdp']})", tau, str(row["k"]),
                 "yes" if row["remat"] else "no", row["accumulate"], f"{row['frozen_bytes_per_device'] / GIB:.2f}"]
        if peak is None:
            cells += [f"n/a ({row['xla'].get('error')})", "n/a"]
        else:
            cells += [f"{peak / GIB:.2f}", ", ".join(str(size) for size in fits(peak)) or "none"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_devices(args: argparse.Namespace, devices: int) -> list[dict[str, Any]]:
    """This script as a worker on `devices` simulated CPU devices; its rows."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, __file__, "--worker", "--size", args.size, "--rank", str(args.rank),
               "--batch", str(args.batch), "--length", str(args.length), "--accumulate", args.accumulate,
               "--cases", args.cases, "--remat", args.remat]
    if args.mesh:
        command += ["--mesh", args.mesh]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"lm_memory worker on {devices} devices exited with {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="8b")
    parser.add_argument("--devices", default="8,64,256", help="simulated device counts, comma-separated")
    parser.add_argument("--mesh", default=None, help="DATAxFSDP for every device count (default: MESHES)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per task")
    parser.add_argument("--length", type=int, default=512, help="tokens per prompt")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--accumulate", default="fused,per_task", help="fused, per_task or both")
    parser.add_argument("--cases", default=",".join(CASES), help=f"task-vector cases among {sorted(CASES)}")
    parser.add_argument("--remat", default="no,yes", help="no, yes or both")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lm_memory.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    started = time.perf_counter()
    rows = [row for devices in (int(d) for d in args.devices.split(",")) for row in run_devices(args, devices)]
    from adamerging_jax.core.checkpoint import write_json_atomic

    report = dict(bench="adamerging_lm_memory", model=dict(size=args.size, **SIZES[args.size]), rows=rows,
                  fits_gib=list(FITS), headroom=HEADROOM, seconds=round(time.perf_counter() - started, 1),
                  command=" ".join(["python benchmarks/lm_memory.py", *(argv if argv is not None else sys.argv[1:])]),
                  note="XLA:CPU buffer assignment of the partitioned step compiled from abstract shapes on "
                       "simulated devices (nothing allocated); peak = arguments + outputs + temporaries - aliased.")
    write_json_atomic(args.out, report)
    print(markdown(rows))
    return report


if __name__ == "__main__":
    main()
