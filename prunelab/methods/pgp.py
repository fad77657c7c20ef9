"""PGP / IF-Prune: posterior-guided visual token pruning (anonymous ICLR submission "Posterior-
Guided Visual Token Pruning in Vision-Language Models"; published as IF-Prune: Information-Flow
Guided Token Pruning for Efficient Vision-Language Models, CVPR 2026).

A small VLM of the same family reads the sample once (a single prefill, no generation). Its
visual hidden states V' (N, d) at ``guide_layer`` (default: the last hidden states, §3.3) go
through a token-wise variational information bottleneck (VIB) head Q_θ trained beforehand
(``prunelab train-vib`` or a sweep's ``stages:``). Each visual token's importance is the
channel-averaged KL divergence of its posterior from a learnable prior (eq. 2); the large VLM
keeps the top-k tokens and hard-prunes the rest at decoder layer L (0: before the LLM).

    posterior  Q_θ(Z_i | V'_i) = N(μ_θ(V'_i), σ_θ²(V'_i))                        (eq. 1)
    prior      P(z) = N(μ_p, σ_p²),  μ_p, σ_p² ∈ R^d learnable, shared            (§3.1)
    score      s_i = 1/d Σ_j KL(Q_θ(Z_i^(j) | V'_i) || P(z^(j)))                  (eq. 2)
    gate       μ_θ(V'_i) = f(I_θ(V'_i)) ⊙ (V'_i − μ_p) + μ_p,  f = sigmoid | exp   (eq. 3)
    sample     Z_i = μ_θ(V'_i) + σ_θ(V'_i) ⊙ ε,  ε ~ N(0, I)                      (eq. 4)
    loss       L = CE(Y | X, Z) + β(s) · 1/m Σ_i KL_i                             (eq. 5)
    schedule   β(s) between τ_min = 0.2 and τ_max = 0.5 over γ warm-up steps      (§4.5)

The head (Q_θ: a two-layer MLP giving the gate logits I_θ and log σ_θ², plus μ_p, log σ_p²) is
:class:`VIBHead` (a torch module in ``prunelab.methods._vib_head``, importable from here: this
module imports torch only where it computes); the training loop lives in
``prunelab.workers.vib`` (it needs the model).

Choices where the paper is silent or inconsistent:
- β schedule: §4.5 prints β(s) = τ_max − (τ_max − τ_min)·min(1, s/γ) (0.5 falling to 0.2) but
  says, twice, that the scheme "imposes fewer penalties at the beginning and stronger penalties
  in later stages". ``kl_schedule="warmup"`` (default) follows the text: τ_min rising to τ_max;
  ``"anneal"`` is the formula as printed; ``"constant"`` is the fixed β = τ_max ablation.
- γ (``warmup_steps``), the MLP width (``head_hidden``), LoRA rank and learning rate are in the
  unavailable supplementary: defaults here are γ = 100, width = d (the guide's hidden size when
  0), LoRA rank 8 on q/v projections, lr 1e-4 (see ``prunelab.workers.vib``).
- Layer L is the ``prune_layer`` axis, default 0 (the "one can serve many" setting, Table 2,
  and Table 1's 5% rows). Scores come from one prefill of the guide (its generation is not
  needed), so ``tflops_guidance`` counts one prefill.
- The guide's hidden state is fed to the head in float32; the KL is computed in float32.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from prunelab.methods.base import (
    LayerSignals,
    LayerStep,
    Plan,
    PlanContext,
    PruningMethod,
    VisionSelection,
    VisionSignals,
    top_k_sorted,
)
from prunelab.methods.registry import register

if TYPE_CHECKING:
    import torch

    from prunelab.methods._vib_head import VIBHead

__all__ = [
    "PGP",
    "VIBHead",
    "gaussian_kl",
    "kl_weight",
    "posterior_mean",
    "reparameterize",
    "token_kl",
]

Gate = Literal["sigmoid", "exp"]
KLSchedule = Literal["warmup", "anneal", "constant"]


# -- pure VIB math -----------------------------------------------------------------------------
def posterior_mean(
    v: torch.Tensor, gate_logits: torch.Tensor, prior_mean: torch.Tensor, gate: Gate = "sigmoid"
) -> torch.Tensor:
    """Gated posterior mean, eq. 3: μ = f(I) ⊙ (V' − μ_p) + μ_p.

    v, gate_logits: (..., d); prior_mean: (d,). With ``gate="sigmoid"``, 0 < f < 1, so each
    channel of μ lies strictly between μ_p and V' (|μ − μ_p| < |V' − μ_p|). ``"exp"`` is the
    paper's ablation (unbounded above). Returns (..., d).
    """
    import torch

    f = torch.sigmoid(gate_logits) if gate == "sigmoid" else torch.exp(gate_logits)
    return f * (v - prior_mean) + prior_mean


def gaussian_kl(
    mean: torch.Tensor, logvar: torch.Tensor, prior_mean: torch.Tensor, prior_logvar: torch.Tensor
) -> torch.Tensor:
    """Per-channel KL(N(mean, e^logvar) || N(prior_mean, e^prior_logvar)), (..., d):

    KL = ½ [ log σ_p² − log σ² + (σ² + (μ − μ_p)²) / σ_p² − 1 ]  (≥ 0, 0 iff equal).
    """
    import torch

    var_ratio = torch.exp(logvar - prior_logvar)
    return 0.5 * (
        prior_logvar - logvar + var_ratio + (mean - prior_mean) ** 2 * torch.exp(-prior_logvar) - 1
    )


def token_kl(
    mean: torch.Tensor, logvar: torch.Tensor, prior_mean: torch.Tensor, prior_logvar: torch.Tensor
) -> torch.Tensor:
    """Token importance, eq. 2: the channel-averaged KL of each token's posterior from the
    prior. mean, logvar: (..., N, d); prior: (d,). Returns (..., N)."""
    return gaussian_kl(mean, logvar, prior_mean, prior_logvar).mean(dim=-1)


def reparameterize(
    mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Eq. 4: Z = μ + σ ⊙ ε with ε ~ N(0, I) (differentiable in μ and log σ²). (..., d)."""
    import torch

    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps


def kl_weight(
    step: int,
    tau_min: float = 0.2,
    tau_max: float = 0.5,
    warmup_steps: int = 100,
    schedule: KLSchedule = "warmup",
) -> float:
    """β of training step ``step`` (0-based), §4.5 with t = min(1, step / γ):

    ``warmup``: τ_min + (τ_max − τ_min)·t (weak KL first, as the text motivates);
    ``anneal``: τ_max − (τ_max − τ_min)·t (the formula as printed); ``constant``: τ_max.
    """
    if schedule == "constant":
        return tau_max
    t = 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)
    if schedule == "anneal":
        return tau_max - (tau_max - tau_min) * t
    return tau_min + (tau_max - tau_min) * t


# -- the method --------------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class PGP(PruningMethod):
    """Hyperparameters of the head and of its training (a change trains a new head):
    ``stage``: the sweep spec's training stage (``stages.<stage>``) that trains the head;
    ``guide_layer``: which guide hidden states feed the head (-1: the last, after the final
    norm; k ≥ 0: the output of decoder layer k); ``head_hidden``: MLP width (0: the guide's
    hidden size); ``gate``: f of eq. 3; ``tau_min``/``tau_max``/``warmup_steps``/
    ``kl_schedule``: β(s); ``lora_rank``: LoRA on the guide's attention q/v (0: frozen guide).
    """

    stage: str = "vib"
    guide_layer: int = -1
    head_hidden: int = 0
    gate: Gate = "sigmoid"
    tau_min: float = 0.2
    tau_max: float = 0.5
    warmup_steps: int = 100
    kl_schedule: KLSchedule = "warmup"
    lora_rank: int = 8

    name: ClassVar[str] = "pgp"
    stages: ClassVar[str] = "guidance (small model + trained VIB head) + layer L (default 0)"
    uses_layer: ClassVar[bool] = True
    needs_guidance: ClassVar[bool] = True
    guidance_signal: ClassVar[str] = "hidden"
    default_prune_layer: ClassVar[int | None] = 0
    min_prune_layer: ClassVar[int] = 0
    paper: ClassVar[str] = (
        "IF-Prune: Information-Flow Guided Token Pruning for Efficient Vision-Language "
        "Models (posterior-guided pruning, PGP), CVPR 2026; code: github.com/snap-research/EVLM"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.stage:
            raise ValueError("pgp stage: must name a training stage")
        if self.head_hidden < 0 or self.lora_rank < 0 or self.warmup_steps < 0:
            raise ValueError("pgp head_hidden, lora_rank and warmup_steps must be >= 0")
        if not 0.0 <= self.tau_min <= self.tau_max:
            raise ValueError(
                f"pgp tau_min={self.tau_min}, tau_max={self.tau_max}: need 0 <= min <= max"
            )

    def head_hparams(self) -> dict[str, Any]:
        """The hyperparameters that decide the trained head (all but ``stage``)."""
        return {
            "guide_layer": self.guide_layer,
            "head_hidden": self.head_hidden,
            "gate": self.gate,
            "tau_min": float(self.tau_min),
            "tau_max": float(self.tau_max),
            "warmup_steps": self.warmup_steps,
            "kl_schedule": self.kl_schedule,
            "lora_rank": self.lora_rank,
        }

    # -- binding the trained head ---------------------------------------------------------
    def bind(self, assets: Mapping[str, Any]) -> PGP:
        """A copy holding the trained head: ``assets["vib_head"]`` = (state dict, metadata) as
        :func:`prunelab.workers.vib.trial_assets` reads them. The LoRA tensors (``lora.*``)
        stay in ``guidance_lora`` for the worker to apply to the guide."""
        if "vib_head" not in assets:
            return self
        from prunelab.methods._vib_head import VIBHead

        state, meta = assets["vib_head"]
        head = VIBHead(int(meta["dim"]), int(meta["hidden"]), meta["gate"])
        head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        head.eval()
        bound = copy.copy(self)
        object.__setattr__(bound, "_head", head)
        object.__setattr__(bound, "_guide_layer", int(meta["guide_layer"]))
        lora = {k[5:]: v for k, v in state.items() if k.startswith("lora.")}
        object.__setattr__(bound, "_lora", (lora, float(meta.get("lora_scale", 1.0))))
        return bound

    @property
    def head(self) -> VIBHead:
        head = getattr(self, "_head", None)
        if head is None:
            raise RuntimeError(
                "pgp needs a trained VIB head: train one with `prunelab train-vib` or declare "
                f"`stages: {{{self.stage}: ...}}` in the sweep spec"
            )
        return head

    @property
    def guidance_layer(self) -> int:
        """Guide layer whose hidden states the head reads (-1: last hidden states)."""
        return int(getattr(self, "_guide_layer", self.guide_layer))

    @property
    def guidance_lora(self) -> tuple[dict[str, torch.Tensor], float]:
        """LoRA deltas of the guide ({module name + '.A'/'.B': tensor}, scale)."""
        return getattr(self, "_lora", ({}, 1.0))

    # -- planning and selection -----------------------------------------------------------
    def plan(self, ctx: PlanContext) -> Plan:
        assert ctx.budget is not None
        layer = self.default_prune_layer if ctx.prune_layer is None else ctx.prune_layer
        assert layer is not None
        if not 0 <= layer < ctx.n_layers:
            raise ValueError(f"pgp prune_layer={layer}: must be in [0, {ctx.n_layers - 1}]")
        keep = ctx.budget.tokens(ctx.n_visual)
        if layer == 0:  # hard-prune V before the LLM (positions of the kept tokens kept)
            return Plan(vision_keep=keep)
        return Plan(layers=(LayerStep(layer=layer, keep=keep, queries=None),))

    def score_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, d) guide hidden states of the visual tokens -> (N,) KL importance (eq. 2)."""
        import torch

        with torch.no_grad():
            return self.head.scores(hidden)

    def select_vision(self, signals: VisionSignals, keep: int) -> VisionSelection:
        if signals.guidance is None:
            raise RuntimeError("pgp selects by guidance scores, but none were computed")
        kept = top_k_sorted(signals.guidance.to(signals.tokens.device), keep)
        return VisionSelection(tokens=signals.tokens[kept], kept=kept, scores=signals.guidance)

    def score_layer(self, step: LayerStep, signals: LayerSignals) -> torch.Tensor:
        if signals.guidance is None:
            raise RuntimeError("pgp selects by guidance scores, but none were computed")
        return signals.guidance

    def select_layer(self, step: LayerStep, signals: LayerSignals) -> torch.Tensor:
        return top_k_sorted(self.score_layer(step, signals), step.keep)


def __getattr__(name: str) -> Any:
    if name == "VIBHead":  # a torch module: imported on first use, not with the methods
        from prunelab.methods._vib_head import VIBHead

        return VIBHead
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
