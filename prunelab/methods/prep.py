"""PREP: pre-inference guided token pruning (anonymous submission, "PREP: Pre-inference Guided Token
Pruning for Efficient Vision-Language Models").

Stage 1, pre-inference (§3.2). The visual tokens are average-pooled into r patch-level tokens
(eq. 5); the LLM runs over the prompt with those r tokens in place of the N visual tokens, up
to the last candidate layer. At every candidate layer k the text-visual alignment distribution

    Q^k = Mean_j[Softmax_i(V^k (T^k)^T / sqrt(D))] / sum_i Mean_j[...]_i        (eq. 1)

is scored by

    EKL_k = H(Q^k) + KL(Q^k || Q^{k-1})                                       (eq. 4)

and the layer k* = argmax_k EKL_k is chosen (candidates 6-15 of LLaVA-1.5-7B's 32 layers).

Stage 2, full inference (§3.3). At layer k* the head-mean attention (eq. 7) gives each visual
token a visual-to-visual and a visual-to-text importance (eqs. 8-9), summed (eq. 10); the
top m% visual tokens (the trial's budget) stay for all later layers and the KV cache.

Resolved details and ambiguities:

- Group size (eq. 5, Table 6): ``group_size`` is the number of visual tokens per group (L in
  eq. 5: "the number of tokens per group used in average pooling", Table 6), so 64 on LLaVA's
  24x24 grid gives r = 9 patch tokens. This is also what the paper's overhead implies: 9 tokens
  through ~10 layers of a 7B model is 0.02 TFLOPs, the 0.4% it reports (64 groups would be
  ~0.13 TFLOPs). ``pooling="grid"`` (default) forms groups of bh x bw tokens on each tile's own
  (row, col) grid from ``VisionSignals.coords`` (bh the largest divisor of the group size not
  above its square root: 64 -> 8x8, 144 -> 12x12, 32 -> 4x8, 192 -> 12x16; edge blocks may be
  partial), so dynamic-resolution and tiled encoders are grouped "according to their original
  size" and tiles are pooled separately. ``pooling="sequence"`` is the literal reshape of eq. 5:
  runs of ``group_size`` consecutive tokens of a tile. Each pooled token sits on the placeholder
  (and position) of its group's member nearest the group's centroid.
- Q^k (eq. 1) is computed from the hidden states V^k, T^k after k decoder layers
  (``alignment="hidden"``, D their width). The softmax runs over the visual axis i (for each
  text token, a distribution over the visual tokens): over the text axis, the mean over j of
  rows summing to one would be the constant 1/M and Q^k uniform. ``alignment="attention"`` is
  a variant: the head-mean attention rows of the text tokens over the visual keys at that layer
  (renormalised), recorded without eager attention.
- T are the prompt's text tokens after the image (the paper's M prompt tokens; the S system
  tokens before the image are excluded, eq. 6).
- Layer numbering: the paper's layers are 1-based ("the k-th layer"): Q^k and Attn^{k*} are
  those of the k-th decoder layer (0-based index k - 1), and the pruning step is
  ``LayerStep(layer=k*)`` (drop at the input of 0-based layer k*, i.e. after the k*-th layer).
  Q^{k-1} of the first candidate is recorded too (k - 1 = 0: the input embeddings).
- Candidate layers: first..last_layer as given whenever the model has them (the paper uses
  6-15 on LLaVA-1.5 (32 layers), InternVL3 and Qwen2.5-VL (28-36)); on shallower models (the
  tiny test models) l -> round(l * n_layers / 32), deduplicated, clamped to [1, n_layers - 1]
  ([2, n_layers - 1] with ``alignment="attention"``, which needs attention at k - 1).
  Ties of EKL: the earliest layer.
  ``rank`` picks the rank-th highest EKL (Table 4's ablation; 1 = the argmax).
- Eqs. 8-9 index Attn[visual rows, text columns]; under the causal mask of these decoders a
  visual token cannot attend to the text after it, so that block is zero. We read the scores as
  the attention each visual token *receives*: s_v[i] = (1/N) sum_j Attn[v_j, v_i] over the N
  visual queries and s_t[i] = (1/M) sum_j Attn[t_j, v_i] over the M text queries after the
  image. ``token_score`` selects v2v + v2t (eq. 10) or one term (Table 7's ablation).
- ``layer_score``: EKL (eq. 4), or its entropy / KL term alone (Table 3's ablation).
- Logarithms are natural; probabilities are clamped at 1e-12 inside the logs.
- The pre-inference's FLOPs (every token of its sequence, every layer it ran, plus the pooling)
  are counted in ``tflops_guidance`` and the total; the paper's eq. 27 counts the r pooled
  tokens through k* layers only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from prunelab.methods.base import (
    HyperparameterError,
    LayerSignals,
    LayerStep,
    Plan,
    PlanContext,
    PreInferenceSignals,
    PreInferenceStep,
    PruningMethod,
    VisionSelection,
    VisionSignals,
    top_k_sorted,
)
from prunelab.methods.registry import register

if TYPE_CHECKING:
    import torch

__all__ = [
    "PREP",
    "alignment_from_attention",
    "alignment_from_hidden",
    "block_shape",
    "candidate_layers",
    "choose_layer",
    "entropy",
    "kl_divergence",
    "layer_scores",
    "multimodal_scores",
    "pool_groups",
    "pool_tokens",
]

REFERENCE_DEPTH = 32  # LLaVA-1.5-7B's decoder layers, for which the paper gives layers 6-15
_EPS = 1e-12


# -- stage 1: pooling (eq. 5) ---------------------------------------------------------------
def block_shape(group_size: int) -> tuple[int, int]:
    """(rows, cols) of a grid block of ``group_size`` tokens: rows the largest divisor of
    ``group_size`` that is at most its square root (64 -> (8, 8), 32 -> (4, 8), 192 -> (12, 16))."""
    rows = max(d for d in range(1, math.isqrt(group_size) + 1) if group_size % d == 0)
    return rows, group_size // rows


def pool_groups(
    coords: torch.Tensor, group_size: int, pooling: str = "grid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partition N visual tokens into r groups (the V_r of eq. 5).

    coords: (N, 3) long (tile, row, col) of each token, in sequence order.
    Returns ``assignment`` (N,) long, the group of each token, and ``anchors`` (r,) long, the
    token each group is placed on (its member nearest the group's (row, col) centroid, lowest
    index on ties); groups are numbered in increasing anchor order.
    ``pooling="grid"``: blocks of ``block_shape(group_size)`` on each tile's grid;
    ``"sequence"``: runs of ``group_size`` consecutive tokens of each tile.
    """
    import torch

    coords = coords.long()
    n = coords.shape[0]
    tile, row, col = coords[:, 0], coords[:, 1], coords[:, 2]
    if pooling == "grid":
        bh, bw = block_shape(group_size)
        block_row, block_col = row // bh, col // bw
    elif pooling == "sequence":
        # rank of each token within its tile, in sequence order
        within = torch.zeros(n, dtype=torch.long, device=coords.device)
        for t in tile.unique():
            members = (tile == t).nonzero().squeeze(-1)
            within[members] = torch.arange(members.numel(), device=coords.device)
        block_row, block_col = within // group_size, torch.zeros_like(within)
    else:
        raise ValueError(f"pooling={pooling!r}: expected 'grid' or 'sequence'")
    key = torch.stack([tile, block_row, block_col], dim=-1)
    _, group = torch.unique(key, dim=0, return_inverse=True)  # (N,) arbitrary group numbering
    r = int(group.max()) + 1
    position = torch.stack([row, col], dim=-1).double()
    count = torch.zeros(r, dtype=torch.double, device=coords.device).index_add_(
        0, group, torch.ones(n, dtype=torch.double, device=coords.device)
    )
    centroid = (
        torch.zeros(r, 2, dtype=torch.double, device=coords.device).index_add_(0, group, position)
        / count[:, None]
    )
    distance = (position - centroid[group]).pow(2).sum(-1)  # (N,)
    # anchor: the member with the smallest (distance, index); a stable sort keeps index order
    order = torch.sort(distance, stable=True).indices  # (N,)
    rank = torch.empty(n, dtype=torch.long, device=coords.device)
    rank[order] = torch.arange(n, device=coords.device)
    first = torch.full((r,), n, dtype=torch.long, device=coords.device)
    first = first.scatter_reduce(0, group, rank, reduce="amin")  # best rank in each group
    anchors_unsorted = order[first]  # (r,) anchor token of each arbitrary group
    anchors, renumber = torch.sort(anchors_unsorted)
    new_id = torch.empty(r, dtype=torch.long, device=coords.device)
    new_id[renumber] = torch.arange(r, device=coords.device)
    return new_id[group], anchors


