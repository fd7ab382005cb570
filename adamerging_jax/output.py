"""A command's output folder: one run at a time, never inside its inputs, and committed at once.

**One run at a time.** `output_lock` holds an exclusive ``fcntl.flock`` on ``.<name>.lock`` beside the
output folder (beside, so the folder itself can be swapped) for the whole run; the file records the holder's
pid, host and start time. A second run into the same folder is refused in one line naming them. The kernel
drops the lock of a killed process, so a lock left by a run that died (even by SIGKILL) is taken over; one
still held by a leftover child of a dead run on this host (its recorded pid gone) is taken over too.

**Placement.** `check_placement` refuses an output equal to or inside an input folder (where plots would
become training images on the next run) and an input inside the output (the commit would remove it), both
paths named with symbolic links resolved; `check_output_contents` refuses an existing output that holds
anything a run does not write, since a commit replaces the whole folder (the hidden temporaries a killed
write left inside it, ``.model.<id>.tmp`` and the like, are the run's own: the commit drops them).

**One commit.** `staged_output` gives a fresh hidden sibling folder to build the whole result in. On
success its files get the usual modes (0666 / 0777 less the umask), everything is flushed to disk, the
previous output's ``state/`` (resumable AdaMerging state) is carried over, and the new folder is swapped in:
by one ``renameat2(RENAME_EXCHANGE)`` where the system has it (the output is at every instant the previous
result or the new one), else by renaming the old folder aside and the new one in. The old result is then
removed. A command whose resumable state lives elsewhere in its output (the paper's ``adamerging_state``)
names those folders (``keep``). After a Ctrl-C (`honour_interrupts`) nothing is swapped in; one
during the swap lets it finish first. `recover_output` (run under the lock, before any work) finishes or undoes a commit a killed run left
half done, so a leftover never survives beside a new result. Files from an earlier run that this run does not
produce do not survive: the new folder holds only what this run wrote.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import fnmatch
import json
import os
import shutil
import signal
import socket
import threading
import uuid
from pathlib import Path
from typing import Callable, Iterator, Mapping

KEEP = ("state",)
RUN_FILES = ("model", "state", "lambdas.json", "lambdas.safetensors", "results.json", "table.md", "*.png")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


_INTERRUPTED = threading.Event()
_COMMITTING = threading.Event()


def interrupted() -> bool:
    """Ctrl-C (SIGINT) was pressed while `honour_interrupts` was active."""
    return _INTERRUPTED.is_set()


def _on_interrupt(signum: int, frame: object) -> None:
    _INTERRUPTED.set()
    if not _COMMITTING.is_set():  # during the swap the interrupt is only remembered: it finishes first
        raise KeyboardInterrupt


@contextlib.contextmanager
def honour_interrupts() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered, so one swallowed where exceptions are
    ignored (a garbage-collection callback) still stops the run: `staged_output` commits nothing after it,
    and the command exits with 130. Main thread only; elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _INTERRUPTED.clear()
    previous = signal.signal(signal.SIGINT, _on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class OutputBusyError(RuntimeError):
    """Another live run holds the output folder's lock."""


def _lock_path(output: Path) -> Path:
    output = Path(os.path.abspath(output))
    return output.parent / f".{output.name}.lock"


def _holder(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(holder: Mapping) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}")


def _gone(holder: Mapping) -> bool:
    """The recorded process ran on this host and no longer exists."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _try_lock(path: Path) -> int | None:
    """An fd holding ``path``'s exclusive lock (the file as it is now on disk), or None when it is held."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file while we opened it: lock the new one


