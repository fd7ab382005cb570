"""Make the reference fixtures of tests/fixtures/methods/ with FusionBench's (and mergekit's) own code.

    python scripts/make_method_fixtures.py [--out tests/fixtures/methods] [--only NAME ...]

Run it in a separate environment that has the references installed (the tests need neither torch nor
FusionBench; they read what this writes):

    python -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.13.0 transformers safetensors numpy
    /tmp/refvenv/bin/pip install --no-deps fusion-bench==0.2.33   # plus what its imports ask for

The models are a tiny random HF ``CLIPVisionModel`` in float64 (q, k, v separate; every tensor drawn at
random, so every weight matrix has distinct singular values and every SVD is unique up to signs that the
methods cancel) and K fine-tuned copies θ_k = θ0 + τ_k with random τ_k:

    models.npz            "pretrained/NAME" and "task{k}/NAME" for every tensor NAME of the state dict
    METHOD.npz            the reference's merged state dict ("merged/NAME"), and whatever else that method's
                          test reads (per-task models, masks, intermediate values), float64

Each method's fixture is one function below, registered with ``@fixture("name")``; it gets the pretrained
and fine-tuned torch modules and returns the arrays to save.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
from typing import Callable

import numpy as np
import torch
import transformers

NUM_TASKS = 4
FIXTURES: dict[str, Callable[[torch.nn.Module, list[torch.nn.Module]], dict[str, np.ndarray]]] = {}


def fixture(name: str):
    """Register a fixture function under `name` (its file is ``name.npz``)."""

    def register(function):
        FIXTURES[name] = function
        return function

    return register


def tiny_clip_vision(seed: int = 0) -> transformers.CLIPVisionModel:
    """A seeded random float64 CLIPVisionModel: width 24, 2 layers, 2 heads, MLP 40, 16×16 images, patch 8."""
    config = transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModel(config).to(torch.float64).eval()
    gains = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.copy_((1.0 if id(tensor) in gains else 0.0) + 0.2 * torch.randn_like(tensor))
    return model


def finetuned_copies(pretrained: torch.nn.Module, num_tasks: int = NUM_TASKS, seed: int = 1) -> list[torch.nn.Module]:
    """θ_k = θ0 + τ_k, τ_k ~ 0.05 · N(0, 1) per entry (every tensor moves, including biases and norms)."""
    generator = torch.Generator().manual_seed(seed)
    models = []
    for _ in range(num_tasks):
        model = copy.deepcopy(pretrained)
        with torch.no_grad():
            for tensor in model.parameters():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
        models.append(model)
    return models


def state_arrays(module: torch.nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """``{prefix/NAME: float64 array}`` for every tensor of the module's state dict."""
    return {f"{prefix}/{name}": t.detach().to(torch.float64).numpy().copy() for name, t in module.state_dict().items()}


# --- one function per method's reference (each returns the arrays of METHOD.npz) -----------------------------

TALL_MASK_LAMBDA = 0.6  # FusionBench's fusion_bench_config/method/tall_mask/task_arithmetic.yaml
CONSENSUS_K = 2  # the Consensus paper's k (TALL masks' "prun_thre_k")
CONSENSUS_SCALE = 0.3  # α of θ0 + α (c ⊙ Σ_t τ_t); the paper picks it on validation data


def _fresh_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict of cloned tensors (FusionBench's ``vector_to_state_dict`` writes into its reference's
    tensors, so each call gets its own)."""
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _tall_masks(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module]):
    """FusionBench's TALL masks: ``fusion_bench.method.tall_mask.utils.generate_task_masks`` (the TALL-masks
    authors' code) on flat vectors θ0, θ_t and τ_MTL = Σ_t τ_t, mask_t = |θ0 − θ_t| > λ |θ0 + τ_MTL − θ_t|.

    ``TallMaskTaskArithmeticAlgorithm.run`` hands its own ``generate_task_masks`` the task vector τ_t where that
    function's docstring asks for θ_t (so it would compare |θ0 − τ_t|, not |τ_t|; in 0.2.33 it stops earlier, at
    a Parameter/Tensor type check of θ0's ``keep_vars`` state dict); the function is called here as documented.
    Returns the masks [K, D] (tensors sorted by name, ``state_dict_to_vector``'s order), the flat θ0 and τ [K, D]."""
    from fusion_bench.method.tall_mask.utils import generate_task_masks
    from fusion_bench.utils import state_dict_to_vector

    flat_pretrained = state_dict_to_vector(pretrained.state_dict())
    flat_finetuned = torch.stack([state_dict_to_vector(model.state_dict()) for model in finetuned])
    task_vectors = flat_finetuned - flat_pretrained
    masks = generate_task_masks(task_vectors, flat_finetuned, flat_pretrained, tall_mask_lambda=TALL_MASK_LAMBDA)
    return masks, flat_pretrained, task_vectors


@fixture("tall_masks")
def tall_masks_reference(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module]) -> dict[str, np.ndarray]:
    """TALL masks (Wang et al., ICML 2024): per task t, "mask/task{t}/NAME" and its model θ0 + m_t ⊙ τ_MTL as
    ``TallMaskTaskArithmeticAlgorithm.run`` retrieves it ("task{t}/NAME")."""
    from fusion_bench.utils import vector_to_state_dict
    from fusion_bench.utils.state_dict_arithmetic import (state_dict_add, state_dict_hadamard_product,
                                                          state_dict_sub, state_dict_sum)

    masks, _, _ = _tall_masks(pretrained, finetuned)
    theta0 = pretrained.state_dict()
    multi_task_vector = state_dict_sum([state_dict_sub(model.state_dict(), theta0) for model in finetuned])
    arrays = {}
    for t, mask in enumerate(masks):
        named_mask = vector_to_state_dict(mask.to(torch.float64), _fresh_state(pretrained))
        retrieved = state_dict_add(theta0, state_dict_hadamard_product(named_mask, multi_task_vector))
        arrays.update({f"task{t}/{name}": value.numpy().copy() for name, value in retrieved.items()})
        arrays.update({f"mask/task{t}/{name}": value.numpy().copy() for name, value in named_mask.items()})
    return arrays


