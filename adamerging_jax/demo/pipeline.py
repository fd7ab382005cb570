"""Fine-tune → merge → evaluate on real weights and real data that ship in registry packages.

The paper's protocol (AdaMerging, Yang et al., ICLR 2024, Table 1) transposed to what can be had offline:

- θ0: EfficientNet-Lite0 pretrained on ImageNet (BatchNorm statistics frozen at their pretrained values);
- tasks: MNIST-5k, Fashion-MNIST, Animal-MNIST, scikit-learn digits (or user tasks), at 48 px;
- heads: per task a frozen head playing CLIP's zero-shot head. The default is a prototype head: per class the
  L2-normalised mean of the L2-normalised pretrained features of `shots` labelled training images,
  logits = scale · cos(feature, prototype). (A logistic-regression head is selectable: it is too strong,
  and entropy minimisation then lowers accuracy; see the README.)
- θ_k: the backbone fine-tuned on task k with its head frozen; τ_k = θ_k − θ0;
- methods: pretrained, individual, weight averaging, task arithmetic, TIES, task-/layer-wise AdaMerging and
  AdaMerging++, all evaluated on each task's test split (the transductive protocol of the paper).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import adamerging_jax as am
from adamerging_jax.core.checkpoint import write_npz_atomic
from adamerging_jax.core.trees import named_leaves
from adamerging_jax.data import packaged
from adamerging_jax.finetune import FinetuneConfig, finetune
from adamerging_jax.heads.prototype import LinearHead, apply_head, logistic_head, prototype_head, select_shots
from adamerging_jax.models import efficientnet
from adamerging_jax.models.efficientnet_checkpoint import load_pretrained

ADAMERGING_METHODS = ("task_wise_adamerging", "layer_wise_adamerging", "task_wise_adamerging++", "layer_wise_adamerging++")
METHODS = ("pretrained", "individual", "weight_average", "task_arithmetic", "ties") + ADAMERGING_METHODS
DEFAULT_CACHE = Path.home() / ".cache" / "adamerging_jax" / "demo"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run; the defaults are the measured recipe (see the README)."""

    tasks: tuple[str, ...] = packaged.DEFAULT_TASKS
    resolution: int = 48
    n_train: int = 3000
    n_test: int = 1000
    seed: int = 0
    head: str = "prototype"
    shots: int = 1
    head_scale: float = 30.0
    finetune_lr: float = 1e-4
    finetune_epochs: int = 2
    finetune_batch: int = 32
    adamerging_steps: int = 100
    adamerging_lr: float = 1e-2
    adamerging_batch: int = 16
    clamp: tuple[float, float] | None = (0.0, 1.0)
    task_arithmetic_scale: float = 0.3
    ties_density: float = 0.2
    ties_reduce: str = "mean"
    ties_scale: float = 1.0
    methods: tuple[str, ...] = METHODS
    eval_batch: int = 500

    @classmethod
    def quick(cls, **overrides: Any) -> "DemoConfig":
        """A small, fast run for tests and smoke checks (minutes become seconds; numbers mean little)."""
        defaults = dict(resolution=32, n_train=256, n_test=128, finetune_epochs=1, adamerging_steps=8, adamerging_batch=8)
        return cls(**{**defaults, **overrides})

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
        if self.head not in ("prototype", "logistic"):
            raise ValueError(f"head must be 'prototype' or 'logistic', got {self.head!r}")


@dataclasses.dataclass
class MethodResult:
    """Accuracy per task; for AdaMerging also λ per leaf, the loss per step, and the summed mean entropy on
    a fixed probe of test images (the first `adamerging_batch` of each task) at λ_init and at λ_final."""

    accuracy: dict[str, float]
    coefficients: dict[str, list] | None = None
    entropy: list[float] | None = None
    probe_entropy: tuple[float, float] | None = None

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.accuracy.values())))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _array_digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _save_tree(path: Path, tree: Any) -> None:
    write_npz_atomic(path, {name: np.asarray(leaf) for name, leaf in named_leaves(tree)})


