"""FastV (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2").

At the input of decoder layer K, keep the visual tokens that received the most attention at
layer K-1 and drop the rest for all later layers (prefill and the KV cache used by decoding).

Choices, with what the literature does:
- Query rows: the official code ranks by the attention of the *last* token (``queries="last"``,
  the default); some re-implementations average over all tokens (``"all"``). Both available.
- Heads: mean over heads (official ``mean(dim=1)``).
- Positions: kept tokens keep their original position ids (FastV's in-place masking), unlike
  PyramidDrop which renumbers.
- The attention row is computed from the row's query and all keys of layer K-1 after RoPE, so
  SDPA/FlashAttention stay on (the official code switches the model to eager attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from prunelab.methods.base import (
    HyperparameterError,
    LayerSignals,
    LayerStep,
    Plan,
    PlanContext,
    PruningMethod,
    top_k_sorted,
)
from prunelab.methods.registry import register

if TYPE_CHECKING:
    import torch

__all__ = ["FastV", "fastv_scores"]


def fastv_scores(attention: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Importance of each visual token.

    attention: (H, Q, S) softmax attention rows of the query tokens at layer K-1.
    visual: (V,) positions of the visual tokens in the sequence.
    Returns (V,): attention received, averaged over heads and query rows.
    """
    return attention[:, :, visual].float().mean(dim=(0, 1))


@register
@dataclass(frozen=True)
class FastV(PruningMethod):
    queries: Literal["last", "all"] = "last"

    name: ClassVar[str] = "fastv"
    stages: ClassVar[str] = "layer K (prune_layer, default 2)"
    uses_layer: ClassVar[bool] = True
    default_prune_layer: ClassVar[int | None] = 2
    min_prune_layer: ClassVar[int] = 1
    paper: ClassVar[str] = "Chen et al., ECCV 2024, arXiv:2403.06764"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.queries not in ("last", "all"):
            raise HyperparameterError(f"fastv.queries={self.queries!r}: expected 'last' or 'all'")

    def plan(self, ctx: PlanContext) -> Plan:
        assert ctx.budget is not None
        layer = self.default_prune_layer if ctx.prune_layer is None else ctx.prune_layer
        keep = ctx.budget.tokens(ctx.n_visual)
        return Plan(layers=(LayerStep(layer=layer, keep=keep, queries=self.queries),))

    def score_layer(self, step: LayerStep, signals: LayerSignals) -> torch.Tensor:
        assert signals.attention is not None
        return fastv_scores(signals.attention, signals.visual)

    def select_layer(self, step: LayerStep, signals: LayerSignals) -> torch.Tensor:
        return top_k_sorted(self.score_layer(step, signals), step.keep)
