"""Random pruning: a seeded uniform subset of the visual tokens.

The control every paper reports against: with ``prune_layer=0`` it acts before the LLM (vision
stage), otherwise at the input of decoder layer ``prune_layer`` (original positions kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from prunelab.methods.base import (
    LayerSignals,
    LayerStep,
    Plan,
    PlanContext,
    PruningMethod,
    VisionSelection,
    VisionSignals,
)
from prunelab.methods.registry import register

if TYPE_CHECKING:
    import torch

__all__ = ["RandomPruning", "random_subset"]


def random_subset(n: int, keep: int, generator: torch.Generator | None) -> torch.Tensor:
    """Sorted (keep,) indices drawn uniformly without replacement from range(n)."""
    import torch

    return torch.randperm(n, generator=generator)[:keep].sort().values


@register
@dataclass(frozen=True)
class RandomPruning(PruningMethod):
    name: ClassVar[str] = "random"
    stages: ClassVar[str] = "vision (prune_layer=0) or layer prune_layer"
    uses_layer: ClassVar[bool] = True
    uses_seed: ClassVar[bool] = True
    default_prune_layer: ClassVar[int | None] = 0

    def plan(self, ctx: PlanContext) -> Plan:
        assert ctx.budget is not None
        keep = ctx.budget.tokens(ctx.n_visual)
        layer = self.default_prune_layer if ctx.prune_layer is None else ctx.prune_layer
        if layer == 0:
            return Plan(vision_keep=keep)
        return Plan(layers=(LayerStep(layer=layer, keep=keep, queries=None),))

    def select_vision(self, signals: VisionSignals, keep: int) -> VisionSelection:
        n = signals.tokens.shape[0]
        kept = random_subset(n, keep, signals.generator).to(signals.tokens.device)
        return VisionSelection(tokens=signals.tokens[kept], kept=kept)

    def select_layer(self, step: LayerStep, signals: LayerSignals) -> torch.Tensor:
        n = signals.visual.shape[0]
        return random_subset(n, step.keep, signals.generator).to(signals.visual.device)
