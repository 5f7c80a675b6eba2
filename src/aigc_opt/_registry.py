"""A small name -> object registry, filled by a decorator.

Used for quantization methods, compile backends, runtime adapters and pass types, so that adding
one is adding one function and one decorator line, never editing an ``if/elif`` chain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import ConfigError, UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries. Duplicates are refused; unknown names get the closest known ones.

    Example:
        >>> methods: Registry[object] = Registry("quantization method")
        >>> @methods.register("int8-dynamic")
        ... def _int8_dynamic(): ...
        >>> "int8-dynamic" in methods
        True
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None) -> Callable[[T], T] | T:
        """Register ``entry`` under ``name``; used bare as ``@registry.register("name")``."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ConfigError(
                    f"A {self.kind} named {name!r} is already registered "
                    f"({self._entries[name]!r}); pick another name or unregister it first."
                )
            self._entries[name] = obj
            return obj

        return add(entry) if entry is not None else add

    def unregister(self, name: str) -> None:
        self.get(name)
        del self._entries[name]

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.kind, name, self._entries) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
