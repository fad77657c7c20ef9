"""SGP: small-VLM-guided pruning (Zhao et al., CVPR 2025, "A Stitch in Time Saves Nine: Small
VLM is a Precise Guidance for Accelerating Large VLMs", arXiv:2412.03324).

A small VLM of the same family answers the question first. The attention its visual tokens
receive is aggregated over *all* its layers, heads, the prompt's text tokens and the generated
answer tokens into one global score per visual token (the paper's Fig. 2b); the large VLM then
keeps the top-scoring visual tokens at decoder layer K and drops the rest for the remaining
layers and the KV cache. The guide's generation is counted in ``tflops_guidance`` (and in
``tflops``) and its run time in the prefill latency.

    s_j = sum_l sum_h sum_{q in prompt text u answer} A^{l,h}_{q, j}        (global score)
    keep = top-k_j s_j                                                        (at layer K)

Choices:
- Queries: the prompt's text tokens (prefill) and every generated token (decode steps), as in
  the paper's aggregation; text before the image cannot attend to it (causal) and adds nothing.
- ``aggregate``: ``sum`` (the paper's aggregation) or ``mean`` over rows (identical ranking
  unless rows differ in count across layers; kept for comparison with FastV-style means).
- Layer K is the ``prune_layer`` axis (default 2, the FastV layer the paper's "FastV-oracle"
  analysis uses); SEE (the paper's early exit that skips the large model) is not part of SGP
  and is not implemented.
- The guide must produce the same visual tokens one to one (same image processing); the
  worker checks it per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from prunelab.methods.base import (
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

__all__ = ["SGP", "sgp_scores"]


def sgp_scores(
    rows: list[torch.Tensor], visual: torch.Tensor, aggregate: str = "sum"
) -> torch.Tensor:
    """Global attention score of each visual token.

    rows: (H, Q, S) softmax attention rows of the guide, one tensor per layer and forward
    (S grows by one per decode step; the visual positions are the same in all of them).
    visual: (N,) sequence positions of the visual tokens.
    Returns (N,) float32: the sum (or mean) over every row of the attention each token receives.
    """
    import torch

    if not rows:
        raise ValueError("no guidance attention rows were recorded")
    total = torch.zeros(visual.numel(), dtype=torch.float32, device=rows[0].device)
    count = 0
    for row in rows:
        total += row[:, :, visual.to(row.device)].float().sum(dim=(0, 1))
        count += row.shape[0] * row.shape[1]
    return total / count if aggregate == "mean" else total


@register
@dataclass(frozen=True)
class SGP(PruningMethod):
    aggregate: Literal["sum", "mean"] = "sum"

    name: ClassVar[str] = "sgp"
    stages: ClassVar[str] = "guidance (small model) + layer K (prune_layer, default 2)"
    uses_layer: ClassVar[bool] = True
    needs_guidance: ClassVar[bool] = True
    default_prune_layer: ClassVar[int | None] = 2
    min_prune_layer: ClassVar[int] = 1
    paper: ClassVar[str] = "Zhao et al., CVPR 2025, arXiv:2412.03324"

    def plan(self, ctx: PlanContext) -> Plan:
        assert ctx.budget is not None
        layer = self.default_prune_layer if ctx.prune_layer is None else ctx.prune_layer
        if not 1 <= layer < ctx.n_layers:
            raise ValueError(f"sgp prune_layer={layer}: must be in [1, {ctx.n_layers - 1}]")
        keep = ctx.budget.tokens(ctx.n_visual)
        return Plan(layers=(LayerStep(layer=layer, keep=keep, queries=None),))

    def score_guidance(self, rows: list[torch.Tensor], visual: torch.Tensor) -> torch.Tensor:
        return sgp_scores(rows, visual, self.aggregate)

    def score_layer(self, step: LayerStep, signals: LayerSignals) -> torch.Tensor:
        if signals.guidance is None:
            raise RuntimeError("sgp selects by guidance scores, but none were computed")
        return signals.guidance

    def select_layer(self, step: LayerStep, signals: LayerSignals) -> torch.Tensor:
        return top_k_sorted(self.score_layer(step, signals), step.keep)
