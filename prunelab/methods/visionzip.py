"""VisionZip (Yang et al., CVPR 2025, "VisionZip: Longer is Better but Not Necessary in Vision
Language Models", arXiv:2412.04467; code github.com/dvlab-research/VisionZip).

A vision stage: of the N visual tokens, keep ``K_d`` *dominant* tokens (the ones the encoder's
CLS query attends to most) and add ``K_c`` *contextual* tokens that summarise the rest by
merging, ``K_d + K_c = keep``. With a (N,) the CLS attention at the encoder's feature layer
(``cls_attention``, head mean), k (N, d) the head-mean keys of that layer (``key_metric``) and
x (N, D) the projected visual tokens:

    (1) K_c = floor(f_c * keep + 1/2),  K_d = keep - K_c           (f_c = ``contextual_fraction``)
    (2) Dom = the K_d indices with the largest a
    (3) R = the other N - K_d indices in increasing order, r_0 < r_1 < ...;
        step s = max(1, |R| // K_c); targets T = (r_0, r_s, r_2s, ...)[:K_c]
    (4) each j in R \\ T joins its most similar target by cosine similarity of keys:
        t(j) = argmax_{t in T} <k_j / |k_j|, k_t / |k_t|>,   M_t = {j : t(j) = t}
    (5) contextual token of target t:
        ``contextual_merge="official"``: c_t = x_t + (1 / max(1, |M_t|)) * sum_{j in M_t} x_j
        ``contextual_merge="mean"``:     c_t = (x_t + sum_{j in M_t} x_j) / (1 + |M_t|)

Output (``keep`` tokens): the dominant tokens as they are and the contextual tokens, each
anchored on its own index (a contextual token on its target), in index order;
``assignment`` maps each input to the output it went to (dominant / target: itself; merged
tokens: their target's contextual token).

Choices (official code = ``visionzip/clip_encoder.py`` and ``visionzip/main.py`` of the LLaVA
path; the Qwen path is ``Qwen2_5_VL/qwen2_5vl_visionzip.py``):

- Dominant:contextual split: a hyperparameter, ``contextual_fraction`` (default 10/64 =
  0.15625). The paper / README settings for LLaVA-1.5 are 54+10 (64 tokens), 108+20 (128),
  162+30 (192) and for LLaVA-NeXT 135+25 (160), 270+50 (320), 540+100 (640): all exactly
  ``K_c = 0.15625 * keep``, so (1) reproduces every published split. The official Qwen2.5-VL
  variant uses a different rule, contextual = 5% of the *input* tokens (70% kept = 65% dominant +
  5% contextual; 50% = 45% + 5%): set ``contextual_fraction = 0.05 / keep_ratio`` for it.
- The CLS slot: the official LLaVA code keeps the CLS token itself as one of the dominant tokens
  (``apply_info(dominant_num=dominant - 1)``: "64 tokens" = CLS + 53 patches + 10 contextual).
  prunelab's visual tokens are the patch tokens only (the HF ``default`` feature strategy drops
  the CLS and the prompt has no slot for it), so all K_d dominant tokens are patches.
- Merge formula: the official code adds the *mean* of a target's members to the target
  (``contextual_tokens = target_hidden + aggregated_hidden``, (5) "official", the default), so a
  contextual token with members has about twice a token's scale; re-implementations (e.g.
  Fanziyang-v/VisionZip) average the target together with its members ("mean"). Both are
  available.
- What is merged: the official LLaVA code merges the encoder's layer -2 hidden states *before*
  the multimodal projector (dominant and contextual hidden states are then projected). A
  prunelab vision stage only has the *projected* tokens (``VisionSignals.tokens``), so (5) merges
  projected tokens; the LLaVA projector is a 2-layer GELU MLP, so P(h_t + mean h_j) differs from
  P(h_t) + mean P(h_j): contextual tokens differ from the official ones, dominant tokens are
  identical. The official Qwen2.5-VL variant merges *after* the PatchMerger (the projected
  embeddings), exactly as here.
- Signals: the CLS attention and keys of the encoder layer that produces the features (layer -2
  for LLaVA-1.5: official ``attentions[-2]`` / ``layers[-2].metric``, the head-mean keys), which is
  what the adapters provide; official sums the CLS row over heads, prunelab averages (same
  ranking). Encoders without CLS (Qwen2-VL, Qwen2.5-VL): the adapter's mean attention received
  (last encoder layer, averaged over each token's merged patches) and keys averaged the same way,
  which is what the authors' Qwen2.5-VL variant uses (attention received at the last ViT layer,
  head mean, summed over queries, averaged within each 2x2 merge group; keys likewise).
- Order: the official code concatenates [dominant tokens in index order, contextual tokens in
  target order], so contextual tokens come after all dominant ones; here every token sits at its
  anchor (``kept`` is sorted), which for 1-D RoPE families changes where contextual tokens are
  in the sequence (and their position ids).
- Several tiles (LLaVA-NeXT, InternVL): one global top-K_d over all tiles (the adapters scale the
  per-crop CLS rows so that values are comparable across crops) and targets evenly spaced over
  all remaining tokens in index order; the official LLaVA-NeXT code splits the counts per crop.
- Zero keys: cosine similarity uses |k| clamped at 1e-6 (official divides by the raw norm).
"""