class _CloningStateDict(dict):
    """θ0's state dict whose ``copy.copy`` clones the tensors: FusionBench's ``load_tall_mask`` converts every
    task's mask with ``vector_to_state_dict``, which writes into the tensors of a shallow copy of this dict, so
    with a plain dict every task's mask would be the last task's."""

    def __copy__(self) -> dict[str, torch.Tensor]:
        return {name: tensor.clone() for name, tensor in self.items()}


@fixture("consensus")
def consensus_reference(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module]) -> dict[str, np.ndarray]:
    """Consensus merging (Wang et al., ICML 2024): the TALL masks saved as ``load_tall_mask`` reads them,
    ``construct_consensus_mask`` (entries in ≥ k tasks' masks), and θ0 + α (c ⊙ Σ_t τ_t) as the TALL-masks code
    applies a masked task vector ("merged/NAME"; "consensus/NAME" the mask)."""
    import tempfile
    from types import SimpleNamespace

    from fusion_bench.method.tall_mask.utils import construct_consensus_mask
    from fusion_bench.utils import vector_to_state_dict

    masks, flat_pretrained, task_vectors = _tall_masks(pretrained, finetuned)
    with tempfile.TemporaryDirectory() as root:
        config = SimpleNamespace(model_location=os.path.join(root, "checkpoints"), model="clip",
                                 num_tasks=len(finetuned), method=SimpleNamespace(use_ties=False))
        os.makedirs(os.path.join(root, "tall_masks", "clip"))
        packed = {f"task{t}": torch.from_numpy(np.packbits(mask.numpy())) for t, mask in enumerate(masks)}
        torch.save(packed, os.path.join(root, "tall_masks", "clip", f"TALL_mask_{len(finetuned)}task.npy"))
        consensus = construct_consensus_mask(_CloningStateDict(_fresh_state(pretrained)), CONSENSUS_K, config)
    merged = flat_pretrained + CONSENSUS_SCALE * (task_vectors.sum(0) * consensus)
    arrays = {f"merged/{n}": v.numpy().copy() for n, v in vector_to_state_dict(merged, _fresh_state(pretrained)).items()}
    mask = vector_to_state_dict(consensus.to(torch.float64), _fresh_state(pretrained))
    arrays.update({f"consensus/{name}": value.numpy().copy() for name, value in mask.items()})
    return arrays


@fixture("emr")
def emr_reference(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module]) -> dict[str, np.ndarray]:
    """EMR-Merging (Huang et al., NeurIPS 2024) by ``EMRMerging.run``: per task t its model after
    ``set_task`` ("task{t}/NAME") and mask ("mask/task{t}/NAME"); the unified task vector ("unified/NAME") and
    the rescalers ("rescalers", [K])."""
    from fusion_bench import BaseModelPool
    from fusion_bench.method.emr_merging import EMRMerging

    names = list(pretrained.state_dict())
    pool = BaseModelPool({"_pretrained_": pretrained, **{f"task{t}": m for t, m in enumerate(finetuned)}})
    model = EMRMerging().run(pool)
    arrays = {f"unified/{n}": model.unified_task_vector[n].detach().numpy().copy() for n in names}
    rescalers = []
    for t in range(len(finetuned)):
        modulator = model.modulators[f"task{t}"]
        model.set_task(f"task{t}")
        arrays.update(state_arrays(model.backbone, f"task{t}"))
        arrays.update({f"mask/task{t}/{n}": modulator.mask[n].detach().numpy().astype(np.float64) for n in names})
        rescalers.append(float(modulator.rescaler))
    arrays["rescalers"] = np.asarray(rescalers, np.float64)
    return arrays

