"""Polymorphic ("Polymorphic: Plug-and-Play Visual Token Compression for Scalable VLMs",
anonymous ICLR 2026 submission, no arXiv id).

Two stages: the visual tokens are first consolidated on the encoder side (the tokens the CLS
attends to most are retained, the others merged by density-peak clustering), then pruned inside
the LLM's prefill at a few layers by the text tokens most aligned with the image ("raters"),
the pruned ones being merged again.

Stage 1, "global-local consolidation" (Section 3.2), to T_1 = K * budget tokens (K = 2,
``redundancy``), of which ``merge_fraction`` are merged clusters (retained:merged = 5.4:1,
Section 4.1, i.e. 10/64 as VisionZip's 54 + 10), with X (N, C) the visual tokens and a (N,) the
encoder's CLS attention (mean attention received where the encoder has no CLS, Qwen2-VL):

         retained = the T_1 - c tokens with the largest a; R = the others
    (1)  D_ij  = ||X_i - X_j|| / sqrt(C)                             on R
    (3)  rho_i = exp(-1/K_nn sum_{k <= K_nn} D_{i, n_k(i)}^2)        K_nn nearest neighbours
    (5)  S_i   = rho_i * delta_i,  delta_i = min_{j : rho_j > rho_i} D_ij;  centers = top-c of S
    (6)  A_i   = argmin_{j in centers} D_ij                           clusters C_k
    (7)  X'_k  = 1/|C_k| sum_{i in C_k} X_i    (``merge_weights="mean"``; "density": the
                 minimiser of (8), sum rho_i X_i / sum rho_i)

Stage 2, "adaptive cross-modal pruning" (Section 3.3), at the input of each pruning layer, with
V (N_v, d) the visual and T (N_t, d) the text hidden states:

    (9)  M     = softmax_t(V T^T / sqrt(d))                            (N_v, N_t)
    (10) s_j   = 1/N_v sum_i M_ij;  raters R = {j : s_j > mean(s)}
    (11) alpha_i = mean_{j in R} M_ij
    (12) kept = {i : alpha_i >= tau}, tau the quantile of alpha that keeps m tokens (top-m)
         the pruned tokens are consolidated again by (1)-(7) into c clusters

so each stage leaves K_s = m + c tokens, m : c = 5.4 : 1 (as stage 1).

Budget (``budget_is_average``): "we initially preserve K times the target visual token budget
before applying the second-stage text-guided pruning, ensuring that the average number of
visual tokens across LLM layers matches the final budget" (Section 4.5). With pruning layers
l_1 < l_2 < l_3 (the first layers with fewer tokens) the counts are a pyramid
K_s = floor(T_1 x^s) with x solved so that (l_1 T_1 + sum_s (l_{s+1} - l_s) K_s) / L equals the
budget within one token (``prunelab.methods.pdrop`` eq. (4)); the paper does not give the
per-layer counts. LLaVA-1.5-7B, 64 tokens: T_1 = 128 (108 retained + 20 merged), then
91 / 64 / 45 from layers 3 / 7 / 16 (x = 0.71, an average of 63.9).

Choices:
- Layers: "pruning is performed at layers 3, 7, and 16" (LLaVA-1.5, 32 layers) and "3, 7, and
  13" (Qwen2-VL-7B, 28 layers) are read as the first layers with fewer tokens (SparseVLM's
  ``pruning_loc`` 2, 6, 15 + 1, the code base the raters come from): ``LayerStep(layer=l)``,
  hidden states entering layer l. ``layers=None`` takes the family's list (Qwen2-VL and
  Qwen2.5-VL: 3, 7, 13 of 28; every other family: 3, 7, 16 of 32) scaled to the depth,
  round(l * L / L_paper), in [1, L - 1], strictly increasing. The paper keeps 3, 7, 16 on the
  40-layer LLaVA-1.5-13B as well; give ``layers=[3,7,16]`` for that.
- K_nn: not given; None = the number of clusters, as the SparseVLM code (``knn`` sets it).
- Features of stage 1: the projected visual tokens (a vision stage's tokens), not the raw
  encoder output; the tokens are merged after the projector.
- Raters' text: the text after the image (question and answer prefix), as SparseVLM; every
  text token if there is none after it; all text rates if no token passes (10).
- ``score="similarity"`` (default) scores by (11) from the hidden states (no attention rows
  needed); ``"attention"`` scores by the raters' head-mean attention rows of the previous
  layer, as SparseVLM (eq. 3 there).
- (12) as a top-m (a quantile threshold keeps the same tokens up to ties, ties by index).
- Merged tokens: anchored on their cluster center's index (stage 1: ``kept`` in index order;
  stage 2 ``merged_position="anchor"``, default); ``"end"`` puts them after the kept tokens'
  states as SparseVLM's recycling does. Positions after each stage renumbered (SparseVLM) or
  ``positions="original"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from prunelab.methods.base import (
    HyperparameterError,
    LayerSelection,
    LayerSignals,
    LayerStep,
    Plan,
    PlanContext,
    PruningMethod,
    VisionSelection,
    VisionSignals,
)
from prunelab.methods.dpc import density_peaks, merge_clusters
from prunelab.methods.pdrop import (
    average_target,
    check_layers,
    layer_steps,
    lowest_average,
    out_of_reach,
    pyramid_ratios,
    scale_layers,
    solve_keeps,
)
from prunelab.methods.registry import register
from prunelab.methods.sparsevlm import rater_scores
from prunelab.methods.visionzip import visionzip_split

if TYPE_CHECKING:
    import torch

__all__ = [
    "PAPER_LAYERS",
    "Polymorphic",
    "consolidate",
    "cross_modal_raters",
    "rater_importance",
]

# the paper's pruning layers and the depth they are given for (Section 4.1)
PAPER_LAYERS: dict[str, tuple[tuple[int, ...], int]] = {
    "llava": ((3, 7, 16), 32),
    "qwen": ((3, 7, 13), 28),
}
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def cross_modal_raters(
    visual: torch.Tensor, text: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. (9)-(10). visual (V, d), text (T, d) hidden states. Returns M (V, T) float32 and the
    raters (T,) bool: text tokens whose mean alignment s_j is above the mean of s."""
    import torch

    scale = math.sqrt(visual.shape[-1])
    similarity = torch.softmax(visual.float() @ text.float().T / scale, dim=-1)  # (V, T)
    alignment = similarity.mean(dim=0)  # (T,)
    return similarity, alignment > alignment.mean()


