"""DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models", arXiv:2503.02175; code github.com/vbdi/divprune).

A vision stage that keeps the most *diverse* subset of the visual tokens: the Max-Min Diversity
Problem solved greedily on cosine distances of the projected tokens x (N, D):

    (1) d(i, j) = 1 - <x_i / |x_i|, x_j / |x_j|>                           (N x N distances)
    (2) first token: s_1 = argmax_j min_{i != j} d(i, j)   (the token farthest from its nearest
        neighbour; official: 2nd-smallest entry of each column, the smallest being d(j, j) = 0)
    (3) then, for k = 2 .. keep:  s_k = argmax_{j not in S} min_{i in S} d(i, j)   (paper eq. 3)

The kept tokens are S in increasing index order, unchanged (no merging); the others are dropped.

Choices (official ``DivPrune`` / ``pairwise_cosine_similarity`` in the authors' LLaVA code):

- Features: the projected visual tokens (official: the output of ``mm_projector``, pruned before
  the LLM at ``LAYER_INDEX=0``), which is ``VisionSignals.tokens``: no encoder signal is needed.
- First token: as the official code (largest nearest-neighbour distance, eq. 2), not a random or
  fixed start.
- Already selected tokens are excluded explicitly in (3); the official code relies on
  d(j, j) = 0 making them lose the argmax, which float rounding (1 - cos ~ 1e-7) can break when
  the remaining tokens are duplicates of selected ones. Otherwise identical, ties to the lowest
  index (``argmax``). Distances are computed in float32.
- Order: the kept tokens keep their original order (``kept`` sorted), as the official code.
- Several tiles: one selection over all N tokens (the official LLaVA-1.6 code also prunes the
  concatenated image features).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from prunelab.methods.base import (
    Plan,
    PlanContext,
    PruningMethod,
    VisionSelection,
    VisionSignals,
)
from prunelab.methods.registry import register

if TYPE_CHECKING:
    import torch

__all__ = ["DivPrune", "cosine_distances", "divprune_order"]


def cosine_distances(x: torch.Tensor) -> torch.Tensor:
    """Eq. (1): (N, N) float32 cosine distances of the rows of x (N, D)."""
    unit = x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1.0 - unit @ unit.T


def divprune_order(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Eqs. (2)-(3): the (keep,) greedy max-min selection, in the order it was chosen."""
    import torch

    n = x.shape[0]
    keep = min(keep, n)
    distances = cosine_distances(x)
    chosen = torch.empty(keep, dtype=torch.long, device=x.device)
    if n == 1:
        return torch.zeros(keep, dtype=torch.long, device=x.device)
    # (2): per column, the 2nd smallest entry (the smallest is the column's own 0)
    first = torch.topk(distances, 2, dim=0, largest=False).values[1]
    chosen[0] = torch.argmax(first)
    min_dist = distances[chosen[0]].clone()  # (N,) distance of each token to the selected set
    selected = torch.zeros(n, dtype=torch.bool, device=x.device)
    selected[chosen[0]] = True
    for k in range(1, keep):
        scores = min_dist.masked_fill(selected, float("-inf"))
        chosen[k] = torch.argmax(scores)
        selected[chosen[k]] = True
        min_dist = torch.minimum(min_dist, distances[chosen[k]])
    return chosen


@register
@dataclass(frozen=True)
class DivPrune(PruningMethod):
    """Greedy max-min diversity selection on the projected visual tokens."""

    name: ClassVar[str] = "divprune"
    stages: ClassVar[str] = "vision"
    paper: ClassVar[str] = "Alvar et al., CVPR 2025, arXiv:2503.02175"

    def plan(self, ctx: PlanContext) -> Plan:
        assert ctx.budget is not None
        return Plan(vision_keep=ctx.budget.tokens(ctx.n_visual))

    def select_vision(self, signals: VisionSignals, keep: int) -> VisionSelection:
        import torch

        tokens = signals.tokens
        kept = divprune_order(tokens, keep).sort().values
        assignment = torch.full((tokens.shape[0],), -1, dtype=torch.long, device=tokens.device)
        assignment[kept] = torch.arange(kept.numel(), device=tokens.device)
        return VisionSelection(tokens=tokens[kept], kept=kept, assignment=assignment)
