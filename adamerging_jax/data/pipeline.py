"""The input pipeline: unlabeled test batches for AdaMerging's optimiser, and full test sets for evaluation.

A *source* is any random-access sequence of ``(image uint8 [H, W, 3], label int)``: a tfds split
(:func:`adamerging_jax.data.tfds_sources.split_source`), a class folder
(:class:`adamerging_jax.data.folder.FolderImages`) or a list.

Adaptation (AdaMerging, Yang et al. 2024, Sec. 3.2): at every step, for every task ``t``, ``n_batches``
batches of ``batch_size`` test images of task ``t``, labels dropped (official: 2 x 16; FusionBench: 1 x 16).
Task ``t``'s images are drawn without replacement from an endless stream of epochs, epoch ``e`` being the
permutation ``default_rng([seed, t, e]).permutation(N_t)``; step ``s`` takes the stream's positions
``[s n B, (s + 1) n B)``.  So the batches of step ``s`` are a pure function of ``(seed, s)``: the pipeline's
whole state is the step number, which the optimiser checkpoints, and resuming at step ``s`` gives exactly
the batches an uninterrupted run would have.  (A batch that straddles two epochs may hold an image twice;
with B much smaller than N_t this is rare.)

Loading uses grain: a ``MapDataset`` over the flat list of image slots, mapped (decode + preprocess), turned
into an iterator whose thread pool decodes images ahead (``num_threads``; ``prefetch`` steps' worth of images)
and batched per step, so the accelerator is fed while the host prepares the next steps.  PIL decodes and
resizes outside the GIL, so threads scale.  Preprocessing defaults to CLIP's
(:mod:`adamerging_jax.data.clip_preprocess`).  `AdaptationBatches.close` (or leaving its ``with`` block) stops
the reading ahead: queued reads are cancelled, so a process exits right after its last step instead of
decoding the images it will never use (Python joins the pool's threads at exit).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import grain
import numpy as np

from adamerging_jax.data.clip_preprocess import preprocess as clip_preprocess
from adamerging_jax.data.clip_preprocess import resize_crop as clip_resize_crop


class Source(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


class SourceSubset:
    """The examples ``indices`` of ``source``, in that order, as a source (e.g. the parts of a test split that
    held-out adaptation adapts on and scores, `core.protocol.Adaptation.split`); a path-backed source's subset
    keeps the paths of its examples."""

    def __init__(self, source: Source, indices: Sequence[int]):
        self.source, self.indices = source, [int(i) for i in indices]
        if bad := [i for i in self.indices if not 0 <= i < len(source)]:
            raise ValueError(f"indices {bad[:5]} outside the source's {len(source)} examples")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.source[self.indices[index]]

    @property
    def paths(self) -> list[str]:
        """The examples' files (an AttributeError for a source without paths)."""
        paths = self.source.paths
        return [paths[i] for i in self.indices]


class CachedSource:
    """``source`` with ``transform`` applied to each image once, on first read, and kept in memory.

    AdaMerging revisits each test image many times (500 steps x 32 images per task against test sets of
    1,880 to 26,032), so caching the decoded, resized uint8 crops (150 KB each at 224 px) saves the
    decode on every later visit.  Safe under grain's threads: a race only computes an item twice.
    """

    def __init__(self, source: "Source", transform: Callable[[np.ndarray], np.ndarray] = clip_resize_crop):
        self.source, self.transform = source, transform
        self._cache: dict[int, tuple[np.ndarray, int]] = {}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if index not in self._cache:
            image, label = self.source[index]
            self._cache[index] = (self.transform(image), label)
        return self._cache[index]


@functools.lru_cache(maxsize=64)
def epoch_permutation(seed: int, task: int, epoch: int, size: int) -> np.ndarray:
    """The order in which epoch ``epoch`` of task ``task`` visits its ``size`` images (cached, read-only)."""
    order = np.random.default_rng([seed, task, epoch]).permutation(size)
    order.flags.writeable = False
    return order


def stream_indices(seed: int, task: int, size: int, start: int, count: int) -> np.ndarray:
    """Positions ``[start, start + count)`` of task ``task``'s endless stream of shuffled epochs."""
    positions = np.arange(start, start + count)
    epochs, offsets = np.divmod(positions, size)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        chosen = epochs == epoch
        out[chosen] = epoch_permutation(seed, task, int(epoch), size)[offsets[chosen]]
    return out


_OPEN_ENDED_STEPS = 2**40 // 4096  # a stream the optimiser never exhausts (grain datasets are lazy)


