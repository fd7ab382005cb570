"""The models of the experiments: θ0 and the fine-tuned CLIP image towers, the zero-shot heads, and the
``apply_fn`` that puts them together.

θ0, the visual projection and the text tower come from one full HF CLIP (``openai/clip-vit-*``); each task's
fine-tuned image tower from an HF ``CLIPVisionModel`` (FusionBench's ``tanganke/clip-vit-*_<task>``) or an
open_clip state dict.  Heads are the zero-shot heads of the pretrained text tower (task_vectors' class names
and templates), cached on disk.  All tasks share the image tower, so ``apply_fn`` is a
:class:`~adamerging_jax.SharedBackbone`: AdaMerging sends all tasks' batches through one forward.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.objective import SharedBackbone
from adamerging_jax.heads import zero_shot
from adamerging_jax.models import clip
from adamerging_jax.models.clip_checkpoint import (
    load_hf_clip,
    load_open_clip_checkpoint,
    resolve_checkpoint,
)
from adamerging_jax.paper.settings import Checkpoints
from adamerging_jax.paper.tasks import paper_task

Params = dict[str, Any]
OPEN_CLIP_SUFFIXES = (".pt", ".pth", ".bin")


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

    def apply_fn(self) -> SharedBackbone:
        """``apply_fn(vision_params, images, task) -> logits`` of the tower with head ``task``."""
        heads = [jnp.asarray(h) for h in self.heads]
        return SharedBackbone(
            features=clip.image_encoder(self.config, jnp.asarray(self.visual_projection)),
            head=lambda features, task: zero_shot.zero_shot_logits(features, heads[task]),
        )


def checkpoint_location(template: str, task: str) -> str:
    """``template`` with ``{task}`` (FusionBench/head name) and ``{dataset}`` (task_vectors name) filled in."""
    spec = paper_task(task)
    unknown = set(re.findall(r"{(\w*)}", template)) - {"task", "dataset"}
    if unknown:
        raise ValueError(f"checkpoint template {template!r}: unknown placeholders {sorted(unknown)} "
                         "(use {task} or {dataset})")
    return template.replace("{task}", spec.head).replace("{dataset}", spec.dataset)


def load_image_tower(location: str, checkpoints: Checkpoints, what: str) -> tuple[clip.ClipConfig, Params]:
    """(config, {"vision", maybe "visual_projection"}) from an HF directory/id or an open_clip state dict."""
    try:
        if location.endswith(OPEN_CLIP_SUFFIXES):
            return load_open_clip_checkpoint(location, trust_pickle=checkpoints.trust_pickle)
        return load_hf_clip(location, allow_download=checkpoints.allow_download)
    except OSError as error:
        raise FileNotFoundError(f"{what}: cannot load {location!r}: {error}") from error
    except (KeyError, ValueError) as error:
        raise ValueError(f"{what}: cannot load {location!r}: {error}") from error


def _same_tower(config: clip.ClipConfig, reference: clip.ClipConfig, what: str, location: str) -> None:
    if config.vision != reference.vision:
        raise ValueError(f"{what} ({location!r}) has image tower {config.vision}, θ0 has {reference.vision}")


def load_models(checkpoints: Checkpoints, merge_tasks: Sequence[str], eval_tasks: Sequence[str],
                head_cache: str | None, log: Callable[[str], None] = print) -> ClipModels:
    """Load θ0, the merged tasks' fine-tuned towers and the evaluated tasks' heads (built once, then cached)."""
    log(f"[models] pretrained CLIP {checkpoints.pretrained}")
    config, full = load_image_tower(checkpoints.pretrained, checkpoints, "pretrained CLIP")
    if config.text is None or "text" not in full:
        raise ValueError(f"pretrained CLIP {checkpoints.pretrained!r} has no text tower: the zero-shot heads need a "
                         "full CLIPModel checkpoint (e.g. openai/clip-vit-base-patch32)")
    pretrained = full["vision"]
    if checkpoints.pretrained_vision:
        log(f"[models] θ0 image tower {checkpoints.pretrained_vision}")
        vision_config, tower = load_image_tower(checkpoints.pretrained_vision, checkpoints, "pretrained image tower")
        _same_tower(vision_config, config, "pretrained image tower", checkpoints.pretrained_vision)
        pretrained = tower["vision"]
    finetuned = []
    for task in merge_tasks:
        location = checkpoint_location(checkpoints.finetuned, task)
        log(f"[models] {task}: fine-tuned image tower {location}")
        task_config, tower = load_image_tower(location, checkpoints, f"task {task!r} fine-tuned tower")
        _same_tower(task_config, config, f"task {task!r} fine-tuned tower", location)
        finetuned.append(tower["vision"])
    heads = [task_head(full, config, checkpoints, task, head_cache, log) for task in eval_tasks]
    return ClipModels(config, pretrained, finetuned, np.asarray(full["visual_projection"]["kernel"]), heads)


PROMPT_ROWS = 32
"""Prompts per text-encoder call: every task's templates (1 to 18 of them) fit, so one compiled encoder serves all."""


def padded_rows(encode: Callable[[np.ndarray], Any], rows: int) -> Callable[[np.ndarray], Any]:
    """``encode`` called on ``ids`` padded (with copies of its first row) to a multiple of ``rows`` rows, the
    padding's outputs dropped: the same result, one compiled shape for every number of templates."""

    def padded(ids: np.ndarray) -> Any:
        count = len(ids)
        extra = -count % rows
        return encode(np.concatenate([ids, np.repeat(ids[:1], extra, axis=0)]) if extra else ids)[:count]

    return padded


def task_head(full: Params, config: clip.ClipConfig, checkpoints: Checkpoints, task: str, cache: str | None,
              log: Callable[[str], None] = print) -> np.ndarray:
    """Task ``task``'s zero-shot head [C, D] from the pretrained CLIP's text tower (cached under ``cache``)."""
    classnames, templates = zero_shot.task_prompts(paper_task(task).head)

    def build() -> np.ndarray:
        log(f"[models] {task}: zero-shot head, {len(classnames)} classes x {len(templates)} templates")
        directory = resolve_checkpoint(checkpoints.pretrained, allow_download=checkpoints.allow_download)
        directory = directory if os.path.isdir(directory) else os.path.dirname(directory)
        tokenizer = zero_shot.load_tokenizer(directory)
        encode = padded_rows(zero_shot.clip_text_encoder(full, config), PROMPT_ROWS)
        return zero_shot.zero_shot_head(encode, tokenizer, classnames, templates, float(full["logit_scale"]),
                                        config.text.context_length)

    if cache is None:
        return build()
    model_id = checkpoints.pretrained
    if os.path.exists(model_id):
        model_id = os.path.abspath(model_id)
    folder = re.sub(r"[^\w.-]+", "_", model_id.strip("/"))[-80:]
    path = os.path.join(cache, "heads", folder, f"{paper_task(task).head}.npz")
    return zero_shot.cached_head(path, classnames, templates, model_id, build)
