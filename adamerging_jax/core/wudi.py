"""WUDI merging (Cheng, Xiong, Wei, Zhu and Yuan, "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors", ICML 2025): a data-free merge that, per weight matrix, finds the merged
task vector whose interference with each task's own input subspace (spanned, the paper argues, by the rows of its
task vector) is smallest.

For each weight matrix (τ_k ∈ R^{out × in} in the reference's orientation, `core.matrix_view`):

    X* = argmin_X  L(X),   L(X) = Σ_k ‖(X − τ_k) τ_kᵀ‖²_F / ‖τ_k‖²_F
    θ  = θ0 + X*

and every other leaf (biases, norms, convolutions) gets the average, θ = θ0 + (1/K) Σ_k τ_k.

Two solvers of the same objective:

- ``"adam"`` — the reference's: Adam (β = (0.9, 0.999), ε = 1e-8, lr 1e-5) for `iterations` steps from
  X = Σ_k τ_k; with the reference's settings it stops far from the minimum, which is the method as published.
- ``"exact"`` — the minimiser itself. Row by row L is a linear least-squares problem,
  L(X) = ‖M Xᵀ − C‖²_F with M = [τ_k / ‖τ_k‖]_k ∈ R^{K·out × in} and C = [τ_k τ_kᵀ / ‖τ_k‖]_k, so
  X* = (M⁺ C)ᵀ, the minimum-norm solution (through the thin SVD of M). The normal equations
  (Σ_k τ_kᵀ τ_k / ‖τ_k‖²) X*ᵀ = Σ_k τ_kᵀ τ_k τ_kᵀ / ‖τ_k‖² are singular whenever Σ_k rank τ_k < in (a position
  embedding of fewer rows than its width, a wide matrix at small K, low-rank task vectors); the minimum-norm
  solution is then the one gradient descent from Σ_k τ_k reaches, and where they are regular it is their solution.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from adamerging_jax.core.matrix_merging import thin_svd
from adamerging_jax.core.matrix_view import MatrixView, map_matrices, require_view
from adamerging_jax.core.parameters import Parameter
from adamerging_jax.core.task_vectors import add_to_pretrained, check_stacked
from adamerging_jax.core.trees import PyTree, accumulation_dtype

Solver = Literal["adam", "exact"]
SOLVERS: tuple[str, ...] = ("adam", "exact")

PAPER = ("Cheng, Xiong, Wei, Zhu and Yuan, Whoever Started the Interference Should End It: Guiding Data-Free Model "
         "Merging via Task Vectors, ICML 2025")
PARAMETERS = (
    Parameter("iterations", 300, "Adam steps per weight matrix (solver adam)", minimum=1),
    Parameter("lr", 1e-5, "Adam's learning rate (solver adam)", minimum=0.0),
    Parameter("solver", "adam", "adam: the reference's Adam steps from Σ_k τ_k; exact: the objective's minimum-norm "
              "minimiser", choices=SOLVERS),
)


def squared_norms(task_vectors: jax.Array) -> jax.Array:
    """‖τ_k‖²_F of each task's matrix [K], a zero one counted as 1 (its term of the loss is 0 either way; the
    reference divides 0 by 0 and returns NaN for a matrix some task left unchanged)."""
    norms = jnp.sum(jnp.square(task_vectors), axis=(1, 2))
    return jnp.where(norms > 0, norms, 1)


def interference_loss(merged: jax.Array, task_vectors: jax.Array) -> jax.Array:
    """L(X) = Σ_k ‖(X − τ_k) τ_kᵀ‖²_F / ‖τ_k‖²_F for one matrix X [out, in] and its task vectors [K, out, in]."""
    interference = jnp.einsum("koi,kpi->kop", merged[None] - task_vectors, task_vectors)
    return jnp.sum(jnp.sum(jnp.square(interference), axis=(1, 2)) / squared_norms(task_vectors))


def loss_gradient_terms(task_vectors: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(A, B) with ∇L(X) = 2 (X A − B): A = Σ_k τ_kᵀ τ_k / ‖τ_k‖² [in, in], B = Σ_k τ_k τ_kᵀ τ_k / ‖τ_k‖² [out, in].

    Accumulated one task at a time, so the memory is one [in, in] and one [out, in] whatever K (differentiating
    L directly holds a [K, out, out] interference per matrix: 1.3 GB for one ViT-L/14 MLP weight at K = 20).
    """
    inputs = task_vectors.shape[2]
    norms = squared_norms(task_vectors)

    def add(terms: tuple[jax.Array, jax.Array], task: tuple[jax.Array, jax.Array]) -> tuple[tuple[jax.Array, jax.Array], None]:
        tau, norm = task
        gram = tau.T @ tau / norm
        return (terms[0] + gram, terms[1] + tau @ gram), None

    start = (jnp.zeros((inputs, inputs), task_vectors.dtype), jnp.zeros_like(task_vectors[0]))
    (a, b), _ = jax.lax.scan(add, start, (task_vectors, norms))
    return a, b


