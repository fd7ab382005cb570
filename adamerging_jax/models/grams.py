"""Input Gram matrices of linear layers, recorded by the Flax models themselves (for RegMean, `core.regmean`).

A linear layer y = W x fed the rows x_1..x_n (every position of a batch: examples × tokens, or × pixels for a
1×1 convolution) has the input Gram matrix

    G = (1/n) Σ_i x_i x_iᵀ = XᵀX / n ∈ R^{in × in}.

The models sow G of each such layer's input into the variable collection `GRAMS`, named after the layer, so
one forward pass with that collection mutable returns every layer's Gram matrix (stacked over layers where the
blocks run under ``nn.scan``, which declares `GRAMS` in its ``variable_axes``). When the collection is not
mutable — every ordinary forward — nothing is computed: the normal path is unchanged.

`kernel_grams` reads the collection back as ``{kernel leaf path: G}``, the paths of the parameter tree.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from adamerging_jax.core.trees import accumulation_dtype

GRAMS = "grams"
"""The variable collection the input Gram matrices are sown into."""

_INPUT = "input"


def sow_input_gram(module: nn.Module, inputs: jax.Array) -> None:
    """Sow G = XᵀX / n of `inputs` (rows: every position but the last axis) under `module`'s scope, computed
    in at least float32 at full matmul precision; a no-op unless `GRAMS` is mutable (and at init)."""
    if module.is_initializing() or not module.is_mutable_collection(GRAMS):
        return
    rows = inputs.reshape(-1, inputs.shape[-1]).astype(accumulation_dtype(inputs.dtype))
    gram = jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST) / rows.shape[0]
    module.sow(GRAMS, _INPUT, gram)


class GramDense(nn.Dense):
    """`flax.linen.Dense` that also sows its input's Gram matrix (`sow_input_gram`); same parameters."""

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        sow_input_gram(self, inputs)
        return super().__call__(inputs)


def kernel_grams(collection: dict[str, Any]) -> dict[str, jax.Array]:
    """``{".../kernel": G}`` from a `GRAMS` collection (``{".../input": (G,)}``); a layer applied more than once
    in the pass (two Gram matrices) is refused rather than mixed."""
    grams = {}
    for names, sown in traverse_util.flatten_dict(collection).items():
        layer = "/".join(names[:-1])
        if len(sown) != 1:
            raise ValueError(f"layer {layer!r} ran {len(sown)} times in one pass: its input Gram matrix is ambiguous")
        grams["/".join((*names[:-1], "kernel"))] = sown[0]
    return grams
