"""Decoder language models of the Llama family (Llama 2/3, Qwen2) in Flax.

The computation is the one of transformers' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``:

    h0 = E[ids]
    h  = h + o(attn(rope(q(n1(h))), rope(k(n1(h))), v(n1(h))))          (× L, pre-norm residual blocks)
    h  = h + down(silu(gate(n2(h))) ⊙ up(n2(h)))
    logits = n(h) @ W_head                    (W_head = Eᵀ when the embeddings are tied)

with RMSNorm n(x) = g ⊙ x / √(mean(x²) + ε) (Zhang & Sennrich, 2019), SwiGLU (Shazeer, 2020) and
grouped-query attention (Ainslie et al., 2023): H query heads share H_kv key/value heads, query head h
reading key/value head ⌊h / (H / H_kv)⌋. Attention is softmax(q kᵀ / √d_head + mask) v, the softmax in
float32, the mask causal and padding: query t sees key s iff s ≤ t and ``attention_mask[s] = 1``.

RoPE (Su et al., 2021) in the "rotate half" layout: the first and second halves of a head vector are the two
coordinates of d_head/2 planes, plane i rotated by the angle p · ω_i at position p, ω_i = θ^(−2i/d_head).
Llama 3.1's frequency scaling (``rope_type: llama3``) rewrites ω with wavelength λ_i = 2π / ω_i, context
C = ``original_max_position_embeddings`` and factors f, α = ``low_freq_factor``, β = ``high_freq_factor``:

    ω_i                          if λ_i < C / β     (high frequencies kept)
    ω_i / f                      if λ_i > C / α     (low frequencies slowed by f)
    (1 − s) ω_i / f + s ω_i      otherwise, s = (C / λ_i − α) / (β − α)

Positions are the count of attended tokens before each token (``cumsum(attention_mask) − 1``), so a
left-padded prompt gets the logits it would get unpadded; right padding gives positions 0, 1, 2, ... as
transformers' default does.

Parameters are a plain nested dict (Linen ``init`` output without the ``"params"`` level):

    {"embed": [V, D],
     "layers": {"attn_norm": {"scale"}, "attn": {"q", "k", "v", "o": {"kernel", ("bias")}},
                "mlp_norm": {"scale"}, "mlp": {"gate", "up", "down": {"kernel", ("bias")}}},
     "norm": {"scale"},
     "lm_head": {"kernel": [D, V]}}              (absent when the embeddings are tied)

Kernels are [in, out] (torch's Linear weights transposed). ``"layers"`` holds the blocks stacked on a
leading axis L and run with ``lax.scan``; :func:`stacked` tells the core which leaves carry that axis so that
layer-wise AdaMerging gets one coefficient per tensor per layer. Biases exist where the config asks for them:
q, k, v (and o) with ``attention_bias`` in Llama; q, k, v always and o never in Qwen2.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.matrix_view import Matrix, MatrixView

Params = dict[str, Any]

MODEL_TYPES = ("llama", "qwen2")
_SILU_NAMES = ("silu", "swish")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's RoPE frequency scaling (HF ``rope_scaling`` with ``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A decoder LM of the Llama family; :meth:`from_hf` reads an HF ``config.json`` dict.

    ``qkv_bias`` / ``o_bias`` / ``mlp_bias`` say which projections carry a bias; ``head_dim`` may differ from
    ``hidden_size / num_heads`` (then q has ``num_heads · head_dim`` outputs). The token ids are kept only to
    be written back on export.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ["vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"]:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig.num_kv_heads={self.num_kv_heads} does not divide "
                             f"num_heads={self.num_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps={self.rms_norm_eps} and rope_theta={self.rope_theta} "
                             "must be positive")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"LlamaConfig.model_type={self.model_type!r}; supported: {MODEL_TYPES}")
        s = self.rope_scaling
        if s is not None and not (s.factor > 0 and 0 < s.low_freq_factor < s.high_freq_factor
                                  and s.original_max_position_embeddings > 0):
            raise ValueError(f"LlamaConfig.rope_scaling={s}: need factor > 0, 0 < low_freq_factor < "
                             "high_freq_factor and original_max_position_embeddings > 0")

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> LlamaConfig:
        """The config of an HF ``config.json`` (``model_type`` "llama" or "qwen2"); errors name the field.

        RoPE is read from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (4.x and
        the hub's files); only the default and "llama3" RoPE types are implemented. Sliding-window attention
        (Qwen2 ``use_sliding_window``) is refused.
        """
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"config.json field 'model_type' is {model_type!r}; supported: {MODEL_TYPES}")
        for field in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]:
            if field not in hf:
                raise ValueError(f"config.json field {field!r} is missing")
        act = hf.get("hidden_act", "silu")
        if act not in _SILU_NAMES:
            raise ValueError(f"config.json field 'hidden_act' is {act!r}; only silu (SwiGLU) is implemented")
        if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
            raise ValueError("config.json field 'use_sliding_window' / 'layer_types': sliding-window attention "
                             "is not implemented")
        if hf.get("pretraining_tp", 1) != 1:
            raise ValueError(f"config.json field 'pretraining_tp' is {hf['pretraining_tp']}; only 1 is supported")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        if not hf.get("head_dim") and hf["hidden_size"] % heads:
            raise ValueError(f"config.json field 'num_attention_heads' ({heads}) does not divide 'hidden_size' "
                             f"({hf['hidden_size']}) and no 'head_dim' is given")
        theta, scaling = _rope_from_hf(hf)
        qwen2 = model_type == "qwen2"
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            qkv_bias=True if qwen2 else bool(hf.get("attention_bias", False)),
            o_bias=False if qwen2 else bool(hf.get("attention_bias", False)),
            mlp_bias=False if qwen2 else bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048), model_type=model_type,
            bos_token_id=hf.get("bos_token_id"), pad_token_id=hf.get("pad_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos)

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict that transformers (4.x and 5) reads back as this model."""
        if self.model_type == "qwen2" and (not self.qkv_bias or self.o_bias or self.mlp_bias):
            raise ValueError("LlamaConfig: a qwen2 model has q/k/v biases and no o/MLP bias; these biases "
                             f"(qkv {self.qkv_bias}, o {self.o_bias}, mlp {self.mlp_bias}) need model_type llama")
        if self.model_type == "llama" and self.qkv_bias != self.o_bias:
            raise ValueError("LlamaConfig: Llama's attention_bias gives q, k, v and o a bias together; "
                             f"qkv_bias={self.qkv_bias} with o_bias={self.o_bias} has no HF Llama config")
        hf: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"],
            "model_type": self.model_type, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id, "attention_dropout": 0.0, "use_cache": True,
        }
        if self.model_type == "llama":
            hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        else:
            hf.update(use_sliding_window=False, sliding_window=None)
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return hf


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """(θ, llama3 scaling or None) from ``rope_parameters`` or ``rope_theta`` + ``rope_scaling``."""
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = dict(hf.get(field) or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("config.json field 'partial_rotary_factor': only 1.0 (RoPE on the whole head) is supported")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"config.json field {field!r}: rope_type {rope_type!r} is not implemented "
                         "(only 'default' and 'llama3')")
    missing = [k for k in ["factor", "low_freq_factor", "high_freq_factor"] if k not in params]
    if missing:
        raise ValueError(f"config.json field {field!r}: llama3 RoPE needs {missing}")
    original = params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
    if original is None:
        raise ValueError(f"config.json field {field!r}: llama3 RoPE needs 'original_max_position_embeddings'")
    return theta, Llama3RopeScaling(float(params["factor"]), float(params["low_freq_factor"]),
                                    float(params["high_freq_factor"]), int(original))


