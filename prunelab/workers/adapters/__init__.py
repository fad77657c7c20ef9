"""Model adapters: everything model-family specific a method may need, behind one interface.

One module per family; each defines ``ADAPTER`` (a :class:`VLMAdapter` subclass),
``tiny_config``, ``build_tiny``, ``from_pretrained`` and ``model_info``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from prunelab.workers.adapters.base import Adapter, Generation, LLMInput, Prepared, VLMAdapter

__all__ = [
    "FAMILY_MODULES",
    "Adapter",
    "Generation",
    "LLMInput",
    "Prepared",
    "VLMAdapter",
    "adapter_for",
    "family_module",
]

FAMILY_MODULES = {
    "llava": "prunelab.workers.adapters.llava",
    "llava_next": "prunelab.workers.adapters.llava_next",
    "qwen2_vl": "prunelab.workers.adapters.qwen2_vl",
    "qwen2_5_vl": "prunelab.workers.adapters.qwen2_vl",
    "internvl": "prunelab.workers.adapters.internvl",
}


def family_module(family: str) -> ModuleType:
    """The adapter module of ``family``."""
    try:
        name = FAMILY_MODULES[family]
    except KeyError:
        raise ValueError(
            f"family={family!r}: expected one of {', '.join(FAMILY_MODULES)}"
        ) from None
    return importlib.import_module(name)


def adapter_for(loaded) -> Adapter:
    """The adapter for a :class:`~prunelab.workers.models.LoadedModel`."""
    module = family_module(loaded.spec.family)
    return module.adapter_class(loaded.spec.family)(loaded)
