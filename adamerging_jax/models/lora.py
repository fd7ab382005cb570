"""Task vectors from PEFT LoRA adapters of a Llama / Qwen2 model, dense or factored.

A LoRA adapter (Hu et al., ICLR 2022) fine-tunes a Linear layer W [out, in] (torch layout) as
W + s · B A with A [r, in], B [out, r] and the scale s = α / r, or s = α / √r with rsLoRA (Kalajdzievski,
2023). Its task vector is therefore, in our [in, out] kernel layout,

    τ = s · (B A)ᵀ = s · Aᵀ Bᵀ      on every adapted kernel (per layer for stacked leaves), 0 elsewhere.

PEFT's folder (``save_pretrained``): ``adapter_config.json`` with ``r``, ``lora_alpha``, ``target_modules``,
``use_rslora``, ``fan_in_fan_out``, ``rank_pattern`` / ``alpha_pattern`` (per-module r / α, matched as PEFT's
``get_pattern_key`` does: the first key k with ``re.match(rf"(.*\\.)?({k})$", module)``), and
``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight``
[out, r], e.g. ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``. The tensors present
decide which modules are adapted. A and B have these shapes whatever ``fan_in_fan_out`` says (it only
describes the base layer's torch layout, and PEFT forces it off for ``nn.Linear``), so τ in our layout is the
same. DoRA, trained biases, embedding LoRA and ``modules_to_save`` are refused with the field named.

Factored form. With K adapters, AdaMerging's merge needs Σ_k λ_k τ_k. Dense, the τ_k cost K·m·n numbers per
adapted m×n kernel (per layer); the factors A_k, B_k cost K·r·(m + n). :func:`lora_factors` stacks the K
adapters' factors per kernel (:class:`~adamerging_jax.core.low_rank.LoraFactors`, ranks zero-padded to each
leaf's largest: zero rows add nothing) and :func:`factored_task_vectors` makes the whole task-vector tree that
``core.merge.merge`` and ``core.optimize.adamerging`` take, the sum being computed inside the jitted step by
``core.low_rank.low_rank_weighted_sum`` without forming the K dense matrices. For a 7B Llama with r = 16 on
q, k, v, o (4096 × 4096 each, 32 layers) and K = 4 adapters: dense 8.6 G numbers, factored 67 M.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.low_rank import LoraFactors, factored_sizes, low_rank_weighted_sum, zero_task_vector
from adamerging_jax.core.trees import map_with_path, named_leaves
from adamerging_jax.data.strict_text import read_json_object
from adamerging_jax.models.hf_files import check_float_tensor, read_safetensors
from adamerging_jax.models.llama import Params, stacked
from adamerging_jax.models.llama_checkpoint import tree_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
__all__ = ["LoraAdapter", "LoraFactors", "LoraModule", "factored_sizes", "factored_task_vectors", "lora_factors",
           "lora_task_vector", "low_rank_weighted_sum", "read_lora_adapter"]  # the factored type lives in the core

_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """One adapted Linear: our leaf ``path`` (and ``layer`` for a stacked leaf), A [r, in], B [out, r], scale s."""

    path: str
    layer: int | None
    a: np.ndarray
    b: np.ndarray
    scale: float


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter read from ``source``: its adapted modules by HF module name."""

    source: str
    modules: Mapping[str, LoraModule]


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the value of the first pattern k with ``(.*\\.)?(k)$`` matching ``module``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory!r}")
    config = read_json_object(path)
    refused = {"use_dora": bool(config.get("use_dora")), "lora_bias": bool(config.get("lora_bias")),
               "bias": config.get("bias", "none") != "none", "modules_to_save": bool(config.get("modules_to_save")),
               "peft_type": config.get("peft_type", "LORA") != "LORA"}
    for field, bad in refused.items():
        if bad:
            raise ValueError(f"{path}: field {field!r} = {config[field]!r} is not supported (plain LoRA only)")
    for field in ["r", "lora_alpha"]:
        value = config.get(field)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
            raise ValueError(f"{path}: field {field!r} must be a finite positive number, got {value!r}")
    return config