def rater_importance(similarity: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
    """Eq. (11): alpha_i = mean over the rater columns of M (V, T); every column if no rater.
    Returns (V,)."""
    import torch

    if not bool(raters.any()):
        raters = torch.ones_like(raters)
    return similarity[:, raters].mean(dim=-1)


def consolidate(
    tokens: torch.Tensor,
    importance: torch.Tensor,
    keep: int,
    clusters: int,
    knn: int | None,
    weights: Literal["mean", "density"],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``keep - clusters`` tokens of highest ``importance`` and merge the others into
    ``clusters`` tokens by density-peak clustering, eqs. (1)-(7).

    tokens: (n, D); importance: (n,). Returns retained (m,) indices (sorted), anchors (c,) the
    cluster centers' indices, merged (c, D) float32 tokens (row k: cluster of anchors[k]), and
    owner (n,): for each token the index (into the n) of the token it is now part of (-1:
    dropped, when there are no clusters)."""
    import torch

    n = tokens.shape[0]
    keep = min(keep, n)
    clusters = min(clusters, keep)
    order = torch.sort(importance.float(), descending=True, stable=True).indices
    retained = order[: keep - clusters].sort().values
    rest = order[keep - clusters :].sort().values  # (n - m,)
    owner = torch.full((n,), -1, dtype=torch.long, device=tokens.device)
    owner[retained] = retained
    if clusters == 0 or rest.numel() == 0:
        empty = rest[:0]
        return retained, empty, tokens.new_zeros(0, tokens.shape[1]).float(), owner
    centers, assignment, density = density_peaks(tokens[rest], clusters, knn)
    merged = merge_clusters(
        tokens[rest], assignment, centers.numel(), density if weights == "density" else None
    )
    anchors = rest[centers]
    owner[rest] = anchors[assignment]
    return retained, anchors, merged, owner


@register
@dataclass(frozen=True)
class Polymorphic(PruningMethod):
    """See the module docstring. ``redundancy``: the paper's K (stage 1 keeps K x budget);
    ``merge_fraction``: share of merged tokens in each stage's output (10/64: 5.4:1);
    ``layers``: first layers with fewer tokens, None = the family's paper list scaled to
    depth; ``knn``: K_nn of eq. (3), None = number of clusters.

    K = 1: stage 1 already keeps the budget (T_1 = round(1 x budget)), so the layer schedule
    solved for that average keeps all T_1 tokens at every pruning layer and the plan has no
    layer step: with ``keep_tokens`` stage 2 prunes nothing, and with ``keep_ratio`` it can
    only trim the rounding of T_1 (at most one token at the paper's layers). K = 1 is thus
    stage 1 alone (CLS-attention retention and density-peak merging), not the paper's reading
    of its Table 5 row ("the framework essentially relies solely on text-guided pruning",
    Section 4.5)."""

    redundancy: float = 2.0
    merge_fraction: float = 10 / 64
    layers: tuple[int, ...] | None = None
    knn: int | None = None
    merge_weights: Literal["mean", "density"] = "mean"
    score: Literal["similarity", "attention"] = "similarity"
    merged_position: Literal["anchor", "end"] = "anchor"
    positions: Literal["original", "renumber"] = "renumber"

    name: ClassVar[str] = "polymorphic"
    stages: ClassVar[str] = (
        "vision (DPC merge to 2x budget) + layers 3,7,16 of 32 (raters, re-merge)"
    )
    budget_is_average: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "Polymorphic: Plug-and-Play Visual Token Compression for Scalable VLMs "
        "(anonymous ICLR 2026 submission)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", check_layers("polymorphic", self.layers, 1))
        if self.redundancy < 1:
            raise HyperparameterError(f"polymorphic.redundancy={self.redundancy}: must be >= 1")
        if not 0 <= self.merge_fraction < 1:
            raise HyperparameterError(
                f"polymorphic.merge_fraction={self.merge_fraction}: must be in [0, 1)"
            )
        if self.knn is not None and self.knn < 1:
            raise HyperparameterError(f"polymorphic.knn={self.knn}: must be >= 1 (or null)")

    def pruning_layers(self, n_layers: int, family: str | None) -> tuple[int, ...]:
        """The first layers with fewer tokens: ``layers``, or the family's paper list scaled."""
        if self.layers is not None:
            beyond = [layer for layer in self.layers if layer > n_layers - 1]
            if beyond:
                raise ValueError(
                    f"polymorphic.layers={list(self.layers)}: layer {beyond[0]} is beyond the "
                    f"last decoder layer ({n_layers - 1}) of a model with {n_layers} layers"
                )
            return self.layers
        layers, depth = PAPER_LAYERS["qwen" if family in QWEN_FAMILIES else "llava"]
        return scale_layers(layers, n_layers, 1, n_layers - 1, paper_depth=depth)

    def plan(self, ctx: PlanContext) -> Plan:
        assert ctx.budget is not None
        n, depth = ctx.n_visual, ctx.n_layers
        if depth < 2:
            raise ValueError(f"polymorphic needs at least 2 decoder layers, the model has {depth}")
        target = average_target(ctx.budget, n)
        first = min(n, max(1, math.floor(self.redundancy * target + 0.5)))  # T_1
        layers = self.pruning_layers(depth, ctx.family)
        solved = solve_keeps(first, depth, layers, target, pyramid_ratios(len(layers)))
        if solved is None:
            lowest = lowest_average(first, depth, layers)
            raise out_of_reach(
                "polymorphic",
                target,
                f"layers {list(layers)} after keeping {first} at the vision stage on a model "
                f"with {depth} layers",
                f"at least {lowest:.1f}",
                "give method.layers with an earlier first layer or a smaller method.redundancy",
            )

        def make(layer: int, keep: int) -> LayerStep:
            queries = "text" if self.score == "attention" else None
            return LayerStep(
                layer=layer, keep=keep, queries=queries, needs_hidden=True, positions=self.positions
            )

        vision = first if first < n else None
        return Plan(
            vision_keep=vision,
            vision_signals=frozenset({"cls_attention"}) if vision is not None else frozenset(),
            layers=layer_steps(first, layers, solved[0], make),
        )

    def select_vision(self, signals: VisionSignals, keep: int) -> VisionSelection:
        import torch

        if signals.cls_attention is None:
            raise ValueError("polymorphic needs the cls_attention vision signal")
        tokens = signals.tokens
        _, clusters = visionzip_split(keep, self.merge_fraction)
        retained, anchors, merged, owner = consolidate(
            tokens,
            signals.cls_attention.to(tokens.device),
            keep,
            clusters,
            self.knn,
            self.merge_weights,
        )
        kept, slot_order = torch.cat([retained, anchors]).sort()
        out = torch.cat([tokens[retained].float(), merged])[slot_order]
        slot = torch.full((tokens.shape[0],), -1, dtype=torch.long, device=tokens.device)
        slot[kept] = torch.arange(kept.numel(), device=tokens.device)
        assignment = torch.where(owner >= 0, slot[owner.clamp_min(0)], -1)
        return VisionSelection(tokens=out.to(tokens.dtype), kept=kept, assignment=assignment)

    def select_layer(self, step: LayerStep, signals: LayerSignals) -> torch.Tensor | LayerSelection:
        import torch

        assert signals.hidden is not None
        visual, hidden = signals.visual, signals.hidden  # (V,), (S, D)
        after = signals.text[signals.text > visual.max()]  # text after the image
        if after.numel() == 0:
            after = signals.text
        similarity, raters = cross_modal_raters(hidden[visual], hidden[after])
        if self.score == "attention":
            assert signals.attention is not None and signals.query_positions is not None
            scores = rater_scores(signals.attention, signals.query_positions, after[raters], visual)
        else:
            scores = rater_importance(similarity, raters)  # (V,)
        _, clusters = visionzip_split(step.keep, self.merge_fraction)
        retained, anchors, merged, _ = consolidate(
            hidden[visual], scores, step.keep, clusters, self.knn, self.merge_weights
        )
        if anchors.numel() == 0:
            return retained
        keep, slot_order = torch.cat([retained, anchors]).sort()
        states = torch.cat([hidden[visual[retained]].float(), merged])
        replacement = states[slot_order] if self.merged_position == "anchor" else states
        return LayerSelection(keep=keep, hidden=replacement.to(hidden.dtype))
