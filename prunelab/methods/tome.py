"""ToMe (Bolya et al., ICLR 2023, "Token Merging: Your ViT But Faster", arXiv:2210.09461; code
github.com/facebookresearch/ToMe) as a visual-token reduction baseline.

ToMe merges ``r`` tokens inside *every* ViT block, between attention and MLP, by bipartite soft
matching on the block's keys. The visual-token pruning papers compare against "ToMe" as a
token-count reduction before the LLM; prunelab does the same here: bipartite soft matching
applied as one vision stage to the projected visual tokens, repeated until ``keep`` tokens
remain. One round, on the current t tokens x (t, D) with metric m (t, d) and sizes s (t,):

    (1) A = tokens 0, 2, 4, ... and B = tokens 1, 3, 5, ... of the current order;
        r = min(t - keep, floor(t / 2))
    (2) S_ab = <m_a / |m_a|, m_b / |m_b|> for a in A, b in B;  best(a) = argmax_b S_ab,
        score(a) = max_b S_ab
    (3) the r tokens of A with the largest score merge into their best(a) (several A may merge
        into one B); the other A tokens and all of B stay: t - r tokens remain
    (4) a B token b with merged set M_b: ``size_weighted`` (ToMe's merge_wavg, default):
            x_b <- (s_b x_b + sum_{a in M_b} s_a x_a) / (s_b + sum_{a in M_b} s_a),
            s_b <- s_b + sum s_a   (same for the metric m)
        otherwise (``bipartite_soft_matching``'s plain ``mean``): unweighted mean of x_b and the
        x_a, sizes ignored.

Rounds repeat while t > keep (each round at most halves t, so about log2(N / keep) rounds).
Output: the remaining tokens, each anchored on the input token it started from (a B token that
absorbed others keeps its own index), in index order; ``assignment`` maps every input to the
output it ended up in.

Choices (official ``tome/merge.py``: ``bipartite_soft_matching``, ``merge_wavg``):

- Where: once, on the projected tokens, rather than inside every encoder block (the original,
  which needs the encoder's forward pass rewritten and changes the encoder's FLOPs). This is the
  common "ToMe" baseline of the visual-token pruning papers.
- Metric: the encoder's head-mean keys at the feature layer (``key_metric``; official ToMe uses
  the block's head-mean keys ``k.mean(1)``), default; ``metric="tokens"`` uses the projected
  tokens themselves (no encoder signal needed). Between rounds the metric of a merged token is
  merged like the token (official ToMe recomputes keys in the next block; there is no next
  block here).
- Size tracking: ``size_weighted=True`` (default) keeps each token's size (how many inputs it
  stands for) and merges by size-weighted average, so every output is the plain mean of the
  inputs it absorbed, as ToMe's ``merge_wavg``. ToMe's *proportional attention* (adding log s to
  the attention logits of later blocks) is not applied: the merged tokens go to the LLM, whose
  attention prunelab does not bias.
- Order between rounds: official ToMe returns [unmerged A (in score order), B] and alternates A/B
  over that order in the next block; here the tokens are put back in index order (by anchor)
  after every round, so every round alternates over the spatial order like the first. Score ties
  are broken by index (stable sort).
- No protected tokens: the CLS token is not among prunelab's visual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

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

__all__ = ["ToMe", "bipartite_merge_round", "tome_merge"]


def bipartite_merge_round(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: torch.Tensor,
    r: int,
    size_weighted: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of eqs. (1)-(4) on x (t, D), metric (t, d), size (t,), merging ``r`` tokens.

    Returns the new x (t - r, D), metric, size, ``target`` (t,): the index in the new order of
    the token each of the t inputs went to, and ``alive`` (t,): which inputs survive (in order).
    """
    import torch

    t = x.shape[0]
    r = min(r, t // 2)
    device = x.device
    a_idx = torch.arange(0, t, 2, device=device)
    b_idx = torch.arange(1, t, 2, device=device)
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    scores = unit[a_idx] @ unit[b_idx].T  # (|A|, |B|)
    node_max, node_idx = scores.max(dim=-1)
    edge = torch.argsort(node_max, descending=True, stable=True)
    src = a_idx[edge[:r]]  # merged A tokens
    dst = b_idx[node_idx[edge[:r]]]  # the B token each one joins

    into = torch.arange(t, device=device)  # index (in the old order) of each token's target
    into[src] = dst
    alive = torch.ones(t, dtype=torch.bool, device=device)
    alive[src] = False
    weight = size.float() if size_weighted else torch.ones(t, device=device)
    new_pos = torch.cumsum(alive, 0) - 1  # position of each survivor in the new order
    target = new_pos[into]
    m = int(alive.sum())
    wsum = torch.zeros(m, device=device).index_add_(0, target, weight)
    x_new = torch.zeros(m, x.shape[1], device=device).index_add_(0, target, x * weight[:, None])
    metric_new = torch.zeros(m, metric.shape[1], device=device).index_add_(
        0, target, metric * weight[:, None]
    )
    size_new = torch.zeros(m, device=device).index_add_(0, target, size.float())
    return x_new / wsum[:, None], metric_new / wsum[:, None], size_new, target, alive


def tome_merge(
    tokens: torch.Tensor, metric: torch.Tensor, keep: int, size_weighted: bool = True
) -> VisionSelection:
    """Bipartite soft matching rounds until ``keep`` of the N tokens (N, D) remain."""
    import torch

    n = tokens.shape[0]
    device = tokens.device
    x = tokens.float()
    m = metric.float()
    size = torch.ones(n, device=device)
    anchor = torch.arange(n, device=device)  # input index each current token is anchored on
    where = torch.arange(n, device=device)  # current position of the token each input is in
    while x.shape[0] > keep:
        r = min(x.shape[0] - keep, x.shape[0] // 2)
        x, m, size, target, alive = bipartite_merge_round(x, m, size, r, size_weighted)
        anchor = anchor[alive]
        where = target[where]
    return VisionSelection(tokens=x.to(tokens.dtype), kept=anchor, assignment=where)


@register
@dataclass(frozen=True)
class ToMe(PruningMethod):
    """Bipartite soft matching (ToMe) applied once to the visual tokens before the LLM."""

    metric: Literal["keys", "tokens"] = "keys"
    size_weighted: bool = True

    name: ClassVar[str] = "tome"
    stages: ClassVar[str] = "vision"
    paper: ClassVar[str] = "Bolya et al., ICLR 2023, arXiv:2210.09461"

    def plan(self, ctx: PlanContext) -> Plan:
        assert ctx.budget is not None
        keep = ctx.budget.tokens(ctx.n_visual)
        signals = frozenset({"key_metric"}) if self.metric == "keys" else frozenset()
        return Plan(vision_keep=keep, vision_signals=signals)

    def select_vision(self, signals: VisionSignals, keep: int) -> VisionSelection:
        if self.metric == "keys":
            if signals.key_metric is None:
                raise ValueError("tome with metric='keys' needs the key_metric vision signal")
            metric = signals.key_metric
        else:
            metric = signals.tokens
        return tome_merge(signals.tokens, metric, keep, self.size_weighted)
