"""Registry of pruning methods: ``@register`` on a :class:`PruningMethod` subclass."""

from __future__ import annotations

import difflib

from prunelab.methods.base import PruningMethod

__all__ = ["UnknownMethodError", "available", "get", "register"]

_REGISTRY: dict[str, type[PruningMethod]] = {}


class UnknownMethodError(KeyError):
    def __init__(self, name: str) -> None:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        super().__init__(f"unknown method {name!r}{hint} (known: {', '.join(sorted(_REGISTRY))})")
        self.name = name

    def __str__(self) -> str:
        return str(self.args[0])


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    if not (isinstance(cls, type) and issubclass(cls, PruningMethod)):
        raise TypeError(f"{cls!r} is not a PruningMethod subclass")
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is already registered by {_REGISTRY[cls.name]}")
    _REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[PruningMethod]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(name) from None


def available() -> list[str]:
    return sorted(_REGISTRY)
