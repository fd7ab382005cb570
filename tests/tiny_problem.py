"""A tiny multi-task problem for the core's tests, in the regime of the paper.

K tasks read their own block of input coordinates through their own embedding leaf ("embed/task{t}") and
share a hidden layer; features are L2-normalised and each task has a frozen prototype head (one labelled
example per class, × 10), the analog of CLIP's zero-shot head. Fine-tuning the backbone for task t moves its
embedding leaf and the shared layer, so the K task vectors interfere in the shared leaves: task arithmetic
at λ = 0.3 under-uses each task vector, and per-leaf λ can recover most of each task's accuracy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

NUM_TASKS, BLOCK, HIDDEN, FEATURES, CLASSES, HEAD_SCALE = 4, 8, 32, 16, 4, 10.0


def features(params, x):
    h = sum(x[:, t * BLOCK : (t + 1) * BLOCK] @ params["embed"][f"task{t}"] for t in range(NUM_TASKS))
    h = jax.nn.relu(h + params["embed_bias"])
    f = h @ params["shared"]["kernel"] + params["shared"]["bias"]
    return f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + 1e-6)


@dataclasses.dataclass
class TinyProblem:
    pretrained: dict
    finetuned: list
    heads: np.ndarray  # [K, FEATURES, CLASSES]
    train: list  # per task (x, y)
    test: list  # per task (x, y)

    def apply(self, params, x, task):
        return features(params, x) @ self.heads[task]


def _task_data(rng, task, n):
    means = np.random.default_rng(100 + task).normal(0, 1.0, (CLASSES, BLOCK))
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(0, 0.3, (n, NUM_TASKS * BLOCK))
    x[:, task * BLOCK : (task + 1) * BLOCK] += means[y] + rng.normal(0, 1.0, (n, BLOCK))
    return x.astype(np.float32), y.astype(np.int32)


def _finetune(apply, params, x, y, steps=150, lr=1e-2):
    optimizer = optax.adam(lr)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

    @jax.jit
    def step(p, s):
        updates, s = optimizer.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    state = optimizer.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params


def make_problem(seed: int = 0, n_train: int = 256, n_test: int = 256) -> TinyProblem:
    rng = np.random.default_rng(seed)
    d_in = NUM_TASKS * BLOCK
    normal = lambda scale, shape: jnp.asarray(rng.normal(0, scale, shape), jnp.float32)  # noqa: E731
    pretrained = {
        "embed": {f"task{t}": normal(d_in**-0.5, (BLOCK, HIDDEN)) for t in range(NUM_TASKS)},
        "embed_bias": jnp.zeros(HIDDEN),
        "shared": {"kernel": normal(HIDDEN**-0.5, (HIDDEN, FEATURES)), "bias": jnp.zeros(FEATURES)},
    }
    train = [_task_data(rng, t, n_train) for t in range(NUM_TASKS)]
    test = [_task_data(rng, t, n_test) for t in range(NUM_TASKS)]
    heads = []
    for x, y in train:
        f = np.asarray(features(pretrained, x))
        heads.append(HEAD_SCALE * np.stack([f[y == c][0] for c in range(CLASSES)], axis=1))
    heads = np.stack(heads).astype(np.float32)
    finetuned = [
        _finetune(lambda p, x, t=t: features(p, x) @ heads[t], pretrained, *train[t]) for t in range(NUM_TASKS)
    ]
    return TinyProblem(pretrained, finetuned, heads, train, test)


def batch_source(problem: TinyProblem, batch: int = 16, seed: int = 0):
    """A resumable batch source: step -> K unlabeled test batches, drawn with a per-step RNG."""

    def batches(step):
        rng = np.random.default_rng([seed, step])
        return [x[rng.choice(len(x), batch, replace=False)] for x, _ in problem.test]

    return batches