REGMEAN_EXAMPLES = 16  # unlabeled images per task (FusionBench's num_regmean_examples; its CLIP default is 256)
REGMEAN_BATCH = 6  # its dataloader's batch size: batches of 6, 6 and 4 exercise its running mean over batches
REGMEAN_RATIO = 0.95  # reduce_non_diagonal_ratio of fusion_bench_config/method/regmean*/clip_regmean*.yaml


def _regmean_images(model: torch.nn.Module, count: int) -> list[torch.Tensor]:
    """Fixed random unlabeled images per task, [REGMEAN_EXAMPLES, 3, H, W] float64 (already preprocessed)."""
    generator = torch.Generator().manual_seed(2)
    size = model.config.image_size
    return [torch.randn(REGMEAN_EXAMPLES, 3, size, size, generator=generator, dtype=torch.float64)
            for _ in range(count)]


def _run_regmean(algorithm_class: type, pretrained: torch.nn.Module, finetuned: list[torch.nn.Module],
                 layout: Callable[[torch.nn.Module], torch.nn.Module] = lambda model: model):
    """``algorithm_class(...).run`` on a model pool of these models (each as ``layout`` presents it) with the
    images of `_regmean_images` as every task's training set. The zero-shot heads FusionBench builds first
    (``on_regmean_start``) only turn the features into logits that RegMean discards, so they are replaced by a
    zero head; every Gram matrix the algorithm computes (its ``get_regmean_weights``) is recorded. Returns (merged
    model, the recorded ``(task name, {module: G})`` in call order, the images)."""
    import lightning
    from fusion_bench import BaseModelPool

    names = [f"task{t}" for t in range(len(finetuned))]
    images = _regmean_images(pretrained, len(names))
    datasets = {name: torch.utils.data.TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
                for name, x in zip(names, images)}

    class Pool(BaseModelPool):
        def load_train_dataset(self, name: str):
            return datasets[name]

        def load_processor(self):
            return lambda image: image  # the images are pixel values already

    algorithm = algorithm_class(num_regmean_examples=REGMEAN_EXAMPLES, exclude_param_names_regex=[],
                                reduce_non_diagonal_ratio=REGMEAN_RATIO, weight_transpose=True,
                                dataloader_kwargs={"batch_size": REGMEAN_BATCH, "num_workers": 0})
    algorithm.fabric = lightning.Fabric(accelerator="cpu", devices=1, precision="64-true")
    algorithm.on_regmean_start = lambda: None
    algorithm.zeroshot_weights = {name: torch.zeros(1, pretrained.config.hidden_size) for name in names}
    algorithm.visual_projection = torch.nn.Identity()
    algorithm.logit_scale_exp = torch.tensor(1.0)
    recorded = []
    compute = algorithm.get_regmean_weights

    def record(name, *args, **kwargs):
        grams = compute(name, *args, **kwargs)
        recorded.append((name, grams))
        return grams

    algorithm.get_regmean_weights = record
    pool = Pool({"_pretrained_": layout(pretrained), **{name: layout(m) for name, m in zip(names, finetuned)}})
    merged = algorithm.run(pool)
    return merged, recorded, images


def _regmean_arrays(merged: torch.nn.Module, grams: dict[str, torch.Tensor], images: list[torch.Tensor]
                    ) -> dict[str, np.ndarray]:
    arrays = state_arrays(merged, "merged")
    arrays.update({f"gram/{key}": g.detach().to(torch.float64).numpy().copy() for key, g in grams.items()})
    arrays.update({f"images/task{t}": x.numpy().copy() for t, x in enumerate(images)})
    return arrays


@fixture("regmean")
def regmean_reference(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module]) -> dict[str, np.ndarray]:
    """RegMean (Jin et al., ICLR 2023) by ``RegMeanAlgorithmForCLIP.run``: the merged model ("merged/NAME"), each
    fine-tuned model's Gram matrices on its task's images ("gram/task{t}/MODULE", e.g.
    ``encoder.layers.0.self_attn.q_proj``) and those images ("images/task{t}", [N, 3, H, W])."""
    from fusion_bench.method.regmean.clip_regmean import RegMeanAlgorithmForCLIP

    merged, recorded, images = _run_regmean(RegMeanAlgorithmForCLIP, pretrained, finetuned)
    grams = {f"{name}/{module}": g for name, per_module in recorded for module, g in per_module.items()}
    return _regmean_arrays(merged, grams, images)


class _Transformers4Layout(torch.nn.Module):
    """A ``CLIPVisionModel`` as transformers 4 laid it out, which FusionBench 0.2.33's RegMean++ reads
    (``model.vision_model.embeddings``, ``model.device``, tensor names under ``vision_model.``); transformers 5
    flattened ``vision_model`` away."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.vision_model = model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


@contextlib.contextmanager
def _encoder_layers_return_tuples():
    """transformers 4's ``CLIPEncoderLayer`` returned ``(hidden_states,)`` and took ``causal_attention_mask``;
    FusionBench 0.2.33's RegMean++ calls a layer so and takes ``[0]`` (on transformers 5's bare tensor that would
    be the first example). Restores transformers 5's forward afterwards."""
    from transformers.models.clip import modeling_clip

    forward = modeling_clip.CLIPEncoderLayer.forward

    def forward_v4(self, hidden_states, attention_mask, causal_attention_mask=None, **kwargs):
        return (forward(self, hidden_states, attention_mask, **kwargs),)

    modeling_clip.CLIPEncoderLayer.forward = forward_v4
    try:
        yield
    finally:
        modeling_clip.CLIPEncoderLayer.forward = forward


