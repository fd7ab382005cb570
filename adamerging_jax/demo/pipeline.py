"""The offline demo's binding: real weights and real data that ship in registry packages, run through the
one merging protocol (`adamerging_jax.core.protocol`).

The paper's protocol (AdaMerging, Yang et al., ICLR 2024, Table 1) transposed to what can be had offline:

- θ0: EfficientNet-Lite0 pretrained on ImageNet (BatchNorm statistics frozen at their pretrained values);
- tasks: MNIST-5k, Fashion-MNIST, Animal-MNIST, scikit-learn digits (or user tasks), at 48 px;
- heads: per task a frozen head playing CLIP's zero-shot head. The default is a prototype head: per class the
  L2-normalised mean of the L2-normalised pretrained features of `shots` labelled training images,
  logits = scale · cos(feature, prototype). (A logistic-regression head is selectable: it is too strong,
  and entropy minimisation then lowers accuracy; see the README.)
- θ_k: the backbone fine-tuned on task k with its head frozen; τ_k = θ_k − θ0;
- methods: every registry method (by default the rows of the paper's Table 1), evaluated on each task's test
  split (the transductive protocol of the paper).

This module holds only what differs from other scenarios: the model, the heads, the data and the settings.
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
from adamerging_jax import cache
from adamerging_jax.core.binding import ModelBinding
from adamerging_jax.core.protocol import Adaptation, MergeSettings, records_json, run_methods
from adamerging_jax.core.trees import check_int, check_number, named_leaves
from adamerging_jax.data import packaged
from adamerging_jax.demo.finetune import FinetuneConfig, finetune
from adamerging_jax.heads.prototype import (LinearHead, apply_head, head_input, linear_logits, logistic_head,
                                            prototype_head, select_shots)
from adamerging_jax.models import efficientnet
from adamerging_jax.models.efficientnet_checkpoint import load_pretrained, tensor_names

METHODS = (
    "pretrained",
    "individual",
    "weight_average",
    {"name": "task_arithmetic", "scale": 0.3},
    {"name": "ties", "density": 0.2, "reduce": "mean", "scale": 1.0},
    "task_wise_adamerging",
    "layer_wise_adamerging",
    {"name": "task_wise_adamerging++", "density": 0.2},
    {"name": "layer_wise_adamerging++", "density": 0.2},
)
"""The demo's rows: the paper's Table 1 (TIES as in the TIES paper: disjoint mean, λ = 1)."""

ADAMERGING = am.AdaMergingConfig(steps=100, lr=1e-2, clamp=(0.0, 1.0), batches_per_task=1, batch_size=16)
"""The demo's AdaMerging: 100 steps of Adam at 1e-2, λ from 0.3 clamped to [0, 1], 16 test images per task."""

SURGERY = {"name": "surgery", "surgery_lr": 2e-4, "surgery_steps": 300}
"""The demo's Representation Surgery, when named (e.g. ``--methods surgery`` or ``all``): Adam at 2e-4 for 300
steps. At the reference's 1e-3, Adam turns off every hidden unit ReLU(W_down z) of every task's module within
200 steps on this representation (L2-normalised features of a ReLU6 network: no negative entry), and each task
is left with its base model; at 2e-4 most units stay on and the L1 distance to the fine-tuned features falls
by about a third in 300 steps."""


def default_merge() -> MergeSettings:
    return MergeSettings(METHODS, ADAMERGING, named=(SURGERY,))


