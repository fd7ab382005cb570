"""CLIP zero-shot classification heads (Radford et al., 2021; as task_vectors / AdaMerging build them).

For class c with prompts t_1..t_T (a template applied to the class name) and the text encoder g:

    e_ct = g(t(c)) / ‖g(t(c))‖,    m_c = mean_t e_ct,    w_c = exp(logit_scale) · m_c / ‖m_c‖

The head is W = [w_1; ...; w_C] ∈ R^{C×D}; an image feature f is L2-normalised and logits = W f / ‖f‖ (no
bias). The heads of the paper's 8 tasks use the class names and templates of mlfoundations/task_vectors
(``clip_tasks.json`` beside this file); any task works given its class names and templates, and
``DEFAULT_TEMPLATES`` (CLIP's short ImageNet prompt list) serves class names that come without templates:

    head = clip_zero_shot_head(params, config, load_tokenizer(checkpoint_dir), ["cat", "dog"], DEFAULT_TEMPLATES)
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from functools import lru_cache
from importlib import resources
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adamerging_jax.core.checkpoint import write_npz_atomic
from adamerging_jax.core.objective import SharedBackbone
from adamerging_jax.models.clip import ClipConfig, encode_text, l2_normalize

PLACEHOLDER = "{c}"


# ------------------------------------------------------------------------------------- tasks and prompts


@lru_cache(maxsize=1)
def _task_table() -> dict[str, dict[str, list[str]]]:
    with resources.files("adamerging_jax.heads").joinpath("clip_tasks.json").open(encoding="utf-8") as f:
        return json.load(f)["tasks"]


# Templates for a user's own class names: CLIP's default prompt "a photo of a {c}." (Radford et al., 2021, §3.1.4)
# and the 7 of its 80 ImageNet templates that OpenAI's prompt-engineering notebook found to ensemble best.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "itap of a {c}.",
    "a bad photo of the {c}.",
    "a origami {c}.",
    "a photo of the large {c}.",
    "a {c} in a video game.",
    "art of the {c}.",
    "a photo of the small {c}.",
)


def task_names() -> list[str]:
    """The tasks with packaged class names and templates: sun397, stanford-cars, resisc45, eurosat, svhn,
    gtsrb, mnist, dtd (FusionBench's names)."""
    return list(_task_table())


def task_prompts(task: str) -> tuple[list[str], list[str]]:
    """(class names, templates) of a packaged task; templates hold ``{c}`` where the class name goes."""
    table = _task_table()
    if task not in table:
        raise ValueError(f"no packaged class names for task {task!r}; known: {sorted(table)}")
    return list(table[task]["classnames"]), list(table[task]["templates"])


def prompts(classname: str, templates: Sequence[str]) -> list[str]:
    """Each template with ``{c}`` replaced by the class name."""
    for template in templates:
        if PLACEHOLDER not in template:
            raise ValueError(f"template {template!r} has no {PLACEHOLDER} placeholder for the class name")
    return [template.replace(PLACEHOLDER, classname) for template in templates]


# ----------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(directory: str) -> Any:
    """transformers' ``CLIPTokenizer`` of a local CLIP checkpoint folder (never the hub).

    Reads either layout ``CLIPTokenizer.from_pretrained`` knows: ``vocab.json`` + ``merges.txt`` (the
    openai/clip-vit-* folders) or ``tokenizer.json`` (+ ``tokenizer_config.json``), which transformers 5's
    ``save_pretrained`` writes.
    """
    from transformers import CLIPTokenizer

    def present(name: str) -> bool:
        return os.path.isfile(os.path.join(directory, name))

    if not ((present("vocab.json") and present("merges.txt")) or present("tokenizer.json")):
        raise FileNotFoundError(f"CLIP tokenizer: {directory!r} holds neither vocab.json + merges.txt nor "
                                f"tokenizer.json")
    return CLIPTokenizer.from_pretrained(directory, local_files_only=True)


def tokenize(tokenizer: Any, texts: Sequence[str], context_length: int) -> np.ndarray:
    """[N, context_length] int32 ids: <|startoftext|> text <|endoftext|>, truncated, padded after the EOS."""
    ids = tokenizer(list(texts), padding="max_length", max_length=context_length, truncation=True,
                    return_tensors="np")["input_ids"].astype(np.int32)
    if not (ids == tokenizer.eos_token_id).any(axis=1).all():
        raise ValueError("tokenizer output lacks an end-of-text token; is the vocabulary empty?")
    return ids


# ---------------------------------------------------------------------------------------------- heads


def zero_shot_head(encode: Callable[[np.ndarray], jax.Array], tokenizer: Any, classnames: Sequence[str],
                   templates: Sequence[str], logit_scale: float, context_length: int) -> np.ndarray:
    """[C, D] head: per class, the renormalised mean of the normalised prompt embeddings, × exp(logit_scale).

    ``encode(token_ids [T, S]) -> [T, D]`` is the projected text encoder (e.g. :func:`clip_text_encoder`).
    """
    if not classnames:
        raise ValueError("zero-shot head needs at least one class name")
    rows = []
    for classname in classnames:
        embeds = l2_normalize(jnp.asarray(encode(tokenize(tokenizer, prompts(classname, templates),
                                                           context_length))))
        rows.append(l2_normalize(embeds.mean(axis=0)))
    return np.asarray(jnp.stack(rows) * jnp.exp(logit_scale), dtype=np.float32)


def clip_text_encoder(params: dict, config: ClipConfig) -> Callable[[np.ndarray], jax.Array]:
    """jit-compiled ``token_ids -> text embeds`` of a CLIP parameter tree (text tower + text projection)."""
    encode = jax.jit(lambda p, ids: encode_text(p, ids, config))
    text_params = {"text": params["text"], "text_projection": params["text_projection"]}
    return lambda token_ids: encode(text_params, token_ids)


def clip_zero_shot_head(params: dict, config: ClipConfig, tokenizer: Any, classnames: Sequence[str],
                        templates: Sequence[str]) -> np.ndarray:
    """The zero-shot head of a CLIP parameter tree (its text tower, projection and logit_scale)."""
    if config.text is None or "text" not in params:
        raise ValueError("zero-shot heads need a full CLIP checkpoint (text tower), not a vision tower alone")
    return zero_shot_head(clip_text_encoder(params, config), tokenizer, classnames, templates,
                          float(params["logit_scale"]), config.text.context_length)



PROMPT_ROWS = 32
"""Prompts per text-encoder call: every task's templates (1 to 18 of them) fit, so one compiled encoder serves all."""


def padded_rows(encode: Callable[[np.ndarray], Any], rows: int = PROMPT_ROWS) -> Callable[[np.ndarray], Any]:
    """``encode`` called on ``ids`` padded (with copies of its first row) to a multiple of ``rows`` rows, the
    padding's outputs dropped: the same result, one compiled shape for every number of templates."""

    def padded(ids: np.ndarray) -> Any:
        count = len(ids)
        extra = -count % rows
        return encode(np.concatenate([ids, np.repeat(ids[:1], extra, axis=0)]) if extra else ids)[:count]

    return padded


def head_builder(params: dict, config: ClipConfig, tokenizer_dir: str
                 ) -> Callable[[Sequence[str], Sequence[str]], np.ndarray]:
    """``(classnames, templates) -> head [C, D]`` of a full CLIP tree, its text encoder compiled once for every
    task (prompt batches padded to `PROMPT_ROWS`); the tokenizer is read from `tokenizer_dir` when first used."""
    if config.text is None or "text" not in params:
        raise ValueError("zero-shot heads need a full CLIP checkpoint (text tower), not a vision tower alone")
    encode = padded_rows(clip_text_encoder(params, config))

    def build(classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        return zero_shot_head(encode, load_tokenizer(tokenizer_dir), classnames, templates,
                              float(params["logit_scale"]), config.text.context_length)

    return build


def head_cache_path(root: str | os.PathLike, model_id: str, name: str) -> str:
    """``root/<model id made file-system safe>/<name>.npz``; a local model is keyed by its absolute path."""
    model = os.path.abspath(model_id) if os.path.exists(model_id) else model_id
    folder = re.sub(r"[^\w.-]+", "_", model.strip("/"))[-80:]
    return os.path.join(os.fspath(root), folder, re.sub(r"[^\w.-]+", "_", name) + ".npz")


def _stored_head(path: str, key: str) -> np.ndarray | None:
    """The head at `path` when it was built for `key` and its checksum holds; else None (with a warning when
    the file is there but unreadable or damaged)."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as stored:
            head, stored_key, checksum = stored["head"], str(stored["key"]), str(stored["checksum"])
    except Exception as error:  # a truncated or bit-flipped file: a miss, rebuilt
        warnings.warn(f"zero-shot head cache {path} is unreadable ({error}); rebuilding it", stacklevel=3)
        return None
    if stored_key != key:
        return None
    if hashlib.sha256(np.ascontiguousarray(head).tobytes()).hexdigest() != checksum:
        warnings.warn(f"zero-shot head cache {path} fails its checksum; rebuilding it", stacklevel=3)
        return None
    return head


def cached_head(path: str, classnames: Sequence[str], templates: Sequence[str], model_id: str,
                build: Callable[[], np.ndarray]) -> np.ndarray:
    """The head stored at ``path`` (.npz) if it was built for these class names, templates and model id and
    its checksum holds, else ``build()``, written atomically to ``path`` and returned."""
    key = hashlib.sha256(json.dumps([list(classnames), list(templates), model_id]).encode()).hexdigest()
    stored = _stored_head(path, key)
    if stored is not None:
        return stored
    head = np.asarray(build(), dtype=np.float32)
    if head.shape[0] != len(classnames):
        raise ValueError(f"head for {path!r} has {head.shape[0]} rows for {len(classnames)} class names")
    checksum = hashlib.sha256(np.ascontiguousarray(head).tobytes()).hexdigest()
    write_npz_atomic(path, {"head": head, "key": np.array(key), "checksum": np.array(checksum)})
    return head


def head_logits(z: jax.Array, head: jax.Array) -> jax.Array:
    """logits = z Wᵀ for representations z [B, D] (already normalised, possibly moved since) and a head W [C, D]."""
    return z @ jnp.asarray(head).T


def zero_shot_logits(features: jax.Array, head: jax.Array) -> jax.Array:
    """logits = (f / ‖f‖) Wᵀ for features [B, D] and a head W [C, D]."""
    return head_logits(l2_normalize(features), head)


class ZeroShotModel(NamedTuple):
    """An image encoder f followed by the frozen zero-shot heads H_t, as the core takes it:

        apply_fn(θ, x, t) = n(f_θ(x)) H_tᵀ                (a `SharedBackbone`: f, then the normalised head)
        features_fn(θ, x) = n(f_θ(x)),  head_fn(z, t) = z H_tᵀ

    the last two the same model split where Representation Surgery (Yang et al., ICML 2024) acts: z is
    FusionBench's ``compute_features`` (n = L2 normalisation)."""

    apply_fn: SharedBackbone
    features_fn: Callable[[Any, jax.Array], jax.Array]
    head_fn: Callable[[jax.Array, int], jax.Array]


def zero_shot_model(encoder: Callable[[Any, jax.Array], jax.Array], heads: Any) -> ZeroShotModel:
    """`ZeroShotModel` of ``encoder(params, images) -> features`` and the heads ``heads[t]`` [C, D] (a sequence,
    or any object indexed by task that yields task t's head when the model runs)."""
    return ZeroShotModel(
        apply_fn=SharedBackbone(features=encoder, head=lambda features, task: zero_shot_logits(features, heads[task])),
        features_fn=lambda params, images: l2_normalize(encoder(params, images)),
        head_fn=lambda z, task: head_logits(z, heads[task]))


def classifier(image_apply_fn: Callable[[Any, jax.Array], jax.Array], heads: Sequence[np.ndarray]
               ) -> Callable[[Any, jax.Array, int], jax.Array]:
    """``apply_fn(params, images, task_index) -> logits``: the image encoder followed by task ``task_index``'s
    frozen head, the signature AdaMerging's optimiser and ``evaluate`` take."""
    return zero_shot_model(image_apply_fn, [jnp.asarray(h) for h in heads]).apply_fn