from __future__ import annotations

import math
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

__all__ = ["VisionZip", "visionzip_select", "visionzip_split"]


def visionzip_split(keep: int, contextual_fraction: float) -> tuple[int, int]:
    """(K_d, K_c) of eq. (1): contextual = round-half-up(fraction * keep), the rest dominant."""
    contextual = min(keep, math.floor(contextual_fraction * keep + 0.5))
    return keep - contextual, contextual


def visionzip_select(
    tokens: torch.Tensor,
    cls_attention: torch.Tensor,
    keys: torch.Tensor,
    dominant: int,
    contextual: int,
    merge: Literal["official", "mean"] = "official",
) -> VisionSelection:
    """Eqs. (2)-(5). tokens (N, D), cls_attention (N,), keys (N, d); returns ``dominant +
    min(contextual, N - dominant)`` tokens anchored in index order, with ``assignment`` (N,)."""
    import torch

    n = tokens.shape[0]
    device = tokens.device
    dominant = min(dominant, n)
    is_dominant = torch.zeros(n, dtype=torch.bool, device=device)
    is_dominant[torch.topk(cls_attention.float(), dominant).indices] = True
    rest = (~is_dominant).nonzero().squeeze(-1)  # (R,) in index order
    contextual = min(contextual, rest.numel())

    anchors = [is_dominant.nonzero().squeeze(-1)]
    values = [tokens[anchors[0]]]
    owner = torch.full((n,), -1, dtype=torch.long, device=device)  # anchor index of each input
    owner[anchors[0]] = anchors[0]
    if contextual > 0:
        step = max(1, rest.numel() // contextual)
        local_targets = torch.arange(0, rest.numel(), step, device=device)[:contextual]
        is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=device)
        is_target[local_targets] = True
        targets, members = rest[is_target], rest[~is_target]  # (K_c,), (R - K_c,)
        unit = keys.float() / keys.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
        similarity = unit[members] @ unit[targets].T  # (R - K_c, K_c)
        choice = similarity.argmax(dim=-1)  # (R - K_c,) target slot of each member
        x = tokens.float()
        sums = torch.zeros(contextual, x.shape[1], device=device).index_add_(0, choice, x[members])
        counts = torch.bincount(choice, minlength=contextual).float()[:, None]  # (K_c, 1)
        if merge == "official":
            merged = x[targets] + sums / counts.clamp_min(1.0)
        else:
            merged = (x[targets] + sums) / (1.0 + counts)
        anchors.append(targets)
        values.append(merged.to(tokens.dtype))
        owner[targets] = targets
        owner[members] = targets[choice]
    kept = torch.cat(anchors)
    order = torch.argsort(kept)
    kept, out = kept[order], torch.cat(values)[order]
    slot = torch.full((n,), -1, dtype=torch.long, device=device)
    slot[kept] = torch.arange(kept.numel(), device=device)
    assignment = torch.where(owner >= 0, slot[owner.clamp_min(0)], owner)
    return VisionSelection(tokens=out, kept=kept, assignment=assignment)


@register
@dataclass(frozen=True)
class VisionZip(PruningMethod):
    """Dominant tokens by CLS attention plus contextual tokens merged by key similarity."""

    contextual_fraction: float = 10 / 64
    contextual_merge: Literal["official", "mean"] = "official"

    name: ClassVar[str] = "visionzip"
    stages: ClassVar[str] = "vision"
    paper: ClassVar[str] = "Yang et al., CVPR 2025, arXiv:2412.04467"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.contextual_fraction <= 1.0:
            raise HyperparameterError(
                f"visionzip.contextual_fraction={self.contextual_fraction!r}: must be in [0, 1]"
            )

    def plan(self, ctx: PlanContext) -> Plan:
        assert ctx.budget is not None
        keep = ctx.budget.tokens(ctx.n_visual)
        return Plan(vision_keep=keep, vision_signals=frozenset({"cls_attention", "key_metric"}))

    def select_vision(self, signals: VisionSignals, keep: int) -> VisionSelection:
        if signals.cls_attention is None or signals.key_metric is None:
            raise ValueError("visionzip needs the cls_attention and key_metric vision signals")
        dominant, contextual = visionzip_split(keep, self.contextual_fraction)
        n = signals.tokens.shape[0]
        if dominant + contextual > n:
            dominant = n - min(contextual, n)
        selection = visionzip_select(
            signals.tokens,
            signals.cls_attention,
            signals.key_metric,
            dominant,
            contextual,
            self.contextual_merge,
        )
        selection.scores = signals.cls_attention  # the dominant tokens' ranking, eq. (2)
        return selection
