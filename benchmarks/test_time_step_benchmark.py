#!/usr/bin/env python3
"""One step of each test-time method, Representation Surgery (Yang et al., ICML 2024) and the weight-ensembling
MoE (WEMoE, Tang et al., ICML 2024), this project beside FusionBench 0.2.33, in one run on CPU, at the step
benchmark's ``tiny`` CLIP size; and (``--memory-report``) what a WEMoE step holds at CLIP ViT-L/14 size.

Speed (the default). For K tasks × B unlabeled images per step:

- ``surgery``: the base model's and each fine-tuned model's representation (normalised image embedding), the
  L1 loss of every task's module and one Adam step on the modules.
  ``project``: `core.surgery.make_surgery_step` jitted, the inputs placed as `train_surgery` places them.
  ``fusion-bench``: its own ``SurgeryModelWrapper`` and ``compute_features``, stepped as
  ``CLIPLayerWiseAdaMergingSurgeryAlgorithm.run`` steps it (per task: features, L1, zero_grad, backward, Adam).
- ``we_moe``: every block's MLP upscaled (the reference's default), the K batches through the routed tower
  (routing weights averaged over each task's batch, its ``batch_reduce``), each task's zero-shot head (C
  classes), the entropy loss and one Adam step on the routers.
  ``project``: `core.we_moe.make_we_moe_step` jitted on the routed model `core.we_moe.build_routed_model`
  builds, placed as `train_we_moe` places it.
  ``fusion-bench``: the model ``CLIPWeightEnsemblingMoEAlgorithm.construct_moe_model`` builds (its
  ``WeightEnsemblingMoE`` per MLP, init_lambda 0.3, 2-layer routers, batch_reduce; the task-arithmetic base
  made as scripts/make_method_fixtures.py makes it, 0.2.33's ``task_arithmetic_merge`` failing on
  Parameters), stepped as ``WeightEnsemblingMoEAlgorithm.test_time_adaptation`` steps it with its default
  ``use_grad_accumulate`` (per task: its ``compute_logits``, its ``entropy_loss``, backward with
  retain_graph; then Adam on the routers and zero_grad). Its ``lightning.Fabric`` is made only when CUDA is
  there; on CPU the backward is ``loss.backward``, which is what Fabric's 32-true backward runs.
- ``we_moe_sequential``: ours with ``sequential_tasks`` (one task's batch through the tower at a time, the
  gradients summed in a ``lax.scan``), against the same FusionBench row.

FusionBench's side runs in the peer's interpreter (``--peer-python``, default this one) by this same file with
``--peer``. Both sides single-threaded (XLA's CPU thread pool and torch's intra-op threads set to 1); data
loading is outside the step on both. ``--rounds`` rounds interleave the sides (ours for every method, then
FusionBench's, then ours again, ...), so a change of the machine's load falls on both; each round times
``--steps`` steps after ``--warmup``, and a row reports the median of the rounds' medians and the least step.

Memory (``--memory-report``): one WEMoE step (every MLP upscaled, 2-layer routers, K = ``--memory-tasks``
tasks × B images of 224² for each B of ``--memory-batch``, the 8 tasks' zero-shot heads) compiled from
abstract shapes (`jax.ShapeDtypeStruct`, nothing allocated) at ``--memory-size`` (default ViT-L/14: the HF
``CLIPVisionModel`` shapes of benchmarks/methods_benchmark.py), in float32: XLA's buffer assignment of it
(arguments, outputs, temporaries) beside the bytes of what the arguments hold, counted from their shapes
(`MEMORY_NOTES`); once with the K batches through the model at once (``order: joint``, the default) and once
one task after another (``order: sequential``, ``sequential_tasks``).

    python benchmarks/test_time_step_benchmark.py --peer-python PEER_PYTHON \\
        --out benchmarks/results/test_time_step_cpu.json
    python benchmarks/test_time_step_benchmark.py --memory-report --out benchmarks/results/we_moe_memory_l14.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from step_benchmark import CLASS_COUNTS, SIZES, time_calls, timing_fields

REPO = Path(__file__).resolve().parents[1]
TINY = SIZES["tiny"]
"""The step benchmark's ``tiny`` CLIP image tower."""
METHODS = ("surgery", "we_moe", "we_moe_sequential")
PEER_METHOD = {"surgery": "surgery", "we_moe": "we_moe", "we_moe_sequential": "we_moe"}
"""FusionBench's row each of ours is set against: its WEMoE loop already goes task by task (its default
``use_grad_accumulate``), so both orders of ours face the same row."""
INIT_LAMBDA = 0.3  # the reference's init_lambda (WEMoE)
ROUTER_LAYERS = 2  # the reference's router_hidden_layers
LOGIT_SCALE = 100.0  # exp(logit_scale) of CLIP


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--classes", type=int, default=10, help="classes of each task's head (WEMoE)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (ours, FusionBench's, ours, ...)")
    p.add_argument("--peer-python", default=os.environ.get("ADAMERGING_JAX_PEER_PYTHON", sys.executable))
    p.add_argument("--peer", action="store_true", help="run FusionBench's side (in the peer's interpreter)")
    p.add_argument("--memory-report", action="store_true", help="WEMoE's step memory instead of the speed rows")
    p.add_argument("--memory-size", default="L/14", choices=("B/32", "L/14"))
    p.add_argument("--memory-tasks", type=int, default=8)
    p.add_argument("--memory-batch", default="16,1", help="comma list of B (images per task)")
    p.add_argument("--out", help="write the JSON here")
    args = p.parse_args(argv)
    args.methods = [name for name in args.methods.split(",") if name]
    if unknown := [name for name in args.methods if name not in METHODS]:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    return args


