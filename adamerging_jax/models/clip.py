"""CLIP (Radford et al., 2021) in Flax: the ViT image tower with its projection, and the text tower.

The computation is the one of transformers' ``CLIPModel`` (and of OpenAI's / open_clip's ViT CLIP):

    vision:  z0 = [cls; conv_p(x)] + pos         (patch conv without bias)
             z  = pre_ln(z0);  z = z + attn(ln1(z));  z = z + fc2(act(fc1(ln2(z))))   (× L)
             pooled = post_ln(z[:, 0]);   image_embeds = pooled @ W_visual_projection
    text:    z0 = tok_emb[ids] + pos;  the same blocks with a causal mask;  z = final_ln(z)
             pooled = z[b, first position of EOS];  text_embeds = pooled @ W_text_projection
    logits_per_image = exp(logit_scale) · n(image_embeds) @ n(text_embeds)ᵀ,  n(v) = v / ‖v‖

with act = quick_gelu(x) = x·σ(1.702x) for the OpenAI weights, LayerNorm eps 1e-5 and attention
softmax(q kᵀ / √d_head) v per head.

Parameters are plain nested dicts (Linen ``init`` output without the ``"params"`` collection level):

    {"vision": {"patch_embed": {"kernel"}, "class_embedding", "pos_embedding", "pre_ln", "layers", "post_ln"},
     "visual_projection": {"kernel"},
     "text": {"token_embedding", "pos_embedding", "layers", "final_ln"},
     "text_projection": {"kernel"},
     "logit_scale": ()}

``"layers"`` holds the transformer blocks stacked on a leading axis L and run with ``lax.scan``
(one compiled block instead of L, compile time on CPU drops several-fold); :func:`stacked` tells which
leaves carry that axis so that layer-wise AdaMerging still gets one coefficient per tensor per layer.
The HF ``CLIPVisionModel`` tensors (q, k, v separate) map one to one onto ``params["vision"]``: ViT-B/32
has 199 such tensors, held in 23 leaves here (16 of them stacked over 12 layers).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from adamerging_jax.core.matrix_view import Matrix, MatrixView
from adamerging_jax.models.grams import GRAMS, GramDense, kernel_grams
from adamerging_jax.core.we_moe import ExpertMixture
from adamerging_jax.models.routing import (EXPERT, ROUTER, ROUTING, RoutedDense, Router, Routing, init_router, router_depth,
                                           router_experts)

Params = dict[str, Any]
ROUTED_LAYERS = "routed_layers"
"""The top blocks of a weight-ensembling MoE image tower (`moe_vision_params`), stacked like ``layers``."""

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class ConfigError(ValueError):
    """An invalid config value; ``owner`` is the config class, ``field`` the field at fault."""

    def __init__(self, owner: str, field: str, value: Any, requirement: str):
        super().__init__(f"{owner}.{field} = {value!r}: {requirement}")
        self.owner, self.field = owner, field


def _require_positive(config: Any, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ConfigError(type(config).__name__, field, value, "must be a positive integer")


def _require_divides(config: Any, field: str, divisor_field: str) -> None:
    value, divisor = getattr(config, field), getattr(config, divisor_field)
    if value % divisor:
        raise ConfigError(type(config).__name__, field, value,
                          f"must be a multiple of {divisor_field} = {divisor}")


def _check_block_fields(config: Any) -> None:
    """The fields a transformer stack shares (width, layers, heads, mlp_dim, activation, layer_norm_eps)."""
    owner = type(config).__name__
    _require_positive(config, "width", "layers", "heads", "mlp_dim")
    _require_divides(config, "width", "heads")
    if config.activation not in ACTIVATIONS:
        raise ConfigError(owner, "activation", config.activation, f"unknown; known: {sorted(ACTIVATIONS)}")
    eps = config.layer_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
        raise ConfigError(owner, "layer_norm_eps", eps, "must be a finite number > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockConfig:
    """The transformer stack both towers share: ``layers`` pre-LayerNorm blocks of ``width`` with ``heads``
    attention heads and an MLP of ``mlp_dim`` (keyword-only fields)."""

    width: int
    layers: int
    heads: int
    mlp_dim: int
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class VisionConfig(BlockConfig):
    """ViT image tower: ``image_size``² inputs cut into ``patch_size``² patches, ``layers`` blocks of ``width``."""

    image_size: int
    patch_size: int

    def __post_init__(self) -> None:
        """Refuse impossible towers up front, naming the field (patches must tile the image, heads the width)."""
        _require_positive(self, "image_size", "patch_size")
        _require_divides(self, "image_size", "patch_size")
        _check_block_fields(self)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig(BlockConfig):
    """Causal text transformer; the pooled token is the first ``eos_token_id`` of each sequence."""

    vocab_size: int
    context_length: int
    eos_token_id: int

    def __post_init__(self) -> None:
        """Refuse impossible towers up front, naming the field (the EOS id must be in the vocabulary)."""
        _require_positive(self, "vocab_size", "context_length")
        _check_block_fields(self)
        if not isinstance(self.eos_token_id, numbers.Integral) or not 0 <= self.eos_token_id < self.vocab_size:
            raise ConfigError("TextConfig", "eos_token_id", self.eos_token_id,
                              f"must be a token id in [0, vocab_size = {self.vocab_size})")


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """A CLIP model. ``text`` / ``embed_dim`` are None for an image tower alone (an HF ``CLIPVisionModel``)."""

    vision: VisionConfig
    text: TextConfig | None = None
    embed_dim: int | None = None
    logit_scale_init: float = 2.6592  # ln(1 / 0.07), rounded as HF configs store it

    def __post_init__(self) -> None:
        if self.embed_dim is not None:
            _require_positive(self, "embed_dim")
        if self.text is not None and self.embed_dim is None:
            raise ConfigError("ClipConfig", "embed_dim", None, "a config with a text tower needs the projection width")


def _openai_text(width: int, heads: int) -> TextConfig:
    return TextConfig(vocab_size=49408, context_length=77, width=width, layers=12, heads=heads,
                      mlp_dim=4 * width, eos_token_id=49407)


def _vit(image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_dim: int) -> VisionConfig:
    return VisionConfig(image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=heads,
                        mlp_dim=mlp_dim)


VARIANTS: dict[str, ClipConfig] = {
    "B/32": ClipConfig(_vit(224, 32, 768, 12, 12, 3072), _openai_text(512, 8), 512),
    "B/16": ClipConfig(_vit(224, 16, 768, 12, 12, 3072), _openai_text(512, 8), 512),
    "L/14": ClipConfig(_vit(224, 14, 1024, 24, 16, 4096), _openai_text(768, 12), 768),
    # Test sizes: seconds to compile on CPU. "Ti/8" is the size of the committed torch fixtures.
    "Ti/8": ClipConfig(_vit(32, 8, 32, 2, 2, 48),
                       TextConfig(vocab_size=534, context_length=32, width=40, layers=2, heads=4, mlp_dim=72,
                                  eos_token_id=533), 24),
    "Ti/4": ClipConfig(_vit(16, 4, 16, 2, 2, 32),
                       TextConfig(vocab_size=534, context_length=32, width=16, layers=2, heads=2, mlp_dim=32,
                                  eos_token_id=533), 8),
}


def get_config(variant: str | ClipConfig) -> ClipConfig:
    """The config of a variant name ("B/32", "B/16", "L/14", "Ti/8", "Ti/4"); a ClipConfig passes through."""
    if isinstance(variant, ClipConfig):
        return variant
    if variant not in VARIANTS:
        raise ValueError(f"unknown CLIP variant {variant!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[variant]


def stacked(path: str) -> bool:
    """True for leaves stacked over layers (leading axis L), e.g. "vision/layers/attn/q/kernel"."""
    return "layers" in path.split("/")


def _matrix(path: str) -> Matrix | None:
    """The 2-D weights as HF's torch CLIP holds them: every Dense kernel as its ``nn.Linear`` weight [out, in]
    (q, k, v separate, one matrix per layer), the position and token embedding tables as stored [N, D]; the
    patch convolution (4-D in torch), class embedding, biases and LayerNorms are not matrices."""
    parts = path.split("/")
    if parts[-1] == "kernel" and "patch_embed" not in parts:
        return Matrix(transpose=True)
    if parts[-1] in ("pos_embedding", "token_embedding"):
        return Matrix(transpose=False)
    return None


matrix_view = MatrixView(_matrix, stacked)
"""The matrix view of a CLIP tree or of its image tower (`core.matrix_view`)."""


# ----------------------------------------------------------------------------------------------- modules


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    """LayerNorm with the two-pass variance E[(x − μ)²], as torch computes it."""
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


class _Attention(nn.Module):
    """Multi-head self-attention softmax(q kᵀ/√d) v with separate q, k, v, out projections (HF layout)."""

    heads: int
    causal: bool

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        batch, length, width = h.shape
        head_dim = width // self.heads
        q, k, v = (GramDense(width, name=n)(h).reshape(batch, length, self.heads, head_dim) for n in "qkv")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim**-0.5, k)
        if self.causal:
            scores = jnp.where(jnp.tril(jnp.ones((length, length), bool)), scores, -jnp.inf)
        attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return GramDense(width, name="out")(attended.reshape(batch, length, width))


class _Mlp(nn.Module):
    """fc2(act(fc1(h))); with ``routing`` (`models.routing`) a weight-ensembling MoE MLP: a router reads h and
    fc1, fc2 are `RoutedDense` layers W_0 + Σ_k r_k(h) τ_k (task vectors held in ``expert_dtype``)."""

    mlp_dim: int
    activation: str
    routing: Routing | None = None
    expert_dtype: Any = None

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        if self.routing is None:
            dense, extra = GramDense, ()
        else:
            dense = functools.partial(RoutedDense, experts=self.routing.experts, expert_dtype=self.expert_dtype)
            extra = (Router(self.routing, name=ROUTER)(h),)
        hidden = ACTIVATIONS[self.activation](dense(self.mlp_dim, name="fc1")(h, *extra))
        return dense(h.shape[-1], name="fc2")(hidden, *extra)


class _Block(nn.Module):
    """Pre-LN transformer block z + attn(ln1 z), then + mlp(ln2 z); scanned: (z, None) -> (z, None). ``routing``
    makes its MLP a weight-ensembling mixture (`_Mlp`)."""

    heads: int
    mlp_dim: int
    activation: str
    eps: float
    causal: bool
    routing: Routing | None = None
    expert_dtype: Any = None

    @nn.compact
    def __call__(self, z: jax.Array, _: None) -> tuple[jax.Array, None]:
        z = z + _Attention(self.heads, self.causal, name="attn")(_layer_norm(self.eps, "ln1")(z))
        mlp = _Mlp(self.mlp_dim, self.activation, self.routing, self.expert_dtype, name="mlp")
        z = z + mlp(_layer_norm(self.eps, "ln2")(z))
        return z, None


def _layers(num_layers: int, heads: int, mlp_dim: int, activation: str, eps: float, causal: bool,
            routing: Routing | None = None, expert_dtype: Any = None, name: str = "layers") -> nn.Module:
    """``num_layers`` blocks with parameters (and sown input Gram matrices) stacked on axis 0, applied by
    ``lax.scan`` (module name `name`); with ``routing``, blocks whose MLP is a weight-ensembling mixture, the
    scan unrolled. WEMoE's step differentiates through those blocks with respect to the routers; scanned, its
    backward stacks every block's residuals into loop buffers (zero-filled, then written slice by slice) and
    the tiny tower's step ran ~1.4× as long on CPU (1220 against 750 XLA ops a step;
    benchmarks/test_time_step_benchmark.py). Unrolling costs compile time (ViT-L/14, 24 routed blocks: 6 → 20
    s on CPU) and +2% of XLA's temporaries."""
    scanned = nn.scan(_Block, variable_axes={"params": 0, GRAMS: 0, ROUTING: 0}, split_rngs={"params": True},
                      length=num_layers, unroll=num_layers if routing is not None else 1)
    return scanned(heads, mlp_dim, activation, eps, causal, routing, expert_dtype, name=name)