def pool_tokens(tokens: torch.Tensor, assignment: torch.Tensor, groups: int) -> torch.Tensor:
    """Eq. 5: V_p = mean of the tokens of each group. tokens (N, D), assignment (N,) in
    [0, groups) -> (groups, D) in ``tokens.dtype`` (summed in float32)."""
    import torch

    assignment = assignment.to(tokens.device)
    total = torch.zeros(groups, tokens.shape[1], dtype=torch.float32, device=tokens.device)
    total.index_add_(0, assignment, tokens.float())
    count = torch.bincount(assignment, minlength=groups).clamp_min(1).float()
    return (total / count[:, None]).to(tokens.dtype)


# -- stage 1: layer choice (eqs. 1, 4) ------------------------------------------------------
def alignment_from_hidden(
    hidden: torch.Tensor, visual: torch.Tensor, text: torch.Tensor
) -> torch.Tensor:
    """Eq. 1: Q^k from hidden states.

    hidden: (S, D) hidden states after k layers; visual: (r,) and text: (M,) positions.
    Returns (r,) float32 Q^k: softmax over the visual axis of V T^T / sqrt(D) (r, M), mean over
    the M text tokens, L1-normalised.
    """
    import torch

    v = hidden[visual.to(hidden.device)].float()  # (r, D)
    t = hidden[text.to(hidden.device)].float()  # (M, D)
    similarity = v @ t.T / math.sqrt(hidden.shape[-1])  # (r, M)
    mean = torch.softmax(similarity, dim=0).mean(dim=1)  # (r,)
    return mean / mean.sum()


