"""Model adapters: everything model-family specific a method may need, behind one interface.

One module per family (or per few: ``qwen2_vl`` serves qwen2_vl and qwen2_5_vl); each defines
``adapter_class``, ``tiny_config``, ``build_tiny``, ``from_pretrained`` and ``model_info``.
:data:`FAMILY_MODULES` names the module of each family, so that a family is known (validated,
listed in did-you-mean messages) without importing anything: a family's module, and the model
library with it, is imported on the first :func:`family_module` of that family only. A new
family is its module plus its line in :data:`FAMILY_MODULES` (``tests/test_registry.py`` checks
that every module of this package has one, and that each line names the right module).

The interface types (:class:`Adapter`, :class:`VLMAdapter`, ...) are importable from here as
before; they come from :mod:`prunelab.workers.adapters.base` (torch) on first use.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from prunelab.registry import Registry, did_you_mean

if TYPE_CHECKING:
    from prunelab.workers.adapters.base import (
        Adapter,
        Generation,
        LLMInput,
        Prepared,
        VLMAdapter,
    )

__all__ = [
    "FAMILIES",
    "FAMILY_MODULES",
    "Adapter",
    "Generation",
    "LLMInput",
    "Prepared",
    "VLMAdapter",
    "adapter_for",
    "family_module",
    "family_problem",
    "register_family",
]

FAMILY_MODULES: dict[str, str] = {
    "internvl": "internvl",
    "llava": "llava",
    "llava_next": "llava_next",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",
}
"""Model family (a config's ``family``) -> the module of this package that implements it."""

FAMILIES: Registry[str] = Registry("model family")
"""Full module name by model family name; the modules are imported by :func:`family_module`."""

# the interface types re-exported from .base, which imports torch: loaded by __getattr__
_BASE_NAMES = frozenset({"Adapter", "Generation", "LLMInput", "Prepared", "VLMAdapter"})


def register_family(module: str, *families: str) -> None:
    """Register the adapter module named ``module`` (a full module name, imported on the first
    lookup of one of ``families``) for ``families``."""
    for family in families:
        FAMILIES.add(family, module)


def _register_shipped() -> None:
    for family, module in FAMILY_MODULES.items():
        register_family(f"{__name__}.{module}", family)


_register_shipped()


def family_problem(family: str) -> str | None:
    """Why ``family`` is not a model family (None: it is), a one-line message. Imports
    nothing."""
    if family in FAMILIES:
        return None
    known = FAMILIES.names()
    hint = did_you_mean(family, known) if isinstance(family, str) else ""
    return f"family={family!r}: expected one of {', '.join(known)}{hint}"


def family_module(family: str) -> ModuleType:
    """The adapter module of ``family``, imported now if it was not yet; ValueError if there
    is none."""
    if (problem := family_problem(family)) is not None:
        raise ValueError(problem)
    return importlib.import_module(FAMILIES.get(family))


def adapter_for(loaded) -> Adapter:
    """The adapter for a :class:`~prunelab.workers.models.LoadedModel`."""
    module = family_module(loaded.spec.family)
    return module.adapter_class(loaded.spec.family)(loaded)


def __getattr__(name: str) -> Any:
    if name in _BASE_NAMES:
        return getattr(importlib.import_module(f"{__name__}.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