@fixture("regmean_plusplus")
def regmean_plusplus_reference(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module]) -> dict[str, np.ndarray]:
    """RegMean++ (Nguyen et al., 2025) by ``RegMeanAlgorithmForCLIPPlusPlus.run``: the merged model
    ("merged/NAME"), the Gram matrices of fine-tuned model t's layer l on its task's inputs after the merged
    layers < l ("gram/task{t}/encoder.layers.{l}.MODULE") and the images ("images/task{t}").

    Run on transformers 5 through `_Transformers4Layout` and `_encoder_layers_return_tuples`; and FusionBench
    0.2.33 declares the class's ``_config_mapping`` as a plain dict, which its parent's auto-registered
    ``__init__`` cannot read, so the subclass here only joins it with the parent's."""
    from fusion_bench.method.regmean_plusplus import RegMeanAlgorithmForCLIPPlusPlus, RegMeanAlgorithmPlusPlus

    class RegMeanPlusPlus(RegMeanAlgorithmForCLIPPlusPlus):
        _config_mapping = RegMeanAlgorithmPlusPlus._config_mapping | RegMeanAlgorithmForCLIPPlusPlus._config_mapping

    with _encoder_layers_return_tuples():
        merged, recorded, images = _run_regmean(RegMeanPlusPlus, pretrained, finetuned, _Transformers4Layout)
    grams, layer_of = {}, {}
    for name, per_module in recorded:
        layer = layer_of[name] = layer_of.get(name, -1) + 1
        grams.update({f"{name}/encoder.layers.{layer}.{module}": g for module, g in per_module.items()})
    return _regmean_arrays(merged.vision_model, grams, images)

WUDI_ITERATIONS = 20  # Adam steps per matrix in the fixture (the reference's default is 300)
SLERP_MIX = dict(t=0.3, DOT_THRESHOLD=0.995)  # a second SLERP run: the LayerNorm gains lerp, the rest slerp


def _pool(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module]):
    """A FusionBench model pool of θ0 ("_pretrained_") and the fine-tuned models ("task0", ...)."""
    from fusion_bench import BaseModelPool

    return BaseModelPool({"_pretrained_": pretrained, **{f"task{t}": m for t, m in enumerate(finetuned)}})


def _signature_defaults(function: Callable, prefix: str = "default") -> dict[str, np.ndarray]:
    """``{prefix/NAME: default}`` for the numeric keyword defaults of `function` (a class: its ``__init__``)."""
    import inspect

    parameters = inspect.signature(function).parameters.values()
    return {f"{prefix}/{p.name}": np.asarray(p.default) for p in parameters
            if isinstance(p.default, (int, float)) and not isinstance(p.default, bool)}


@fixture("wudi")
def wudi_reference(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module]) -> dict[str, np.ndarray]:
    """WUDI (Cheng et al., ICML 2025): θ0 + FusionBench's ``wudi_merging`` of the task vectors after
    `WUDI_ITERATIONS` Adam steps per 2-D tensor ("merged/NAME"); its defaults: "default/iter_num" (the
    function's signature) and "default/lr" (the Adam learning rate its source writes out)."""
    import inspect
    import re

    from fusion_bench.method.wudi.wudi import wudi_merging
    from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_sub

    theta0 = pretrained.state_dict()
    task_vectors = [state_dict_sub(model.state_dict(), theta0) for model in finetuned]
    merged_task_vector = wudi_merging(task_vectors, accelerator="cpu", iter_num=WUDI_ITERATIONS)
    merged = state_dict_add(theta0, {name: value.detach() for name, value in merged_task_vector.items()})
    lr = re.search(r"optim\.Adam\(.*?\blr=([0-9.eE+-]+)", inspect.getsource(wudi_merging)).group(1)
    return {**{f"merged/{name}": value.numpy().copy() for name, value in merged.items()},
            **_signature_defaults(wudi_merging), "default/lr": np.asarray(float(lr))}


@fixture("magmax")
def magmax_reference(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module]) -> dict[str, np.ndarray]:
    """MagMax (Marczak et al., ECCV 2024): ``MagMaxAlgorithm().run`` at its default scaling factor
    ("merged/NAME", "default/scaling_factor")."""
    from fusion_bench.method.magmax.magmax import MagMaxAlgorithm

    merged = MagMaxAlgorithm().run(_pool(pretrained, finetuned))
    return {**state_arrays(merged, "merged"), **_signature_defaults(MagMaxAlgorithm)}