@contextlib.contextmanager
def output_lock(output: str | os.PathLike, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold ``output``'s lock for the block (module docstring); `OutputBusyError` in one line naming the run
    that holds it. The parent folder is created if needed."""
    path = _lock_path(Path(output))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _try_lock(path)
    if fd is None:
        holder = _holder(path)
        if not _gone(holder):
            raise OutputBusyError(f"{os.path.abspath(output)} is being written by another run ({_describe(holder)}); "
                                  f"wait for it to finish or choose another --output")
        log(f"[output] taking over the lock of {_describe(holder)}, which is no longer running")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fd = _try_lock(path)
        if fd is None:
            raise OutputBusyError(f"{os.path.abspath(output)} is being written by another run "
                                  f"({_describe(_holder(path))}); wait for it to finish or choose another --output")
    elif (previous := _holder(path)).get("pid") is not None:
        log(f"[output] taking over the lock of {_describe(previous)}, which is no longer running")
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode())
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_placement(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None],
                    skip_missing: bool = True) -> None:
    """ValueError naming both paths when ``output`` is, or is inside, an input folder, or an input lies
    inside ``output`` (``inputs``: a label such as ``tasks[0].unlabeled`` → a path; None is skipped, and so
    are paths that do not exist, e.g. hub ids, unless ``skip_missing`` is False: a folder a run will make)."""
    out = _real(output)
    for label, value in inputs.items():
        if value is None or (skip_missing and not os.path.exists(value)):
            continue
        real = _real(value)
        if _within(out, real):
            where = "is" if out == real else "is inside"
            raise ValueError(f"--output {output} ({out}) {where} the {label} folder {value} ({real}); choose an "
                             "output outside every input")
        if _within(real, out):
            raise ValueError(f"the {label} {value} ({real}) is inside --output {output} ({out}), which a run "
                             "replaces; choose an output outside every input")


def check_output_contents(output: str | os.PathLike, produced: tuple[str, ...] = RUN_FILES) -> None:
    """ValueError naming them when an existing ``output`` holds entries a run does not write (``produced``:
    names or glob patterns): a commit replaces the whole folder, and nothing a user put there may be lost."""
    if not os.path.isdir(output):
        return
    foreign = sorted(name for name in os.listdir(output) if not _produced(name, produced))
    if foreign:
        raise ValueError(f"--output {output} holds files a run does not write: {foreign[:5]}; a run replaces the "
                         "whole folder, so choose an empty or new folder")


def _produced(name: str, produced: tuple[str, ...]) -> bool:
    """``name`` is one of ``produced``, or the hidden temporary of one that a killed run left in its folder
    (``.model.<id>.tmp``, ``.results.json.<id>.tmp``, ``.model.<id>.old``): the commit drops it."""
    leftovers = [f".{pattern}.*.{kind}" for pattern in produced for kind in ("tmp", "old")]
    return any(fnmatch.fnmatch(name, pattern) for pattern in (*produced, *leftovers))


def _siblings(output: Path, kind: str) -> list[Path]:
    return sorted(output.parent.glob(f".{output.name}.{kind}-*"))


def recover_output(output: str | os.PathLike, log: Callable[[str], None] = print,
                   keep: tuple[str, ...] = KEEP) -> None:
    """Finish or undo a commit a killed run left half done (call under `output_lock`, so the run that made
    them is gone): an output renamed aside with no new one in its place comes back, a ``keep`` folder
    (resumable state) left in the old result returns to the output, and every leftover stage or old result
    is removed."""
    output = Path(os.path.abspath(output))
    for old in _siblings(output, "old"):
        if not output.exists():
            log(f"[output] restoring {output} from {old.name}, left by a run that stopped while committing")
            os.rename(old, output)
    for leftover in _siblings(output, "old") + _siblings(output, "new"):
        _carry_kept(leftover, output, keep)
        log(f"[output] removing {leftover}, left by a run that stopped while writing {output.name}")
        shutil.rmtree(leftover)


def _carry_kept(old: Path, output: Path, keep: tuple[str, ...]) -> None:
    """The ``keep`` folders of ``old`` moved into ``output`` where it has none (a stage never holds them
    before its commit, so only a previous result gives them)."""
    for name in keep:
        if (old / name).is_dir() and output.is_dir() and not (output / name).exists():
            os.rename(old / name, output / name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finish_files(folder: Path) -> None:
    """Usual modes (0666 / 0777 less the umask) and every file and folder flushed to disk."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, 0o666 & ~mask)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for root, _, _ in os.walk(folder, topdown=False):
        fsync_folder(root)


def fsync_folder(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), os.fspath(b))


def _swap_in(stage: Path, output: Path, keep: tuple[str, ...]) -> None:
    """``stage`` becomes ``output``; the previous output's ``keep`` folders move into it; the old result is
    removed last."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    old = output.parent / f".{output.name}.old-{tag}"
    if not output.exists():
        os.rename(stage, output)
    elif _exchange(stage, output):
        old = stage  # it now holds the previous result
    else:
        os.rename(output, old)
        try:
            os.rename(stage, output)
        except BaseException:
            os.rename(old, output)
            raise
    fsync_folder(output.parent)
    if old.exists():
        _carry_kept(old, output, keep)
        shutil.rmtree(old)


@contextlib.contextmanager
def staged_output(output: str | os.PathLike, keep: tuple[str, ...] = KEEP) -> Iterator[Path]:
    """A fresh sibling folder of ``output`` to write the whole result into; swapped in as ``output`` when
    the block succeeds (module docstring), removed when it fails (the previous output untouched). The
    previous output's ``keep`` folders (resumable state, written in place during the run) are carried over."""
    output = Path(os.path.abspath(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = output.parent / f".{output.name}.new-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.mkdir(stage)
    try:
        yield stage
        _finish_files(stage)
        _COMMITTING.set()
        try:
            if interrupted():
                raise KeyboardInterrupt
            _swap_in(stage, output, keep)
        finally:
            _COMMITTING.clear()
    finally:
        if stage.exists():
            shutil.rmtree(stage)


def committed_paths(files: Mapping[str, Path], stage: Path, output: str | os.PathLike) -> dict[str, Path]:
    """Where ``files`` written in ``stage`` lie once it is committed as ``output``."""
    return {key: Path(output) / path.relative_to(stage) for key, path in files.items()}
