"""Unlabeled prompts per task for merging language models: read, tokenized, bucketed, shuffled per step.

A task's prompts come from a text file (one prompt a line, blank lines skipped) or a JSONL file (one object a
line, the prompt under a named field), and are tokenized once with the checkpoint's own tokenizer
(``transformers.AutoTokenizer``, local files only), truncated to the largest bucket (a warning counts them).

:class:`TextBatches` is the ``step -> [batch per task]`` source the optimiser takes, with the conventions of
``adamerging_jax.data.pipeline.AdaptationBatches``: task ``t``'s prompts are drawn without replacement from
an endless stream of epochs, epoch ``e`` being ``default_rng([seed, t, e]).permutation(N_t)``, and step ``s``
takes the stream's positions ``[s n B, (s + 1) n B)``; so a step's batches are a pure function of
``(seed, step)`` and a run resumes at any step. A batch is ``{"input_ids": int32 [n B, T], "attention_mask":
int32 [n B, T]}``; all tasks of a step share T, the smallest bucket length that holds the step's longest
prompt, so a jitted step compiles once per bucket at most (with powers of two, ⌈log₂(max / min)⌉ + 1 times).
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from adamerging_jax.data.pipeline import stream_indices
from adamerging_jax.data.strict_text import text_lines, visible

Batch = dict[str, np.ndarray]


def read_prompts(path: str | os.PathLike, field: str | None = None) -> list[str]:
    """The prompts of a file: a ``.jsonl`` file's ``field`` per line, otherwise one prompt a line.

    The file must be UTF-8 (the error names the byte offset). Blank lines are skipped; a prompt with no
    visible character (only whitespace and zero-width or other format characters) and a JSONL line that is
    not an object with a string ``field`` are errors naming the file, the line and the field.
    """
    path = os.fspath(path)
    jsonl = path.endswith(".jsonl")
    if jsonl and not field:
        raise ValueError(f"{path}: a JSONL file needs the name of its prompt field")
    prompts = []
    for number, line in enumerate(text_lines(path), start=1):
        if not line.strip():
            continue
        prompt = line
        if jsonl:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON object ({err})") from err
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ValueError(f"{path}:{number}: no string field {field!r}")
            prompt = record[field]
        if not visible(prompt):
            raise ValueError(f"{path}:{number}: the prompt {prompt!r} has no visible character")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """The tokenizer saved in a checkpoint folder (``AutoTokenizer``, local files only, no download)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(directory), local_files_only=True)


def bucket_lengths(max_length: int, min_length: int = 16) -> tuple[int, ...]:
    """Powers of two from ``min_length`` below ``max_length``, then ``max_length``: e.g. (16, 32, 64, 100)."""
    if not 1 <= min_length <= max_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
    lengths = []
    length = 1 << (min_length - 1).bit_length()
    while length < max_length:
        lengths.append(length)
        length *= 2
    return (*lengths, max_length)


def tokenize_prompts(prompts: Sequence[str], tokenizer: Any, max_length: int, *, task: str = "prompts"
                     ) -> list[np.ndarray]:
    """Token ids (int32) of each prompt, special tokens as the tokenizer adds them, cut to ``max_length``.

    Truncation keeps the first ``max_length`` tokens and warns once with the count; a prompt that gives no
    token is an error naming its index.
    """
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    sequences = [np.asarray(ids[:max_length], np.int32) for ids in encoded]
    for index, ids in enumerate(sequences):
        if ids.size == 0:
            raise ValueError(f"{task}: prompt {index} ({prompts[index]!r}) gives no token")
    truncated = sum(len(ids) > max_length for ids in encoded)
    if truncated:
        warnings.warn(f"{task}: {truncated} of {len(encoded)} prompts are longer than {max_length} tokens and "
                      "were truncated", stacklevel=2)
    return sequences


def pad_id_of(tokenizer: Any) -> int:
    """The id padding is written with: the pad token, else the EOS token, else 0 (padding is always masked)."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def pad_sequences(sequences: Sequence[np.ndarray], length: int, pad_id: int, padding_side: str = "right") -> Batch:
    """``{"input_ids", "attention_mask"}`` int32 [N, length]: each sequence padded with ``pad_id`` on one side."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, sequence in enumerate(sequences):
        if len(sequence) > length:
            raise ValueError(f"sequence {row} has {len(sequence)} tokens, more than the length {length}")
        span = slice(0, len(sequence)) if padding_side == "right" else slice(length - len(sequence), length)
        ids[row, span], mask[row, span] = sequence, 1
    return {"input_ids": ids, "attention_mask": mask}


@dataclasses.dataclass
class TextBatches:
    """Per step, for every task, ``n_batches`` × ``batch_size`` shuffled prompts as one padded batch.

    ``tasks[t]`` holds task t's token id sequences (:func:`tokenize_prompts`), none longer than the largest
    of ``buckets``. Calling the instance with a step gives the optimiser's K batches (module docstring).
    """

    tasks: Sequence[Sequence[np.ndarray]]
    batch_size: int = 16
    n_batches: int = 1
    seed: int = 0
    buckets: tuple[int, ...] = bucket_lengths(256)
    pad_id: int = 0
    padding_side: str = "right"

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.n_batches < 1:
            raise ValueError(f"batch_size and n_batches must be >= 1, got {self.batch_size}, {self.n_batches}")
        if not self.tasks:
            raise ValueError("no tasks given")
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise ValueError(f"buckets must be increasing positive lengths, got {self.buckets}")
        for task, sequences in enumerate(self.tasks):
            if len(sequences) == 0:
                raise ValueError(f"task {task}: no prompts")
            longest = max(len(s) for s in sequences)
            if longest > self.buckets[-1]:
                raise ValueError(f"task {task}: a prompt has {longest} tokens, more than the largest bucket "
                                 f"{self.buckets[-1]}")

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], tokenizer_dir: str | os.PathLike, *,
                   field: str | None = None, max_length: int = 256, min_length: int = 16, **kwargs: Any
                   ) -> TextBatches:
        """Batches over one prompt file per task, tokenized with the tokenizer in ``tokenizer_dir``.

        The pad id is the tokenizer's pad token, else its EOS token, else 0 (padding is masked either way).
        Other keywords (batch_size, n_batches, seed, padding_side) go to the constructor.
        """
        tokenizer = load_tokenizer(tokenizer_dir)
        tasks = [tokenize_prompts(read_prompts(path, field), tokenizer, max_length, task=os.fspath(path))
                 for path in paths]
        return cls(tasks, buckets=bucket_lengths(max_length, min(min_length, max_length)), pad_id=pad_id_of(tokenizer),
                   **kwargs)

    @property
    def prompts_per_task(self) -> int:
        return self.n_batches * self.batch_size

    def indices(self, step: int) -> np.ndarray:
        """Prompt indices of step ``step``: int64 [K, n_batches · batch_size] (a pure function of seed, step)."""
        per_task = self.prompts_per_task
        return np.stack([stream_indices(self.seed, task, len(sequences), step * per_task, per_task)
                         for task, sequences in enumerate(self.tasks)])

    def __call__(self, step: int) -> list[Batch]:
        """The optimiser's ``batches(step)``: K padded batches of ``n_batches · batch_size`` prompts."""
        chosen = [[self.tasks[task][i] for i in row] for task, row in enumerate(self.indices(step))]
        longest = max(len(s) for sequences in chosen for s in sequences)
        length = next(b for b in self.buckets if b >= longest)
        return [pad_sequences(sequences, length, self.pad_id, self.padding_side) for sequences in chosen]