class _CosinesInFloat64:
    """While active, ``Tensor.float()`` leaves float64 tensors float64: ModelStock's ``compute_angle`` casts the
    task vectors to float32 before its cosines, which would put float32 rounding (~1e-7 in the ratio t) into a
    float64 comparison."""

    def __enter__(self) -> None:
        self.original = original = torch.Tensor.float
        torch.Tensor.float = lambda tensor, *args, **kwargs: (
            tensor if tensor.dtype == torch.float64 else original(tensor, *args, **kwargs))

    def __exit__(self, *exc) -> None:
        torch.Tensor.float = self.original


MODEL_STOCK_IGNORED = ("embeddings.position_embedding.weight", "post_layernorm.weight")  # name endings


@fixture("model_stock")
def model_stock_reference(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module]) -> dict[str, np.ndarray]:
    """Model Stock (Jang et al., ECCV 2024): ``ModelStock(ignore_keys=...).run`` with its cosines in float64
    (`_CosinesInFloat64`) on all K models ("merged/NAME"), on the first two (its K = 2 branch, "pair/NAME"),
    with the tensors named by `MODEL_STOCK_IGNORED` ignored ("ignoring/NAME"), and as published, cosines in
    float32 ("float32_cosines/NAME")."""
    from fusion_bench.method.model_stock.model_stock import ModelStock

    ignored = [name for name in pretrained.state_dict() if name.endswith(MODEL_STOCK_IGNORED)]

    def run(models: list[torch.nn.Module], ignore_keys: list[str] | None = None) -> torch.nn.Module:
        return ModelStock(ignore_keys=ignore_keys).run(_pool(copy.deepcopy(pretrained), models))

    published = run(finetuned)
    with _CosinesInFloat64():
        arrays = {**state_arrays(run(finetuned), "merged"), **state_arrays(run(finetuned[:2]), "pair"),
                  **state_arrays(run(finetuned, ignored), "ignoring")}
    return {**arrays, **state_arrays(published, "float32_cosines")}


@fixture("slerp")
def slerp_reference(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module]) -> dict[str, np.ndarray]:
    """SLERP of the first two fine-tuned models: ``SlerpMergeAlgorithm.run`` at t = 0.5 (fusion_bench_config's
    method/slerp/slerp.yaml; the class has no default t) and its default DOT_THRESHOLD and epsilon
    ("merged/NAME", "default/NAME"), and at `SLERP_MIX` ("mix/NAME")."""
    from fusion_bench import BaseModelPool
    from fusion_bench.method.slerp.slerp import SlerpMergeAlgorithm

    def run(**settings: float) -> torch.nn.Module:
        pair = BaseModelPool({"task0": copy.deepcopy(finetuned[0]), "task1": copy.deepcopy(finetuned[1])})
        return SlerpMergeAlgorithm(**settings).run(pair)

    return {**state_arrays(run(t=0.5), "merged"), **state_arrays(run(**SLERP_MIX), "mix"),
            **_signature_defaults(SlerpMergeAlgorithm)}

ISO_CTS_OTHER_FRACTION = 0.5  # a second Iso-CTS run: other common / task-specific subspace sizes


def _subtracted_task_vectors(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module]
                             ) -> list[dict[str, torch.Tensor]]:
    """τ_k = θ_k − θ0 as FusionBench's TSV-M and Iso runs build them (``state_dict_sub``)."""
    from fusion_bench.utils.state_dict_arithmetic import state_dict_sub

    theta0 = pretrained.state_dict()
    return [state_dict_sub(model.state_dict(), theta0) for model in finetuned]


def _config_defaults(config: str, prefix: str = "default") -> dict[str, np.ndarray]:
    """``{prefix/FIELD: value}`` for the numeric fields of FusionBench's ``fusion_bench_config/method/CONFIG``
    (the defaults its command line runs a method with)."""
    import importlib.resources

    import yaml

    fields = yaml.safe_load((importlib.resources.files("fusion_bench_config") / "method" / config).read_text())
    return {f"{prefix}/{key}": np.asarray(value) for key, value in fields.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def _scaled_onto(pretrained: torch.nn.Module, task_vector: dict[str, torch.Tensor], scale: float,
                 prefix: str = "merged") -> dict[str, np.ndarray]:
    """``{prefix/NAME: θ0 + scale · task_vector}`` as the runs apply a merged task vector (``state_dict_mul``,
    ``state_dict_add``)."""
    from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul

    merged = state_dict_add(pretrained.state_dict(), state_dict_mul(task_vector, scale))
    return {f"{prefix}/{name}": value.detach().numpy().copy() for name, value in merged.items()}


@fixture("tsv_m")
def tsv_m_reference(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module]) -> dict[str, np.ndarray]:
    """TSV-M (Gargiulo et al., CVPR 2025) as ``TaskSingularVectorMerging.run`` does it: FusionBench's
    ``compute_and_sum_svd_mem_reduction`` on the task vectors (no excluded keys), times its config's alpha,
    added to θ0 ("merged/NAME"); the per-task task vectors it returns with ``return_single_task_models``
    ("task{t}/NAME"); the config's defaults ("default/alpha")."""
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

    defaults = _config_defaults("task_singular_vector/TaskSingularVectorMerging.yaml")
    merged, per_task = compute_and_sum_svd_mem_reduction(_subtracted_task_vectors(pretrained, finetuned),
                                                         exclude_keys=[], accelerator="cpu",
                                                         return_single_task_models=True)
    arrays = _scaled_onto(pretrained, merged, float(defaults["default/alpha"]))
    for t, task_vector in enumerate(per_task):
        arrays.update({f"task{t}/{name}": value.numpy().copy() for name, value in task_vector.items()})
    return {**arrays, **defaults}


