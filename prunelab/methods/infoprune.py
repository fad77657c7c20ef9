"""InfoPrune ("InfoPrune: Revisiting Visual Token Pruning from an Information-Theoretic
Perspective", anonymous ICLR 2026 submission, no arXiv id).

Two stages. Stage 1 (vision side, Algorithm 1) keeps T_1 of the N visual tokens x_i (D,) by
an attention prior and the marginal information each token adds, then merges the dropped ones
into the kept; stage 2 drops all but T_2 = R_2 * T_1 of them inside the LLM after layer K.

Stage 1 (Algorithm 1), a (N,) the encoder's CLS attention at layer -2:

    (6)  q_i  = softmax(a / tau)_i ^ gamma                        attention prior (line 2)
         C    = top-(alpha * T_1) of q                            candidate pool (line 3)
    (7)  Z_i  = sqrt(q_i) x_i,  i in C                            DPP-style features (line 4)
    (8)  r_i  = ||Z_i||^2 - ||U^T Z_i||^2 = ||(I - P_U) Z_i||^2    residual energy (line 8)
         repeat T_1 times: stop if max_{C \\ S} r_i <= eps; add i* = argmax r_i to S and
         u = (Z_i* - U U^T Z_i*) / ||.|| to the orthonormal basis U   (lines 7-16)
         |S| < T_1: fill with the top-q of C \\ S  (lines 18-20; |S| > T_1 cannot happen)
    merge: c_j = beta, x~_j = beta x_j for j in S; every i not in S joins
         j(i) = argmax_{j in S} cos(x_i, x_j): c_j += 1, x~_j += x_i;  output x~_j / c_j
         (lines 24-33)

Stage 2 (Section 3.2): at layer K the last text token's attention, head mean,

    (9)  s_i  = 1/H sum_h alpha_i^(K, h),  i = 1..T_1;  keep the top T_2 = R_2 * T_1

Diagnostics (Section 2.1, Appendix C.1), for a selection order i_1, i_2, ... of tokens x:

    (2)  MFI_t = ||x_{i_t} - U U^T x_{i_t}||              U: orthonormal basis of x_{i_1..i_{t-1}}
    (C.1.2) MGI_t = log(1 + 1/t x^T (C_S + e I)^{-1} x),  C_S = 1/(t-1) sum_{s<t} x_s x_s^T
         (the boxed form with |S| = t - 1 tokens before; C_S = 0 for the first token)

``select_vision`` returns them for InfoPrune's order and for plain top-T_1 attention (the
paper's Fig. 2 baseline) when the runner asks (the first samples of a trial), every 8 steps as
the paper records them (C.2.1); the runner logs them as ``infoprune/curves.json``.

Budget (``budget_is_average``): the paper reports the average over the L decoder layers
(Table 4: R_1 = 16.7%, R_2 = 33.3% for "11.1%" = 64 tokens: (16 * 96 + 16 * 32) / 32 = 64),

    (10) avg = ((K + 1) T_1 + (L - K - 1) T_2) / L,   T_2 = round(R_2 * T_1)

so ``plan`` takes the T_1 whose average is closest to the budget (within half a token, as the
average grows by at most one token per unit of T_1). Where even T_1 = N is too little (budgets
above ((K + 1) + (L - K - 1) R_2) / L of N, ~67% on LLaVA-1.5) stage 1 keeps every token and
T_2 is solved from (10) instead.

Paper settings (Appendix B) and choices:
- tau = 0.7, gamma = 0.5, attention of encoder layer -2 (the adapters' feature layer on LLaVA,
  LLaVA-NeXT and InternVL; Qwen2-VL/2.5-VL have no CLS and give the mean attention each token
  receives at the last encoder layer, see the adapters). a is the head-mean CLS row (a
  probability row), so softmax(a / 0.7) is a mild reweighting; as written in the paper.
- alpha = 2 for LLaVA models, 3 for Qwen2.5-VL (``alpha=None`` picks by family; InternVL, not
  in the paper, gets 2). The pool never exceeds N.
- K = 15 ("the 16th layer", 32-layer LLaVA) and K = 13 (28-layer Qwen2.5-VL): ``layer=None``
  scales 15/32 to the depth, round(15 * L / 32), which gives 13 for L = 28 and 2 for L = 4;
  layer K + 1 is the first with T_2 tokens (``LayerStep(layer=K + 1)``, whose attention rows
  come from layer K). R_2 = 0.33.
- eps: the paper gives no value; here it is relative, r_i <= eps * max_{i in C} ||Z_i||^2
  (scale-free; float32 round-off in (8) is ~1e-6 of that and counts as 0), default 1e-4.
- beta: the paper gives no value; default 1 (a kept token weighs as one merged token).
- Features x: the projected visual tokens (what a vision stage sees); the paper's X are the
  visual embeddings fed to the LLM as well ("output tensor compatible with downstream
  processing"). The merged x~_j replace the kept tokens, in index order (``kept`` sorted).
- Greedy step: one pivoted-Cholesky update of all candidates' residuals per pick (the fast
  greedy MAP update of Chen et al., 2018), equivalent to Gram-Schmidt on U: with G = Z Z^T,
  e_j = (G_{i*, j} - sum_s c_{s, i*} c_{s, j}) / sqrt(r_i*) = <u, Z_j>, r_j -= e_j^2. No Python
  loop over candidates, no host sync per step (r is non-increasing, so the steps after the
  first below eps are masked out and cut off at the end).
- Positions after stage 2: kept (``positions="original"``, as FastV, whose pruning the stage
  follows: "hidden states and attention masks are updated"); "renumber" is available.
- MGI's e: 1e-3 times the mean squared entry of x (the paper does not give it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from prunelab.methods.base import (
    HyperparameterError,
    LayerSignals,
    LayerStep,
    Plan,
    PlanContext,
    PruningMethod,
    VisionSelection,
    VisionSignals,
    top_k_sorted,
)
from prunelab.methods.pdrop import PAPER_DEPTH, average_target, pdrop_scores
from prunelab.methods.registry import register

if TYPE_CHECKING:
    import torch

__all__ = [
    "PAPER_LAYER",
    "QWEN_FAMILIES",
    "InfoPrune",
    "attention_prior",
    "candidate_pool",
    "fill_by_prior",
    "greedy_residual",
    "infoprune_select",
    "prototype_merge",
    "selection_curves",
    "stage_counts",
]

PAPER_LAYER = 15  # K on 32-layer LLaVA: attention of layer 15 ranks, layer 16 has T_2 tokens
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")  # alpha = 3 (Appendix B)
CURVE_STRIDE = 8  # the paper records MFI / MGI every 8 selection steps (Appendix C.2.1)
MGI_RIDGE = 1e-3  # e of MGI, relative to the mean squared entry of x
ROUND_OFF = 1e-6  # residual energies below this share of the largest are float32 noise


def attention_prior(attention: torch.Tensor, tau: float, gamma: float) -> torch.Tensor:
    """Eq. (6): q = softmax(a / tau) ^ gamma. attention: (N,). Returns (N,) float32."""
    import torch

    return torch.softmax(attention.float() / tau, dim=-1).pow(gamma)


def candidate_pool(prior: torch.Tensor, size: int) -> torch.Tensor:
    """Algorithm 1 line 3: the ``size`` indices with the largest prior (N,), best first (P,)."""
    import torch

    size = max(1, min(size, prior.shape[0]))
    return torch.sort(prior, descending=True, stable=True).indices[:size]


def _residual_steps(
    gram: torch.Tensor, steps: int, order: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pivoted Cholesky on the Gram matrix (P, P) of P vectors z_j: ``steps`` picks, each the
    largest residual energy r_j = ||(I - P_U) z_j||^2 among the unpicked (or ``order[t]`` when
    an order is given), then one rank-1 update of every residual.

    Returns picks (steps,) and the residual energy (steps,) of each pick when it was picked.
    A pick whose r is at float32 round-off (<= 1e-6 of the largest ||z_j||^2: in the span
    already) has energy 0 and leaves the others unchanged."""
    import torch

    p = gram.shape[0]
    steps = min(steps, p)
    residual = gram.diagonal().clone()  # (P,) r_j = ||z_j||^2 with U empty
    floor = ROUND_OFF * residual.max()
    coeffs = gram.new_zeros(steps, p)  # c_{s, j} = <u_s, z_j>
    picked = torch.zeros(p, dtype=torch.bool, device=gram.device)
    picks = torch.empty(steps, dtype=torch.long, device=gram.device)
    energy = gram.new_empty(steps)
    for s in range(steps):
        i = torch.where(picked, -math.inf, residual).argmax() if order is None else order[s]
        r = residual[i]
        alive = r > floor
        picks[s], energy[s] = i, torch.where(alive, r, 0.0)
        picked[i] = True
        e = (gram[i] - coeffs[:s, i] @ coeffs[:s]) / torch.where(alive, r, 1.0).sqrt()  # (P,)
        e = torch.where(alive, e, 0.0)
        coeffs[s] = e
        residual = residual - e * e
    return picks, energy


