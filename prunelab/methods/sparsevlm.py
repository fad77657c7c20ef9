"""SparseVLM (Zhang et al., ICML 2025, "SparseVLM: Visual Token Sparsification for Efficient
Vision-Language Model Inference", arXiv:2410.04417; code: Gumpest/SparseVLMs).

Text-guided, training-free pruning inside the LLM at a few layers (official ``pruning_loc``
2, 6, 15 of LLaVA-1.5's 32). After each such layer l the visual tokens are rated by the text
tokens that are relevant to the image ("raters"), the lowest-rated are dropped from layer l+1
on, and the best of the dropped ones are recycled: clustered and merged into a few tokens.

Raters (official ``LlamaDynamicvitModel.forward``, "Section 3.2.2"), with H_v (V, D) the visual
and H_t (T, D) the text hidden states (text = the tokens after the image: question and answer
prefix, not the system prompt before it):

    (1)  R     = 1/V sum_i softmax_t(H_v H_t^T)_(i, t)            (T,) relevance of each text token
    (2)  raters = {t : R_t > mean(R)}

Scores (official ``attn_postprocess_*`` in ``score.py``), A the head-mean attention of layer l:

    (3)  s_j   = 1/|raters| sum_{t in raters} A_(t, j)           (V,) for each visual token j
    (4)  keep  = top-m of s                                       the others are "pruned"

Recycling (official ``cluster_and_merge`` in ``utils.py``, "Section 3.3"): of the pruned tokens
the top ``recycle_ratio`` by s, n_r = floor(n_pruned * 0.3) + 1, are clustered into
c = floor(n_r / 10) + 1 clusters by density-peak clustering with k-nearest neighbours (DPC-kNN)
on their hidden states x_i, d_ij = ||x_i - x_j|| / sqrt(D):

    (5)  rho_i   = exp(-1/k sum_{j in kNN(i)} d_ij^2)             k = c, kNN includes i itself
    (6)  delta_i = min_{j : rho_j > rho_i} d_ij  (max_ij d_ij for the densest token)
    (7)  centers = top-c of rho_i * delta_i;  each token joins its nearest center
    (8)  merged_c = mean of the tokens of cluster c               (c, D) new visual tokens

(5)-(8) are ``prunelab.methods.dpc``, shared with Polymorphic.

Budget (``budget_is_average``): the official code adds the c merged tokens after the m kept
ones, so a stage leaves K = m + c visual tokens. Here K is planned (the only count a layer
stage can have) and m solves m + c(V - m) = K with c(.) the official cluster count above; the
c merged tokens are written into c of the K kept slots (``LayerSelection``). The K_s follow

    (9)  K_s = floor(N * x * max(x, min_stage_ratio)^(s-1))       s = 1..S

with x solved (bisection) so that the visual tokens averaged over all decoder layers,
(l_1 N + sum_s (l_{s+1} - l_s) K_s) / L, equal the budget within one token (see
``prunelab.methods.pdrop``, eq. (4)). Above x = 0.5 this is a geometric pyramid x, x^2, x^3;
below, later stages keep half the previous one (``min_stage_ratio``), the mean stage-to-stage
ratio of the official lists (0.66/0.55 for "192", 0.38/0.33 for "128", 0.39/0.56 for "64",
recycled tokens included). LLaVA-1.5 (N=576, L=32, first pruned layers 3, 7, 16): 192 ->
319/176/97, 128 -> 190/95/47, 64 -> 27/13/6 (official "64" list: 82/32/18 with recycling,
an 82-token average by this count).

Choices:
- Keep counts: the paper adapts the number dropped per layer to the rank of the rater x visual
  attention matrix; the released v1 code keeps min(floor(rank * scale + bias), V - 1) with
  per-budget scale/bias, the current code (score.py ``attn_postprocess_topk``) fixed per-budget
  lists, e.g. 300/200/110 ("192"), 303/110/36 ("128"), 66/30/17 ("64") plus the recycled
  tokens. A per-sample, rank-dependent count cannot keep a per-sample budget and is not
  expressible here (a plan fixes each stage's keep before the attention exists), and the
  official lists average 206/145/82 visual tokens per layer on LLaVA-1.5 by this project's
  count (every layer up to l sees all tokens), not the named budgets. So the counts are the
  geometric schedule above; the rank is not used.
- Rater states (``rater_source``): the official code computes (1)-(2) once, from the LLM's
  input embeddings, and reuses the raters at every stage. ``"embeddings"`` (default) does the
  same: each stage gets the input embeddings of the current tokens (``needs_embeddings``);
  text tokens are never dropped, so every stage finds the same raters. ``"hidden"`` recomputes
  (1)-(2) at each stage from the hidden states entering layer l+1 (the output of layer l), as
  the paper's description of layer-wise rating reads. Raw states, no norm, in both.
- Layer: as official, layer l's own attention rates and layer l+1 is the first with fewer
  tokens (``LayerStep(layer=l + 1)``, whose signals come from layer l).
- Attention: head mean of layer l's softmax rows (post-RoPE, causal) of the text queries
  (``queries="text"``), restricted to the rater rows; as official. If no token passes (2) (all
  relevances equal), every text token after the image rates.
- Positions: renumbered after each stage (official ``position_ids[:, :new_length]``).
- Recycled tokens: ``recycle_position="end"`` (default, official order) puts the merged tokens
  after the kept visual tokens: the K slots (kept tokens and the cluster centers' slots, sorted)
  receive the kept tokens' states in order, then the merged ones; with renumbered positions
  this is exactly the official sequence when the visual tokens are contiguous. On layouts with
  text inside the visual span (LLaVA-NeXT newlines) this moves kept states past those tokens;
  ``"anchor"`` instead writes each merged token into its cluster center's slot and leaves every
  kept token in place. If K is too small for the official cluster count (1 + c(V - 1) > K), the
  merged tokens take at most half of the K slots; ``recycle=False`` keeps the top K.
- DPC-kNN ties: the official code adds uniform noise * 1e-6 to rho; here equal densities are
  ordered by token index (deterministic).
- Other depths: ``layers`` (official ``pruning_loc``: the layer whose attention rates; layer+1
  is the first with fewer tokens) default 2,6,15 of 32 scaled to round(l * L / 32), strictly
  increasing, at most L-2 (4 layers: 0,1,2). An explicit ``layers`` is used as given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from prunelab.methods.base import (
    HyperparameterError,
    LayerSelection,
    LayerSignals,
    LayerStep,
    Plan,
    PlanContext,
    PruningMethod,
)
from prunelab.methods.dpc import dpc_knn, merge_clusters
from prunelab.methods.pdrop import (
    check_highest_layer,
    check_layers,
    layer_steps,
    lowest_average,
    out_of_reach,
    plan_inputs,
    scale_layers,
    solve_keeps,
)
from prunelab.methods.registry import register

__all__ = [
    "PAPER_LAYERS",
    "SparseVLM",
    "cluster_count",
    "dpc_knn",
    "merge_clusters",
    "rater_relevance",
    "rater_scores",
    "recycle_split",
]

PAPER_LAYERS = (2, 6, 15)  # official pruning_loc for LLaVA-1.5 (32 layers)


def rater_relevance(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Eq. (1)-(2). visual: (V, D), text: (T, D) hidden states. Returns (T,) bool: raters."""
    similarity = visual.float() @ text.float().T  # (V, T)
    relevance = similarity.softmax(dim=-1).mean(dim=0)  # (T,)
    return relevance > relevance.mean()


