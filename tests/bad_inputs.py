"""The row type of the bad-input tables (``CASES`` in ``test_bad_inputs_*.py`` and the merge config tests),
which ``docs/bad-inputs.md`` is generated from."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: a short id, a one-line description a README can show, what is expected (an exception
    type; for a merge config the changes that make it bad), the message part that names the culprit, and
    (where the table needs it) the callable that builds the input and makes the call."""

    id: str
    description: str
    expected: Any
    fragment: str
    run: Callable[..., Any] | None = None


def fill_world(value: Any, world: Any) -> Any:
    """`value` (nested dicts, lists, strings) with "{world}" replaced by the test's folder."""
    if isinstance(value, str):
        return value.replace("{world}", str(world))
    if isinstance(value, dict):
        return {k: fill_world(v, world) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_world(v, world) for v in value]
    return value


def assert_no_traceback(capfd: Any) -> None:
    """The command printed no traceback on stderr (captured at the file descriptor, so a thread's uncaught
    exception or a library's logged one counts too): a bad input gives one ``error:`` line, nothing else."""
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-3000:]
