#!/usr/bin/env python3
"""Tokens per second of one layer-wise AdaMerging step on a Llama decoder, against one plain forward+backward.

One step (AdaMerging, Yang et al., ICLR 2024) with K task vectors, B prompts of T tokens per task:

    θ(λ) = θ0 + Σ_k clamp(λ_k, 0, 1) τ_k     (one λ per task and HF tensor: [K, L] on stacked leaves)
    L(λ) = Σ_t Σ_{n,i} w H(softmax z_t[n, i]) / Σ w      (mask-weighted next-token entropy, `causal_lm_binding`)
    λ ← Adam(∇_λ L), lr 1e-3                               (`adamerging_jax.make_step`, jitted, λ donated)

against the floor: one plain forward+backward of θ0 (no merge, no update) on the same K·B·T tokens as one
batch, the same loss, gradients for every parameter. The merge is K axpys per tensor and the update touches
only λ, so on CPU the step should cost about the floor; ``step/floor`` is that ratio.

Times are the median (and min) of ``--steps`` calls after ``--warmup`` untimed ones; compile time is measured
apart (``lower().compile()``). Tokens per second = K·B·T / median. Sizes: ``tiny`` (hidden 64, 2 layers,
vocabulary 256, T = 32) and ``small`` (hidden 256, 4 layers, vocabulary 2048, T = 128).

Example (the committed result):
    python benchmarks/lm_speed.py --sizes tiny,small --out benchmarks/results/lm_speed_cpu.json
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_benchmark's timing helpers
from step_benchmark import machine, time_calls, timing_fields  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Size:
    """A Llama decoder (`adamerging_jax.models.llama.LlamaConfig` fields) and the prompt length T."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tokens: int

    def llama_config(self) -> Any:
        from adamerging_jax.models.llama import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                           num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                           head_dim=self.hidden_size // self.num_heads)


