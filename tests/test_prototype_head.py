"""Prototype and logistic-regression heads against direct computations."""

import jax
import numpy as np
import pytest

from adamerging_jax.heads.prototype import (
    LinearHead,
    apply_head,
    logistic_head,
    prototype_head,
    select_shots,
)


def numpy_prototype_logits(train_features, train_labels, num_classes, scale, query):
    """The formula written out: p_c = n(mean_i n(f_i)), logits = scale · n(q) · p_c, n(v) = v / ‖v‖."""
    normalise = lambda v: v / np.linalg.norm(v)  # noqa: E731
    prototypes = []
    for cls in range(num_classes):
        members = [normalise(f) for f, y in zip(train_features, train_labels) if y == cls]
        prototypes.append(normalise(np.mean(members, axis=0)))
    return np.array([[scale * normalise(q) @ p for p in prototypes] for q in query])


@pytest.mark.parametrize("shots", [1, 3])
def test_prototype_head_matches_the_formula(shots):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 6)
    features = rng.normal(size=(24, 16)) * rng.uniform(0.1, 10, size=(24, 1))  # norms vary a lot
    chosen = select_shots(labels, 4, shots=shots, seed=2)
    head = prototype_head(features[chosen], labels[chosen], 4, scale=30.0)
    query = rng.normal(size=(5, 16))
    expected = numpy_prototype_logits(features[chosen], labels[chosen], 4, 30.0, query)
    np.testing.assert_allclose(apply_head(head, query), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(jax.jit(apply_head)(head, query), expected, rtol=1e-5, atol=1e-4)
    assert head.normalize and head.num_classes == 4


def test_select_shots_is_per_class_deterministic_and_checked():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    chosen = select_shots(labels, 3, shots=2, seed=7)
    assert labels[chosen].tolist() == [0, 0, 1, 1, 2, 2] and len(set(chosen)) == 6
    np.testing.assert_array_equal(chosen, select_shots(labels, 3, shots=2, seed=7))
    assert any(not np.array_equal(chosen, select_shots(labels, 3, shots=2, seed=s)) for s in range(8, 12))
    with pytest.raises(ValueError, match="class 0 has 3 labelled examples, 4 shots"):
        select_shots(labels, 3, shots=4)
    with pytest.raises(ValueError, match="at least one example"):
        prototype_head(np.ones((2, 3)), np.array([0, 0]), 2)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_logistic_head_folds_the_standardisation_into_the_weights(num_classes):
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(1)
    labels = np.arange(60) % num_classes
    features = rng.normal(size=(60, 5)) * [1, 50, 0.1, 3, 1] + 10 + labels[:, None]
    head = logistic_head(features, labels, num_classes)
    mean, std = features.mean(0), features.std(0) + 1e-6
    model = sklearn_linear.LogisticRegression(C=1.0, max_iter=1000).fit((features - mean) / std, labels)
    probabilities = jax.nn.softmax(apply_head(head, features.astype(np.float32)))
    np.testing.assert_allclose(probabilities, model.predict_proba((features - mean) / std), atol=1e-4)
    assert not head.normalize


def test_head_is_a_pytree_with_a_static_normalise_flag():
    head = LinearHead(np.ones((3, 2), np.float32), np.zeros(2, np.float32), normalize=True)
    leaves, treedef = jax.tree_util.tree_flatten(head)
    assert len(leaves) == 2
    assert jax.tree_util.tree_unflatten(treedef, leaves).normalize
