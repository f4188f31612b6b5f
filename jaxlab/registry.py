"""One registry type for everything chosen by name: models, optimizers, attention and scan
implementations, objectives, mixers.

A module creates one ``Registry`` per kind of thing and registers its entries at import time::

    OPTIMIZERS = Registry("optimizer", field="config.optim.name")
    OPTIMIZERS.register("adamw", make_adamw)
    OPTIMIZERS.get(config.optim.name)  # ValueError naming the field, the choices and the value

Registering a name twice is an error unless ``replace=True`` (a user overriding a built-in does
so on purpose; two modules colliding by accident should not be silent).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind, looked up with an error that names the config field."""

    def __init__(self, kind: str, *, field: str | None = None):
        """``kind``: what the entries are (for messages); ``field``: the argument or config
        field users set to choose one (default ``kind``)."""
        self.kind = kind
        self.field = field or kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Adds ``entry`` under ``name`` and returns it (so it also works as a decorator's
        body)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} registry: name must be a non-empty string, got {name!r}")
        if name in self._entries and not replace:
            raise ValueError(
                f"{self.kind} registry: {name!r} is already registered; pass replace=True to "
                "override it"
            )
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ValueError(f"{self.field} must be one of {self.names()}, got {name!r}")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
