"""The unpruned baseline: every visual token reaches every layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prunelab.methods.base import Plan, PlanContext, PruningMethod
from prunelab.methods.registry import register

__all__ = ["NoPruning"]


@register
@dataclass(frozen=True)
class NoPruning(PruningMethod):
    """Keeps all visual tokens; the reference for ``score_ratio``, ``flops_ratio`` and fidelity."""

    name: ClassVar[str] = "none"
    stages: ClassVar[str] = "-"
    uses_budget: ClassVar[bool] = False

    def plan(self, ctx: PlanContext) -> Plan:
        return Plan()
