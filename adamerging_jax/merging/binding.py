"""The CLIP binding of the ``merge`` command: θ0 and the fine-tuned image towers, the zero-shot heads built
from the pretrained text tower with each task's class names and templates, and the `ModelBinding` that tells
the core CLIP's ``apply_fn``, its stacked layers and its HF tensor names.

    logits_t(x) = exp(s) · n(f_θ(x) W) · n(h_t,c)ᵀ,  h_t,c = n(mean_j n(g(template_j(c))))   (Radford et al. 2021)

f_θ the merged image tower, W the pretrained visual projection, g the pretrained text encoder; only f_θ's
parameters are merged (τ_k = θ_k − θ0 over the image tower).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from adamerging_jax.cache import cache_dir
from adamerging_jax.core.binding import ModelBinding
from adamerging_jax.core.objective import SharedBackbone
from adamerging_jax.heads import zero_shot
from adamerging_jax.merging.config import MergeConfig, TaskConfig
from adamerging_jax.models import clip
from adamerging_jax.models.clip_checkpoint import lambda_tensor_names, resolve_checkpoint
from adamerging_jax.paper.models import PROMPT_ROWS, load_image_tower, padded_rows
from adamerging_jax.paper.settings import Checkpoints

Params = dict[str, Any]


@dataclasses.dataclass
class ClipTowers:
    """The loaded checkpoints: ``full`` the pretrained CLIP tree (text tower, projections, logit_scale),
    ``pretrained`` θ0's image tower, ``finetuned`` one image tower per task, ``tokenizer_dir`` the folder
    holding the pretrained CLIP's tokenizer files."""

    config: clip.ClipConfig
    full: Params
    pretrained: Params
    finetuned: list[Params]
    tokenizer_dir: str


def _checkpoints(config: MergeConfig) -> Checkpoints:
    return Checkpoints(pretrained=config.pretrained, finetuned=config.pretrained,
                       pretrained_vision=config.pretrained_vision, trust_pickle=config.trust_pickle,
                       allow_download=not config.offline)


def _same_tower(found: clip.ClipConfig, reference: clip.ClipConfig, what: str, location: str) -> None:
    if found.vision != reference.vision:
        raise ValueError(f"{what} {location!r} has image tower {found.vision}, the pretrained CLIP has "
                         f"{reference.vision}")


def load_towers(config: MergeConfig, log: Callable[[str], None] = print) -> ClipTowers:
    """Load θ0 (and the text side) and every task's fine-tuned tower; each tower must have θ0's config."""
    checkpoints = _checkpoints(config)
    log(f"[models] pretrained CLIP {config.pretrained}")
    clip_config, full = load_image_tower(config.pretrained, checkpoints, "pretrained")
    if clip_config.text is None or "text" not in full or "visual_projection" not in full:
        raise ValueError(f"pretrained {config.pretrained!r} is not a full CLIPModel (no text tower or visual "
                         "projection): the zero-shot heads need one, e.g. openai/clip-vit-base-patch32")
    pretrained = full["vision"]
    if config.pretrained_vision:
        log(f"[models] θ0 image tower {config.pretrained_vision}")
        found, tower = load_image_tower(config.pretrained_vision, checkpoints, "pretrained_vision")
        _same_tower(found, clip_config, "pretrained_vision", config.pretrained_vision)
        pretrained = tower["vision"]
    finetuned = []
    for task in config.tasks:
        log(f"[models] {task.name}: fine-tuned image tower {task.finetuned}")
        found, tower = load_image_tower(task.finetuned, checkpoints, f"task {task.name!r} finetuned")
        _same_tower(found, clip_config, f"task {task.name!r} finetuned", task.finetuned)
        finetuned.append(tower["vision"])
    directory = resolve_checkpoint(config.pretrained, allow_download=not config.offline)
    directory = directory if os.path.isdir(directory) else os.path.dirname(directory)
    return ClipTowers(clip_config, full, pretrained, finetuned, directory)


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
        towers = self.towers
        tokenizer = zero_shot.load_tokenizer(towers.tokenizer_dir)
        encode = padded_rows(zero_shot.clip_text_encoder(towers.full, towers.config), PROMPT_ROWS)
        folder = re.sub(r"[^\w.-]+", "_", self.model_id.strip("/"))[-80:]
        heads = []
        for task in self.tasks:
            templates = templates_of(task)

            def make(task: TaskConfig = task, templates: list[str] = templates) -> np.ndarray:
                log(f"[models] {task.name}: zero-shot head, {len(task.classes)} classes x {len(templates)} templates")
                return zero_shot.zero_shot_head(encode, tokenizer, task.classes, templates,
                                                float(towers.full["logit_scale"]), towers.config.text.context_length)

            name = re.sub(r"[^\w.-]+", "_", task.name) + ".npz"
            path = os.path.join(cache_dir("heads"), "merge", folder, name)
            heads.append(jnp.asarray(zero_shot.cached_head(path, task.classes, templates, self.model_id, make)))
        self._heads = heads

    def __getitem__(self, task: int) -> jnp.ndarray:
        if self._heads is None:
            raise RuntimeError("the zero-shot heads are not built yet: call TaskHeads.build() first")
        return self._heads[task]


def clip_binding(towers: ClipTowers, heads: TaskHeads) -> ModelBinding:
    """The image tower with the pretrained projection and the frozen zero-shot heads, CLIP's stacked
    layers and the HF ``CLIPVisionModel`` tensor names of its entries."""
    names = lambda_tensor_names(towers.config)
    apply_fn = SharedBackbone(
        features=clip.image_encoder(towers.config, jnp.asarray(towers.full["visual_projection"]["kernel"])),
        head=lambda features, task: zero_shot.zero_shot_logits(features, heads[task]),
    )
    return ModelBinding(apply_fn=apply_fn, stacked=clip.stacked, tensor_names=names, tensor_order=names.order)
