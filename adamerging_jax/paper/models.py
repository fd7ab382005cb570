"""The models of the experiments: θ0 and the fine-tuned CLIP image towers, the zero-shot heads, and the
`ModelBinding` that puts them together.

θ0, the visual projection and the text tower come from one full HF CLIP (``openai/clip-vit-*``); each task's
fine-tuned image tower from an HF ``CLIPVisionModel`` (FusionBench's ``tanganke/clip-vit-*_<task>``) or an
open_clip state dict.  Heads are the zero-shot heads of the pretrained text tower (task_vectors' class names
and templates), cached on disk.  The binding (``ClipModels.binding``) is the merge command's,
`merging.binding.clip_binding`: its ``apply_fn`` a :class:`~adamerging_jax.SharedBackbone` (all tasks share the
image tower, so AdaMerging sends all tasks' batches through one forward), CLIP's stacked layers and matrix
view, the Gram capture (RegMean), the split into the normalised image embedding and the head (Surgery) and the
weight-ensembling MoE form (WEMoE).
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.binding import ModelBinding
from adamerging_jax.heads import zero_shot
from adamerging_jax.merging.binding import clip_binding
from adamerging_jax.models import clip
from adamerging_jax.models.clip_checkpoint import load_clip_towers
from adamerging_jax.paper.settings import Checkpoints
from adamerging_jax.paper.tasks import paper_task

Params = dict[str, Any]


@dataclasses.dataclass
class ClipModels:
    """θ0's image tower, the fine-tuned towers of the merged tasks, and one zero-shot head per evaluated task."""

    config: clip.ClipConfig
    pretrained: Params
    finetuned: list[Params]
    visual_projection: np.ndarray
    heads: list[np.ndarray]

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def binding(self) -> ModelBinding:
        """The merge command's CLIP binding (`clip_binding`) of the tower with the evaluated tasks' heads:
        ``apply_fn(vision_params, images, task) -> logits`` with head ``task``, its stacked layers, matrix
        view, Gram capture, representation and head (Surgery) and MoE form (WEMoE)."""
        return clip_binding(self.config, [jnp.asarray(h) for h in self.heads], self.visual_projection)


def checkpoint_location(template: str, task: str) -> str:
    """``template`` with ``{task}`` (FusionBench/head name) and ``{dataset}`` (task_vectors name) filled in."""
    spec = paper_task(task)
    unknown = set(re.findall(r"{(\w*)}", template)) - {"task", "dataset"}
    if unknown:
        raise ValueError(f"checkpoint template {template!r}: unknown placeholders {sorted(unknown)} "
                         "(use {task} or {dataset})")
    return template.replace("{task}", spec.head).replace("{dataset}", spec.dataset)


def load_models(checkpoints: Checkpoints, merge_tasks: Sequence[str], eval_tasks: Sequence[str],
                head_cache: str | None, log: Callable[[str], None] = print) -> ClipModels:
    """Load θ0, the merged tasks' fine-tuned towers and the evaluated tasks' heads (built once, then cached)."""
    towers = load_clip_towers(
        checkpoints.pretrained, [(task, checkpoint_location(checkpoints.finetuned, task)) for task in merge_tasks],
        pretrained_vision=checkpoints.pretrained_vision, trust_pickle=checkpoints.trust_pickle,
        allow_download=checkpoints.allow_download, log=log)
    build = zero_shot.head_builder(towers.full, towers.config, towers.tokenizer_dir)
    heads = [task_head(build, checkpoints, task, head_cache, log) for task in eval_tasks]
    return ClipModels(towers.config, towers.pretrained, towers.finetuned,
                      np.asarray(towers.full["visual_projection"]["kernel"]), heads)


def task_head(build: Callable[[Sequence[str], Sequence[str]], np.ndarray], checkpoints: Checkpoints, task: str,
              cache: str | None, log: Callable[[str], None] = print) -> np.ndarray:
    """Task ``task``'s zero-shot head [C, D] (task_vectors' class names and templates) from `build`
    (`zero_shot.head_builder` of the pretrained CLIP), cached under ``cache/heads``."""
    classnames, templates = zero_shot.task_prompts(paper_task(task).head)

    def make() -> np.ndarray:
        log(f"[models] {task}: zero-shot head, {len(classnames)} classes x {len(templates)} templates")
        return build(classnames, templates)

    if cache is None:
        return make()
    model_id = checkpoints.pretrained
    model_id = os.path.abspath(model_id) if os.path.exists(model_id) else model_id
    path = zero_shot.head_cache_path(os.path.join(cache, "heads"), model_id, paper_task(task).head)
    return zero_shot.cached_head(path, classnames, templates, model_id, make)