@fixture("iso_c")
def iso_c_reference(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module]) -> dict[str, np.ndarray]:
    """Iso-C (Marczak et al., ICML 2025) as ``ISO_C_Merge.run`` does it: θ0 + scaling_factor · FusionBench's
    ``iso_c`` of the task vectors, at its config's scaling factor ("merged/NAME", "default/scaling_factor")."""
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c

    defaults = _config_defaults("isotropic_merging/iso_c.yaml")
    merged = iso_c(_subtracted_task_vectors(pretrained, finetuned), accelerator="cpu")
    return {**_scaled_onto(pretrained, merged, float(defaults["default/scaling_factor"])), **defaults}


def _iso_cts(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module], fraction: float | None = None
             ) -> dict[str, np.ndarray]:
    """θ0 + scaling_factor · FusionBench's ``iso_cts`` of the task vectors, as ``ISO_CTS_Merge.run`` does it, at
    the config's defaults or at another common-space fraction ("merged/NAME", "default/FIELD")."""
    from fusion_bench.method.isotropic_merging.iso_utils import iso_cts

    defaults = _config_defaults("isotropic_merging/iso_cts.yaml")
    chosen = float(defaults["default/common_space_fraction"]) if fraction is None else fraction
    merged = iso_cts(_subtracted_task_vectors(pretrained, finetuned), common_space_fraction=chosen, accelerator="cpu")
    return {**_scaled_onto(pretrained, merged, float(defaults["default/scaling_factor"])), **defaults}


@fixture("iso_cts")
def iso_cts_reference(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module]) -> dict[str, np.ndarray]:
    """Iso-CTS (Marczak et al., ICML 2025) at its config's defaults (`_iso_cts`)."""
    return _iso_cts(pretrained, finetuned)


@fixture("iso_cts_fraction")
def iso_cts_fraction_reference(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module]) -> dict[str, np.ndarray]:
    """Iso-CTS at common_space_fraction = `ISO_CTS_OTHER_FRACTION` (`_iso_cts`): other subspace sizes."""
    return _iso_cts(pretrained, finetuned, ISO_CTS_OTHER_FRACTION)

SURGERY_STEPS = 20  # Adam steps in the fixture (the reference's surgery_steps is 1000)
SURGERY_BATCH = 4  # images per task and step (the reference's batch_size is 16)
SURGERY_DISTINCT = 4  # distinct batches per task, cycled over the steps
SURGERY_PROJECTION = 12  # d, the visual projection's output (the representation's size)
SURGERY_BASE_SCALE = 0.3  # the base model: task arithmetic θ0 + 0.3 Σ_k τ_k


def _surgery_features(projection: torch.Tensor):
    """FusionBench's ``CLIPClassificationMixin.compute_features`` (pooled @ projection, normalised) with this
    projection: the representation Surgery works on."""
    from fusion_bench.mixins.clip_classification import CLIPClassificationMixin

    holder = type("Holder", (), {"visual_projection": torch.nn.Linear(projection.shape[1], projection.shape[0],
                                                                      bias=False)})()
    with torch.no_grad():
        holder.visual_projection.weight.copy_(projection)
    return lambda model, images: CLIPClassificationMixin.compute_features(holder, model, images)