def timing(run: Callable[[], Any], args: argparse.Namespace) -> dict[str, Any]:
    return timing_fields(time_calls(run, args.steps, args.warmup))


# ---------------------------------------------------------------------------------------- FusionBench's side


def _torch_towers(args: argparse.Namespace) -> tuple[Any, list[Any], Any]:
    """θ0 and K fine-tuned HF ``CLIPVisionModel``s at the tiny size (seeded), and the visual projection."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(**TINY.hf_config())
    base = transformers.CLIPVisionModel(config).eval()
    finetuned = [transformers.CLIPVisionModel(config).eval() for _ in range(args.k)]
    projection = torch.nn.Linear(TINY.width, TINY.projection_dim, bias=False).requires_grad_(False)
    return base, finetuned, projection


def fusion_bench_surgery(args: argparse.Namespace) -> Callable[[], None]:
    import torch
    from fusion_bench.mixins.clip_classification import CLIPClassificationMixin
    from fusion_bench.models.surgery.surgerymodelwrapper import SurgeryModelWrapper

    base, finetuned, projection = _torch_towers(args)
    finetuned = [model.requires_grad_(False) for model in finetuned]
    holder = type("Holder", (), {"visual_projection": projection})()
    features = lambda model, images: CLIPClassificationMixin.compute_features(holder, model, images)  # noqa: E731
    names = [f"task{k}" for k in range(args.k)]
    wrapper = SurgeryModelWrapper(base, names, projection_dim=TINY.projection_dim)
    optimizer = torch.optim.Adam(wrapper.collect_trainable_params(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    images = torch.randn(args.k, args.batch, 3, TINY.image_size, TINY.image_size)

    def step() -> None:
        for task, name in enumerate(names):
            target = features(finetuned[task], images[task])
            moved, _, _ = wrapper.compute_surgery_features(lambda model: features(model, images[task]), name)
            loss = torch.nn.functional.l1_loss(moved, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return step


def fusion_bench_we_moe(args: argparse.Namespace) -> Callable[[], None]:
    import copy
    from unittest import mock

    import torch
    from omegaconf import DictConfig
    from fusion_bench.method.we_moe import clip_we_moe
    from fusion_bench.method.we_moe.we_moe import entropy_loss

    sys.path.insert(0, str(REPO / "scripts"))
    import make_method_fixtures as references

    base, finetuned, projection = _torch_towers(args)
    names = [f"task{k}" for k in range(args.k)]
    pool = {name: references._VisionHolder(model) for name, model in zip(["_pretrained_", *names], [base, *finetuned])}
    algorithm = object.__new__(clip_we_moe.CLIPWeightEnsemblingMoEAlgorithm)
    algorithm.config = DictConfig(dict(init_lambda=INIT_LAMBDA, router_hidden_layers=ROUTER_LAYERS, batch_reduce=True,
                                       lr=1e-4, optimizer="adam"))
    algorithm.modelpool = type("Pool", (), {"model_names": names,
                                            "load_model": staticmethod(lambda name: copy.deepcopy(pool[name]))})()
    with mock.patch.object(clip_we_moe, "task_arithmetic_merge", references._task_arithmetic_merge):
        model = algorithm.construct_moe_model()
    algorithm.visual_projection = projection
    text = torch.randn(args.k, args.classes, TINY.projection_dim)
    algorithm.zeroshot_weights = dict(zip(names, text / text.norm(dim=-1, keepdim=True)))
    algorithm.logit_scale_exp = torch.tensor(LOGIT_SCALE)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=algorithm.config.lr)
    model.train()
    images = torch.randn(args.k, args.batch, 3, TINY.image_size, TINY.image_size)

    def step() -> None:
        for task, name in enumerate(names):
            loss = entropy_loss(algorithm.compute_logits(model, (images[task], None), name))
            loss.backward(retain_graph=True)
        optimizer.step()
        optimizer.zero_grad()

    return step


def bench_fusion_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch
    from transformers.models.clip import modeling_clip

    if not hasattr(modeling_clip, "CLIPVisionTransformer"):  # transformers 5 folded it into CLIPVisionModel;
        modeling_clip.CLIPVisionTransformer = modeling_clip.CLIPVisionModel  # FusionBench imports it for hints only
    torch.set_num_threads(1)
    makers = {"surgery": fusion_bench_surgery, "we_moe": fusion_bench_we_moe}
    return [{"method": name, "row": "fusion-bench", "torch": torch.__version__, "threads": torch.get_num_threads(),
             **timing(makers[name](args), args)} for name in args.methods]


# ------------------------------------------------------------------------------------------------ our side


def _jax_towers(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(vision config, θ0, stacked τ, visual projection [width, projection_dim]) at the tiny size, seeded."""
    import jax
    import jax.numpy as jnp

    import adamerging_jax as am
    from adamerging_jax.models import clip

    config = clip.VisionConfig(image_size=TINY.image_size, patch_size=TINY.patch_size, width=TINY.width,
                               layers=TINY.layers, heads=TINY.heads, mlp_dim=TINY.mlp_dim)
    size = TINY.image_size
    init = jax.jit(clip.VisionTower(config).init)
    params = [init(jax.random.PRNGKey(k), jnp.zeros((1, size, size, 3)))["params"] for k in range(args.k + 1)]
    projection = jax.random.normal(jax.random.PRNGKey(99), (TINY.width, TINY.projection_dim)) / TINY.width ** 0.5
    return config, params[0], am.task_vectors(params[0], params[1:]), projection