class _PatchEmbed(nn.Module):
    """conv_p(x) without bias, stride p, as one matmul of the flattened p × p patches with the kernel
    [p, p, C, W] (the same parameter, init and result as `flax.linen.Conv`; about half its time on CPU, where
    XLA's strided convolution is slow: 1.0 → 0.45 ms for 64 images of 32², 106 → 49 ms for 16 of 224² at
    ViT-B/32)."""

    width: int
    patch: int

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch
        batch, height, width, channels = images.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, channels, self.width))
        patches = images.reshape(batch, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, (height // p) * (width // p), p * p * channels)
        return patches @ kernel.reshape(p * p * channels, self.width).astype(jnp.result_type(images, kernel))


class VisionTower(nn.Module):
    """ViT image tower; returns (last_hidden_state [B, 1+N, W], pooled = post_ln(cls) [B, W]).

    Input images are NHWC floats, already normalised (see ``adamerging_jax.data.clip_preprocess``).
    """

    config: VisionConfig
    routed_layers: int = 0
    routing: Routing | None = None
    expert_dtype: Any = None

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = self.config
        p = c.patch_size
        patches = _PatchEmbed(c.width, p, name="patch_embed")(images)
        cls = self.param("class_embedding", nn.initializers.normal(c.width**-0.5), (c.width,))
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (c.num_patches + 1, c.width))
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (patches.shape[0], 1, c.width))
        z = jnp.concatenate([cls, patches], axis=1) + pos
        z = _layer_norm(c.layer_norm_eps, "pre_ln")(z)
        block = (c.heads, c.mlp_dim, c.activation, c.layer_norm_eps, False)
        if c.layers > self.routed_layers:
            z, _ = _layers(c.layers - self.routed_layers, *block)(z, None)
        if self.routed_layers:
            z, _ = _layers(self.routed_layers, *block, self.routing, self.expert_dtype, name=ROUTED_LAYERS)(z, None)
        return z, _layer_norm(c.layer_norm_eps, "post_ln")(z[:, 0])