def alignment_from_attention(attention: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Variant of eq. 1 on attention: attention (H, M, S) softmax rows of the M text queries,
    visual (r,) key positions -> (r,) float32 head- and query-mean attention to each visual
    token, L1-normalised."""
    mean = attention[:, :, visual.to(attention.device)].float().mean(dim=(0, 1))
    return mean / mean.sum().clamp_min(_EPS)


def entropy(q: torch.Tensor) -> torch.Tensor:
    """H(q) = -sum_i q_i log q_i (nats) of a distribution q (..., r) -> (...)."""
    return -(q * q.clamp_min(_EPS).log()).sum(dim=-1)


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_i p_i (log p_i - log q_i) (nats) of distributions (..., r) -> (...)."""
    return (p * (p.clamp_min(_EPS).log() - q.clamp_min(_EPS).log())).sum(dim=-1)


def layer_scores(
    distributions: dict[int, torch.Tensor], candidates: tuple[int, ...], score: str = "ekl"
) -> torch.Tensor:
    """Eq. 4 for each candidate k: H(Q^k) + KL(Q^k || Q^{k-1}) (``"ekl"``), or one term
    (``"entropy"``, ``"kl"``). distributions: k -> (r,) Q^k, holding every candidate k and
    k - 1. Returns (len(candidates),) float32."""
    import torch

    out = []
    for k in candidates:
        q, previous = distributions[k].float(), distributions[k - 1].float()
        h, kl = entropy(q), kl_divergence(q, previous)
        out.append({"ekl": h + kl, "entropy": h, "kl": kl}[score])
    return torch.stack(out)


def choose_layer(candidates: tuple[int, ...], scores: torch.Tensor, rank: int = 1) -> int:
    """The candidate with the ``rank``-th highest score (1: the argmax, eq. 4's k*); ties go to
    the earlier layer."""
    values = scores.detach().float().cpu().tolist()
    order = sorted(range(len(candidates)), key=lambda i: (-values[i], candidates[i]))
    return candidates[order[min(rank, len(order)) - 1]]


def candidate_layers(
    first: int, last: int, n_layers: int, lowest: int = 1, reference: int = REFERENCE_DEPTH
) -> tuple[int, ...]:
    """The candidate layers ``first..last`` at depth ``n_layers``, increasing.

    As given when the model has them all (the paper prunes between layers 6-15 of 28-, 32- and
    36-layer LLMs); on shallower models scaled from a ``reference``-layer one:
    round(l * n_layers / reference), deduplicated, clamped to [lowest, n_layers - 1]."""
    if n_layers - 1 < lowest:
        raise ValueError(
            f"prep needs at least {lowest + 1} decoder layers, the model has {n_layers}"
        )
    if lowest <= first and last <= n_layers - 1:
        return tuple(range(first, last + 1))
    scaled = {round(layer * n_layers / reference) for layer in range(first, last + 1)}
    return tuple(sorted({min(max(k, lowest), n_layers - 1) for k in scaled}))


# -- stage 2: multimodal token score (eqs. 7-10) --------------------------------------------
def multimodal_scores(
    attention: torch.Tensor,
    query_positions: torch.Tensor,
    visual: torch.Tensor,
    text: torch.Tensor,
    token_score: str = "v2v+v2t",
) -> torch.Tensor:
    """Eqs. 7-10: the multimodal score of each visual token at layer k*.

    attention: (H, Q, S) softmax rows of the queries at ``query_positions`` (Q,), which must
    include every visual token and the text after the image. visual: (N,) visual positions;
    text: text positions (those after the last visual token are the M prompt tokens).
    Returns (N,) float32: s_v[i] = (1/N) sum_j A[v_j, v_i] plus s_t[i] = (1/M) sum_j A[t_j, v_i]
    with A the head mean (eq. 7), as selected by ``token_score``.
    """
    import torch

    device = attention.device
    visual, text = visual.to(device), text.to(device)
    row_of = torch.full((attention.shape[-1],), -1, dtype=torch.long, device=device)
    row_of[query_positions.to(device)] = torch.arange(query_positions.numel(), device=device)
    prompt = text[text > visual.max()] if visual.numel() else text
    if bool((row_of[visual] < 0).any()) or bool((row_of[prompt] < 0).any()):
        raise ValueError("prep needs the attention rows of every visual and prompt text token")
    mean = attention.float().mean(dim=0)  # (Q, S): eq. 7
    keys = mean[:, visual]  # (Q, N): columns of the visual tokens
    s_v = keys[row_of[visual]].mean(dim=0)  # (N,): eqs. 8-9, visual queries
    # (N,): eqs. 8-9, prompt text queries
    s_t = keys[row_of[prompt]].mean(dim=0) if prompt.numel() else torch.zeros_like(s_v)
    return {"v2v+v2t": s_v + s_t, "v2v": s_v, "v2t": s_t}[token_score]  # eq. 10


@register
@dataclass(frozen=True)
class PREP(PruningMethod):
    group_size: int = 64
    pooling: Literal["grid", "sequence"] = "grid"
    first_layer: int = 6
    last_layer: int = 15
    alignment: Literal["hidden", "attention"] = "hidden"
    layer_score: Literal["ekl", "entropy", "kl"] = "ekl"
    rank: int = 1
    token_score: Literal["v2v+v2t", "v2v", "v2t"] = "v2v+v2t"

    name: ClassVar[str] = "prep"
    stages: ClassVar[str] = "pre-inference (pooled tokens, EKL over layers 6-15) + layer k*"
    paper: ClassVar[str] = (
        "PREP: Pre-inference Guided Token Pruning for Efficient Vision-Language Models "
        "(anonymous submission)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 1:
            raise HyperparameterError(f"prep.group_size={self.group_size}: must be >= 1")
        if not 1 <= self.first_layer <= self.last_layer:
            raise HyperparameterError(
                f"prep.first_layer={self.first_layer}, last_layer={self.last_layer}: need "
                "1 <= first_layer <= last_layer"
            )
        if self.rank < 1:
            raise HyperparameterError(f"prep.rank={self.rank}: must be >= 1")

    def candidates(self, n_layers: int) -> tuple[int, ...]:
        """Candidate layers k (1-based, = ``LayerStep.layer``) at depth ``n_layers``."""
        lowest = 2 if self.alignment == "attention" else 1
        return candidate_layers(self.first_layer, self.last_layer, n_layers, lowest)

    def plan(self, ctx: PlanContext) -> Plan:
        """A provisional plan: prune at the last candidate; the pre-inference sets k*."""
        assert ctx.budget is not None
        candidates = self.candidates(ctx.n_layers)
        recorded = tuple(sorted(set(candidates) | {k - 1 for k in candidates}))
        keep = ctx.budget.tokens(ctx.n_visual)
        return Plan(
            layers=(LayerStep(layer=candidates[-1], keep=keep, queries="all"),),
            pre_inference=PreInferenceStep(
                candidates=candidates,
                layers=recorded,
                hidden=self.alignment == "hidden",
                text_attention=self.alignment == "attention",
            ),
        )

    def pool_pre_inference(self, signals: VisionSignals) -> VisionSelection:
        assignment, anchors = pool_groups(signals.coords, self.group_size, self.pooling)
        pooled = pool_tokens(signals.tokens, assignment, anchors.numel())
        return VisionSelection(tokens=pooled, kept=anchors, assignment=assignment)

    def distributions(self, signals: PreInferenceSignals, depths: tuple[int, ...]) -> dict:
        """Q^k (r,) for each depth k (eq. 1, or its attention variant)."""
        if self.alignment == "hidden":
            return {
                k: alignment_from_hidden(signals.hidden[k], signals.visual, signals.text)
                for k in depths
            }
        return {k: alignment_from_attention(signals.attention[k], signals.visual) for k in depths}

    def after_pre_inference(self, plan: Plan, signals: PreInferenceSignals) -> tuple[Plan, int]:
        assert plan.pre_inference is not None
        step = plan.pre_inference
        q = self.distributions(signals, step.layers)
        scores = layer_scores(q, step.candidates, self.layer_score)
        layer = choose_layer(step.candidates, scores, self.rank)
        final = dataclasses.replace(
            plan,
            layers=tuple(dataclasses.replace(s, layer=layer) for s in plan.layers),
            pre_inference=None,
        )
        return final, layer

    def select_layer(self, step: LayerStep, signals: LayerSignals) -> torch.Tensor:
        if signals.attention is None or signals.query_positions is None:
            raise RuntimeError("prep scores tokens by attention, but none was recorded")
        scores = multimodal_scores(
            signals.attention,
            signals.query_positions,
            signals.visual,
            signals.text,
            self.token_score,
        )
        return top_k_sorted(scores, step.keep)