def _images(args: argparse.Namespace, mesh: Any) -> list[Any]:
    import numpy as np

    from adamerging_jax.core.parallel import shard_batches

    rng = np.random.default_rng(0)
    size = TINY.image_size
    return shard_batches([rng.standard_normal((args.batch, size, size, 3), np.float32) for _ in range(args.k)], mesh)


def _compiled(step: Any, state: dict[str, Any], frozen: tuple, batches: Any) -> tuple[Callable[[], None], float]:
    """``step(state["train"], state["opt"], *frozen, batches)`` compiled once, as a call that advances `state` (its
    trained part and optimiser state donated), and the compile time in seconds."""
    started = time.perf_counter()
    compiled = step.lower(state["train"], state["opt"], *frozen, batches).compile()
    compile_seconds = time.perf_counter() - started

    def run() -> None:
        state["train"], state["opt"], losses = compiled(state["train"], state["opt"], *frozen, batches)
        losses.block_until_ready()

    return run, compile_seconds


def project_surgery(args: argparse.Namespace) -> tuple[Callable[[], None], float]:
    import jax
    import optax

    from adamerging_jax.core import surgery
    from adamerging_jax.core.parallel import data_mesh, place_tree, replicated_copy
    from adamerging_jax.models import clip

    config, pretrained, tau, projection = _jax_towers(args)

    def features_fn(vision: Any, images: Any) -> Any:
        return clip.l2_normalize(clip.vision_forward(vision, images, config)[1] @ projection)

    mesh = data_mesh(jax.devices()[:1])
    pretrained, tau = place_tree(pretrained, mesh, False), place_tree(tau, mesh, False)
    modules = replicated_copy(surgery.init_modules(jax.random.PRNGKey(0), args.k, TINY.projection_dim), mesh)
    optimizer = optax.adam(1e-3)
    state = {"train": modules, "opt": replicated_copy(optimizer.init(modules), mesh)}
    step = jax.jit(surgery.make_surgery_step(features_fn, optimizer), donate_argnums=(0, 1))
    return _compiled(step, state, (pretrained, pretrained, tau), _images(args, mesh))