class TextTower(nn.Module):
    """Causal text transformer; returns (final_ln(z) [B, S, W], pooled at the first EOS token [B, W])."""

    config: TextConfig

    @nn.compact
    def __call__(self, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = self.config
        table = self.param("token_embedding", nn.initializers.normal(0.02), (c.vocab_size, c.width))
        pos = self.param("pos_embedding", nn.initializers.normal(0.01), (c.context_length, c.width))
        z = jnp.take(table, token_ids, axis=0) + pos[: token_ids.shape[1]]
        z, _ = _layers(c.layers, c.heads, c.mlp_dim, c.activation, c.layer_norm_eps, causal=True)(z, None)
        z = _layer_norm(c.layer_norm_eps, "final_ln")(z)
        eos_position = jnp.argmax(token_ids == c.eos_token_id, axis=-1)
        return z, z[jnp.arange(z.shape[0]), eos_position]


class CLIP(nn.Module):
    """Both towers, the two projections and ``logit_scale``. ``__call__`` gives logits_per_image [B_img, B_txt]."""

    config: ClipConfig

    def setup(self) -> None:
        c = self.config
        self.vision = VisionTower(c.vision)
        self.visual_projection = nn.Dense(c.embed_dim, use_bias=False)
        self.text = TextTower(c.text)
        self.text_projection = nn.Dense(c.embed_dim, use_bias=False)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init), ())

    def encode_image(self, images: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision(images)[1])

    def encode_text(self, token_ids: jax.Array) -> jax.Array:
        return self.text_projection(self.text(token_ids)[1])

    def __call__(self, images: jax.Array, token_ids: jax.Array) -> jax.Array:
        image_embeds = l2_normalize(self.encode_image(images))
        text_embeds = l2_normalize(self.encode_text(token_ids))
        return jnp.exp(self.logit_scale) * image_embeds @ text_embeds.T