def _load_tree(path: Path, like: Any) -> Any:
    with np.load(path) as data:
        names = [name for name, _ in named_leaves(like)]
        if sorted(names) != sorted(data.files):
            raise ValueError(f"cached tree {path} does not match the model's leaves; delete it to rebuild")
        leaves = [jnp.asarray(data[name]) for name in names]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


def finetune_cache_key(task: packaged.Task, config: DemoConfig, finetune_config: FinetuneConfig, pretrained: Any) -> str:
    """Digest of everything a fine-tuned backbone depends on: the task's training data, the resolution,
    the head (kind, shots, scale, seed), the fine-tuning settings and the pretrained weights."""
    leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(pretrained)]
    return _digest(
        dict(
            task=task.name,
            data=_array_digest(task.train_x, task.train_y),
            resolution=config.resolution,
            head=(config.head, config.shots, config.head_scale, config.seed),
            finetune=dataclasses.asdict(finetune_config),
            weights=_array_digest(leaves[0], leaves[-1]),
        )
    )


def make_heads(config: DemoConfig, tasks, pretrained_features: Callable, train_inputs) -> list[LinearHead]:
    """The frozen per-task heads, built from the pretrained backbone's features of labelled train images."""
    heads = []
    for task, inputs in zip(tasks, train_inputs):
        if config.head == "prototype":
            chosen = select_shots(task.train_y, task.num_classes, config.shots, seed=config.seed)
            heads.append(prototype_head(pretrained_features(inputs[chosen]), task.train_y[chosen], task.num_classes, config.head_scale))
        else:
            heads.append(logistic_head(np.asarray(pretrained_features(inputs)), task.train_y, task.num_classes))
    return heads


