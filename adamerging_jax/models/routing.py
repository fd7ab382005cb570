"""Weight-ensembling routing (Tang, Shen, Du, Zhou, Liu, Zhang and Tao, "Merging Multi-Task Models via
Weight-Ensembling Mixture of Experts", ICML 2024): the pieces a model uses to turn a linear layer of a
module group (CLIP's MLP, an MBConv block's pointwise convolutions) into an input-dependent ensemble

    W(h) = W_0 + Σ_k r_k(h) τ_k,   b(h) = b_0 + Σ_k r_k(h) τ_k^b,
    r(h) = mean over tokens of fc2(ReLU(fc1(h_i)))    (the router; depth 1: fc1 alone, depth 0: a constant r)

with W_0 the pretrained layer and τ_k task k's task vector of it; h is the module group's input (every token
or pixel i of an example). The routing weights r are computed per example and, while training (FusionBench's
``batch_reduce``), averaged over each group of examples (one task's batch), so one ensembled weight serves the
whole group: a module takes ``r [G, K]`` and inputs whose leading axis is G equal groups.

Initialisation is FusionBench 0.2.33's (``models/we_moe.py``): hidden kernels ~ N(0, 0.01²), hidden biases 0,
the last kernel ~ N(0, 0.01²) and its bias λ_init (so r ≈ λ_init: the ensembled model starts at task
arithmetic), depth 0: r = λ_init.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = dict[str, Any]
EXPERT = "expert_"
"""The prefix of an ensembled leaf's task vectors: ``expert_kernel`` [K, ...] beside ``kernel``."""
ROUTER = "router"
"""The name of a routed module group's router."""
ROUTING = "routing"
"""The variable collection the routers sow their weights r [G, K] into (when it is mutable)."""


@dataclasses.dataclass(frozen=True)
class Routing:
    """A router's shape: ``experts`` (K, the task vectors ensembled), ``hidden_layers`` (0, 1 or 2: the
    reference's ``router_hidden_layers``), ``init_lambda`` (the last bias's initial value) and ``groups``: None
    routes every example on its own (evaluation), G averages r over G equal consecutive groups of examples
    (training: one group per task's batch)."""

    experts: int
    hidden_layers: int = 2
    init_lambda: float = 0.3
    groups: int | None = None

    def __post_init__(self) -> None:
        if self.hidden_layers not in (0, 1, 2):
            raise ValueError(f"router hidden_layers must be 0, 1 or 2 (the reference's), got {self.hidden_layers!r}")


class Router(nn.Module):
    """r [G, K] of the inputs h [N, ..., d] (see the module docstring)."""

    routing: Routing

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        routing = self.routing
        count = routing.groups or h.shape[0]
        if routing.hidden_layers == 0:
            weight = self.param("weight", nn.initializers.constant(routing.init_lambda), (routing.experts,), h.dtype)
            return self._sown(jnp.broadcast_to(weight, (count, routing.experts)))
        small = nn.initializers.normal(0.01)
        x = h
        if routing.hidden_layers == 2:
            x = jax.nn.relu(nn.Dense(h.shape[-1], kernel_init=small, param_dtype=h.dtype, name="fc1")(x))
        last = f"fc{routing.hidden_layers}"
        x = nn.Dense(routing.experts, kernel_init=small, bias_init=nn.initializers.constant(routing.init_lambda),
                     param_dtype=h.dtype, name=last)(x)
        per_example = jnp.mean(x.reshape(x.shape[0], -1, routing.experts), axis=1)
        return self._sown(jnp.mean(per_example.reshape(count, -1, routing.experts), axis=1))

    def _sown(self, weights: jax.Array) -> jax.Array:
        if self.is_mutable_collection(ROUTING):
            self.sow(ROUTING, "weights", weights)
        return weights


def ensemble(base: jax.Array, experts: jax.Array, weights: jax.Array) -> jax.Array:
    """W_g = W_0 + Σ_k r_gk τ_k for every group g: ``[G, *base.shape]`` in W_0's dtype (τ may be narrower, e.g.
    bf16: it is widened in the sum)."""
    mixed = jnp.einsum("gk,k...->g...", weights.astype(base.dtype), experts.astype(base.dtype))
    return base[None] + mixed


def grouped_linear(x: jax.Array, kernels: jax.Array, biases: jax.Array | None) -> jax.Array:
    """x_g W_g (+ b_g) per group: x [N, ..., in] split into G equal consecutive groups, kernels [G, in, out]."""
    groups = kernels.shape[0]
    grouped = x.reshape(groups, -1, *x.shape[1:])
    y = jnp.einsum("gn...i,gio->gn...o", grouped, kernels)
    if biases is not None:
        y = y + biases.reshape(groups, 1, *([1] * (x.ndim - 2)), -1)
    return y.reshape(*x.shape[:-1], -1)


class RoutedDense(nn.Module):
    """A Dense layer whose weight is ensembled per group: ``kernel`` [in, out] and ``bias`` [out] (W_0, b_0, at
    the names `flax.linen.Dense` gives them) and ``expert_kernel`` [K, in, out], ``expert_bias`` [K, out] (τ);
    called with r [G, K]."""

    features: int
    experts: int
    expert_dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, weights: jax.Array) -> jax.Array:
        shape = (x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, x.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), x.dtype)
        expert_dtype = self.expert_dtype or x.dtype
        expert_kernel = self.param("expert_kernel", nn.initializers.zeros, (self.experts, *shape), expert_dtype)
        expert_bias = self.param("expert_bias", nn.initializers.zeros, (self.experts, self.features), expert_dtype)
        return grouped_linear(x, ensemble(kernel, expert_kernel, weights), ensemble(bias, expert_bias, weights))


def router_depth(router: Params) -> int:
    """The router's hidden_layers, read from its parameters (``weight``: 0; ``fc1``: 1; ``fc1`` and ``fc2``: 2)."""
    return 0 if "weight" in router else len(router)


def router_experts(router: Params) -> int:
    """K, read from the router's parameters."""
    if "weight" in router:
        return int(router["weight"].shape[-1])
    return int(router[f"fc{router_depth(router)}"]["bias"].shape[-1])


def init_router(key: jax.Array, routing: Routing, width: int, layers: int, dtype: Any) -> Params:
    """Initial parameters of `layers` routers reading inputs of `width`, stacked on a leading layer axis."""
    keys = jax.random.split(key, layers)
    sample = jnp.zeros((1, 1, width), dtype)
    return jax.vmap(lambda k: Router(routing).init(k, sample)["params"])(keys)
