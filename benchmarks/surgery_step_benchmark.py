#!/usr/bin/env python3
"""One Representation Surgery step (Yang et al., "Representation Surgery for Multi-Task Model Merging", ICML 2024),
this project beside FusionBench 0.2.33, in one run on CPU, at the step benchmark's ``tiny`` CLIP size.

A step, for K tasks × B unlabeled images: the base model's and each fine-tuned model's representation
(normalised image embedding), the L1 loss of every task's module and one Adam step on the modules.

- ``project``: `core.surgery.make_surgery_step` jitted, the inputs placed as `train_surgery` places them.
- ``fusion-bench``: FusionBench's own ``SurgeryModelWrapper`` and its ``compute_features``, stepped as
  ``CLIPLayerWiseAdaMergingSurgeryAlgorithm.run`` steps it (per task: features, L1, zero_grad, backward, Adam),
  run by this same file in the peer's interpreter (``--peer-python``, default this one) with ``--peer``.

Both sides single-threaded (XLA's CPU thread pool and torch's intra-op threads set to 1); the times are the median
(and min) of ``--steps`` steps after ``--warmup``.

    python benchmarks/surgery_step_benchmark.py --peer-python PEER_PYTHON --out benchmarks/results/surgery_step_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

TINY = dict(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_dim=128, projection_dim=16)
"""The step benchmark's ``tiny`` size (benchmarks/step_benchmark.py SIZES["tiny"])."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peer-python", default=os.environ.get("ADAMERGING_JAX_PEER_PYTHON", sys.executable))
    p.add_argument("--peer", action="store_true", help="run FusionBench's side (in the peer's interpreter)")
    p.add_argument("--out", help="write the JSON here")
    return p.parse_args(argv)


def timing(run: Callable[[], Any], steps: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"ms_per_step_median": 1e3 * statistics.median(times), "ms_per_step_min": 1e3 * min(times), "steps": steps}


def bench_fusion_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    from transformers.models.clip import modeling_clip

    if not hasattr(modeling_clip, "CLIPVisionTransformer"):  # transformers 5 folded it into CLIPVisionModel;
        modeling_clip.CLIPVisionTransformer = modeling_clip.CLIPVisionModel  # the wrapper imports it for hints only
    from fusion_bench.mixins.clip_classification import CLIPClassificationMixin
    from fusion_bench.models.surgery.surgerymodelwrapper import SurgeryModelWrapper

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        hidden_size=TINY["width"], intermediate_size=TINY["mlp_dim"], num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"], image_size=TINY["image_size"], patch_size=TINY["patch_size"],
        projection_dim=TINY["projection_dim"])
    base = transformers.CLIPVisionModel(config).eval()
    finetuned = [transformers.CLIPVisionModel(config).eval().requires_grad_(False) for _ in range(args.k)]
    holder = type("Holder", (), {"visual_projection": torch.nn.Linear(TINY["width"], TINY["projection_dim"],
                                                                      bias=False).requires_grad_(False)})()
    features = lambda model, images: CLIPClassificationMixin.compute_features(holder, model, images)  # noqa: E731
    names = [f"task{k}" for k in range(args.k)]
    wrapper = SurgeryModelWrapper(base, names, projection_dim=TINY["projection_dim"])
    optimizer = torch.optim.Adam(wrapper.collect_trainable_params(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    images = torch.randn(args.k, args.batch, 3, TINY["image_size"], TINY["image_size"])

    def step() -> None:
        for task, name in enumerate(names):
            target = features(finetuned[task], images[task])
            moved, _, _ = wrapper.compute_surgery_features(lambda model: features(model, images[task]), name)
            loss = torch.nn.functional.l1_loss(moved, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return {"row": "fusion-bench", "torch": torch.__version__, "threads": torch.get_num_threads(),
            **timing(step, args.steps, args.warmup)}


def bench_project(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from adamerging_jax.core import surgery
    from adamerging_jax.core.parallel import data_mesh, place_tree, replicated_copy, shard_batches
    from adamerging_jax.models import clip

    config = clip.VisionConfig(image_size=TINY["image_size"], patch_size=TINY["patch_size"], width=TINY["width"],
                               layers=TINY["layers"], heads=TINY["heads"], mlp_dim=TINY["mlp_dim"])
    size = TINY["image_size"]
    init = jax.jit(clip.VisionTower(config).init)
    params = [init(jax.random.PRNGKey(k), jnp.zeros((1, size, size, 3)))["params"] for k in range(args.k + 1)]
    projection = jax.random.normal(jax.random.PRNGKey(99), (TINY["width"], TINY["projection_dim"])) / TINY["width"] ** 0.5

    def features_fn(vision: Any, images: Any) -> Any:
        return clip.l2_normalize(clip.vision_forward(vision, images, config)[1] @ projection)

    mesh = data_mesh(jax.devices()[:1])
    pretrained = place_tree(params[0], mesh, False)
    tau = place_tree(jax.tree_util.tree_map(lambda *xs: jnp.stack([x - xs[0] for x in xs[1:]]), *params), mesh, False)
    modules = replicated_copy(surgery.init_modules(jax.random.PRNGKey(0), args.k, TINY["projection_dim"]), mesh)
    optimizer = optax.adam(1e-3)
    state = {"modules": modules, "opt": replicated_copy(optimizer.init(modules), mesh)}
    rng = np.random.default_rng(0)
    batches = shard_batches([rng.standard_normal((args.batch, size, size, 3), np.float32) for _ in range(args.k)], mesh)
    step = jax.jit(surgery.make_surgery_step(features_fn, optimizer), donate_argnums=(0, 1))
    started = time.perf_counter()
    compiled = step.lower(state["modules"], state["opt"], pretrained, pretrained, tau, batches).compile()
    compile_seconds = time.perf_counter() - started

    def run() -> None:
        state["modules"], state["opt"], losses = compiled(state["modules"], state["opt"], pretrained, pretrained, tau,
                                                          batches)
        losses.block_until_ready()

    return {"row": "project", "jax": jax.__version__, "compile_seconds": compile_seconds,
            **timing(run, args.steps, args.warmup)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.peer:
        print(json.dumps(bench_fusion_bench(args)))
        return
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1").strip()
    project = bench_project(args)
    peer_argv = [args.peer_python, os.path.abspath(__file__), "--peer", "--k", str(args.k), "--batch",
                 str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    peer = json.loads(subprocess.run(peer_argv, check=True, capture_output=True, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.strip().splitlines()[-1])
    ratio = project["ms_per_step_median"] / peer["ms_per_step_median"]
    result = {"benchmark": "one Representation Surgery step, tiny CLIP", "size": TINY, "k": args.k,
              "batch": args.batch, "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "peer_python": "PEER_PYTHON", "xla_flags": os.environ["XLA_FLAGS"], "rows": [project, peer],
              "project_over_fusion_bench": ratio}
    print(f"project {project['ms_per_step_median']:.2f} ms/step, FusionBench {peer['ms_per_step_median']:.2f} "
          f"ms/step: {ratio:.3f}× FusionBench's time")
    if args.out:
        with open(args.out, "w") as file:
            json.dump(result, file, indent=2)
            file.write("\n")


if __name__ == "__main__":
    main()