def _check(condition: bool, field: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ValueError(f"DemoConfig.{field} must be {requirement}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run; the defaults are the measured recipe (see the README). Validated when built:
    a wrong type or range raises a ValueError naming the field, before any work starts."""

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
    merge: MergeSettings = dataclasses.field(default_factory=default_merge)
    eval_batch: int = 500

    @classmethod
    def quick(cls, **overrides: Any) -> "DemoConfig":
        """A small, fast run for tests and smoke checks (minutes become seconds; numbers mean little)."""
        merge = MergeSettings(METHODS, dataclasses.replace(ADAMERGING, steps=8, batch_size=8),
                              named=({**SURGERY, "surgery_steps": 8},))
        defaults = dict(resolution=32, n_train=256, n_test=128, finetune_epochs=1, merge=merge)
        return cls(**{**defaults, **overrides})

    def __post_init__(self) -> None:
        _check(isinstance(self.tasks, tuple) and all(isinstance(t, str) and t for t in self.tasks), "tasks",
               self.tasks, "a tuple of task names")
        for field in ("resolution", "n_train", "n_test", "shots", "finetune_epochs", "finetune_batch", "eval_batch"):
            check_int(f"DemoConfig.{field}", getattr(self, field), 1)
        check_int("DemoConfig.seed", self.seed, 0)
        _check(self.resolution >= 16, "resolution", self.resolution, "at least 16 (EfficientNet's stride is 32)")
        _check(self.head in ("prototype", "logistic"), "head", self.head, "'prototype' or 'logistic'")
        for field in ("head_scale", "finetune_lr"):
            check_number(f"DemoConfig.{field}", getattr(self, field), positive=True)
        _check(isinstance(self.merge, MergeSettings), "merge", self.merge, "a MergeSettings")

    def finetune_config(self) -> FinetuneConfig:
        return FinetuneConfig(self.finetune_lr, self.finetune_epochs, self.finetune_batch, seed=self.seed)

    def describe(self) -> dict[str, Any]:
        """Every setting as JSON (the merge settings as the registry describes them)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "merge"}
        return {**fields, "tasks": list(self.tasks), "merge": self.merge.describe()}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _array_digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


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


def finetuned_backbones(config: DemoConfig, tasks, train_inputs, heads, weights, batch_stats, cache_dir,
                        quiet: bool, log: Callable[[str], None]) -> list[Any]:
    """θ_k per task: fine-tuned with its head frozen, or read from the cache under a key of every setting."""
    pretrained = jax.tree_util.tree_map(jnp.asarray, weights.params)
    finetune_config = config.finetune_config()
    finetuned = []
    for task, inputs, head in zip(tasks, train_inputs, heads):
        key = finetune_cache_key(task, config, finetune_config, weights.params)
        path = Path(cache_dir) / f"finetuned-{task.name}-{key}.npz" if cache_dir is not None else None
        cached = cache.load_tree(path, pretrained) if path is not None else None
        if cached is not None:
            log(f"[demo] {task.name}: fine-tuned backbone from cache {path}")
            finetuned.append(jax.tree_util.tree_map(jnp.asarray, cached))
            continue
        result = finetune(pretrained, batch_stats, head, inputs, task.train_y, finetune_config, quiet=quiet,
                          description=f"fine-tune {task.name}")
        finetuned.append(result.params)
        if path is not None:
            cache.save_tree(path, result.params)
    return finetuned


def representation(features: Callable[[Any, Any], Any], heads: Sequence[LinearHead]
                   ) -> tuple[Callable[[Any, Any], Any], Callable[[Any, int], Any]]:
    """The EfficientNet binding's representation and the head after it, for Surgery: ``features_fn(θ, x)`` is
    what the heads' linear maps read (`head_input`: the backbone's features, L2-normalised for prototype
    heads) and ``head_fn(z, t)`` task t's linear map; ``head_fn(features_fn(θ, x), t)`` is the demo's logits."""
    return (lambda params, x: head_input(heads[0], features(params, x)),
            lambda z, task: linear_logits(heads[task], z))


def demo_binding(batch_stats: Any, heads: Sequence[LinearHead]) -> ModelBinding:
    """The demo's `ModelBinding`: the EfficientNet-Lite0 backbone (BatchNorm statistics ``batch_stats``
    frozen) with task t's frozen head ``heads[t]``, ``apply_fn(θ, x, t) = head_t(features(θ, x))`` a
    `SharedBackbone` (all tasks' batches through one forward), no stacked leaf, the pointwise convolutions as
    the matrix view, their Gram capture (RegMean), the representation and head of `representation` (Surgery),
    the MoE form of the top blocks (WEMoE), and the leaves named as in the package's state dict."""

    def features(params: Any, x: Any) -> Any:
        return efficientnet.features(params, batch_stats, x)

    features_fn, head_fn = representation(features, heads)
    names = tensor_names()
    return ModelBinding(
        apply_fn=am.SharedBackbone(features=features, head=lambda f, task: apply_head(heads[task], f)),
        stacked=efficientnet.stacked, tensor_names=names, tensor_order=names.order,
        matrix_view=efficientnet.matrix_view, gram_fn=efficientnet.gram_fn(batch_stats), features_fn=features_fn,
        head_fn=head_fn, mixture=efficientnet.expert_mixture(batch_stats, lambda f: head_input(heads[0], f)))


def split_test_sets(adaptation: Adaptation, inputs: Sequence[np.ndarray], labels: Sequence[np.ndarray]
                    ) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """Per task, the test images adapted on and the (images, labels) scored, as `adaptation` splits them (all of
    them both ways when transductive; disjoint parts when held out)."""
    adapt, scored = [], []
    for task, (x, y) in enumerate(zip(inputs, labels)):
        adapt_indices, score_indices = adaptation.split(len(x), task)
        adapt.append(x[adapt_indices])
        scored.append((x[score_indices], np.asarray(y)[score_indices]))
    return adapt, scored


def adaptation_batches(config: DemoConfig, test_inputs: Sequence[np.ndarray]) -> Callable[[int], list[np.ndarray]]:
    """Step s's unlabeled batches: per task `batch_size` test images drawn without replacement, seeded by
    (seed, s), so a run resumes at any step."""
    size = config.merge.adamerging.batch_size

    def batches(step: int) -> list[np.ndarray]:
        rng = np.random.default_rng([config.seed, step])
        return [x[rng.choice(len(x), size, replace=False)] for x in test_inputs]

    return batches


def run_demo(
    config: DemoConfig = DemoConfig(),
    *,
    tasks: Sequence[packaged.Task] | None = None,
    cache_dir: str | Path | None = None,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the whole benchmark; returns a JSON-able run (settings, per-method records, times).

    Fine-tuned backbones are cached under `cache_dir` (e.g. ``adamerging_jax.cache.cache_dir("finetuned")``),
    keyed by every setting and the data they were made from, so a changed setting never reuses a stale cache;
    a damaged or wrong cache file is a warned miss, recomputed and replaced (`cache_dir=None`: no cache).
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
    binding = demo_binding(batch_stats, heads)
    started = time.perf_counter()
    finetuned = finetuned_backbones(config, tasks, train_inputs, heads, weights, batch_stats, cache_dir, quiet, log)
    times["finetune"] = time.perf_counter() - started

    merge = config.merge
    merge = binding.merge_settings(dataclasses.replace(
        merge, adamerging=dataclasses.replace(merge.adamerging, seed=config.seed, quiet=quiet),
        adaptation=dataclasses.replace(merge.adaptation, seed=config.seed)))
    adapt_inputs, test_sets = split_test_sets(merge.adaptation, test_inputs, [t.test_y for t in tasks])
    records = run_methods(
        merge, pretrained, am.task_vectors(pretrained, finetuned), test_sets=test_sets, task_names=names,
        adaptation=adaptation_batches(config, adapt_inputs),
        probe=[x[: merge.adamerging.batch_size] for x in adapt_inputs],
        mesh=am.data_mesh(jax.devices()[:1]), **binding.protocol_arguments(),
        eval_batch_size=config.eval_batch, log=log)
    times.update({name: record.seconds["build"] for name, record in records.items()})
    times["evaluate"] = next(iter(records.values())).seconds["evaluate"]
    times["total"] = time.perf_counter() - start
    return dict(
        settings=config.describe(),
        tasks=names,
        leaves=[name for name, _ in named_leaves(pretrained)],
        methods=records_json(records),
        seconds=times,
        devices=[str(d) for d in jax.devices()],
    )