def project_we_moe(args: argparse.Namespace, sequential_tasks: bool = False) -> tuple[Callable[[], None], float]:
    import jax
    import optax

    from adamerging_jax.core import we_moe
    from adamerging_jax.core.methods import task_arithmetic
    from adamerging_jax.core.parallel import data_mesh, place_tree, replicated_copy
    from adamerging_jax.models import clip
    from adamerging_jax.models.routing import Routing

    config, pretrained, tau, projection = _jax_towers(args)
    mixture = clip.expert_mixture(config, projection)
    text = jax.random.normal(jax.random.PRNGKey(98), (args.k, args.classes, TINY.projection_dim))
    heads = LOGIT_SCALE * clip.l2_normalize(text)

    def head_fn(z: Any, task: int) -> Any:
        return z @ heads[task].T

    merged = task_arithmetic(pretrained, tau, INIT_LAMBDA)
    frozen, routers = we_moe.build_routed_model(mixture, pretrained, merged, tau, None,
                                                Routing(args.k, ROUTER_LAYERS, INIT_LAMBDA), seed=0)
    mesh = data_mesh(jax.devices()[:1])
    optimizer = optax.adam(1e-4)
    routers = replicated_copy(routers, mesh)
    state = {"train": routers, "opt": replicated_copy(optimizer.init(routers), mesh)}
    step = jax.jit(we_moe.make_we_moe_step(mixture, head_fn, optimizer, sequential_tasks), donate_argnums=(0, 1))
    return _compiled(step, state, (place_tree(frozen, mesh, False),), _images(args, mesh))