def adam_minimiser(task_vectors: jax.Array, iterations: int, lr: float | jax.Array) -> jax.Array:
    """X after `iterations` Adam steps on `interference_loss` from X = Σ_k τ_k (one matrix, [K, out, in]), with
    the loss's gradient in closed form, 2 (X A − B) (`loss_gradient_terms`): one [out, in] × [in, in] product a
    step, where differentiating L costs about 3K·out/in times as much."""
    optimiser = optax.adam(jnp.asarray(lr, task_vectors.dtype))
    a, b = loss_gradient_terms(task_vectors)

    def step(carry: tuple[jax.Array, optax.OptState], _: None) -> tuple[tuple[jax.Array, optax.OptState], None]:
        merged, state = carry
        updates, state = optimiser.update(2 * (merged @ a - b), state)
        return (optax.apply_updates(merged, updates), state), None

    start = jnp.sum(task_vectors, axis=0)
    (merged, _), _ = jax.lax.scan(step, (start, optimiser.init(start)), length=iterations)
    return merged


def exact_minimiser(task_vectors: jax.Array) -> jax.Array:
    """The minimum-norm minimiser X* = (M⁺ C)ᵀ of `interference_loss` (module docstring), [out, in].

    With M = U S Vᵀ (thin SVD) and C's blocks τ_k τ_kᵀ / ‖τ_k‖: Uᵀ C = Σ_k U_kᵀ (τ_k / ‖τ_k‖) τ_kᵀ, and
    X* = (Uᵀ C)ᵀ S⁺ Vᵀ, singular values below ε · max(K·out, in) · s_max counted as zero (NumPy's ``lstsq`` rule).
    """
    k, out, inputs = task_vectors.shape
    scaled = task_vectors / jnp.sqrt(squared_norms(task_vectors))[:, None, None]
    u, s, vt = thin_svd(scaled.reshape(k * out, inputs))
    cutoff = jnp.finfo(s.dtype).eps * max(k * out, inputs) * s[0]
    inverse = jnp.where(s > cutoff, 1 / jnp.where(s > cutoff, s, 1), 0)
    u_c = jnp.einsum("kor,koi,kpi->rp", u.reshape(k, out, -1), scaled, task_vectors)
    return jnp.einsum("rp,r,ri->pi", u_c, inverse, vt)


def merged_matrix(task_vectors: jax.Array, solver: Solver, iterations: int, lr: float | jax.Array) -> jax.Array:
    """WUDI's merged task vector of one matrix ([K, out, in] → [out, in]), in τ's accumulation dtype."""
    tau = task_vectors.astype(accumulation_dtype(task_vectors.dtype))
    return exact_minimiser(tau) if solver == "exact" else adam_minimiser(tau, iterations, lr)


@partial(jax.jit, static_argnames=("view", "iterations", "solver"))
def _wudi(pretrained: PyTree, task_vectors: PyTree, view: MatrixView, iterations: int, lr: jax.Array,
          solver: Solver) -> PyTree:
    average = lambda tau, theta: jnp.mean(tau.astype(accumulation_dtype(tau.dtype)), axis=0)  # noqa: E731
    per_matrix = lambda tau, theta: merged_matrix(tau, solver, iterations, lr)  # noqa: E731
    return add_to_pretrained(pretrained, map_matrices(per_matrix, average, pretrained, task_vectors, view))


def wudi_merging(pretrained: PyTree, task_vectors: PyTree, view: MatrixView | None, iterations: int = 300,
                 lr: float = 1e-5, solver: Solver = "adam") -> PyTree:
    """WUDI: θ = θ0 + argmin_X Σ_k ‖(X − τ_k) τ_kᵀ‖²_F / ‖τ_k‖²_F per matrix of `view`, θ0 + mean_k τ_k elsewhere
    (module docstring). ``solver="adam"``: `iterations` Adam steps of learning rate `lr` from Σ_k τ_k (the
    reference's 300 and 1e-5); ``"exact"``: the minimum-norm minimiser. The result has θ0's dtypes."""
    require_view("wudi", view)
    if solver not in SOLVERS:
        raise ValueError(f"method 'wudi': parameter 'solver' must be one of {list(SOLVERS)}, got {solver!r}")
    check_stacked(pretrained, task_vectors)
    return _wudi(pretrained, task_vectors, view, iterations, jnp.asarray(lr), solver)