def run_demo(
    config: DemoConfig = DemoConfig(),
    *,
    tasks: Sequence[packaged.Task] | None = None,
    cache_dir: str | Path | None = DEFAULT_CACHE,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the whole benchmark; returns a JSON-able dict (settings, per-method accuracies, λ, entropy, times).

    Fine-tuned backbones and heads are cached under `cache_dir`, keyed by every setting and the data they
    were made from, so a changed setting never reuses a stale cache (`cache_dir=None` disables it).
    """
    times: dict[str, float] = {}
    start = time.perf_counter()
    if tasks is None:
        tasks = packaged.load_tasks(config.tasks, config.seed, config.n_train, config.n_test, skip_unavailable=True, warn=log)
    if len(tasks) < 2:
        raise ValueError(f"the demo merges at least 2 tasks; only {[t.name for t in tasks]} are available")
    names = [t.name for t in tasks]
    weights = load_pretrained()
    pretrained = jax.tree_util.tree_map(jnp.asarray, weights.params)
    batch_stats = jax.tree_util.tree_map(jnp.asarray, weights.batch_stats)
    train_inputs = [packaged.preprocess(t.train_x, config.resolution) for t in tasks]
    test_inputs = [packaged.preprocess(t.test_x, config.resolution) for t in tasks]
    times["data"] = time.perf_counter() - start

    pretrained_features = lambda x: efficientnet.features_in_batches(pretrained, batch_stats, x, config.eval_batch)  # noqa: E731
    heads = make_heads(config, tasks, pretrained_features, train_inputs)

    apply_fn = am.SharedBackbone(
        features=lambda params, x: efficientnet.features(params, batch_stats, x),
        head=lambda f, task: apply_head(heads[task], f),
    )

    finetune_config = FinetuneConfig(config.finetune_lr, config.finetune_epochs, config.finetune_batch, seed=config.seed)
    finetuned = []
    t0 = time.perf_counter()
    for task, inputs, head in zip(tasks, train_inputs, heads):
        key = finetune_cache_key(task, config, finetune_config, weights.params)
        path = Path(cache_dir) / f"finetuned-{task.name}-{key}.npz" if cache_dir is not None else None
        if path is not None and path.exists():
            log(f"[demo] {task.name}: fine-tuned backbone from cache {path}")
            finetuned.append(_load_tree(path, pretrained))
            continue
        result = finetune(pretrained, batch_stats, head, inputs, task.train_y, finetune_config, quiet=quiet, description=f"fine-tune {task.name}")
        finetuned.append(result.params)
        if path is not None:
            _save_tree(path, result.params)
    times["finetune"] = time.perf_counter() - t0

    test_sets = [(x, t.test_y) for x, t in zip(test_inputs, tasks)]
    evaluate = lambda params: am.evaluate(apply_fn, params, test_sets, names, config.eval_batch).per_task  # noqa: E731
    tv = am.task_vectors(pretrained, finetuned)
    results: dict[str, MethodResult] = {}
    t0 = time.perf_counter()
    for method in config.methods:
        log(f"[demo] {method}")
        if method == "pretrained":
            results[method] = MethodResult(evaluate(pretrained))
        elif method == "individual":
            accuracy = {}
            for t, (name, params) in enumerate(zip(names, finetuned)):
                single = lambda p, x, _, t=t: apply_fn(p, x, t)  # noqa: E731
                accuracy[name] = am.evaluate(single, params, [test_sets[t]], [name], config.eval_batch).per_task[name]
            results[method] = MethodResult(accuracy)
        elif method == "weight_average":
            results[method] = MethodResult(evaluate(am.weight_average(pretrained, tv)))
        elif method == "task_arithmetic":
            results[method] = MethodResult(evaluate(am.task_arithmetic(pretrained, tv, config.task_arithmetic_scale)))
        elif method == "ties":
            merged = am.ties_merging(pretrained, tv, config.ties_density, config.ties_reduce, config.ties_scale)
            results[method] = MethodResult(evaluate(merged))
        else:
            results[method] = _adamerging(method, config, apply_fn, pretrained, tv, test_inputs, evaluate, quiet)
        times[method] = time.perf_counter() - t0
        t0 = time.perf_counter()
    times["total"] = time.perf_counter() - start
    return dict(
        settings=dataclasses.asdict(config),
        tasks=names,
        leaves=[name for name, _ in named_leaves(pretrained)],
        methods={m: dict(dataclasses.asdict(r), mean=r.mean) for m, r in results.items()},
        seconds=times,
        devices=[str(d) for d in jax.devices()],
    )


def _adamerging(method, config, apply_fn, pretrained, tv, test_inputs, evaluate, quiet) -> MethodResult:
    """Task-/layer-wise AdaMerging (++ on TIES-preprocessed task vectors) from λ = 0.3."""
    if method.endswith("++"):
        tv = am.ties_task_vectors(tv, config.ties_density)
    granularity = "task" if method.startswith("task_wise") else "layer"

    def batches(step):
        rng = np.random.default_rng([config.seed, step])
        return [x[rng.choice(len(x), config.adamerging_batch, replace=False)] for x in test_inputs]

    ada_config = am.AdaMergingConfig(
        steps=config.adamerging_steps,
        granularity=granularity,
        lr=config.adamerging_lr,
        clamp=config.clamp,
        batches_per_task=1,
        batch_size=config.adamerging_batch,
        seed=config.seed,
        quiet=quiet,
    )
    result = am.adamerging(apply_fn, pretrained, tv, batches, ada_config, mesh=am.data_mesh(jax.devices()[:1]))
    lam = {path: np.asarray(value).tolist() for path, value in result.coefficients.per_leaf().items()}
    probe = [x[: config.adamerging_batch] for x in test_inputs]
    initial = am.merge(pretrained, tv, am.init_coefficients(pretrained, len(test_inputs), granularity), clamp=config.clamp)
    probe_entropy = tuple(float(am.entropy_objective(apply_fn, params, probe)[0]) for params in (initial, result.params))
    return MethodResult(evaluate(result.params), lam, result.history["loss"].sum(1).tolist(), probe_entropy)
