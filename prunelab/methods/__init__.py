"""Pruning methods: one file each, registered by name. Importing this package registers them all."""

from prunelab.methods import fastv, none, random_subset  # noqa: F401  (registration)
from prunelab.methods.base import (
    Budget,
    HyperparameterError,
    LayerSignals,
    LayerStep,
    Plan,
    PlanContext,
    PruningMethod,
    VisionSelection,
    VisionSignals,
)
from prunelab.methods.registry import UnknownMethodError, available, get, register

__all__ = [
    "Budget",
    "HyperparameterError",
    "LayerSignals",
    "LayerStep",
    "Plan",
    "PlanContext",
    "PruningMethod",
    "UnknownMethodError",
    "VisionSelection",
    "VisionSignals",
    "available",
    "get",
    "register",
]
