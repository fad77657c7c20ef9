"""A registry of things looked up by name (pruning methods, model families, benchmark kinds)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

__all__ = ["Registry", "UnknownNameError", "did_you_mean"]

T = TypeVar("T")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the known name closest to ``name`` ("" if none is close)."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


class UnknownNameError(KeyError):
    """A name nobody registered; ``str()`` is one line:
    ``unknown <kind> 'fastvv'; did you mean 'fastv'? (known: a, b, c)``."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        hint = did_you_mean(name, known)
        super().__init__(f"unknown {kind} {name!r}{hint} (known: {', '.join(known)})")
        self.kind, self.name, self.known = kind, name, known

    def __str__(self) -> str:  # not KeyError's repr() of the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Objects of one ``kind`` ("method", "model family") by unique name.

    ``load``, if given, runs once before the first lookup (``get``, ``in``, ``names``,
    ``items``) to import the modules that register, where they cannot be imported with the
    registry. ``get`` raises ``error``, an :class:`UnknownNameError` subclass.
    """

    def __init__(
        self,
        kind: str,
        load: Callable[[], object] | None = None,
        error: type[UnknownNameError] = UnknownNameError,
    ) -> None:
        self.kind, self._load, self._error = kind, load, error
        self._entries: dict[str, T] = {}

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` as ``name`` and return it; the same object again is a no-op, a
        different one under a taken name a ValueError naming both."""
        if not name:
            raise ValueError(f"{self.kind} {obj!r} has no name")
        if (held := self._entries.get(name, obj)) is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered by {held!r}, not {obj!r}")
        self._entries[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`: ``@REGISTRY.register("name")``."""
        return lambda obj: self.add(name, obj)

    def unregister(self, name: str) -> T:
        """Remove ``name``, returning what it held (tests' throwaway entries)."""
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """The object registered as ``name``; :class:`UnknownNameError` (a KeyError) if none."""
        if name not in self:
            raise self._error(self.kind, name, self.names())
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._loaded())

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._loaded().items())  # names are unique: objects never compared

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._loaded()

    def _loaded(self) -> dict[str, T]:
        if (load := self._load) is not None:
            self._load = None  # first: loading may look names up
            try:
                load()
            except BaseException:
                self._load = load  # retried on the next lookup
                raise
        return self._entries
