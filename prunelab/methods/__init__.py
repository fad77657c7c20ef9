"""Pruning methods: one file each, registered by name. Importing this package registers them all
(every module in this package other than ``base``, ``registry`` and the private ``_*`` ones is
imported). None of them imports torch at import time: a method imports it where it computes
with tensors, so that planning (``prunelab methods``, a dry run) does without torch."""

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


def build(
    name: str, hparams: dict, keep_ratio: float | None, keep_tokens: int | None
) -> tuple[PruningMethod, Budget | None]:
    """The method ``name`` with ``hparams`` and the budget it is given (None: it takes none),
    before any trained asset is bound: what planning reads, and what a worker binds a trial's
    assets to (``prunelab.workers.runner.build_method``)."""
    method = get(name).from_hparams(dict(hparams))
    budget = Budget(keep_ratio=keep_ratio, keep_tokens=keep_tokens) if method.uses_budget else None
    return method, budget


for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry") and not _module.name.startswith("_"):
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
    "build",
    "get",
    "register",
]
