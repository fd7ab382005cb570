"""The refusal the library raises for a ``merge`` or ``paper`` input it cannot run.

A `MergeError` carries one message naming the file, task, field or parameter at fault. Library modules raise
it and never exit the process; only the command line (`adamerging_jax.cli`) prints it as one ``error: ...``
line and exits with status 1.
"""

from __future__ import annotations


class MergeError(ValueError):
    """A refused input, its message naming what is at fault (module docstring)."""
