"""evaluate_models: many models, one pass over each test set, against accuracies computed in numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

import adamerging_jax as am
from adamerging_jax.core.evaluate import pad_batch

RNG = np.random.default_rng(0)
HEADS = RNG.normal(size=(2, 5, 3)).astype(np.float32)  # two tasks, 5 features, 3 classes
TESTS = [(RNG.normal(size=(n, 5)).astype(np.float32), RNG.integers(0, 3, n)) for n in (11, 7)]


def apply(params, x, task):
    return (x * params["scale"]) @ HEADS[task]


def numpy_accuracy(scale, task):
    x, y = TESTS[task]
    return float(np.mean(np.argmax((x * scale) @ HEADS[task], axis=1) == y))


class Reads:
    """An iterable of batches that counts how often it is read."""

    def __init__(self, x, y, size):
        self.x, self.y, self.size, self.reads = x, y, size, 0

    def __iter__(self):
        self.reads += 1
        for start in range(0, len(self.x), self.size):
            yield self.x[start : start + self.size], self.y[start : start + self.size]


def test_many_models_one_pass_per_task_and_per_task_models():
    models = {
        "one": {"scale": jnp.float32(1.0)},
        "minus": {"scale": jnp.float32(-1.0)},
        "only_first": am.PerTask(lambda t: {"scale": jnp.float32(2.0)} if t == 0 else None),
    }
    sources = [Reads(x, y, 4) for x, y in TESTS]
    result = am.evaluate_models(apply, models, sources, ["a", "b"], batch_size=4)
    assert [s.reads for s in sources] == [1, 1]
    assert result["one"].per_task == {"a": numpy_accuracy(1.0, 0), "b": numpy_accuracy(1.0, 1)}
    assert result["minus"].per_task == {"a": numpy_accuracy(-1.0, 0), "b": numpy_accuracy(-1.0, 1)}
    assert result["only_first"].per_task == {"a": numpy_accuracy(2.0, 0)}  # no model for task b


def test_arrays_and_batches_and_shared_backbone_agree():
    params = {"scale": jnp.float32(0.5)}
    plain = am.evaluate(apply, params, TESTS, batch_size=3)
    shared = am.SharedBackbone(lambda p, x: x * p["scale"], lambda f, t: f @ HEADS[t])
    assert am.evaluate(shared, params, TESTS, batch_size=8).per_task == plain.per_task
    assert plain.per_task == {"0": numpy_accuracy(0.5, 0), "1": numpy_accuracy(0.5, 1)}
    assert plain.mean == np.mean([numpy_accuracy(0.5, 0), numpy_accuracy(0.5, 1)])


def test_pad_batch_pads_every_leaf_with_zeros_and_keeps_full_batches():
    batch = {"ids": np.ones((2, 3), np.int32), "mask": np.ones((2, 3), np.int32)}
    padded = pad_batch(batch, 4)
    assert padded["ids"].shape == (4, 3) and padded["ids"][2:].sum() == 0 and padded["ids"].dtype == np.int32
    full = np.arange(8.0).reshape(4, 2)
    assert pad_batch(full, 4) is not None and np.array_equal(pad_batch(full, 4), full)


def negated(params, x, task):
    """A model's own forward: the negated logits (its argmax is the least likely class of `apply`)."""
    return -apply(params, x, task)


def test_models_with_their_own_forward_are_scored_in_the_same_pass():
    """``forwards``: a model with its own apply_fn (as Surgery's) is scored in the one pass over each test set,
    so one-shot generators of batches serve every model."""
    def once(x, y):
        yield from ((x[start : start + 4], y[start : start + 4]) for start in range(0, len(x), 4))

    models = {"one": {"scale": jnp.float32(1.0)}, "own": {"scale": jnp.float32(-1.0)}}
    result = am.evaluate_models(apply, models, [once(x, y) for x, y in TESTS], ["a", "b"], batch_size=4,
                                forwards={"own": negated})
    assert result["one"].per_task == {"a": numpy_accuracy(1.0, 0), "b": numpy_accuracy(1.0, 1)}
    assert result["own"].per_task == {"a": numpy_accuracy(1.0, 0), "b": numpy_accuracy(1.0, 1)}  # −(−x) = x
    with pytest.raises(ValueError, match=r"forwards for models \['other'\]"):
        am.evaluate_models(apply, models, TESTS, batch_size=4, forwards={"other": negated})
