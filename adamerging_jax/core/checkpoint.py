"""Resumable run state with orbax, digests that identify a run's inputs, and atomic writes of final outputs.

A run's state (λ, the optimiser state, the step, the per-step history and the settings it was made with) is
saved as one orbax checkpoint. Arrays are stored as their flat list of leaves, so any optax state (whatever
its pytree classes) round-trips bit-exactly; the tree structure comes from the template at restore time.

Every checkpoint carries its own integrity record: a SHA-256 of each state leaf's bytes and one of the JSON
metadata, checked on restore. A checkpoint that fails to read or to match them (a flipped byte, a truncated
or missing file, an empty step folder) is unusable; `RunCheckpointer.restore_latest` then falls back to the
previous one with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Sharding

from adamerging_jax.core.trees import PyTree, named_leaves

SAMPLES_PER_LEAF = 2048


def _strided(leaf: Any) -> Any:
    """Every s-th element of the flattened leaf, s = ceil(size / SAMPLES_PER_LEAF): at most that many values."""
    flat = leaf.reshape(-1)
    return flat[:: max(1, -(-flat.size // SAMPLES_PER_LEAF))]


def tree_digest(tree: PyTree, sharding: Sharding | None = None) -> str:
    """A short SHA-256 of a pytree: per leaf its path, shape, dtype and a strided sample of its values.

    Cheap whatever the tree's size: at most `SAMPLES_PER_LEAF` values per leaf are read (`_strided`), for
    device arrays by one jitted gather whose outputs are placed with `sharding` (replicated, so every process
    of a multi-host run can read them). It tells apart trees with another structure, shape or dtype and
    almost any change of values spread over a leaf; a change confined to unsampled elements goes unseen.
    """
    named = named_leaves(tree)
    on_device = [i for i, (_, leaf) in enumerate(named) if isinstance(leaf, jax.Array)]
    gathered = jax.jit(lambda xs: [_strided(x) for x in xs], out_shardings=sharding)([named[i][1] for i in on_device])
    samples = {i: np.asarray(x) for i, x in zip(on_device, gathered)}
    digest = hashlib.sha256()
    for i, (path, leaf) in enumerate(named):
        sample = samples[i] if i in samples else _strided(np.asarray(leaf))
        digest.update(f"{path}|{np.shape(leaf)}|{np.asarray(sample).dtype}|".encode())
        digest.update(np.ascontiguousarray(sample).tobytes())
    return digest.hexdigest()[:16]


def _leaves_digest(leaves: list[Any]) -> str:
    """SHA-256 of every leaf's shape, dtype and bytes: what a checkpoint's state must read back as."""
    digest = hashlib.sha256()
    for leaf in leaves:
        array = np.asarray(leaf)
        digest.update(f"{array.shape}|{array.dtype}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class CorruptCheckpointError(ValueError):
    """A checkpoint step that cannot be read back as it was written."""


def _one_line(error: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, cut to `limit` characters (orbax errors run to many lines)."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _AbandonedReads(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" reports of orbax array reads left behind when a
    damaged checkpoint was refused: the refusal already said why, in one line (a warning, or the error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Task exception was never retrieved") and "async_deserialize" in message)


def _quiet_abandoned_reads() -> None:
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedReads) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_AbandonedReads())


class RunCheckpointer:
    """Saves and restores `(state pytree, JSON metadata)` every `every` steps, keeping the last two."""

    def __init__(self, directory: str | os.PathLike, every: int):
        if every < 1:
            raise ValueError(f"checkpoint interval must be at least 1 step, got {every}")
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state: PyTree, metadata: dict[str, Any]) -> None:
        """Save `state` and `metadata` as step `step`, with their digests (see the module docstring)."""
        leaves = jax.tree_util.tree_leaves(state)
        record = dict(metadata=metadata, state_sha256=_leaves_digest(jax.device_get(leaves)))
        record["sha256"] = _json_digest(record)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({str(i): leaf for i, leaf in enumerate(leaves)}),
                metadata=ocp.args.JsonSave(record),
            ),
        )
        self._manager.wait_until_finished()

    def _record(self, step: int) -> dict[str, Any]:
        """Step `step`'s integrity record, checked; CorruptCheckpointError saying why it is unusable."""
        folder = self.directory / str(step)
        if folder.is_dir() and not any(folder.iterdir()):
            raise CorruptCheckpointError("the step folder is empty")
        try:
            record = dict(self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"])
        except Exception as error:  # orbax raises many types for unreadable files
            raise CorruptCheckpointError(f"its metadata cannot be read ({_one_line(error)})") from None
        expected = record.pop("sha256", None)
        if expected != _json_digest(record) or not isinstance(record.get("metadata"), dict):
            raise CorruptCheckpointError("its metadata does not match the digest saved with it")
        return record

    def metadata(self, step: int) -> dict[str, Any]:
        """The metadata saved at `step` (checked against its digest; CorruptCheckpointError if unusable)."""
        return self._record(step)["metadata"]

    def restore(self, step: int, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
        """The state saved at `step`, shaped and placed like `template`, and its metadata, both checked
        against the digests saved with them; CorruptCheckpointError if unusable."""
        record = self._record(step)
        template_leaves, treedef = jax.tree_util.tree_flatten(template)
        target = {str(i): leaf for i, leaf in enumerate(template_leaves)}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
            leaves = [restored["state"][str(i)] for i in range(len(template_leaves))]
        except Exception as error:  # orbax raises many types for unreadable files
            _quiet_abandoned_reads()
            raise CorruptCheckpointError(f"its arrays cannot be read ({_one_line(error)})") from None
        if _leaves_digest(jax.device_get(leaves)) != record["state_sha256"]:
            raise CorruptCheckpointError("its arrays do not match the digest saved with them")
        return jax.tree_util.tree_unflatten(treedef, leaves), record["metadata"]

    def restore_latest(
        self, template: PyTree, check: Callable[[int, dict[str, Any]], None]
    ) -> tuple[int, PyTree, dict[str, Any]] | None:
        """The newest usable checkpoint as `(step, state, metadata)`, or None when the directory holds none.

        `check(step, metadata)` runs on the newest readable metadata before its arrays are read, and may
        raise (e.g. a checkpoint of another run): that error propagates. Unusable newer steps are moved aside
        (to `corrupt_step_<n>` in the directory, so later saves can reuse their step numbers) with a
        `warnings.warn` naming each step and why. When no step is usable, a CorruptCheckpointError says so in
        one line, with each step's reason, and leaves the directory as it is.
        """
        unusable: list[tuple[int, str]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                metadata = self.metadata(step)
                check(step, metadata)
                state, metadata = self.restore(step, template)
            except CorruptCheckpointError as error:
                unusable.append((step, str(error)))
                continue
            for bad_step, reason in unusable:
                moved = self._set_aside(bad_step)
                warnings.warn(
                    f"checkpoint step {bad_step} in {self.directory} is unusable ({reason}); moved to {moved.name}, "
                    f"resuming from step {step}",
                    stacklevel=3,
                )
            return step, state, metadata
        if unusable:
            reasons = "; ".join(f"step {step}: {reason}" for step, reason in unusable)
            raise CorruptCheckpointError(
                f"no usable checkpoint in {self.directory} ({reasons}); to start afresh, delete it or use another "
                "checkpoint_dir"
            )
        return None

    def _set_aside(self, step: int) -> Path:
        """Move step `step`'s folder to `corrupt_step_<step>[_<n>]` (process 0; every process then reloads)."""
        target = self.directory / f"corrupt_step_{step}"
        n = 1
        while target.exists():
            target, n = self.directory / f"corrupt_step_{step}_{n}", n + 1
        if jax.process_index() == 0:
            os.replace(self.directory / str(step), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"adamerging_jax set aside checkpoint step {step}")
        self._manager.reload()
        return target

    def close(self) -> None:
        self._manager.close()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; `os.replace`d over `path` when the block succeeds and
    removed when it fails, so `path` is never seen half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_path`), flushed to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_npz_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, replaceable: Iterable[str]) -> Iterator[str]:
    """A fresh folder beside ``directory`` to write into, renamed to ``directory`` when the block succeeds
    and removed when it fails, so ``directory`` is never seen half written.

    An existing ``directory`` is replaced only when it holds nothing but names in ``replaceable`` (an earlier
    export); otherwise FileExistsError names the files that would be lost.
    """
    target = os.path.abspath(os.fspath(directory))
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise FileExistsError(f"{target!r} exists and is not a directory")
        if foreign := sorted(set(os.listdir(target)) - set(replaceable)):
            raise FileExistsError(f"{target!r} exists and holds files an export does not write: {foreign[:5]}; "
                                  f"choose an empty or new directory")
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
    os.mkdir(tmp)  # mode 0777 & ~umask, as a folder made by hand
    try:
        yield tmp
        if os.path.exists(target):
            old = os.path.join(parent, f".{name}.{uuid.uuid4().hex}.old")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def check_writable_folder(path: str | os.PathLike) -> None:
    """Raise a one-line ValueError unless `path` is a folder this user can write, or can be made one: its
    nearest existing ancestor is a writable folder. Nothing is created, so a dry run leaves no trace."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{path} is not writable ({existing} does not let this user write)")