def rater_scores(
    attention: torch.Tensor,
    query_positions: torch.Tensor,
    raters: torch.Tensor,
    visual: torch.Tensor,
) -> torch.Tensor:
    """Eq. (3). attention: (H, Q, S) softmax rows of the queries at ``query_positions`` (Q,);
    raters: (R,) sequence positions of the rater tokens; visual: (V,) positions. Returns (V,)."""
    rows = torch.isin(query_positions, raters)
    if not bool(rows.any()):
        rows = torch.ones_like(rows)
    return attention[:, rows][:, :, visual].float().mean(dim=(0, 1))


def cluster_count(n_pruned: int, recycle_ratio: float, cluster_ratio: float) -> int:
    """Clusters the official code makes from ``n_pruned`` dropped tokens: the top
    int(n * recycle_ratio) + 1 of them, in int(n_r * cluster_ratio) + 1 clusters (0 for 0)."""
    if n_pruned <= 0:
        return 0
    recycled = min(n_pruned, int(n_pruned * recycle_ratio) + 1)
    return min(recycled, int(recycled * cluster_ratio) + 1)


def recycle_split(
    n_visual: int, slots: int, recycle_ratio: float, cluster_ratio: float
) -> tuple[int, int]:
    """(m, c): tokens kept by score and merged tokens for a stage leaving ``slots`` of
    ``n_visual`` visual tokens, with m + cluster_count(n_visual - m) = slots (largest such m).

    h(m) = m + cluster_count(n_visual - m) is non-decreasing in steps of 0 or 1, so every
    slot count in [h(1), n_visual] is reached. Below h(1) (too few slots for the official
    cluster count) the merged tokens take at most half the slots."""
    if slots >= n_visual:
        return n_visual, 0
    for kept in range(slots, 0, -1):
        clusters = cluster_count(n_visual - kept, recycle_ratio, cluster_ratio)
        if kept + clusters == slots:
            return kept, clusters
    clusters = min(cluster_count(n_visual - slots, recycle_ratio, cluster_ratio), slots // 2)
    return slots - clusters, clusters


@register
@dataclass(frozen=True)
class SparseVLM(PruningMethod):
    """See the module docstring. ``layers``: official ``pruning_loc`` (the layers whose attention
    rates the visual tokens; the next layer is the first with fewer), None = 2,6,15 scaled to
    the model's depth. ``recycle``: merge the best pruned tokens (``recycle_ratio`` of them,
    into ``cluster_ratio`` as many clusters) into ``recycle_position`` slots."""

    layers: tuple[int, ...] | None = None
    recycle: bool = True
    recycle_ratio: float = 0.3
    cluster_ratio: float = 0.1
    recycle_position: Literal["end", "anchor"] = "end"
    min_stage_ratio: float = 0.5
    rater_source: Literal["embeddings", "hidden"] = "embeddings"

    name: ClassVar[str] = "sparsevlm"
    version: ClassVar[str] = "2"  # 2: raters from the input embeddings, as official
    stages: ClassVar[str] = "after layers 2,6,15 of 32 (scaled to depth), recycling merged tokens"
    budget_is_average: ClassVar[bool] = True
    paper: ClassVar[str] = "Zhang et al., ICML 2025, arXiv:2410.04417"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", check_layers("sparsevlm", self.layers, 0))
        for field in ("recycle_ratio", "cluster_ratio", "min_stage_ratio"):
            value = getattr(self, field)
            if not 0.0 < value <= 1.0:
                raise HyperparameterError(f"sparsevlm.{field}={value}: must be in (0, 1]")

    def plan(self, ctx: PlanContext) -> Plan:
        n, depth, target = plan_inputs("sparsevlm", ctx)
        if self.layers is not None:
            check_highest_layer(
                "sparsevlm",
                self.layers,
                depth - 2,
                f"leaves no later layer to prune on a model with {depth} layers "
                f"(at most {depth - 2})",
            )
            rating = self.layers
        else:
            rating = scale_layers(PAPER_LAYERS, depth, 0, depth - 2)
        layers = tuple(layer + 1 for layer in rating)  # first layer with fewer tokens
        solved = solve_keeps(n, depth, layers, target, self.stage_ratios(len(layers)))
        if solved is None:
            lowest = lowest_average(n, depth, layers)
            raise out_of_reach(
                "sparsevlm",
                target,
                f"layers {list(rating)} on a model with {depth} layers and {n} visual tokens",
                f"at least {lowest:.1f}: every layer up to {rating[0]} sees all",
                "give method.layers with an earlier first layer",
            )

        def make(layer: int, keep: int) -> LayerStep:
            return LayerStep(
                layer=layer,
                keep=keep,
                queries="text",
                needs_hidden=True,
                positions="renumber",
                needs_embeddings=self.rater_source == "embeddings",
            )

        return Plan(layers=layer_steps(n, layers, solved[0], make))

    def stage_ratios(self, n_stages: int) -> Callable[[float], list[float]]:
        """Eq. (9): K_s / N = x * max(x, min_stage_ratio)^(s-1) as a function of the solved x."""
        floor = self.min_stage_ratio
        return lambda x: [x * max(x, floor) ** s for s in range(n_stages)]

    def select_layer(self, step: LayerStep, signals: LayerSignals) -> torch.Tensor | LayerSelection:
        assert signals.attention is not None and signals.query_positions is not None
        assert signals.hidden is not None
        visual, hidden = signals.visual, signals.hidden  # (V,), (S, D)
        after = signals.text[signals.text > visual.max()]  # text after the image
        if after.numel() == 0:
            after = signals.text
        rating = signals.embeddings if self.rater_source == "embeddings" else hidden
        assert rating is not None
        raters = after[rater_relevance(rating[visual], rating[after])]
        scores = rater_scores(signals.attention, signals.query_positions, raters, visual)  # (V,)
        order = torch.sort(scores, descending=True, stable=True).indices  # (V,)
        n_visual = visual.numel()
        if self.recycle:
            kept_count, clusters = recycle_split(
                n_visual, step.keep, self.recycle_ratio, self.cluster_ratio
            )
        else:
            kept_count, clusters = min(step.keep, n_visual), 0
        kept = order[:kept_count].sort().values  # (m,) indices into visual
        if clusters == 0:
            return kept
        pruned = order[kept_count:]  # best score first
        recycled = pruned[: min(pruned.numel(), int(pruned.numel() * self.recycle_ratio) + 1)]
        states = hidden[visual[recycled]]  # (n_r, D)
        centers, assignment = dpc_knn(states, clusters)
        merged = merge_clusters(states, assignment, clusters)  # (c, D)
        anchors = recycled[centers]  # (c,) indices into visual: the centers' slots
        keep, slot_order = torch.cat([kept, anchors]).sort()
        if self.recycle_position == "anchor":
            replacement = torch.cat([hidden[visual[kept]].float(), merged])[slot_order]
        else:
            replacement = torch.cat([hidden[visual[kept]].float(), merged])
        return LayerSelection(keep=keep, hidden=replacement.to(hidden.dtype))
