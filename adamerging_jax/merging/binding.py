"""The CLIP binding of the ``merge`` command: θ0 and the fine-tuned image towers, the zero-shot heads built
from the pretrained text tower with each task's class names and templates, and the `ModelBinding` that tells
the core CLIP's ``apply_fn``, its stacked layers and its HF tensor names (`clip_binding`, also the binding of
the paper's experiments, `adamerging_jax.paper.models`).

    logits_t(x) = exp(s) · n(f_θ(x) W) · n(h_t,c)ᵀ,  h_t,c = n(mean_j n(g(template_j(c))))   (Radford et al. 2021)

The representation (``features_fn``, for Surgery) is z = n(f_θ(x) W), FusionBench's ``compute_features``; the
head after it is z ↦ exp(s) · z · n(h_t,c)ᵀ.

f_θ the merged image tower, W the pretrained visual projection, g the pretrained text encoder; only f_θ's
parameters are merged (τ_k = θ_k − θ0 over the image tower).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from adamerging_jax.cache import cache_dir
from adamerging_jax.core.binding import ModelBinding
from adamerging_jax.heads import zero_shot
from adamerging_jax.merging.schema import MergeConfig, TaskConfig
from adamerging_jax.models import clip
from adamerging_jax.models.clip_checkpoint import (
    ClipTowers,
    StreamedTowers,
    coefficient_tensor_names,
    load_clip_towers,
    official_coefficient_rows,
    open_clip_towers,
)

Params = dict[str, Any]


def load_towers(config: MergeConfig, log: Callable[[str], None] = print) -> ClipTowers:
    """Load θ0 (and the text side) and every task's fine-tuned tower; each tower must have θ0's config."""
    return load_clip_towers(config.pretrained, [(task.name, task.finetuned) for task in config.tasks],
                            pretrained_vision=config.pretrained_vision, trust_pickle=config.trust_pickle,
                            allow_download=not config.offline, log=log)


def open_towers(config: MergeConfig, log: Callable[[str], None] = print) -> StreamedTowers:
    """`load_towers` from the safetensors headers, for a merge streamed from disk: nothing loaded."""
    return open_clip_towers(config.pretrained, [(task.name, task.finetuned) for task in config.tasks],
                            pretrained_vision=config.pretrained_vision, allow_download=not config.offline, log=log)


def templates_of(task: TaskConfig) -> list[str]:
    """The task's templates with ``{}`` as the heads module spells the class slot, or CLIP's defaults."""
    if task.templates is None:
        return list(zero_shot.DEFAULT_TEMPLATES)
    return [template.replace("{}", zero_shot.PLACEHOLDER) for template in task.templates]


class TaskHeads:
    """The tasks' zero-shot heads [C, D] from the pretrained text tower, built by `build` (text-encoder
    compute, so not in a dry run) and cached under ``cache_dir("heads")`` by class names, templates and model.
    ``heads[t]`` is task t's head once built."""

    def __init__(self, towers: ClipTowers, tasks: Sequence[TaskConfig], model_id: str):
        self.towers, self.tasks = towers, list(tasks)
        self.model_id = os.path.abspath(model_id) if os.path.exists(model_id) else model_id
        self._heads: list[jnp.ndarray] | None = None

    def build(self, log: Callable[[str], None] = print) -> None:
        build = zero_shot.head_builder(self.towers.full, self.towers.config, self.towers.tokenizer_dir)
        heads = []
        for task in self.tasks:
            templates = templates_of(task)

            def make(task: TaskConfig = task, templates: list[str] = templates) -> np.ndarray:
                log(f"[models] {task.name}: zero-shot head, {len(task.classes)} classes x {len(templates)} templates")
                return build(task.classes, templates)

            path = zero_shot.head_cache_path(cache_dir("heads") / "merge", self.model_id, task.name)
            heads.append(jnp.asarray(zero_shot.cached_head(path, task.classes, templates, self.model_id, make)))
        self._heads = heads

    def __getitem__(self, task: int) -> jnp.ndarray:
        if self._heads is None:
            raise RuntimeError("the zero-shot heads are not built yet: call TaskHeads.build() first")
        return self._heads[task]


def clip_binding(config: clip.ClipConfig, heads: TaskHeads | Sequence[jnp.ndarray] | None = None,
                 projection: Any = None) -> ModelBinding:
    """The image tower with the pretrained ``projection`` ([W, D] kernel) and the frozen zero-shot ``heads``
    (task t's head [C, D] is ``heads[t]``: the merge command's `TaskHeads`, built when the run starts, or the
    paper's list of heads), CLIP's stacked layers and matrix view, the HF ``CLIPVisionModel`` tensor names of
    its entries and the rows of the official λ files. The one CLIP binding of the ``merge`` command and the
    paper's experiments. Without heads (a merge streamed from disk, which scores nothing) the model's
    functions are not to be run: the binding serves its names and view."""
    names = coefficient_tensor_names(config)
    projection = None if projection is None else jnp.asarray(projection)
    encoder = clip.image_encoder(config, projection)
    model = zero_shot.zero_shot_model(encoder, heads)
    return ModelBinding(apply_fn=model.apply_fn, stacked=clip.stacked, tensor_names=names, tensor_order=names.order,
                        matrix_view=clip.matrix_view, official_rows=official_coefficient_rows(config),
                        gram_fn=clip.vision_grams(config), features_fn=model.features_fn,
                        head_fn=model.head_fn, mixture=clip.expert_mixture(config, projection))
