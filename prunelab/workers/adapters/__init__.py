"""Model adapters: everything model-family specific a method may need, behind one interface.

One module per family (or per few: ``qwen2_vl`` serves qwen2_vl and qwen2_5_vl); each defines
``adapter_class``, ``tiny_config``, ``build_tiny``, ``from_pretrained`` and ``model_info``, and
ends with ``register_family(__name__, "<family>", ...)``. :data:`FAMILIES` imports every module
of this package on its first lookup, so a new family needs only its module.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from types import ModuleType

from prunelab.registry import Registry, did_you_mean
from prunelab.workers.adapters.base import Adapter, Generation, LLMInput, Prepared, VLMAdapter

__all__ = [
    "FAMILIES",
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


def _import_family_modules() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


FAMILIES: Registry[ModuleType] = Registry("model family", load=_import_family_modules)
"""Family module by model family name (a config's ``family``)."""


def register_family(module: str, *families: str) -> None:
    """Register the adapter module named ``module`` (its ``__name__``) for ``families``."""
    for family in families:
        FAMILIES.add(family, sys.modules[module])


def family_problem(family: str) -> str | None:
    """Why ``family`` is not a model family (None: it is), a one-line message."""
    if family in FAMILIES:
        return None
    known = FAMILIES.names()
    hint = did_you_mean(family, known) if isinstance(family, str) else ""
    return f"family={family!r}: expected one of {', '.join(known)}{hint}"


def family_module(family: str) -> ModuleType:
    """The adapter module of ``family``; ValueError if there is none."""
    if (problem := family_problem(family)) is not None:
        raise ValueError(problem)
    return FAMILIES.get(family)


def adapter_for(loaded) -> Adapter:
    """The adapter for a :class:`~prunelab.workers.models.LoadedModel`."""
    module = family_module(loaded.spec.family)
    return module.adapter_class(loaded.spec.family)(loaded)