def greedy_residual(features: torch.Tensor, steps: int, eps: float) -> torch.Tensor:
    """Eq. (8), Algorithm 1 lines 5-16: greedy maximum orthogonal residual.

    features: (P, D) candidates Z. Picks up to ``steps`` rows, each the one with the largest
    ||(I - P_U) Z_i||^2 over the span U of those before, and stops before the first pick whose
    residual energy is <= eps * max_i ||Z_i||^2. Returns the picks in order (s,), s <= steps,
    as indices into ``features``."""
    z = features.float()
    gram = z @ z.T  # (P, P)
    picks, energy = _residual_steps(gram, steps)
    threshold = eps * gram.diagonal().max()
    # the best remaining residual only shrinks: the picks above eps are a prefix
    count = int((energy > threshold).cumprod(0).sum())
    return picks[:count]


def fill_by_prior(
    selected: torch.Tensor, pool: torch.Tensor, prior: torch.Tensor, budget: int
) -> torch.Tensor:
    """Algorithm 1 lines 17-23: ``selected`` (s,) pool positions, then the best-prior rest of
    the pool (P,) up to ``budget``; truncated by prior if longer. Returns (budget,) indices into
    the N tokens, in selection order (greedy picks first)."""
    import torch

    chosen = pool[selected]
    if chosen.numel() > budget:  # line 22: truncate by q (not reached by the greedy loop)
        best = torch.sort(prior[chosen], descending=True, stable=True).indices[:budget]
        return chosen[best.sort().values]
    is_chosen = torch.zeros(pool.numel(), dtype=torch.bool, device=pool.device)
    is_chosen[selected] = True
    rest = pool[~is_chosen]  # pool is in decreasing prior order, so is rest
    return torch.cat([chosen, rest[: budget - chosen.numel()]])


