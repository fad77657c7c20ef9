"""PruMerge+ (Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large
Multimodal Models", arXiv:2403.15388, ICCV 2025; code github.com/42Shawn/LLaVA-PruMerge).

A vision stage. With a (N,) the encoder's CLS attention (``cls_attention``), k (N, d) the keys
(``key_metric``) and x (N, D) the projected visual tokens:

    (1) outliers (IQR): Q1, Q3 = 25th / 75th percentiles of a (linear interpolation),
        O = {i : a_i > Q3 + c * (Q3 - Q1)},  c = ``iqr_factor`` = 1.5, ranked by a (descending);
        with no outlier (e.g. uniform attention) O = {argmax a} (the official code would divide
        by zero)
    (2) PruMerge+ adds spatially uniform samples U (the "+"), so that K = O u U
        ``budget_mode="adaptive"`` (the paper's count, varies per image; official
        ``token_prune_merge_advanced_plus``): step = floor(N / |O|), stride = max(1, floor(step /
        3)); U = tokens at positions 0, stride, 2 stride, ... < N - 1 of the spatial order
        (tile, row, col), minus O.
        ``budget_mode="budget"`` (default; exactly ``keep`` tokens out, so keep-ratio sweeps
        work): slots = keep (minus 1 for the extra token below); if |O| >= slots, K = the
        ``slots`` outliers with the largest a; otherwise U = ``need = slots - |O|`` tokens evenly
        spaced over the M non-outliers in spatial order (positions floor(i * M / need),
        i = 0 .. need - 1), the same arithmetic-sequence sampling as the adaptive mode with the
        stride set by the budget.
    (3) merge (kNN on keys): for each kept p, NN(p) = the ``knn`` = 32 tokens j != p (kept or
        not) with the largest <k_p / |k_p|, k_j / |k_j|>;
        ``merge="official"``:      y_p = x_p + sum_{j in NN(p)} a_j x_j
        ``merge="weighted_mean"``: y_p = (a_p x_p + sum_{j in NN(p)} a_j x_j) / (a_p + sum a_j)
    (4) ``extra_token`` (official): one more token e = sum_{j not in K} a_j x_j over the pruned
        tokens (``weighted_mean``: divided by sum_{j not in K} a_j), anchored on the pruned token
        with the largest a.

Output: y_p for p in K and e, in anchor order (``keep`` tokens in budget mode; |K| + 1 in
adaptive mode, reported per sample as ``visual_tokens_kept``). ``assignment`` is not given: the
kNN merge is many-to-many (a pruned token feeds every kept token it is a neighbour of).

Choices (official = ``llava/model/multimodal_encoder/clip_encoder.py``):

- Budget: the paper's count is adaptive (about 25% of the tokens for PruMerge+ on LLaVA-1.5);
  prunelab sweeps need exact budgets, so ``budget_mode="budget"`` (default) fills with spatial
  samples or trims the outliers by attention as in (2); ``"adaptive"`` reproduces the paper's
  variable count (the plan's ``vision_keep``, used only for compute estimates, is then the
  budget, not the realised count). Official counts use ``int(N * (|O| / N))`` and
  ``int(1 / ratio)`` in floating point; here the exact integers |O| and floor(N / |O|).
- Spatial samples: the official code samples flat indices ``arange(0, 575, stride)`` of the
  single 24 x 24 grid (the last index is never sampled); here the arithmetic sequence runs over
  the tokens sorted by (tile, row, col) (``coords``), so several tiles / thumbnails are covered
  in proportion to their size, and ``< N - 1`` generalises 575.
- Attention and keys: the official code hooks q / k of CLIP ``layers[23]`` (the last block, whose
  input is the penultimate-layer features LLaVA uses), computes ONE softmax over the full
  1024-d q . k scaled by 1024^-0.5 (no head split), and takes full 1024-d keys. prunelab's adapters
  give the per-head softmax of the CLS row averaged over heads and head-mean keys at the encoder
  layer that *produces* the features (``layers[22]`` on LLaVA-1.5, one block earlier): the ranking
  and the IQR count differ somewhat from the official ones. Encoders without CLS (Qwen2-VL,
  Qwen2.5-VL): mean attention received (the adapters' substitute); PruMerge has no official
  variant for them.
- Merge formula: the official code adds the attention-weighted *sum* of the neighbours to the
  token (``updated_center = x_others[i] + weighted_avg`` with the division by the weights
  commented out): default ``"official"``; ``"weighted_mean"`` divides by the weights (the
  division the code has commented out; the "weighted average by attention" reading of the
  paper's description), the kept token weighted by its own attention. Neighbours are taken
  among all other tokens (kept ones included) and read from the un-merged tokens, as the
  official code.
- Extra token: the official inference code appends ``extra_one_token`` (attention-weighted sum of
  all pruned tokens) after the kept tokens; here it is anchored on the most-attended pruned token
  (``kept`` must be distinct input indices) and counts towards ``keep`` in budget mode.
  ``extra_token=False`` leaves it out.
- What is merged: the official code merges the CLIP features *before* the projector (then
  projects); here the projected tokens (``VisionSignals.tokens``), the only ones a vision stage
  has. The projector is nonlinear (2-layer GELU MLP), so merged tokens differ from the official.
- Order: official order is [outliers by attention, spatial samples, extra token]; here every
  token sits at its anchor in index order (``kept`` sorted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from prunelab.methods.base import (
    HyperparameterError,
    Plan,
    PlanContext,
    PruningMethod,
    VisionSelection,
    VisionSignals,
)
from prunelab.methods.registry import register

if TYPE_CHECKING:
    import torch

__all__ = [
    "PruMergePlus",
    "iqr_outliers",
    "prumerge_merge",
    "spatial_order",
    "spatial_samples_adaptive",
    "spatial_samples_budget",
]


def iqr_outliers(attention: torch.Tensor, factor: float = 1.5) -> torch.Tensor:
    """Eq. (1): indices i with a_i > Q3 + factor * (Q3 - Q1), by decreasing attention."""
    import torch

    a = attention.float()
    q1, q3 = torch.quantile(a, torch.tensor([0.25, 0.75], device=a.device))
    outliers = (a > q3 + factor * (q3 - q1)).nonzero().squeeze(-1)
    return outliers[torch.argsort(a[outliers], descending=True, stable=True)]


def spatial_order(coords: torch.Tensor) -> torch.Tensor:
    """(N,) token indices sorted by (tile, row, col) of ``coords`` (N, 3)."""
    import torch

    c = coords.long()
    base = int(c.max()) + 1 if c.numel() else 1
    key = (c[:, 0] * base + c[:, 1]) * base + c[:, 2]
    return torch.argsort(key, stable=True)


def spatial_samples_adaptive(coords: torch.Tensor, n_outliers: int) -> torch.Tensor:
    """Eq. (2), adaptive: positions 0, s, 2s, ... < N - 1 of the spatial order, with
    s = max(1, floor(floor(N / |O|) / 3)) (official arithmetic sequence)."""
    import torch

    n = coords.shape[0]
    stride = max(1, (n // max(1, n_outliers)) // 3)
    positions = torch.arange(0, max(1, n - 1), stride, device=coords.device)
    return spatial_order(coords)[positions]


def spatial_samples_budget(coords: torch.Tensor, exclude: torch.Tensor, need: int) -> torch.Tensor:
    """Eq. (2), budget: ``need`` tokens evenly spaced (floor(i * M / need)) over the M tokens not
    in ``exclude``, in spatial order."""
    import torch

    order = spatial_order(coords)
    excluded = torch.zeros(coords.shape[0], dtype=torch.bool, device=coords.device)
    excluded[exclude] = True
    candidates = order[~excluded[order]]
    m = candidates.numel()
    need = min(need, m)
    positions = torch.div(
        torch.arange(need, device=coords.device) * m, max(need, 1), rounding_mode="floor"
    )
    return candidates[positions]


def prumerge_merge(
    tokens: torch.Tensor,
    attention: torch.Tensor,
    keys: torch.Tensor,
    kept: torch.Tensor,
    knn: int,
    merge: Literal["official", "weighted_mean"] = "official",
) -> torch.Tensor:
    """Eq. (3): the (|K|, D) merged kept tokens, in the order of ``kept``."""
    import torch

    x = tokens.float()
    a = attention.float()
    n = x.shape[0]
    k = min(knn, n - 1)
    if k <= 0:
        return x[kept]
    unit = keys.float() / keys.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similarity = unit[kept] @ unit.T  # (|K|, N)
    similarity[torch.arange(kept.numel(), device=x.device), kept] = float("-inf")  # not itself
    neighbours = torch.topk(similarity, k, dim=-1).indices  # (|K|, k)
    weights = a[neighbours]  # (|K|, k)
    weighted = torch.einsum("mk,mkd->md", weights, x[neighbours])
    if merge == "official":
        return x[kept] + weighted
    total = a[kept] + weights.sum(dim=-1)
    return (a[kept, None] * x[kept] + weighted) / total.clamp_min(1e-12)[:, None]


@register
@dataclass(frozen=True)
class PruMergePlus(PruningMethod):
    """IQR outliers of CLS attention plus spatial samples, merged with their key neighbours."""

    budget_mode: Literal["budget", "adaptive"] = "budget"
    knn: int = 32
    merge: Literal["official", "weighted_mean"] = "official"
    extra_token: bool = True
    iqr_factor: float = 1.5

    name: ClassVar[str] = "prumerge_plus"
    stages: ClassVar[str] = "vision"
    paper: ClassVar[str] = "Shang et al., ICCV 2025, arXiv:2403.15388 (PruMerge+)"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.knn < 0:
            raise HyperparameterError(f"prumerge_plus.knn={self.knn!r}: must be >= 0")
        if self.iqr_factor < 0:
            raise HyperparameterError(f"prumerge_plus.iqr_factor={self.iqr_factor!r}: must be >= 0")

    def plan(self, ctx: PlanContext) -> Plan:
        assert ctx.budget is not None
        keep = ctx.budget.tokens(ctx.n_visual)
        return Plan(vision_keep=keep, vision_signals=frozenset({"cls_attention", "key_metric"}))

    def kept_tokens(self, attention: torch.Tensor, coords: torch.Tensor, keep: int) -> torch.Tensor:
        """Eqs. (1)-(2): the sorted indices K of the kept (merge-target) tokens."""
        import torch

        n = attention.shape[0]
        outliers = iqr_outliers(attention, self.iqr_factor)
        if outliers.numel() == 0:  # e.g. uniform attention: the most attended token stands in
            outliers = torch.argmax(attention.float()).reshape(1)
        if self.budget_mode == "adaptive":
            samples = spatial_samples_adaptive(coords, outliers.numel())
            chosen = torch.zeros(n, dtype=torch.bool, device=attention.device)
            chosen[outliers] = True
            chosen[samples] = True
            return chosen.nonzero().squeeze(-1)
        keep = min(keep, n)
        slots = keep - 1 if self.extra_token and 2 <= keep < n else keep
        if outliers.numel() >= slots:
            return outliers[:slots].sort().values
        samples = spatial_samples_budget(coords, outliers, slots - outliers.numel())
        return torch.cat([outliers, samples]).sort().values

    def select_vision(self, signals: VisionSignals, keep: int) -> VisionSelection:
        import torch

        if signals.cls_attention is None or signals.key_metric is None:
            raise ValueError("prumerge_plus needs the cls_attention and key_metric vision signals")
        tokens = signals.tokens
        attention = signals.cls_attention.to(tokens.device)
        n = tokens.shape[0]
        kept = self.kept_tokens(attention, signals.coords.to(tokens.device), keep)
        merged = prumerge_merge(
            tokens, attention, signals.key_metric.to(tokens.device), kept, self.knn, self.merge
        )
        pruned = torch.ones(n, dtype=torch.bool, device=tokens.device)
        pruned[kept] = False
        budget_room = self.budget_mode == "adaptive" or kept.numel() < min(keep, n)
        if self.extra_token and bool(pruned.any()) and budget_room:
            rest = pruned.nonzero().squeeze(-1)
            a = attention.float()[rest]
            extra = (a[:, None] * tokens.float()[rest]).sum(dim=0, keepdim=True)
            if self.merge == "weighted_mean":
                extra = extra / a.sum().clamp_min(1e-12)
            anchor = rest[torch.argmax(a)].reshape(1)
            order = torch.argsort(torch.cat([kept, anchor]))
            kept = torch.cat([kept, anchor])[order]
            merged = torch.cat([merged, extra])[order]
        return VisionSelection(tokens=merged.to(tokens.dtype), kept=kept)