def run_peer(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One round of FusionBench's side in the peer's interpreter: a row per method."""
    methods = list(dict.fromkeys(PEER_METHOD[name] for name in args.methods))
    argv = [args.peer_python, os.path.abspath(__file__), "--peer", "--methods", ",".join(methods), "--k",
            str(args.k), "--batch", str(args.batch), "--classes", str(args.classes), "--steps", str(args.steps),
            "--warmup", str(args.warmup)]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"the FusionBench side failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def combined(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a row per round: the first round's details, the median of the rounds' medians, the min of
    their minima and every round's median in ``rounds_ms``."""
    medians = [row["ms_per_step_median"] for row in rounds]
    return {**rounds[0], "ms_per_step_median": statistics.median(medians),
            "ms_per_step_min": min(row["ms_per_step_min"] for row in rounds), "rounds_ms": medians}


def run_speed(args: argparse.Namespace) -> dict[str, Any]:
    """`--rounds` rounds, each timing our step of every method, then FusionBench's (interleaved: a change of the
    machine's load falls on both sides)."""
    makers = {"surgery": project_surgery, "we_moe": project_we_moe,
              "we_moe_sequential": lambda args: project_we_moe(args, sequential_tasks=True)}
    compiled = {name: makers[name](args) for name in args.methods}
    ours: dict[str, list] = {name: [] for name in args.methods}
    theirs: dict[str, list] = {PEER_METHOD[name]: [] for name in args.methods}
    for _ in range(args.rounds):
        for name, (run, compile_seconds) in compiled.items():
            ours[name].append({"method": name, "row": "project", "jax": jax_version(),
                               "compile_seconds": compile_seconds, **timing(run, args)})
        for row in run_peer(args):
            theirs[row["method"]].append(row)
    rows, ratios = [], {}
    peers = {name: combined(peer_rounds) for name, peer_rounds in theirs.items()}
    for name in args.methods:
        project, peer = combined(ours[name]), peers[PEER_METHOD[name]]
        rows.append(project)
        ratios[name] = project["ms_per_step_median"] / peer["ms_per_step_median"]
        print(f"{name}: project {project['ms_per_step_median']:.2f} ms/step, FusionBench "
              f"{peer['ms_per_step_median']:.2f} ms/step: {ratios[name]:.3f}× FusionBench's time")
    rows += list(peers.values())
    return {"benchmark": "one test-time step (Surgery, WEMoE), tiny CLIP", "size": dataclasses.asdict(TINY),
            "k": args.k, "batch": args.batch, "classes": args.classes, "steps": args.steps, "warmup": args.warmup,
            "rounds": args.rounds, "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "xla_flags": os.environ["XLA_FLAGS"], "rows": rows, "project_over_fusion_bench": ratios}


def jax_version() -> str:
    import jax

    return jax.__version__


# -------------------------------------------------------------------------------------------- memory report


def nbytes(tree: Any) -> int:
    """The bytes of a tree of arrays or `jax.ShapeDtypeStruct`s."""
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def memory_row(size_name: str, k: int, batch: int, sequential_tasks: bool) -> dict[str, Any]:
    """One WEMoE step (every MLP upscaled) at `size_name` with K = `k` tasks × `batch` images, the tasks at once
    or one after another, compiled from shapes: the bytes of what its arguments hold, by part, beside XLA's
    buffer assignment."""
    import jax
    import jax.numpy as jnp
    import optax

    import methods_benchmark

    from adamerging_jax.core import we_moe
    from adamerging_jax.models import clip
    from adamerging_jax.models.routing import Routing

    size, projection_dim = methods_benchmark.SIZES[size_name], SIZES[size_name].projection_dim
    classes = [CLASS_COUNTS[t % len(CLASS_COUNTS)] for t in range(k)]
    config = clip.VisionConfig(image_size=size.image_size, patch_size=size.patch_size, width=size.width,
                               layers=size.layers, heads=size.heads, mlp_dim=size.mlp_dim)
    projection = jax.ShapeDtypeStruct((size.width, projection_dim), jnp.float32)
    heads = [jax.ShapeDtypeStruct((c, projection_dim), jnp.float32) for c in classes]
    pretrained, tau = methods_benchmark.abstract_inputs(size, k)
    mixture = clip.expert_mixture(config)
    frozen, routers = jax.eval_shape(lambda p, t: we_moe.build_routed_model(
        mixture, p, p, t, None, Routing(k, ROUTER_LAYERS, INIT_LAMBDA), seed=0), pretrained, tau)
    optimizer = optax.adam(1e-4)
    opt_state = jax.eval_shape(optimizer.init, routers)
    images = [jax.ShapeDtypeStruct((batch, size.image_size, size.image_size, 3), jnp.float32) for _ in range(k)]

    def step(routers: Any, opt_state: Any, frozen: Any, images: Any, projection: Any, heads: Any) -> tuple:
        head_fn = lambda z, t: z @ heads[t].T  # noqa: E731
        return we_moe.make_we_moe_step(clip.expert_mixture(config, projection), head_fn, optimizer,
                                       sequential_tasks)(routers, opt_state, frozen, images)

    start = time.perf_counter()
    analysis = jax.jit(step, donate_argnums=(0, 1)).lower(routers, opt_state, frozen, images, projection,
                                                          heads).compile().memory_analysis()
    experts = clip.moe_expert_leaves(frozen)
    mlp = frozen[clip.ROUTED_LAYERS]["mlp"]
    per_group = sum(nbytes(leaves) - nbytes({n: v for n, v in leaves.items() if n.startswith("expert_")})
                    for leaves in mlp.values())
    held = {"task_vectors_bytes": nbytes(experts), "rest_of_the_frozen_tower_bytes": nbytes(frozen) - nbytes(experts),
            "routers_bytes": nbytes(routers), "adam_state_bytes": nbytes(opt_state), "images_bytes": nbytes(images),
            "projection_and_heads_bytes": nbytes((projection, heads)),
            "ensembled_weights_bytes": per_group * (1 if sequential_tasks else k)}
    xla = dict(argument_bytes=analysis.argument_size_in_bytes, output_bytes=analysis.output_size_in_bytes,
               temp_bytes=analysis.temp_size_in_bytes, alias_bytes=analysis.alias_size_in_bytes)
    xla["peak_bytes"] = xla["argument_bytes"] + xla["output_bytes"] + xla["temp_bytes"] - xla["alias_bytes"]
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    order = "sequential" if sequential_tasks else "joint"
    print(f"WEMoE step, {size_name}, K = {k} × B = {batch}, {order} (GiB): " + ", ".join(
        f"{name.removesuffix('_bytes')} {gib(value)}" for name, value in {**held, **xla}.items()), file=sys.stderr)
    return dict(method="we_moe", size=size_name, k=k, batch=batch, order=order, classes=classes,
                upscaled_layers=size.layers, router_hidden_layers=ROUTER_LAYERS, dtype="float32", held=held,
                xla=xla, compile_s=round(time.perf_counter() - start, 3))


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    from step_benchmark import machine

    rows = [memory_row(args.memory_size, args.memory_tasks, int(batch), sequential)
            for batch in args.memory_batch.split(",") for sequential in (False, True)]
    return dict(bench="we_moe_step_memory", machine=machine(), rows=rows, notes=MEMORY_NOTES)


MEMORY_NOTES = [
    "held: from the shapes of the step's arguments (float32): task_vectors = τ_k of every routed MLP (fc1, fc2 "
    "kernels and biases, [layers, K, ...]); rest_of_the_frozen_tower = W_0 of the routed MLPs and θ_merged "
    "everywhere else (θ0 + λ Σ_k τ_k; here every MLP is routed, so attention, norms and embeddings); routers = "
    "the 2-layer routers of every routed block; adam_state = Adam's m and v (and its step count); images = "
    "the K × B inputs.",
    "ensembled_weights: W_0 + Σ_k r_gk τ_k, one per task's group and routed linear layer, from shapes; the "
    "backward keeps them, so they are part of XLA's temporaries, as are the activations of the K × B images "
    "through the tower, forward and backward. order sequential: one task's batch through the tower at a time "
    "(a lax.scan over the tasks), so one task's ensembled weights and activations.",
    "xla: the compiled step's buffer assignment (memory_analysis); peak = arguments + outputs + temporaries − "
    "aliased (the routers and the Adam state are donated). XLA:CPU's assignment, not a GPU's.",
    "outside the step: building the routed model reads θ0 and the stacked τ of the whole tower, which the "
    "caller (merge, the protocol) holds besides; train_we_moe holds the step's arguments.",
]


def recorded_command(argv: list[str]) -> str:
    """The command line, the peer's interpreter (a path outside the repository) written as PEER_PYTHON."""
    words = [("PEER_PYTHON" if before == "--peer-python" else word) for before, word in zip(["", *argv], argv)]
    words = ["--peer-python=PEER_PYTHON" if word.startswith("--peer-python=") else word for word in words]
    return " ".join(["python", "benchmarks/test_time_step_benchmark.py", *words])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.peer:
        print(json.dumps(bench_fusion_bench(args)))
        return
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1").strip()
    sys.path.insert(0, str(REPO))
    result = run_memory(args) if args.memory_report else run_speed(args)
    result["command"] = recorded_command(list(sys.argv[1:] if argv is None else argv))
    if args.out:
        from adamerging_jax.core.checkpoint import write_json_atomic

        write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
