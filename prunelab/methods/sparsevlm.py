"""SparseVLM (Zhang et al., ICML 2025, "SparseVLM: Visual Token Sparsification for Efficient
Vision-Language Model Inference", arXiv:2410.04417; code: Gumpest/SparseVLMs).

Text-guided, training-free pruning inside the LLM at a few layers (official ``pruning_loc``
2, 6, 15 of LLaVA-1.5's 32). After each such layer l the visual tokens are rated by the text
tokens that are relevant to the image ("raters"), the lowest-rated are dropped from layer l+1
on, and the best of the dropped ones are recycled: clustered and merged into a few tokens.

Raters (Section 3.2; official ``LlamaDynamicvitModel.forward``, ``modelling_sparse_llama.py``),
with E_v (V_0, D) the LLM's input embeddings of all V_0 visual tokens and E_t (T, D) those of
the text after the image (question and answer prefix, not the system prompt before it):

    (1)  R      = 1/V_0 sum_i softmax_t(E_v E_t^T)_(i, t)       (T,) relevance of each text token
    (2)  raters = {t : R_t > mean(R)}

The official code computes (1)-(2) once, before its layer loop, and rates with the same text
tokens (``t_token_idx``) at every pruning layer; so does ``raters="once"`` (default).

Scores (official ``attn_postprocess_topk`` in ``score.py``), A the head-mean attention of layer l:

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

(5)-(8) are ``prunelab.methods.dpc``, shared with Polymorphic. The official code adds the c
merged tokens after the m kept ones, so stage s leaves K_s = m_s + c(V_{s-1} - m_s) visual
tokens, c(.) the cluster count above (``cluster_count``). A plan fixes K_s (the only count a
layer stage has); the stage recovers m_s as the largest m with m + c(V - m) = K_s
(``recycle_split``) and writes the c merged tokens into c of the K_s slots (``LayerSelection``).

Schedules (``schedule``):

- ``"solved"`` (default; ``budget_is_average``): the K_s follow

    (9)  K_s = floor(N * x * max(x, min_stage_ratio)^(s-1))       s = 1..S

  with x solved (bisection) so that the visual tokens averaged over all decoder layers,
  (l_1 N + sum_s (l_{s+1} - l_s) K_s) / L, equal the budget within one token (see
  ``prunelab.methods.pdrop``, eq. (4); every layer up to l sees all tokens). Above x = 0.5
  this is a geometric pyramid x, x^2, x^3; below, later stages keep half the previous one
  (``min_stage_ratio``), the mean stage-to-stage ratio of the official lists (0.66/0.55 for
  "192", 0.38/0.33 for "128", 0.39/0.56 for "64", recycled tokens included). LLaVA-1.5
  (N=576, L=32, first pruned layers 3, 7, 16): 192 -> 319/176/97, 128 -> 190/95/47,
  96 -> 108/54/27, 64 -> 27/13/6.
- ``"official"``: the official per-budget lists of m_s (``score.py`` ``sparse_token_list_*``,
  chosen by ``RETAIN_TOKN``; version 1_0, the default there): 192: 300/200/110,
  128: 303/110/36, 96: 238/48/26, 64: 66/30/17, each at most V_{s-1} - 1 as official, and
  K_s = m_s + c(V_{s-1} - m_s) (m_s alone with ``recycle=False``). On LLaVA-1.5 the K_s are
  309/204/113, 312/117/39, 249/55/27 and 82/32/18; ``recycle_split`` recovers exactly the
  official m_s from them (tested). Averaged over the 32 layers by the count above (layer l
  attends over, and caches, all V_{s-1} tokens) they give 6608/32 = 206.5, 4653/32 = 145.4,
  3651/32 = 114.1 and 2632/32 = 82.25 visual tokens, not the budget they are named after;
  the official log ("Equal Tokens", ``num_token``) counts layer l at its output K_s instead
  and gets 192.0, 128.6, 96.9 and 64.8 (printed as int: 192, 128, 96, 64), hence the names.
  The budget selects the list (``Budget.tokens(N)``: 192, 128, 96 or 64). The lists are
  tuned for LLaVA-1.5-7B and come with no rule for other settings, so any other budget, a
  model with other than 576 visual tokens or 32 layers, or ``layers`` other than 2,6,15 is
  refused (``plan`` raises, one line for ``plan_problem``) rather than scaled into a
  schedule the authors never ran. The official version 2_0 (SparseVLM+: other lists, no
  recycling) is not offered.

Choices:
- Keep counts: the paper adapts the number dropped per layer to the rank of the rater x visual
  attention matrix; the released v1 code keeps min(floor(rank * scale + bias), V - 1) with
  per-budget scale/bias, the current code the fixed lists above. A per-sample, rank-dependent
  count cannot keep a per-sample budget and is not expressible here (a plan fixes each
  stage's keep before the attention exists); the rank is not used.
- Raters (``raters``): ``"once"`` (default) as official: the first layer step asks for the
  input embeddings (``needs_embeddings``; no vision stage precedes, so every visual token is
  still present) and computes (1)-(2) from them; the rater mask over the text tokens
  (``LayerSignals.text``, which layer steps never drop, so the mask stays aligned) is handed
  to each later step through ``LayerSelection.carry`` / ``LayerSignals.carry``. A later step
  without it is an error, not a recomputation. ``"per_stage"`` recomputes (1)-(2) at each
  stage from the hidden states entering layer l+1 (the output of layer l) of the tokens then
  present, a layer-wise reading of the paper the official code does not do: the surviving
  visual tokens change R and so the raters. Raw states, no norm, in both. (Version 2
  recomputed (1)-(2) at each stage from the input embeddings of the surviving tokens, which
  is neither: the rater set changes as visual tokens drop.)
- Text after the image: the text tokens after the last visual token of the sequence the
  raters are chosen on (the first stage's for ``"once"``); every text token if there is none.
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
- Other depths (``schedule="solved"``): ``layers`` (official ``pruning_loc``: the layer whose
  attention rates; layer+1 is the first with fewer tokens) default 2,6,15 of 32 scaled to
  round(l * L / 32), strictly increasing, at most L-2 (4 layers: 0,1,2). An explicit
  ``layers`` is used as given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
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

if TYPE_CHECKING:
    import torch

__all__ = [
    "OFFICIAL_DEPTH",
    "OFFICIAL_KEEPS",
    "OFFICIAL_VISUAL",
    "PAPER_LAYERS",
    "SparseVLM",
    "cluster_count",
    "dpc_knn",
    "merge_clusters",
    "official_keeps",
    "rater_mask",
    "rater_relevance",
    "rater_scores",
    "recycle_split",
    "text_after_image",
]

PAPER_LAYERS = (2, 6, 15)  # official pruning_loc for LLaVA-1.5 (32 layers)
OFFICIAL_VISUAL = 576  # LLaVA-1.5's visual tokens, for which the official lists are tuned
OFFICIAL_DEPTH = 32  # LLaVA-1.5-7B's decoder layers
# official score.py (version 1_0) sparse_token_list_<RETAIN_TOKN>: tokens kept by score (m_s)
# at pruning_loc 2, 6, 15, before the merged ones are added
OFFICIAL_KEEPS: dict[int, tuple[int, ...]] = {
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}


def rater_relevance(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Eq. (1)-(2). visual: (V, D), text: (T, D) hidden states. Returns (T,) bool: raters."""
    similarity = visual.float() @ text.float().T  # (V, T)
    relevance = similarity.softmax(dim=-1).mean(dim=0)  # (T,)
    return relevance > relevance.mean()


