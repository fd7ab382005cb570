"""Frozen linear heads built from pretrained features: CLIP-like prototype heads and logistic regression.

In the paper each task's head is CLIP's zero-shot head: per class, the L2-normalised mean of the
L2-normalised text embeddings of its prompts; logits = exp(logit_scale) · cos(image feature, prototype).
Without a text tower the **prototype head** takes the same form with image features: per class c,

    p_c = normalise( mean_{i ∈ S_c} normalise(f(x_i)) ),   logits_c(x) = scale · ⟨normalise(f(x)), p_c⟩,

where S_c holds ``shots`` labelled train examples of class c and f is the *pretrained* backbone (default
1 shot, scale 30). Measured on the offline benchmark, this reproduces the paper's regime: weak
pretrained heads that fine-tuning and AdaMerging improve. A **logistic-regression head** fit on all
pretrained train features is kept for comparison: it is so strong already that entropy minimisation lowers
accuracy, so it is not the default.

Both are a ``LinearHead``: ``logits = g(f) @ weight + bias`` with g = L2 normalisation or the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from adamerging_jax.models.clip import l2_normalize

DEFAULT_SHOTS = 1
DEFAULT_SCALE = 30.0


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LinearHead:
    """``logits = g(features) @ weight + bias``; g L2-normalises when ``normalize`` (a static field)."""

    weight: jax.Array  # [D, C]
    bias: jax.Array  # [C]
    normalize: bool = field(default=False, metadata={"static": True})

    @property
    def num_classes(self) -> int:
        return self.weight.shape[1]


EPS = 1e-12
"""The floor of ‖x‖ when features are normalised, so a zero feature stays finite."""


def head_input(head: LinearHead, features: jax.Array) -> jax.Array:
    """g(features): what the head's linear map reads (the representation z; L2-normalised when ``normalize``)."""
    return l2_normalize(features, eps=EPS) if head.normalize else features


def linear_logits(head: LinearHead, z: jax.Array) -> jax.Array:
    """z @ weight + bias for representations z [N, D] (`head_input`'s, possibly moved since)."""
    return z @ head.weight + head.bias


def apply_head(head: LinearHead, features: jax.Array) -> jax.Array:
    """Logits [N, C] of features [N, D]."""
    return linear_logits(head, head_input(head, features))


def select_shots(labels: np.ndarray, num_classes: int, shots: int = DEFAULT_SHOTS, seed: int = 0) -> np.ndarray:
    """Indices of ``shots`` examples per class drawn by ``numpy.random.default_rng(seed)``, class-major."""
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in range(num_classes):
        members = np.flatnonzero(labels == cls)
        if len(members) < shots:
            raise ValueError(f"class {cls} has {len(members)} labelled examples, {shots} shots requested")
        chosen.append(rng.choice(members, size=shots, replace=False))
    return np.concatenate(chosen)


def prototype_head(
    features: jax.Array, labels: np.ndarray, num_classes: int, scale: float = DEFAULT_SCALE
) -> LinearHead:
    """Prototype head from the (pretrained) features of the chosen shots; every class needs ≥ 1 example."""
    features = l2_normalize(jnp.asarray(features, jnp.float32), eps=EPS)
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes)
    if len(counts) > num_classes or (counts == 0).any():
        raise ValueError(f"every class in [0, {num_classes}) needs at least one example, got counts {counts.tolist()}")
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # [N, C]
    means = (one_hot.T @ features) / counts[:, None]  # [C, D]
    prototypes = l2_normalize(means, eps=EPS)
    return LinearHead(scale * prototypes.T, jnp.zeros(num_classes, jnp.float32), normalize=True)


def logistic_head(
    features: np.ndarray, labels: np.ndarray, num_classes: int, regularization: float = 1.0, max_iter: int = 1000
) -> LinearHead:
    """Multinomial logistic regression (scikit-learn, L2 with inverse strength ``regularization``).

    Fit on standardised features z = (f − μ)/σ; the standardisation is folded into the head:
    logits = z W + b = f (W/σ) + (b − (μ/σ) W).
    """
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as error:
        raise ImportError("the logistic head needs scikit-learn: pip install scikit-learn") from error
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    present = np.unique(labels)
    if not np.array_equal(present, np.arange(num_classes)):
        raise ValueError(f"the logistic head needs examples of all {num_classes} classes, got {present.tolist()}")
    mean, std = features.mean(0), features.std(0) + 1e-6
    model = LogisticRegression(C=regularization, max_iter=max_iter).fit((features - mean) / std, labels)
    coef, intercept = model.coef_, model.intercept_
    if num_classes == 2:  # scikit-learn keeps one logit s for class 1; softmax([-s/2, s/2]) = sigmoid(s)
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    weight = coef.T / std[:, None]  # [D, C]
    bias = intercept - (mean / std) @ coef.T
    return LinearHead(jnp.asarray(weight, jnp.float32), jnp.asarray(bias, jnp.float32), normalize=False)