def prototype_merge(
    tokens: torch.Tensor, kept: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 lines 24-33: every token not in ``kept`` (T,) joins the kept token of highest
    cosine similarity; each kept token becomes (beta x_j + sum of its members) / (beta + count).

    tokens: (N, D). Returns merged (T, D) float32 in ``kept`` order, and owner (N,): the
    position in ``kept`` each token went to (a kept token to itself)."""
    import torch

    x = tokens.float()
    n = x.shape[0]
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    owner = (unit @ unit[kept].T).argmax(dim=-1)  # (N,)
    owner[kept] = torch.arange(kept.numel(), device=x.device)
    is_kept = torch.zeros(n, dtype=torch.bool, device=x.device)
    is_kept[kept] = True
    weight = torch.where(is_kept, beta, 1.0)  # (N,)
    sums = torch.zeros(kept.numel(), x.shape[1], device=x.device)
    sums.index_add_(0, owner, x * weight[:, None])
    counts = torch.zeros(kept.numel(), device=x.device).index_add_(0, owner, weight)
    return sums / counts[:, None], owner


def selection_curves(
    tokens: torch.Tensor, order: torch.Tensor, stride: int = CURVE_STRIDE
) -> dict[str, list[float]]:
    """Eq. (2) MFI and (C.1.2) MGI of the tokens (N, D) picked in ``order`` (T,), at steps
    0, stride, 2 stride, ... (0-based: step t adds the (t+1)-th token to t tokens before).

    Returns {"step": [...], "mfi": [...], "mgi": [...]}."""
    import torch

    x = tokens.float()[order]  # (T, D)
    gram = x @ x.T  # (T, T)
    _, energy = _residual_steps(gram, x.shape[0], torch.arange(x.shape[0], device=x.device))
    ridge = MGI_RIDGE * float(x.pow(2).mean())
    steps = list(range(0, x.shape[0], stride))
    mgi = []
    for t in steps:
        norm = gram[t, t]
        if t == 0:
            quad = norm / ridge
        else:  # Woodbury: x^T (e I + X_S^T X_S / t)^-1 x = (|x|^2 - g^T (e t I + G_S)^-1 g) / e
            g = gram[:t, t]
            system = gram[:t, :t] + ridge * t * torch.eye(t, device=x.device)
            quad = (norm - g @ torch.linalg.solve(system, g)) / ridge
        mgi.append(float(torch.log1p(quad.clamp_min(0.0) / (t + 1))))
    mfi = energy.clamp_min(0.0).sqrt()[steps]
    return {"step": steps, "mfi": mfi.tolist(), "mgi": mgi}


def infoprune_select(
    tokens: torch.Tensor,
    attention: torch.Tensor,
    keep: int,
    alpha: float,
    tau: float,
    gamma: float,
    eps: float,
    beta: float,
) -> tuple[VisionSelection, torch.Tensor]:
    """Algorithm 1 on tokens (N, D) with CLS attention (N,): ``keep`` merged tokens anchored in
    index order, and the selection order (keep,) (greedy picks, then the fill by prior)."""
    n = tokens.shape[0]
    keep = min(keep, n)
    prior = attention_prior(attention.to(tokens.device), tau, gamma)  # (N,)
    pool = candidate_pool(prior, math.floor(alpha * keep + 0.5))  # (P,)
    features = prior[pool].sqrt()[:, None] * tokens[pool].float()  # (P, D) eq. (7)
    picks = greedy_residual(features, keep, eps)
    order = fill_by_prior(picks, pool, prior, keep)  # (keep,)
    kept = order.sort().values
    merged, owner = prototype_merge(tokens, kept, beta)
    selection = VisionSelection(tokens=merged.to(tokens.dtype), kept=kept, assignment=owner)
    return selection, order


def stage_counts(
    n_visual: int, n_layers: int, first: int, target: float, r2: float
) -> tuple[int, int]:
    """(T_1, T_2) of eq. (10) closest to ``target``: T_1 tokens for layers [0, first), T_2 =
    round(r2 * T_1) (at least 1) from layer ``first`` on; T_1 = N and T_2 solved when even
    T_1 = N averages below the target."""

    def second(t1: int) -> int:
        return max(1, min(t1, math.floor(r2 * t1 + 0.5)))

    def average(t1: int, t2: int) -> float:
        return (first * t1 + (n_layers - first) * t2) / n_layers

    if average(n_visual, second(n_visual)) < target:
        t2 = math.floor((target * n_layers - first * n_visual) / (n_layers - first) + 0.5)
        return n_visual, max(1, min(n_visual, t2))
    guess = round(target * n_layers / (first + (n_layers - first) * r2))
    candidates = range(max(1, guess - 3), min(n_visual, guess + 3) + 1)
    t1 = min(candidates, key=lambda t: (abs(average(t, second(t)) - target), t))
    return t1, second(t1)


@register
@dataclass(frozen=True)
class InfoPrune(PruningMethod):
    """See the module docstring. ``layer``: the paper's K (0-based layer whose last-token
    attention ranks; K + 1 is the first with T_2 tokens), None = 15 of 32 scaled to the depth.
    ``alpha``: candidate pool factor, None = 2 (3 on Qwen2-VL / Qwen2.5-VL)."""

    tau: float = 0.7
    gamma: float = 0.5
    alpha: float | None = None
    eps: float = 1e-4
    beta: float = 1.0
    r2: float = 0.33
    layer: int | None = None
    positions: Literal["original", "renumber"] = "original"

    name: ClassVar[str] = "infoprune"
    stages: ClassVar[str] = "vision (attention prior + greedy residual + merge), layer 15 of 32"
    budget_is_average: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "InfoPrune: Revisiting Visual Token Pruning from an Information-Theoretic "
        "Perspective (anonymous ICLR 2026 submission)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tau <= 0:
            raise HyperparameterError(f"infoprune.tau={self.tau}: must be > 0")
        if self.gamma <= 0:
            raise HyperparameterError(f"infoprune.gamma={self.gamma}: must be > 0")
        if self.alpha is not None and self.alpha < 1:
            raise HyperparameterError(f"infoprune.alpha={self.alpha}: must be >= 1 (or null)")
        if not 0 <= self.eps < 1:
            raise HyperparameterError(f"infoprune.eps={self.eps}: must be in [0, 1)")
        if self.beta <= 0:
            raise HyperparameterError(f"infoprune.beta={self.beta}: must be > 0")
        if not 0 < self.r2 <= 1:
            raise HyperparameterError(f"infoprune.r2={self.r2}: must be in (0, 1]")
        if self.layer is not None and self.layer < 0:
            raise HyperparameterError(f"infoprune.layer={self.layer}: must be >= 0 (or null)")

    def pool_factor(self, family: str | None) -> float:
        """alpha: the hyperparameter, or the paper's 3 for Qwen families and 2 otherwise."""
        if self.alpha is not None:
            return self.alpha
        return 3.0 if family in QWEN_FAMILIES else 2.0

    def rank_layer(self, n_layers: int) -> int:
        """K: the layer whose attention ranks (0-based); the next is the first with T_2."""
        if self.layer is not None:
            if self.layer > n_layers - 2:
                raise ValueError(
                    f"infoprune.layer={self.layer}: leaves no later layer to prune on a model "
                    f"with {n_layers} layers (at most {n_layers - 2})"
                )
            return self.layer
        return max(0, min(n_layers - 2, math.floor(PAPER_LAYER * n_layers / PAPER_DEPTH + 0.5)))

    def plan(self, ctx: PlanContext) -> Plan:
        assert ctx.budget is not None
        n, depth = ctx.n_visual, ctx.n_layers
        if depth < 2:
            raise ValueError(f"infoprune needs at least 2 decoder layers, the model has {depth}")
        first = self.rank_layer(depth) + 1
        t1, t2 = stage_counts(n, depth, first, average_target(ctx.budget, n), self.r2)
        steps = ()
        if t2 < t1:
            steps = (LayerStep(layer=first, keep=t2, queries="last", positions=self.positions),)
        vision = t1 if t1 < n else None
        return Plan(
            vision_keep=vision,
            vision_signals=frozenset({"cls_attention"}) if vision is not None else frozenset(),
            layers=steps,
        )

    def select_vision(self, signals: VisionSignals, keep: int) -> VisionSelection:
        import torch

        if signals.cls_attention is None:
            raise ValueError("infoprune needs the cls_attention vision signal")
        selection, order = infoprune_select(
            signals.tokens,
            signals.cls_attention,
            keep,
            self.pool_factor(signals.family),
            self.tau,
            self.gamma,
            self.eps,
            self.beta,
        )
        if signals.want_diagnostics:
            ours = selection_curves(signals.tokens, order)
            by_attention = torch.sort(signals.cls_attention.float(), descending=True, stable=True)
            baseline = selection_curves(signals.tokens, by_attention.indices[: order.numel()])
            selection.diagnostics = {
                **ours,
                "mfi_attention": baseline["mfi"],
                "mgi_attention": baseline["mgi"],
            }
        return selection

    def select_layer(self, step: LayerStep, signals: LayerSignals) -> torch.Tensor:
        assert signals.attention is not None
        return top_k_sorted(pdrop_scores(signals.attention, signals.visual), step.keep)