# ------------------------------------------------------------------------------------- functional API


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 0.0) -> jax.Array:
    """x / max(‖x‖₂, eps) along ``axis``: CLIP's feature normalisation (eps = 0, as HF's x / ‖x‖); a positive
    eps keeps a zero vector finite."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def init_params(variant: str | ClipConfig, key: jax.Array) -> Params:
    """Random CLIP parameters (plain nested dict); a config without a text tower gives {"vision": ...} only."""
    config = get_config(variant)
    images = jnp.zeros((1, config.vision.image_size, config.vision.image_size, 3))
    if config.text is None:
        return {"vision": jax.jit(VisionTower(config.vision).init)(key, images)["params"]}
    tokens = jnp.zeros((1, config.text.context_length), jnp.int32)
    return jax.jit(CLIP(config).init)(key, images, tokens)["params"]


def vision_forward(vision_params: Params, images: jax.Array, config: ClipConfig | VisionConfig
                   ) -> tuple[jax.Array, jax.Array]:
    """(last_hidden_state, pooled) of the image tower (HF ``CLIPVisionModel`` outputs), computed in the
    parameters' dtype (images are cast to it, so bf16 parameters give a bf16 forward)."""
    vision_config = config.vision if isinstance(config, ClipConfig) else config
    return VisionTower(vision_config).apply({"params": vision_params}, _in_params_dtype(vision_params, images))


