"""The causal-LM binding: a Llama / Qwen2 decoder scored by AdaMerging's entropy objective.

For task t's batch ``{"input_ids" [N, T], "attention_mask" [N, T]}`` (e.g. from `data.text.TextBatches`)
the merged decoder gives next-token logits z = f_θ(ids) [N, T, V]. Two readings of them:

- next-token prediction (default): position i predicts token i + 1, so the predictions are z[:, :-1] with
  weights w[n, i] = m[n, i] · m[n, i + 1] (both the reading and the predicted token are real, not padding),
  and the task's entropy is the mask-weighted mean Σ w H(softmax(z)) / Σ w (`core.objective.Predictions`);
- classification by LM (``candidates``: per task the token ids of its answers, e.g. " yes" / " no"): the
  logits at the last non-padding position of each prompt restricted to those C tokens, [N, C], a C-way
  classifier whose entropy (and accuracy, with labels in 0..C−1) is the task's.

Both are independent of padding: left or right, padded positions carry no weight and do not move the last
real position (the decoder masks padded keys and counts positions over real tokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from adamerging_jax.core.binding import ModelBinding
from adamerging_jax.core.objective import Output, Predictions
from adamerging_jax.models import llama
from adamerging_jax.models.llama_checkpoint import coefficient_tensor_names

Batch = Mapping[str, jax.Array]


def next_token_predictions(logits: jax.Array, attention_mask: jax.Array) -> Predictions:
    """Predictions(z[:, :-1], m[:, 1:] · m[:, :-1]) of logits z [N, T, V] and mask m [N, T]."""
    mask = attention_mask.astype(logits.dtype)
    return Predictions(logits[:, :-1], mask[:, 1:] * mask[:, :-1])


def last_token_logits(logits: jax.Array, attention_mask: jax.Array, candidates: Sequence[int]) -> jax.Array:
    """z[n, i_n, candidates] [N, C], i_n = max{i : m[n, i] = 1} the last real position of prompt n (T − 1 for
    a row with no real token)."""
    length = attention_mask.shape[1]
    last = length - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=1)
    at_last = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
    return at_last[:, jnp.asarray(candidates, jnp.int32)]


def _checked_candidates(candidates: Sequence[Sequence[int]] | None, vocab_size: int
                        ) -> tuple[tuple[int, ...], ...] | None:
    """``candidates`` as tuples of ints, each task's ≥ 2 ids inside the vocabulary (one line naming the task)."""
    if candidates is None:
        return None
    checked = []
    for task, ids in enumerate(candidates):
        ids = tuple(int(i) for i in ids)
        if len(ids) < 2:
            raise ValueError(f"candidates of task {task}: {list(ids)} has fewer than 2 token ids (C ≥ 2 needed)")
        outside = [i for i in ids if not 0 <= i < vocab_size]
        if outside:
            raise ValueError(f"candidates of task {task}: token ids {outside} outside the vocabulary of {vocab_size}")
        checked.append(ids)
    return tuple(checked)


def causal_lm_binding(config: llama.LlamaConfig, *, candidates: Sequence[Sequence[int]] | None = None,
                      remat: bool = False) -> ModelBinding:
    """The `ModelBinding` of a Llama / Qwen2 decoder (module docstring): ``apply_fn(params, batch, task)`` runs
    `llama.forward` (``remat``: each scanned block recomputed in the backward pass) and returns the next-token
    `Predictions`, or with ``candidates`` the last real position's logits over task ``task``'s candidate ids;
    stacked leaves by `llama.stacked`, λ named by `coefficient_tensor_names`."""
    choices = _checked_candidates(candidates, config.vocab_size)

    def apply_fn(params: llama.Params, batch: Batch, task: int) -> Output:
        mask = jnp.asarray(batch["attention_mask"], jnp.int32)
        logits = llama.forward(params, batch["input_ids"], mask, config, remat=remat)
        if choices is None:
            return next_token_predictions(logits, mask)
        if task >= len(choices):
            raise ValueError(f"task {task}: no candidates given (candidates name {len(choices)} tasks)")
        return last_token_logits(logits, mask, choices[task])

    names = coefficient_tensor_names(config)
    return ModelBinding(apply_fn=apply_fn, stacked=llama.stacked, tensor_names=names, tensor_order=names.order,
                        matrix_view=llama.matrix_view)