def read_lora_adapter(directory: str | os.PathLike) -> LoraAdapter:
    """A PEFT LoRA adapter folder (module docstring), every tensor named and checked: floating point and
    finite (as a full checkpoint's weights), A and B paired, ranks as the config says, modules that are Llama
    Linear layers."""
    directory = os.fspath(directory)
    config = _read_config(directory)
    tensors = read_safetensors(os.path.join(directory, ADAPTER_WEIGHTS))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        match = _KEY.fullmatch(key)
        if not match:
            raise ValueError(f"{directory}: tensor {key!r} is not a LoRA factor "
                             "(base_model.model.<module>.lora_A/lora_B.weight)")
        check_float_tensor(key, array, directory)
        if not np.isfinite(array).all():
            raise ValueError(f"{directory}: tensor {key!r} holds {int(np.isnan(array).sum())} NaN and "
                             f"{int(np.isinf(array).sum())} inf values")
        pairs.setdefault(match.group(1), {})[match.group(2)] = array.astype(np.float32)
    if not pairs:
        raise ValueError(f"{directory}: {ADAPTER_WEIGHTS} holds no LoRA tensors")
    modules = {}
    for module, factors in sorted(pairs.items()):
        if set(factors) != {"A", "B"}:
            raise ValueError(f"{directory}: module {module!r} has lora_{''.join(factors)} but not both A and B")
        a, b = factors["A"], factors["B"]
        r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ValueError(f"{directory}: module {module!r}: lora_A {a.shape} and lora_B {b.shape} are not "
                             f"[r, in] and [out, r] with r = {r} from {ADAPTER_CONFIG}")
        try:
            path, layer = tree_path(module + ".weight")
        except KeyError as err:
            raise ValueError(f"{directory}: module {module!r} is not a Llama / Qwen2 layer") from err
        if not path.endswith("kernel"):
            raise ValueError(f"{directory}: module {module!r} is not a Linear layer")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        if not math.isfinite(scale):
            raise ValueError(f"{directory}: module {module!r}: scale α / r = {alpha!r} / {r!r} is not finite")
        modules[module] = LoraModule(path, layer, a, b, float(scale))
    return LoraAdapter(directory, modules)


def _check_against(adapter: LoraAdapter, leaves: Mapping[str, Any]) -> None:
    """Each module's leaf exists in the base tree, with the layer and the [in, out] shape that A and B imply."""
    for module, m in adapter.modules.items():
        if m.path not in leaves:
            raise ValueError(f"{adapter.source}: module {module!r} adapts leaf {m.path!r}, which the base model "
                             "does not have (a tied LM head?)")
        shape = tuple(leaves[m.path].shape)
        kernel = shape[1:] if stacked(m.path) else shape
        if stacked(m.path) and not 0 <= m.layer < shape[0]:
            raise ValueError(f"{adapter.source}: module {module!r}: layer {m.layer} outside the {shape[0]} layers")
        if kernel != (m.a.shape[1], m.b.shape[0]):
            raise ValueError(f"{adapter.source}: module {module!r}: lora_A {m.a.shape} and lora_B {m.b.shape} "
                             f"do not fit the base kernel {kernel} ([in, out])")


def lora_task_vector(adapter: LoraAdapter, base: Params) -> Params:
    """τ of one adapter, a tree shaped and typed like ``base``: s (B A)ᵀ on adapted kernels, 0 elsewhere."""
    leaves = dict(named_leaves(base))
    _check_against(adapter, leaves)
    deltas: dict[str, np.ndarray] = {}
    for m in adapter.modules.values():
        delta = deltas.setdefault(m.path, np.zeros(leaves[m.path].shape, np.float32))
        delta[m.layer if stacked(m.path) else ...] = m.scale * (m.b @ m.a).T
    return map_with_path(lambda path, x: jnp.asarray(deltas.get(path, np.zeros(x.shape, np.float32)), x.dtype),
                         base)


def lora_factors(adapters: Sequence[LoraAdapter], base: Params) -> dict[str, LoraFactors]:
    """The K adapters' factors per adapted kernel leaf (path → :class:`LoraFactors`), ranks zero-padded to each
    leaf's largest; the leaves no adapter touches are absent (their τ is 0)."""
    if not adapters:
        raise ValueError("no adapters given")
    leaves = dict(named_leaves(base))
    for adapter in adapters:
        _check_against(adapter, leaves)
    k = len(adapters)
    out: dict[str, LoraFactors] = {}
    for path in sorted({m.path for adapter in adapters for m in adapter.modules.values()}):
        modules = [(t, m) for t, adapter in enumerate(adapters) for m in adapter.modules.values() if m.path == path]
        rank = max(m.a.shape[0] for _, m in modules)
        shape = tuple(leaves[path].shape)
        layers = (shape[0],) if stacked(path) else ()
        d_in, d_out = shape[-2:]
        a = np.zeros((k, *layers, rank, d_in), np.float32)
        b = np.zeros((k, *layers, d_out, rank), np.float32)
        scale = np.zeros((k, *layers), np.float32)
        for t, m in modules:
            where = (t, m.layer) if stacked(path) else (t,)
            r = m.a.shape[0]
            a[where][:r], b[where][:, :r], scale[where] = m.a, m.b, m.scale
        out[path] = LoraFactors(jnp.asarray(a), jnp.asarray(b), jnp.asarray(scale))
    return out


def factored_task_vectors(adapters: Sequence[LoraAdapter], base: Params) -> Params:
    """The K adapters' task vectors as a tree shaped like ``base`` for ``core.merge.merge`` / ``adamerging``:
    :class:`LoraFactors` on adapted kernels, and on every other leaf the zero τ of
    ``core.low_rank.zero_task_vector`` (zero-rank factors for matrices such as the embedding, dense zeros
    [K, *shape] for the small vector leaves: norm gains and biases)."""
    factors = lora_factors(adapters, base)
    k = len(adapters)
    return map_with_path(lambda path, x: factors[path] if path in factors
                         else zero_task_vector(x.shape, k, int(stacked(path)), x.dtype), base)