@fixture("surgery")
def surgery_reference(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module]) -> dict[str, np.ndarray]:
    """FusionBench's SurgeryModelWrapper trained as ``CLIPLayerWiseAdaMergingSurgeryAlgorithm.run`` trains it
    (per iteration, per task: L1 between the wrapper's surgery features and the fine-tuned model's, zero_grad,
    backward, one Adam(lr 1e-3) step over all modules) on a task-arithmetic base, for SURGERY_STEPS steps.

    Saved: the images ("images" [distinct, K, B, 3, H, W], step s uses s % distinct), the projection, the
    initial modules, step 0's per-task loss and gradients, every step's losses, the final modules."""
    from transformers.models.clip import modeling_clip

    if not hasattr(modeling_clip, "CLIPVisionTransformer"):  # transformers 5 folded it into CLIPVisionModel; the
        modeling_clip.CLIPVisionTransformer = modeling_clip.CLIPVisionModel  # wrapper imports it for type hints only
    from fusion_bench.models.surgery.surgerymodelwrapper import SurgeryModelWrapper

    generator = torch.Generator().manual_seed(5)
    size, width = pretrained.config.image_size, pretrained.config.hidden_size
    projection = torch.randn(SURGERY_PROJECTION, width, generator=generator, dtype=torch.float64) / width ** 0.5
    images = torch.randn(SURGERY_DISTINCT, NUM_TASKS, SURGERY_BATCH, 3, size, size, generator=generator,
                         dtype=torch.float64)
    base = copy.deepcopy(pretrained)
    with torch.no_grad():
        for name, tensor in base.named_parameters():
            theta0 = dict(pretrained.named_parameters())[name]
            tensor.copy_(theta0 + SURGERY_BASE_SCALE * sum(dict(m.named_parameters())[name] - theta0 for m in finetuned))
    features = _surgery_features(projection)
    names = [f"task{k}" for k in range(NUM_TASKS)]
    torch.manual_seed(6)
    wrapper = SurgeryModelWrapper(base, names, projection_dim=SURGERY_PROJECTION)
    for model in finetuned:
        model.requires_grad_(False)

    def modules(prefix: str) -> dict[str, np.ndarray]:
        params = [p.detach().numpy().copy() for p in wrapper.collect_trainable_params()]
        return {f"{prefix}/down": np.stack(params[0::2]), f"{prefix}/up": np.stack(params[1::2])}

    arrays = {"images": images.numpy(), "projection": projection.numpy(), **modules("initial")}
    optimizer = torch.optim.Adam(wrapper.collect_trainable_params(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    losses = np.zeros((SURGERY_STEPS, NUM_TASKS))
    for step in range(SURGERY_STEPS):
        for task, name in enumerate(names):
            batch = images[step % SURGERY_DISTINCT, task]
            target = features(finetuned[task], batch)
            moved, _, _ = wrapper.compute_surgery_features(lambda model: features(model, batch), name)
            loss = torch.nn.functional.l1_loss(moved, target)
            optimizer.zero_grad()
            loss.backward()
            if step == 0:
                down, up = (getattr(wrapper, f"feature_mapping_to_head_{part}_proj_{name}").weight.grad
                            for part in ("down", "up"))
                arrays[f"step0_grad/down/{task}"] = down.numpy().copy()
                arrays[f"step0_grad/up/{task}"] = up.numpy().copy()
            optimizer.step()
            losses[step, task] = loss.item()
    arrays["losses"] = losses
    arrays.update(modules("final"))
    return arrays


WE_MOE_STEPS = 20  # Adam steps in the fixture (the reference's max_steps is 1000)
WE_MOE_LR = 1e-3  # larger than the reference's 1e-4, so that 20 steps move the routers visibly
WE_MOE_CLASSES = 5  # classes of each task's zero-shot head
WE_MOE_LOGIT_SCALE = 100.0  # exp(logit_scale) of CLIP


def _task_arithmetic_merge(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module], scaling_factor: float
                           ) -> torch.nn.Module:
    """θ0 + s Σ_k (θ_k − θ0) into `pretrained`, with FusionBench's state-dict arithmetic on plain tensors: 0.2.33's
    ``task_arithmetic_merge`` reads the state dicts with keep_vars=True, and its type check then refuses to add
    its Tensor task vector to the Parameters of θ0 (a TypeError for every model)."""
    from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub

    theta0 = pretrained.state_dict()
    vectors = [state_dict_sub(model.state_dict(), theta0) for model in finetuned]
    total = vectors[0]
    for vector in vectors[1:]:
        total = state_dict_add(total, vector)
    pretrained.load_state_dict(state_dict_add(theta0, state_dict_mul(total, scaling_factor)))
    return pretrained


class _VisionHolder(torch.nn.Module):
    """A CLIPVisionModel under ``.vision_model``, where FusionBench's WEMoE looks for the encoder (transformers 5
    folded that level into CLIPVisionModel itself)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.vision_model = model

    def forward(self, images: torch.Tensor):
        return self.vision_model(images)


@fixture("we_moe")
def we_moe_reference(pretrained: torch.nn.Module, finetuned: list[torch.nn.Module]) -> dict[str, np.ndarray]:
    """FusionBench's WEMoE: the model ``CLIPWeightEnsemblingMoEAlgorithm.construct_moe_model`` builds
    (init_lambda 0.3, 2-layer routers, batch_reduce; every MLP upscaled; its task-arithmetic base made by
    `_task_arithmetic_merge`) trained as ``test_time_adaptation``
    trains it with use_grad_accumulate (per task: ``compute_logits``, ``entropy_loss``, backward; then one
    Adam step), for WE_MOE_STEPS steps on random zero-shot heads.

    Saved: images ("images" [distinct, K, B, 3, H, W], step s uses s % distinct), the projection, the heads
    (normalised text embeddings [K, C, D]), the initial routers ("initial/LAYER/fc1.weight", ...), step 0's
    per-example routing weights ("step0_routing" [K, L, B, K]: each router's output averaged over the tokens),
    every step's per-task losses, the final routers, and the trained model's per-example-routed logits of step
    0's batches ("final_logits" [K, B, C])."""
    from unittest import mock

    from omegaconf import DictConfig
    from fusion_bench.method.we_moe import clip_we_moe
    from fusion_bench.method.we_moe.clip_we_moe import CLIPWeightEnsemblingMoEAlgorithm
    from fusion_bench.method.we_moe.we_moe import entropy_loss

    generator = torch.Generator().manual_seed(7)
    size, width = pretrained.config.image_size, pretrained.config.hidden_size
    projection = torch.randn(SURGERY_PROJECTION, width, generator=generator, dtype=torch.float64) / width ** 0.5
    images = torch.randn(SURGERY_DISTINCT, NUM_TASKS, SURGERY_BATCH, 3, size, size, generator=generator,
                         dtype=torch.float64)
    text = torch.randn(NUM_TASKS, WE_MOE_CLASSES, SURGERY_PROJECTION, generator=generator, dtype=torch.float64)
    text = text / text.norm(dim=-1, keepdim=True)
    names = [f"task{k}" for k in range(NUM_TASKS)]
    pool = {name: _VisionHolder(model) for name, model in zip(["_pretrained_", *names], [pretrained, *finetuned])}
    algorithm = object.__new__(CLIPWeightEnsemblingMoEAlgorithm)
    algorithm.config = DictConfig(dict(init_lambda=0.3, router_hidden_layers=2, batch_reduce=True))
    algorithm.modelpool = type("Pool", (), {"model_names": names,
                                            "load_model": staticmethod(lambda name: copy.deepcopy(pool[name]))})()
    torch.manual_seed(8)
    with mock.patch.object(clip_we_moe, "task_arithmetic_merge", _task_arithmetic_merge):
        model = algorithm.construct_moe_model()
    algorithm.visual_projection = torch.nn.Linear(width, SURGERY_PROJECTION, bias=False)
    with torch.no_grad():
        algorithm.visual_projection.weight.copy_(projection)
    algorithm.zeroshot_weights = dict(zip(names, text))
    algorithm.logit_scale_exp = torch.tensor(WE_MOE_LOGIT_SCALE, dtype=torch.float64)
    layers = model.vision_model.encoder.layers
    assert all(isinstance(layer.mlp, clip_we_moe.WeightEnsemblingMoE) for layer in layers)

    def routers(prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}/{index}/{name}": value.detach().numpy().copy()
                for index, layer in enumerate(layers) for name, value in layer.mlp.gate.named_parameters()}

    arrays = {"images": images.numpy(), "projection": projection.numpy(), "heads": text.numpy(),
              **routers("initial")}
    gate_outputs: list[torch.Tensor] = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda module, inputs, output: gate_outputs.append(output.mean(1)))
             for layer in layers]
    for task, name in enumerate(names):
        with torch.no_grad():
            algorithm.compute_logits(model, (images[0, task], None), name)
    arrays["step0_routing"] = torch.stack(gate_outputs).reshape(NUM_TASKS, len(layers), SURGERY_BATCH, -1).numpy()
    for hook in hooks:
        hook.remove()
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=WE_MOE_LR)
    losses = np.zeros((WE_MOE_STEPS, NUM_TASKS))
    for step in range(WE_MOE_STEPS):
        for task, name in enumerate(names):
            loss = entropy_loss(algorithm.compute_logits(model, (images[step % SURGERY_DISTINCT, task], None), name))
            loss.backward(retain_graph=True)
            losses[step, task] = loss.item()
        optimizer.step()
        optimizer.zero_grad()
    arrays["losses"] = losses
    arrays.update(routers("final"))
    for layer in layers:
        layer.mlp.batch_reduce = False
    with torch.no_grad():
        arrays["final_logits"] = torch.stack([algorithm.compute_logits(model, (images[0, task], None), name)
                                              for task, name in enumerate(names)]).numpy()
    return arrays


# --- end of method fixtures ---


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "methods"))
    parser.add_argument("--only", nargs="*", help="make only these methods' fixtures (and models.npz)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_default_dtype(torch.float64)
    pretrained = tiny_clip_vision()
    finetuned = finetuned_copies(pretrained)
    models = state_arrays(pretrained, "pretrained")
    for k, model in enumerate(finetuned):
        models.update(state_arrays(model, f"task{k}"))
    np.savez_compressed(os.path.join(args.out, "models.npz"), **models)
    for name, make in FIXTURES.items():
        if args.only and name not in args.only:
            continue
        arrays = make(copy.deepcopy(pretrained), [copy.deepcopy(m) for m in finetuned])
        np.savez_compressed(os.path.join(args.out, f"{name}.npz"), **arrays)
        print(f"wrote {name}.npz ({len(arrays)} arrays)")


if __name__ == "__main__":
    main()
