"""What every command checks and holds before its work starts, shared by the command lines (`adamerging_jax.cli`,
`adamerging_jax.paper.cli`): the output folder can be written and is locked for the run, the cache folder can be
used. A refusal is a `MergeError` naming the flag or folder at fault; the command line prints it as one
``error:`` line.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from adamerging_jax.cache import ENV_VAR, cache_root, enable_compilation_cache
from adamerging_jax.merging.errors import MergeError


def check_output_dir(path: Path) -> None:
    """Refuse an output that is a file or cannot be written, before any work starts."""
    from adamerging_jax.core.checkpoint import check_writable_folder

    try:
        check_writable_folder(path)
    except ValueError as error:
        raise MergeError(f"--output {error}") from None


def check_cache_root(folder: Path | None = None) -> None:
    """The cache folder (``folder``, else the cache root) is a folder this user can write, or can be made."""
    from adamerging_jax.core.checkpoint import check_writable_folder

    folder = folder or cache_root()
    try:
        check_writable_folder(folder)
    except ValueError as error:
        raise MergeError(f"the cache folder (${ENV_VAR} or --cache) {error}; set ${ENV_VAR} to a writable "
                         "folder") from None


def start_compilation_cache() -> None:
    """JAX's persistent compilation cache under the cache root (`check_cache_root` first)."""
    check_cache_root()
    try:
        enable_compilation_cache(1.0)
    except OSError as error:
        raise MergeError(f"the cache folder {cache_root()} cannot be used: {error.strerror}") from None


@contextlib.contextmanager
def locked_output(output: Path, keep: tuple[str, ...] | None = None) -> Iterator[None]:
    """Hold ``output``'s lock (`adamerging_jax.output.output_lock`) after finishing any commit a killed run
    left half done (``keep``: the command's resumable-state folders, default ``state``); a second run into it
    is refused in one line naming the first."""
    from adamerging_jax.output import KEEP, OutputBusyError, output_lock, recover_output

    try:
        with output_lock(output):
            recover_output(output, keep=keep or KEEP)
            yield
    except OutputBusyError as error:
        raise MergeError(str(error)) from None
