"""Fine-tune a backbone on one task with its head frozen: the task vectors of the offline benchmark.

The paper fine-tunes CLIP's image encoder per task with the zero-shot head frozen, then merges the task
vectors τ_k = θ_k − θ0. Here the backbone ``params`` are trained on one task's labelled train images by
minimising the cross-entropy of ``apply_head(head, features_fn(params, batch_stats, x))``; the head and the
BatchNorm statistics ``batch_stats`` are inputs of the step, not trained, so they come out unchanged (BN
runs in inference mode). Recipe (measured on this project's CPU machine): Adam 1e-4, linear warm-up over the first
10% of steps from 0 then cosine decay to 0, batch 32, 2 epochs; each epoch visits a fresh permutation drawn
from ``numpy.random.default_rng(seed)`` and drops the last incomplete batch (one compiled shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from adamerging_jax.heads.prototype import LinearHead, apply_head
from adamerging_jax.models import efficientnet

PyTree = Any
FeaturesFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]


@dataclass(frozen=True)
class FinetuneConfig:
    """Optimiser and schedule of per-task fine-tuning."""

    learning_rate: float = 1e-4
    epochs: int = 2
    batch_size: int = 32
    warmup_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.learning_rate <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"learning_rate, epochs and batch_size must be positive, got {self}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {self.warmup_fraction}")


@dataclass(frozen=True)
class FinetuneResult:
    """Fine-tuned backbone parameters and the training loss of every step."""

    params: PyTree
    losses: np.ndarray


def learning_rate_schedule(config: FinetuneConfig, total_steps: int) -> optax.Schedule:
    """0 → ``learning_rate`` linearly over ``warmup_fraction`` of the steps, then cosine down to 0."""
    warmup = int(round(config.warmup_fraction * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )


def classification_loss(
    params: PyTree, batch_stats: PyTree, head: LinearHead, x: jax.Array, y: jax.Array, features_fn: FeaturesFn
) -> jax.Array:
    """Mean cross-entropy ``−log softmax(head(f(x)))[y]`` over the batch."""
    logits = apply_head(head, features_fn(params, batch_stats, x))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


ADAM = optax.scale_by_adam()  # betas (0.9, 0.999), eps 1e-8: optax.adam without the learning rate


@partial(jax.jit, static_argnames="features_fn", donate_argnums=(0, 1))
def train_step(
    params: PyTree,
    opt_state: optax.OptState,
    batch_stats: PyTree,
    head: LinearHead,
    x: jax.Array,
    y: jax.Array,
    learning_rate: jax.Array,
    features_fn: FeaturesFn,
) -> tuple[PyTree, optax.OptState, jax.Array]:
    """One Adam step on ``params`` only: θ ← θ − lr · adam(∇θ loss). ``params``/``opt_state`` are donated.

    The learning rate is an argument (not baked into the optimiser) so every task reuses one compiled step.
    """
    loss, grads = jax.value_and_grad(classification_loss)(params, batch_stats, head, x, y, features_fn)
    direction, opt_state = ADAM.update(grads, opt_state, params)
    params = jax.tree_util.tree_map(lambda p, d: p - learning_rate * d, params, direction)
    return params, opt_state, loss


def epoch_batches(num_items: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index batches of one epoch: a permutation cut into full batches (the remainder is dropped)."""
    order = rng.permutation(num_items)
    return [order[start : start + batch_size] for start in range(0, num_items - batch_size + 1, batch_size)]


def finetune(
    params: PyTree,
    batch_stats: PyTree,
    head: LinearHead,
    images: np.ndarray,
    labels: np.ndarray,
    config: FinetuneConfig = FinetuneConfig(),
    features_fn: FeaturesFn = efficientnet.features,
    quiet: bool = False,
    description: str = "fine-tune",
) -> FinetuneResult:
    """Fine-tune ``params`` on preprocessed ``images`` [N, R, R, 3] and ``labels`` [N] with ``head`` frozen.

    ``features_fn(params, batch_stats, x)`` is the backbone (EfficientNet-Lite0 by default). The input
    ``params`` are copied, never donated. Same inputs and ``config.seed`` give the same result.
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    if len(images) != len(labels):
        raise ValueError(f"{description}: {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError(f"{description}: no training images")
    if labels.min() < 0 or labels.max() >= head.num_classes:
        raise ValueError(
            f"{description}: labels must lie in [0, {head.num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    batch_size = min(config.batch_size, len(images))
    steps_per_epoch = len(images) // batch_size
    total_steps = steps_per_epoch * config.epochs

    rates = np.asarray(learning_rate_schedule(config, total_steps)(jnp.arange(total_steps)), np.float32)
    params = jax.tree_util.tree_map(lambda leaf: jnp.array(leaf, dtype=jnp.float32, copy=True), params)
    opt_state = ADAM.init(params)
    rng = np.random.default_rng(config.seed)
    losses = []
    with tqdm(total=total_steps, desc=description, disable=quiet, leave=False) as progress:
        for _ in range(config.epochs):
            for batch in epoch_batches(len(images), batch_size, rng):
                params, opt_state, loss = train_step(
                    params, opt_state, batch_stats, head, images[batch], labels[batch], rates[len(losses)], features_fn
                )
                losses.append(loss)
                progress.update(1)
                if progress.n % 10 == 0:
                    progress.set_postfix(loss=f"{float(loss):.3f}")
    return FinetuneResult(params, np.asarray(jax.device_get(losses), np.float32))