def text_after_image(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(T,) bool over the ``text`` positions (T,): those after the last ``visual`` position
    (V,), the question and answer prefix; every one if none is after it."""
    import torch

    after = text > visual.max()
    return after if bool(after.any()) else torch.ones_like(after)


def rater_mask(states: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Eq. (1)-(2) on the (S, D) ``states`` of a sequence with ``visual`` (V,) and ``text`` (T,)
    positions: (T,) bool over ``text``, the raters among the text after the image."""
    import torch

    after = text_after_image(visual, text)
    mask = torch.zeros_like(after)
    mask[after] = rater_relevance(states[visual], states[text[after]])
    return mask


def rater_scores(
    attention: torch.Tensor,
    query_positions: torch.Tensor,
    raters: torch.Tensor,
    visual: torch.Tensor,
) -> torch.Tensor:
    """Eq. (3). attention: (H, Q, S) softmax rows of the queries at ``query_positions`` (Q,);
    raters: (R,) sequence positions of the rater tokens; visual: (V,) positions. Returns (V,)."""
    import torch

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


def official_keeps(
    scored: Sequence[int],
    n_visual: int,
    recycle_ratio: float | None,
    cluster_ratio: float,
) -> tuple[int, ...]:
    """K_s of the official schedule: stage s keeps m_s = min(scored[s], V_{s-1} - 1) tokens by
    score (official ``attn_postprocess_topk``) plus, unless ``recycle_ratio`` is None (no
    recycling), cluster_count(V_{s-1} - m_s) merged ones; V_0 = ``n_visual``, V_s = K_s."""
    keeps: list[int] = []
    previous = n_visual
    for listed in scored:
        kept = min(listed, previous - 1)
        if recycle_ratio is not None:
            kept += cluster_count(previous - kept, recycle_ratio, cluster_ratio)
        keeps.append(kept)
        previous = kept
    return tuple(keeps)


@register
@dataclass(frozen=True)
class SparseVLM(PruningMethod):
    """See the module docstring. ``layers``: official ``pruning_loc`` (the layers whose attention
    rates the visual tokens; the next layer is the first with fewer), None = 2,6,15 scaled to
    the model's depth. ``recycle``: merge the best pruned tokens (``recycle_ratio`` of them,
    into ``cluster_ratio`` as many clusters) into ``recycle_position`` slots. ``raters``: chosen
    ``"once"`` from the input embeddings (official) or ``"per_stage"`` from the hidden states.
    ``schedule``: per-stage counts ``"solved"`` for the average budget, or the ``"official"``
    lists (LLaVA-1.5 at 192/128/96/64 tokens only)."""

    layers: tuple[int, ...] | None = None
    recycle: bool = True
    recycle_ratio: float = 0.3
    cluster_ratio: float = 0.1
    recycle_position: Literal["end", "anchor"] = "end"
    min_stage_ratio: float = 0.5
    raters: Literal["once", "per_stage"] = "once"
    schedule: Literal["solved", "official"] = "solved"

    name: ClassVar[str] = "sparsevlm"
    # 3: raters chosen once at the first stage and carried to the later ones (official);
    # schedule="official"; rater_source replaced by raters
    version: ClassVar[str] = "3"
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
        if self.schedule == "official":
            rating, keeps = PAPER_LAYERS, self.official_schedule(ctx)
        else:
            rating = self.rating_layers(depth)
            layers = tuple(layer + 1 for layer in rating)
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
            keeps = solved[0]

        def make(layer: int, keep: int) -> LayerStep:
            return LayerStep(
                layer=layer, keep=keep, queries="text", needs_hidden=True, positions="renumber"
            )

        first_reduced = tuple(layer + 1 for layer in rating)  # first layer with fewer tokens
        steps = layer_steps(n, first_reduced, keeps, make)
        if self.raters == "once" and steps:  # the first stage chooses the raters
            steps = (dataclasses.replace(steps[0], needs_embeddings=True), *steps[1:])
        return Plan(layers=steps)

    def rating_layers(self, depth: int) -> tuple[int, ...]:
        """The layers whose attention rates (official ``pruning_loc``) on a ``depth``-layer LLM."""
        if self.layers is None:
            return scale_layers(PAPER_LAYERS, depth, 0, depth - 2)
        check_highest_layer(
            "sparsevlm",
            self.layers,
            depth - 2,
            f"leaves no later layer to prune on a model with {depth} layers (at most {depth - 2})",
        )
        return self.layers

    def official_schedule(self, ctx: PlanContext) -> tuple[int, ...]:
        """K_s of ``schedule="official"`` (``official_keeps``); ValueError where the official
        lists are not defined."""
        assert ctx.budget is not None
        n, depth, tokens = ctx.n_visual, ctx.n_layers, ctx.budget.tokens(ctx.n_visual)
        scored = OFFICIAL_KEEPS.get(tokens)
        layers = PAPER_LAYERS if self.layers is None else self.layers
        if scored is None or (n, depth, layers) != (OFFICIAL_VISUAL, OFFICIAL_DEPTH, PAPER_LAYERS):
            budgets = "/".join(str(b) for b in OFFICIAL_KEEPS)
            raise ValueError(
                f"sparsevlm.schedule='official': the official lists are for LLaVA-1.5 "
                f"({OFFICIAL_VISUAL} visual tokens, {OFFICIAL_DEPTH} layers, layers 2,6,15) at "
                f"{budgets} tokens, not {n} visual tokens, {depth} layers, layers "
                f"{','.join(map(str, layers))} at {tokens} tokens; use schedule='solved'"
            )
        ratio = self.recycle_ratio if self.recycle else None
        return official_keeps(scored, n, ratio, self.cluster_ratio)

    def stage_ratios(self, n_stages: int) -> Callable[[float], list[float]]:
        """Eq. (9): K_s / N = x * max(x, min_stage_ratio)^(s-1) as a function of the solved x."""
        floor = self.min_stage_ratio
        return lambda x: [x * max(x, floor) ** s for s in range(n_stages)]

    def stage_raters(self, step: LayerStep, signals: LayerSignals) -> torch.Tensor:
        """(T,) bool over ``signals.text``: the raters of this stage (see ``raters``)."""
        import torch

        if self.raters == "per_stage":
            assert signals.hidden is not None
            return rater_mask(signals.hidden, signals.visual, signals.text)
        if step.needs_embeddings:  # the plan's first stage
            if signals.embeddings is None:
                raise ValueError("sparsevlm: the first layer step needs the input embeddings")
            return rater_mask(signals.embeddings, signals.visual, signals.text)
        carry = signals.carry
        if carry is None or carry.shape != signals.text.shape or carry.dtype != torch.bool:
            got = None if carry is None else f"{carry.dtype} {tuple(carry.shape)}"
            raise ValueError(
                f"sparsevlm: the layer step at {step.layer} needs the first stage's rater mask "
                f"over its {signals.text.numel()} text tokens (LayerSignals.carry), got {got}"
            )
        return carry.to(signals.text.device)

    def _scores(self, signals: LayerSignals, raters: torch.Tensor) -> torch.Tensor:
        """Eq. (3): (V,) scores of ``signals.visual`` by the ``raters`` (T,) over the text."""
        assert signals.attention is not None and signals.query_positions is not None
        text = signals.text[raters]
        return rater_scores(signals.attention, signals.query_positions, text, signals.visual)

    def score_layer(self, step: LayerStep, signals: LayerSignals) -> torch.Tensor:
        return self._scores(signals, self.stage_raters(step, signals))

    def select_layer(self, step: LayerStep, signals: LayerSignals) -> torch.Tensor | LayerSelection:
        import torch

        assert signals.attention is not None and signals.query_positions is not None
        assert signals.hidden is not None
        visual, hidden = signals.visual, signals.hidden  # (V,), (S, D)
        mask = self.stage_raters(step, signals)  # (T,)
        carry = mask if self.raters == "once" else None
        scores = self._scores(signals, mask)  # (V,)
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
            return kept if carry is None else LayerSelection(keep=kept, carry=carry)
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
        return LayerSelection(keep=keep, hidden=replacement.to(hidden.dtype), carry=carry)
