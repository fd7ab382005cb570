"""A declared, user-settable parameter of a merge method or task-vector transform: its default, a help line,
and what values are allowed; `validate` converts a value or raises a ValueError naming the owner and the
parameter."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Parameter:
    """A declared method parameter: its default, a help line, and what values are allowed.

    The type is the default's (``float`` also takes ints; a ``None`` default takes ``kind``); ``choices``,
    ``minimum`` and ``maximum`` (inclusive) bound the value; ``optional`` allows ``None``. A parameter whose
    values are not plain scalars (e.g. a task-vector transform given by name or as a mapping) has ``convert``:
    it returns the value in canonical form or raises a ValueError saying what is allowed.
    """

    name: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    kind: type | None = None
    optional: bool = False
    convert: Callable[[Any], Any] | None = None

    @property
    def type(self) -> type:
        return self.kind or type(self.default)

    def validate(self, owner: str, value: Any, kind: str = "method") -> Any:
        """`value` converted to the parameter's type, or a ValueError naming the owner (a method, or the `kind`
        of thing) and the parameter."""
        where = f"{kind} {owner!r}: parameter {self.name!r}"
        if value is None and (self.optional or self.default is None):
            return None
        if self.convert is not None:
            try:
                return self.convert(value)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        expected = self.type
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise ValueError(f"{where} must be a {expected.__name__}, got {value!r}")
        if expected is float and not math.isfinite(value):
            raise ValueError(f"{where} must be finite, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{where} must be one of {list(self.choices)}, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{where} must be ≥ {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{where} must be ≤ {self.maximum}, got {value!r}")
        return value
