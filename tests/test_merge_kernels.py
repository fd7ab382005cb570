"""The two formulations of the merge's Σ_k λ[k] τ[k] (reduction: GPU/TPU, contraction: CPU) against float64
numpy, for task-wise λ [K] and layer-wise λ [K, L], fp32 and bf16 τ, values and λ-gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adamerging_jax.core.merge import weighted_sum_by_contraction, weighted_sum_by_reduction

FORMULATIONS = [weighted_sum_by_reduction, weighted_sum_by_contraction]


@pytest.mark.parametrize("weighted_sum", FORMULATIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("lam_shape,tau_shape", [((3,), (3, 5, 4)), ((3, 2), (3, 2, 5, 4)), ((4, 6), (4, 6))])
@pytest.mark.parametrize("tau_dtype", [jnp.float32, jnp.bfloat16])
def test_weighted_sum_matches_float64(weighted_sum, lam_shape, tau_shape, tau_dtype):
    rng = np.random.default_rng(0)
    lam = rng.normal(size=lam_shape).astype(np.float32)
    tau = jnp.asarray(rng.normal(size=tau_shape), tau_dtype)
    tau64 = np.asarray(tau.astype(jnp.float32), np.float64)
    lam64 = lam.astype(np.float64).reshape(lam_shape + (1,) * (len(tau_shape) - len(lam_shape)))
    expected = (lam64 * tau64).sum(axis=0)
    got = jax.jit(weighted_sum)(jnp.asarray(lam), tau)
    assert got.dtype == jnp.float32 and got.shape == tau_shape[1:]
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)

    # ∂/∂λ of Σ g ⊙ Σ_k λ[k] τ[k] = Σ_{non-λ axes} g ⊙ τ[k]
    g = rng.normal(size=tau_shape[1:])
    grad = jax.grad(lambda l: jnp.sum(jnp.asarray(g, jnp.float32) * weighted_sum(l, tau)))(jnp.asarray(lam))
    axes = tuple(range(len(lam_shape), len(tau_shape)))
    np.testing.assert_allclose(np.asarray(grad), (g[None] * tau64).sum(axis=axes), rtol=1e-5, atol=1e-5)
