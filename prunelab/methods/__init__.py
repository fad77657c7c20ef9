"""Pruning methods: one file each, registered by name. Importing this package registers them all
(every module in this package other than ``base`` and ``registry`` is imported)."""

import importlib
import pkgutil

from prunelab.methods.base import (
    BUDGET_MODES,
    AverageBudget,
    Budget,
    HyperparameterError,
    LayerSelection,
    LayerSignals,
    LayerStep,
    Plan,
    PlanContext,
    PruningMethod,
    TrainedHeadMethod,
    VisionSelection,
    VisionSignals,
)
from prunelab.methods.registry import METHODS, UnknownMethodError, available, get, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "BUDGET_MODES",
    "METHODS",
    "AverageBudget",
    "Budget",
    "HyperparameterError",
    "LayerSelection",
    "LayerSignals",
    "LayerStep",
    "Plan",
    "PlanContext",
    "PruningMethod",
    "TrainedHeadMethod",
    "UnknownMethodError",
    "VisionSelection",
    "VisionSignals",
    "available",
    "get",
    "register",
]