def stacked(path: str) -> bool:
    """True for leaves stacked over layers (leading axis L), e.g. "layers/attn/q/kernel"."""
    return path.split("/")[0] == "layers"


def _matrix(path: str) -> Matrix | None:
    """Every Dense kernel as its HF ``nn.Linear`` weight [out, in] (one matrix per layer), the embedding table
    as stored [V, D]; RMSNorm gains and biases are not matrices."""
    last = path.split("/")[-1]
    if last == "kernel":
        return Matrix(transpose=True)
    return Matrix(transpose=False) if path == "embed" else None


matrix_view = MatrixView(_matrix, stacked)
"""The matrix view of a Llama / Qwen2 tree (`core.matrix_view`)."""


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """ω_i = θ^(−2i/d_head), i < d_head/2, with Llama 3.1's scaling when configured (module docstring); float32."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    s = config.rope_scaling
    if s is not None:
        wavelength = 2 * math.pi / inv_freq
        context = s.original_max_position_embeddings
        smooth = (context / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
        inv_freq = np.where(wavelength > context / s.low_freq_factor, inv_freq / s.factor,
                            np.where(wavelength < context / s.high_freq_factor, inv_freq, blended))
    return inv_freq.astype(np.float32)


# ----------------------------------------------------------------------------------------------- modules


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE in the rotate-half layout: x cos + [−x₂, x₁] sin."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class _RMSNorm(nn.Module):
    """g ⊙ x / √(mean(x²) + ε), the statistics in float32 and the result cast back before the gain (as HF)."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * normed.astype(x.dtype)