def _in_params_dtype(vision_params: Params, images: jax.Array) -> jax.Array:
    return jnp.asarray(images, dtype=vision_params["patch_embed"]["kernel"].dtype)


_STEM = ("patch_embed", "class_embedding", "pos_embedding", "pre_ln")


@dataclasses.dataclass(frozen=True)
class VisionGrams:
    """The image tower's input Gram matrices, for RegMean and RegMean++ (`core.regmean`): G = XᵀX / n of every
    Dense in the blocks (q, k, v, out, fc1, fc2; rows: examples × tokens), keyed by its kernel's path in the
    image-tower tree, e.g. ``"layers/attn/q/kernel"`` → ``[L, in, in]``.

    Called (``gram_fn(vision_params, images)``), one forward of the tower gives them all: the Dense layers sow
    them (`models.grams`) and the scan over the blocks stacks them. RegMean++ runs the tower in stages
    (`core.regmean.LayerwiseGrams`): `stem` (patch and position embeddings, class token, pre-LayerNorm: the
    leaves `stem_leaf` names), then `block` by block over the blocks stacked under `layers`.
    """

    config: VisionConfig
    layers: str = "layers"

    def __call__(self, vision_params: Params, images: jax.Array) -> dict[str, jax.Array]:
        _, sown = VisionTower(self.config).apply({"params": vision_params}, _in_params_dtype(vision_params, images),
                                                 mutable=[GRAMS])
        return kernel_grams(sown[GRAMS])

    def stem_leaf(self, path: str) -> bool:
        return path.split("/")[0] in _STEM

    def stem(self, vision_params: Params, images: jax.Array) -> jax.Array:
        """The input of block 0, pre_ln([cls; patches] + pos) ``[B, 1 + N, W]``: the pre-LayerNorm's output
        captured from the tower's forward (under ``jit`` the blocks after it are dead code and never run)."""
        _, captured = VisionTower(self.config).apply(
            {"params": vision_params}, _in_params_dtype(vision_params, images),
            capture_intermediates=lambda module, _: module.name == "pre_ln", mutable=["intermediates"])
        return captured["intermediates"]["pre_ln"]["__call__"][0]

    def block(self, block_params: Params, hidden: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """One block (its parameters without the layer axis): its output and its Gram matrices."""
        c = self.config
        (out, _), sown = _Block(c.heads, c.mlp_dim, c.activation, c.layer_norm_eps, causal=False).apply(
            {"params": block_params}, hidden, None, mutable=[GRAMS])
        return out, kernel_grams(sown[GRAMS])


def vision_grams(variant: str | ClipConfig | VisionConfig) -> VisionGrams:
    """The Gram capture of a variant's image tower (`VisionGrams`), e.g. ``AdaptContext(gram_fn=...)``."""
    return VisionGrams(variant if isinstance(variant, VisionConfig) else get_config(variant).vision)


def text_forward(text_params: Params, token_ids: jax.Array, config: ClipConfig) -> tuple[jax.Array, jax.Array]:
    """(last_hidden_state, pooled) of the text tower (HF ``CLIPTextModel`` outputs)."""
    return TextTower(config.text).apply({"params": text_params}, token_ids)


def encode_image(params: Params, images: jax.Array, config: ClipConfig) -> jax.Array:
    """Image embeddings pooled @ W_visual_projection (HF ``get_image_features``), not normalised."""
    return vision_forward(params["vision"], images, config)[1] @ params["visual_projection"]["kernel"]


def encode_text(params: Params, token_ids: jax.Array, config: ClipConfig) -> jax.Array:
    """Text embeddings pooled @ W_text_projection (HF ``get_text_features``), not normalised."""
    return text_forward(params["text"], token_ids, config)[1] @ params["text_projection"]["kernel"]


def logits_per_image(params: Params, images: jax.Array, token_ids: jax.Array, config: ClipConfig) -> jax.Array:
    """exp(logit_scale) · n(image_embeds) @ n(text_embeds)ᵀ, as HF ``CLIPModel(...).logits_per_image``."""
    return CLIP(config).apply({"params": params}, images, token_ids)


def image_encoder(variant: str | ClipConfig, visual_projection: jax.Array | None = None
                  ) -> Callable[[Params, jax.Array], jax.Array]:
    """``apply_fn(vision_params, images) -> features`` over the image tower alone: the tree merging acts on.

    With ``visual_projection`` (the frozen [W, D] kernel of the pretrained CLIP) the features are the image
    embeddings pooled @ W; without it, the pooled [B, W] output. Features are not normalised: the zero-shot
    head does that (``adamerging_jax.heads.zero_shot``).
    """
    config = get_config(variant)

    def apply_fn(vision_params: Params, images: jax.Array) -> jax.Array:
        pooled = vision_forward(vision_params, images, config)[1]
        return pooled if visual_projection is None else pooled @ visual_projection

    return apply_fn


# ------------------------------------------------------------------------- weight-ensembling MoE (WEMoE)


def _layer_slice(tree: Params, start: int, stop: int | None = None) -> Params:
    return jax.tree_util.tree_map(lambda x: x[start:stop], tree)


def moe_vision_params(pretrained: Params, merged: Params, task_vectors: Params, routed_layers: int,
                      expert_dtype: Any = None) -> Params:
    """The frozen parameters of an image tower whose top `routed_layers` MLPs are weight-ensembling mixtures
    (`models.routing`): `merged` everywhere else, and in those MLPs W_0 (`pretrained`'s fc1, fc2) with the task
    vectors under ``expert_kernel`` / ``expert_bias`` ``[layers, K, ...]`` (in `expert_dtype`; None: θ0's).
    The top blocks are under `ROUTED_LAYERS`, the others under ``"layers"`` (absent when every block is routed)."""
    cut = pretrained["layers"]["ln1"]["scale"].shape[0] - routed_layers
    tree = {name: value for name, value in merged.items() if name != "layers"}
    if cut:
        tree["layers"] = _layer_slice(merged["layers"], 0, cut)
    mlp = {}
    for name, base in _layer_slice(pretrained["layers"]["mlp"], cut).items():
        tau = jax.tree_util.tree_map(lambda t: jnp.swapaxes(t[:, cut:], 0, 1), task_vectors["layers"]["mlp"][name])
        mlp[name] = {**base, **{f"expert_{leaf}": value.astype(expert_dtype or value.dtype)
                                for leaf, value in tau.items()}}
    tree[ROUTED_LAYERS] = {**_layer_slice(merged["layers"], cut), "mlp": mlp}
    return tree


def moe_vision_forward(params: Params, routers: Params, images: jax.Array, config: ClipConfig | VisionConfig,
                       groups: int | None = None, *, with_routing: bool = False) -> Any:
    """(last_hidden_state, pooled) of the routed image tower (`moe_vision_params`) with the routers of its top
    blocks ([layers, ...]); `groups` as `models.routing.Routing`. ``with_routing``: also the routing weights
    r [layers, G, K] of the top blocks, ``((last_hidden_state, pooled), r)``."""
    vision_config = config.vision if isinstance(config, ClipConfig) else config
    routed = params[ROUTED_LAYERS]
    routing = Routing(router_experts(routers), router_depth(routers), groups=groups)
    tree = {**params, ROUTED_LAYERS: {**routed, "mlp": {**routed["mlp"], ROUTER: routers}}}
    tower = VisionTower(vision_config, routed["ln1"]["scale"].shape[0], routing)
    images = _in_params_dtype(params, images)
    if not with_routing:
        return tower.apply({"params": tree}, images)
    outputs, sown = tower.apply({"params": tree}, images, mutable=[ROUTING])
    return outputs, sown[ROUTING][ROUTED_LAYERS]["mlp"][ROUTER]["weights"][0]


def moe_expert_leaves(params: Params) -> dict[str, jax.Array]:
    """The routed MLPs' task vectors by leaf path, e.g. ``"routed_layers/mlp/fc1/expert_kernel"`` [layers, K, in,
    out]."""
    mlp = params[ROUTED_LAYERS]["mlp"]
    return {f"{ROUTED_LAYERS}/mlp/{name}/{leaf}": value for name, leaves in mlp.items() for leaf, value in leaves.items()
            if leaf.startswith(EXPERT)}


def expert_mixture(variant: str | ClipConfig | VisionConfig, visual_projection: jax.Array | None = None
                   ) -> ExpertMixture:
    """The image tower as a weight-ensembling MoE (`core.we_moe`): its module group is the MLP (fc1, fc2) of the
    top blocks, routed by the MLP's input; the representation is the image tower's features (pooled @ the
    projection when given), L2-normalised as the CLIP binding's ``features_fn``."""
    config = variant if isinstance(variant, VisionConfig) else get_config(variant).vision

    def features(frozen: Params, routers: Params, images: jax.Array, groups: int | None) -> jax.Array:
        pooled = moe_vision_forward(frozen, routers, images, config, groups)[1]
        return l2_normalize(pooled if visual_projection is None else pooled @ visual_projection)

    def init_routers(key: jax.Array, pretrained: Params, layers: int, routing: Routing) -> Params:
        dtype = pretrained["layers"]["mlp"]["fc1"]["kernel"].dtype
        return init_router(key, routing, config.width, layers, dtype)

    return ExpertMixture(layers=config.layers, module_group="the MLPs (fc1, fc2) of the top blocks",
                         upscale=moe_vision_params, init_routers=init_routers, features=features,
                         expert_leaves=moe_expert_leaves)
