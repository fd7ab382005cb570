"""A catalog of named values of one kind (merge methods, task-vector transforms): registered by name, looked
up by name, and an unknown name answered with the known ones."""

from __future__ import annotations

from typing import Any, TypeVar

Named = TypeVar("Named")


class Catalog(dict[str, Any]):
    """``{name: value}`` for values with a ``name``; `kind` words its errors ("merge method", ...)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, value: Named, *, replace: bool = False) -> Named:
        """Register `value` under ``value.name`` (an existing name needs ``replace=True``); returns it."""
        name = getattr(value, "name", None)
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self and not replace:
            raise ValueError(f"{self.kind} {name!r} is registered already; pass replace=True to replace it")
        self[name] = value
        return value

    def lookup(self, name: str) -> Any:
        """The value registered as `name`; an unknown name lists the known ones."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {sorted(self)}")
        return self[name]
