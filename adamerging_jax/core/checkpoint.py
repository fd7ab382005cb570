"""Resumable run state with orbax, and atomic writes of final outputs.

A run's state (λ, the optimiser state, the step, the per-step history and the settings it was made with) is
saved as one orbax checkpoint. Arrays are stored as their flat list of leaves, so any optax state (whatever
its pytree classes) round-trips bit-exactly; the tree structure comes from the template at restore time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from adamerging_jax.core.trees import PyTree


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
        leaves = {str(i): leaf for i, leaf in enumerate(jax.tree_util.tree_leaves(state))}
        self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(leaves), metadata=ocp.args.JsonSave(metadata))
        )
        self._manager.wait_until_finished()

    def restore(self, step: int, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
        """The state saved at `step`, shaped and placed like `template`, and its metadata."""
        template_leaves, treedef = jax.tree_util.tree_flatten(template)
        target = {str(i): leaf for i, leaf in enumerate(template_leaves)}
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), metadata=ocp.args.JsonRestore())
        )
        leaves = [restored["state"][str(i)] for i in range(len(template_leaves))]
        return jax.tree_util.tree_unflatten(treedef, leaves), dict(restored["metadata"])

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
