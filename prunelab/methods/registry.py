"""Registry of pruning methods: ``@register`` on a :class:`PruningMethod` subclass."""

from __future__ import annotations

from prunelab.methods.base import PruningMethod
from prunelab.registry import Registry, UnknownNameError

__all__ = ["METHODS", "UnknownMethodError", "available", "get", "register"]


class UnknownMethodError(UnknownNameError):
    """``get`` of an unregistered method: ``unknown method 'x'; did you mean 'y'? (known: ...)``."""


METHODS: Registry[type[PruningMethod]] = Registry("method", error=UnknownMethodError)
_REGISTRY = METHODS._entries  # the name -> class dict behind METHODS (tests monkeypatch it)


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: register a method under its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, PruningMethod)):
        raise TypeError(f"{cls!r} is not a PruningMethod subclass")
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    return METHODS.add(cls.name, cls)


def get(name: str) -> type[PruningMethod]:
    return METHODS.get(name)


def available() -> list[str]:
    return METHODS.names()