class _Attention(nn.Module):
    """Grouped-query self-attention with RoPE; ``allowed`` [N, T, T] is the causal ∧ padding mask."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, allowed: jax.Array) -> jax.Array:
        c = self.config
        n, t, _ = h.shape
        dense = lambda features, bias, name: nn.Dense(features, use_bias=bias, name=name)
        q = dense(c.num_heads * c.head_dim, c.qkv_bias, "q")(h).reshape(n, t, c.num_kv_heads, c.kv_groups, c.head_dim)
        k = dense(c.num_kv_heads * c.head_dim, c.qkv_bias, "k")(h).reshape(n, t, c.num_kv_heads, c.head_dim)
        v = dense(c.num_kv_heads * c.head_dim, c.qkv_bias, "v")(h).reshape(n, t, c.num_kv_heads, c.head_dim)
        q = _rotate(q, cos[:, :, None, None], sin[:, :, None, None])
        k = _rotate(k, cos[:, :, None], sin[:, :, None])
        scores = jnp.einsum("nqkgd,nskd->nkgqs", q, k).astype(jnp.float32) * c.head_dim**-0.5
        # A finite floor, not −∞: a query with no visible key (left padding) gets a uniform row, not NaN.
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        attended = jnp.einsum("nkgqs,nskd->nqkgd", weights, v).reshape(n, t, c.num_heads * c.head_dim)
        return dense(c.hidden_size, c.o_bias, "o")(attended)


class _Mlp(nn.Module):
    """SwiGLU: down(silu(gate(h)) ⊙ up(h))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        c = self.config
        gate = nn.Dense(c.intermediate_size, use_bias=c.mlp_bias, name="gate")(h)
        up = nn.Dense(c.intermediate_size, use_bias=c.mlp_bias, name="up")(h)
        return nn.Dense(c.hidden_size, use_bias=c.mlp_bias, name="down")(jax.nn.silu(gate) * up)


class _Block(nn.Module):
    """h + attn(n1 h), then + mlp(n2 h); scanned: (h, cos, sin, allowed) -> (h, None)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, allowed: jax.Array
                 ) -> tuple[jax.Array, None]:
        c = self.config
        h = h + _Attention(c, name="attn")(_RMSNorm(c.rms_norm_eps, name="attn_norm")(h), cos, sin, allowed)
        h = h + _Mlp(c, name="mlp")(_RMSNorm(c.rms_norm_eps, name="mlp_norm")(h))
        return h, None


class LlamaForCausalLM(nn.Module):
    """Token embedding, L scanned blocks (rematerialised in the backward pass with ``remat``), final RMSNorm,
    LM head; ``__call__(input_ids, attention_mask, position_ids)`` gives logits [N, T, V]."""

    config: LlamaConfig
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array) -> jax.Array:
        c = self.config
        table = self.param("embed", nn.initializers.normal(0.02), (c.vocab_size, c.hidden_size))
        h = jnp.take(table, input_ids, axis=0)
        angles = position_ids[..., None].astype(jnp.float32) * rope_frequencies(c)
        angles = jnp.concatenate([angles, angles], axis=-1)
        cos, sin = jnp.cos(angles).astype(h.dtype), jnp.sin(angles).astype(h.dtype)
        length = input_ids.shape[1]
        allowed = jnp.tril(jnp.ones((length, length), bool))[None] & (attention_mask[:, None, :] > 0)
        block = nn.remat(_Block, prevent_cse=False) if self.remat else _Block
        layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_layers)
        h, _ = layers(c, name="layers")(h, cos, sin, allowed)
        h = _RMSNorm(c.rms_norm_eps, name="norm")(h)
        if c.tie_word_embeddings:
            return h @ table.T.astype(h.dtype)
        return nn.Dense(c.vocab_size, use_bias=False, name="lm_head")(h)


# ------------------------------------------------------------------------------------- functional API


def position_ids_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position of each token among the attended ones, cumsum(mask) − 1 clipped at 0 (int32 [N, T])."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def init_params(config: LlamaConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters (plain nested dict) in ``dtype``: N(0, 0.02²) weights, zero biases, unit RMSNorm gains."""
    ids = jnp.zeros((1, 1), jnp.int32)
    params = jax.jit(LlamaForCausalLM(config).init)(key, ids, jnp.ones_like(ids), ids)["params"]
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), params)


def forward(params: Params, input_ids: jax.Array, attention_mask: jax.Array | None, config: LlamaConfig, *,
            position_ids: jax.Array | None = None, remat: bool = False) -> jax.Array:
    """Next-token logits [N, T, V] of ``input_ids`` int [N, T], computed in the parameters' dtype.

    ``attention_mask`` [N, T] (1 = token, 0 = padding; None = all tokens) hides padded keys; padded query
    positions give logits that mean nothing and must be masked by the caller. ``position_ids`` defaults to
    :func:`position_ids_from_mask`. ``remat=True`` recomputes each block's activations in the backward pass
    instead of storing them (same numbers, less memory).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {input_ids.shape}")
    positions = position_ids_from_mask(mask) if position_ids is None else jnp.asarray(position_ids, jnp.int32)
    return LlamaForCausalLM(config, remat=remat).apply({"params": params}, input_ids, mask, positions)