SIZES = {
    "tiny": Size(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 tokens=32),
    "small": Size(vocab_size=2048, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=2,
                  tokens=128),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,small", help=f"comma-separated, of {list(SIZES)}")
    parser.add_argument("--k", type=int, default=4, help="task vectors K")
    parser.add_argument("--batch", type=int, default=4, help="prompts per task B")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lm_speed_cpu.json"))
    args = parser.parse_args(argv)
    unknown = [name for name in args.sizes.split(",") if name not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; known: {list(SIZES)}")
    if min(args.k, args.batch, args.steps) < 1 or args.warmup < 0:
        parser.error("--k, --batch and --steps must be >= 1, --warmup >= 0")
    return args


def problem(size: Size, k: int, batch: int, seed: int) -> dict[str, Any]:
    """θ0 (random init), K task vectors τ_k ~ 1e-3 · N(0, 1) per entry, and K batches of B full-length prompts."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from adamerging_jax.models import llama

    config = size.llama_config()
    pretrained = llama.init_params(config, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    task_vectors = jax.tree_util.tree_map(
        lambda x: jnp.asarray(1e-3 * rng.standard_normal((k, *x.shape)), x.dtype), pretrained)
    batches = [{"input_ids": jnp.asarray(rng.integers(0, size.vocab_size, (batch, size.tokens)), jnp.int32),
                "attention_mask": jnp.ones((batch, size.tokens), jnp.int32)} for _ in range(k)]
    return dict(config=config, pretrained=pretrained, task_vectors=task_vectors, batches=batches)


def compiled_and_time(function: Any, *inputs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = function.lower(*inputs).compile()
    return compiled, time.perf_counter() - start


def bench_step(data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The jitted layer-wise AdaMerging step (merge + forward + backward + Adam), λ and Adam's state donated."""
    import jax

    import adamerging_jax as am
    from adamerging_jax.merging.lm_binding import causal_lm_binding
    from adamerging_jax.models import llama

    config = am.AdaMergingConfig(granularity="layer", lr=1e-3, batches_per_task=1, batch_size=args.batch,
                                 stacked=llama.stacked, quiet=True)
    apply_fn = causal_lm_binding(data["config"]).apply_fn
    optimizer = config.make_optimizer()
    lam = am.init_coefficients(data["pretrained"], args.k, "layer", config.init_value, llama.stacked)
    state = [lam, optimizer.init(lam), data["pretrained"], data["task_vectors"], data["batches"]]
    step = jax.jit(am.make_step(apply_fn, optimizer, config), donate_argnums=(0, 1))
    compiled, compile_s = compiled_and_time(step, *state)

    def run() -> Any:
        state[0], state[1], losses = compiled(*state)
        return jax.block_until_ready(losses)

    first = float(run().sum())
    times = time_calls(run, args.steps, max(args.warmup - 1, 0))
    return dict(impl="adamerging-step", compile_s=round(compile_s, 3), **timing_fields(times),
                loss_first=round(first, 5), loss_last=round(float(run().sum()), 5),
                n_coefficients=sum(int(v.size) for v in lam.values.values()))


def bench_floor(data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One plain forward+backward of θ0 on the K·B prompts as one batch: the same loss, ∂L/∂θ for every leaf."""
    import jax
    import jax.numpy as jnp

    from adamerging_jax.core.objective import task_entropy
    from adamerging_jax.merging.lm_binding import causal_lm_binding

    apply_fn = causal_lm_binding(data["config"]).apply_fn
    batch = {key: jnp.concatenate([b[key] for b in data["batches"]]) for key in data["batches"][0]}
    grad = jax.jit(jax.grad(lambda params: task_entropy(apply_fn, params, batch, 0)))
    compiled, compile_s = compiled_and_time(grad, data["pretrained"])
    times = time_calls(lambda: jax.block_until_ready(compiled(data["pretrained"])), args.steps, args.warmup)
    return dict(impl="forward-backward", compile_s=round(compile_s, 3), **timing_fields(times))


def run_benchmark(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Every size's step and floor rows, with the machine and the command line ``argv``."""
    import jax

    rows = []
    for name in args.sizes.split(","):
        size = SIZES[name]
        data = problem(size, args.k, args.batch, args.seed)
        tokens = args.k * args.batch * size.tokens
        n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(data["pretrained"]))
        measured = [bench_step(data, args), bench_floor(data, args)]
        for row in measured:
            row.update(size=name, tokens_per_step=tokens, n_params=n_params,
                       tokens_per_s=round(tokens / (row["ms_per_step_median"] / 1e3), 1))
            print(f"[lm_speed] {name} {row['impl']}: {row['ms_per_step_median']:.1f} ms, "
                  f"{row['tokens_per_s']:.0f} tokens/s (compile {row['compile_s']:.1f} s)", file=sys.stderr)
        measured[0]["step_over_floor"] = round(measured[0]["ms_per_step_median"] / measured[1]["ms_per_step_median"],
                                               3)
        rows += measured
    command = " ".join(["python", "benchmarks/lm_speed.py", *argv])
    return dict(bench="lm_layerwise_adamerging_step", machine=machine(), k=args.k, batch_per_task=args.batch,
                steps=args.steps, warmup=args.warmup, sizes={name: dataclasses.asdict(SIZES[name])
                                                             for name in args.sizes.split(",")},
                rows=rows, command=command)


def markdown(report: dict[str, Any]) -> str:
    lines = ["| size | params | K·B·T tokens | what | ms/step (median) | tokens/s | step / floor | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        ratio = row.get("step_over_floor")
        lines.append(f"| {row['size']} | {row['n_params'] / 1e6:.2f} M | {row['tokens_per_step']} | {row['impl']} | "
                     f"{row['ms_per_step_median']:.1f} | {row['tokens_per_s']:.0f} | "
                     f"{'–' if ratio is None else f'{ratio:.2f}'} | {row['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    report = run_benchmark(args, argv)
    print(markdown(report))
    from adamerging_jax.core.checkpoint import write_json_atomic

    write_json_atomic(args.out, report)
    print(f"wrote {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