@dataclasses.dataclass
class AdaptationBatches:
    """Per step, for every task, ``n_batches`` shuffled batches of ``batch_size`` unlabeled images.

    ``batches(start_step, num_steps)`` yields ``(step, images)`` with images float32
    ``[T, n_batches, batch_size, *image_shape]``, task order as ``sources``.  The state to checkpoint is
    the next step number; ``batches(step, ...)`` resumes there exactly.  The instance itself is the
    ``step -> per-task batches`` callable that ``adamerging_jax.adamerging`` takes.
    """

    sources: Sequence[Source]
    batch_size: int = 16
    n_batches: int = 1
    seed: int = 0
    preprocess: Callable[[np.ndarray], np.ndarray] = clip_preprocess
    num_threads: int = 8
    prefetch: int = 4

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.n_batches < 1:
            raise ValueError(f"batch_size and n_batches must be >= 1, got {self.batch_size}, {self.n_batches}")
        if not self.sources:
            raise ValueError("no task sources given")
        for task, source in enumerate(self.sources):
            if len(source) == 0:
                raise ValueError(f"task {task}: its test source is empty")
        self._stream: grain.DatasetIterator | None = None
        self._next_step = -1

    @property
    def images_per_task(self) -> int:
        return self.n_batches * self.batch_size

    def fingerprint(self, examples_per_source: int = 4) -> str:
        """The identity of the batches this sampler yields, for the optimiser's checkpoints: a short SHA-256
        of ``batch_size``, ``n_batches``, ``seed``, the preprocessing function's name, every source's length
        and the raw images at ``examples_per_source`` evenly spaced indices of each source (cheap: a few
        reads per task). Thread counts and prefetching do not change the batches and are left out."""
        settings = dict(
            batch_size=self.batch_size,
            n_batches=self.n_batches,
            seed=self.seed,
            preprocess=getattr(self.preprocess, "__qualname__", type(self.preprocess).__qualname__),
            lengths=[len(source) for source in self.sources],
        )
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for source in self.sources:
            for index in np.unique(np.linspace(0, len(source) - 1, examples_per_source).astype(int)):
                image = np.ascontiguousarray(source[int(index)][0])
                digest.update(f"{image.shape}|{image.dtype}|".encode())
                digest.update(image.tobytes())
        return digest.hexdigest()[:16]

    def indices(self, step: int) -> np.ndarray:
        """Image indices of step ``step``: int64 [T, n_batches, batch_size] (a pure function of seed, step)."""
        per_task = self.images_per_task
        return np.stack(
            [
                stream_indices(self.seed, task, len(source), step * per_task, per_task)
                for task, source in enumerate(self.sources)
            ]
        ).reshape(len(self.sources), self.n_batches, self.batch_size)

    def _load(self, slot: int) -> np.ndarray:
        """Slot ``slot`` of the flat stream: step-major, then task, batch, image."""
        per_step = len(self.sources) * self.images_per_task
        step, within = divmod(slot, per_step)
        task, position = divmod(within, self.images_per_task)
        index = stream_indices(self.seed, task, len(self.sources[task]), step * self.images_per_task + position, 1)
        image, _ = self.sources[task][int(index[0])]
        return np.asarray(self.preprocess(image), np.float32)

    def _shape_step(self, flat: np.ndarray) -> np.ndarray:
        return flat.reshape(len(self.sources), self.n_batches, self.batch_size, *flat.shape[1:])

    def _read_ahead(self, start_step: int, num_steps: int) -> grain.DatasetIterator:
        """The images of steps ``[start_step, start_step + num_steps)`` decoded ahead one by one by the thread
        pool (``prefetch`` steps' worth), batched per step; ``close()`` on it cancels the queued reads."""
        if start_step < 0 or num_steps < 0:
            raise ValueError(f"start_step and num_steps must be >= 0, got {start_step}, {num_steps}")
        per_step = len(self.sources) * self.images_per_task
        slots = grain.MapDataset.range(start_step * per_step, (start_step + num_steps) * per_step)
        images = slots.map(self._load).to_iter_dataset(_read_options(self.num_threads, self.prefetch * per_step))
        return iter(images.batch(per_step).map(self._shape_step))

    def batches(self, start_step: int, num_steps: int) -> Iterator[tuple[int, np.ndarray]]:
        """Prefetching iterator of ``(step, images)`` for steps ``start_step .. start_step + num_steps - 1``;
        its reading ahead ends with the last step."""
        return zip(range(start_step, start_step + num_steps), self._read_ahead(start_step, num_steps))

    def __call__(self, step: int) -> list[np.ndarray]:
        """The optimiser's ``batches(step)``: K arrays ``[n_batches * batch_size, *image_shape]``, one per task.

        Consecutive calls are served from one prefetching stream; a call for any other step (a resume)
        restarts the stream there.  The result is the same either way: a pure function of (seed, step).
        """
        if self._stream is None or self._next_step != step:
            self.close()
            self._stream = self._read_ahead(step, _OPEN_ENDED_STEPS)
        images = next(self._stream)
        self._next_step = step + 1
        return list(images.reshape(len(self.sources), self.images_per_task, *images.shape[3:]))

    def close(self) -> None:
        """Stop reading ahead (module docstring): the queued reads are cancelled and each thread ends after
        the image it is decoding. A later call starts a new stream."""
        if self._stream is not None:
            self._stream.close()
        self._stream, self._next_step = None, -1

    def __enter__(self) -> AdaptationBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_options(num_threads: int, buffered_elements: int) -> grain.ReadOptions:
    """grain reads ahead ``buffered_elements`` images (at least one per thread) with ``num_threads`` threads."""
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(num_threads, buffered_elements))


def _load_labeled(source: Source, preprocess: Callable[[np.ndarray], np.ndarray], index: int) -> tuple[np.ndarray, np.int64]:
    image, label = source[index]
    return np.asarray(preprocess(image), np.float32), np.int64(label)


def evaluation_batches(
    source: Source,
    batch_size: int = 256,
    preprocess: Callable[[np.ndarray], np.ndarray] = clip_preprocess,
    *,
    num_threads: int = 8,
    prefetch: int = 2,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every example of ``source`` once, in order: ``(images [b, ...] float32, labels [b] int64)``.

    The last batch holds the remainder.  A test set for ``adamerging_jax.evaluate``, which pads that last
    batch itself: give both the same ``batch_size`` so one compiled function serves every batch.
    """
    if len(source) == 0:
        raise ValueError("cannot evaluate on an empty source")
    examples = grain.MapDataset.range(len(source)).map(functools.partial(_load_labeled, source, preprocess))
    iterator = iter(examples.to_iter_dataset(_read_options(num_threads, prefetch * batch_size)).batch(batch_size))
    try:
        yield from iterator
    finally:  # an evaluation stopped early reads no further
        iterator.close()
