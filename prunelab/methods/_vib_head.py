"""PGP's VIB head (:class:`VIBHead`), a torch module: kept out of :mod:`prunelab.methods.pgp`
so that planning, which imports every method, does not import torch. ``from
prunelab.methods.pgp import VIBHead`` still gives it (imported on first use)."""

from __future__ import annotations

import math

import torch
from torch import nn

from prunelab.methods.pgp import Gate, posterior_mean, token_kl

__all__ = ["VIBHead"]


class VIBHead(nn.Module):
    """Q_θ and the prior: a two-layer MLP V' (d) -> hidden -> (I_θ, log σ_θ²) (2d), and the
    learnable per-channel prior μ_p, log σ_p² (d each, §3.1 / §4.1).

    The prior starts at N(0, 1); the last MLP layer starts at zero except for its gate bias
    (``gate_init``: sigmoid(2) ≈ 0.88 of V' passes) so training starts from a near-identity
    bottleneck with unit posterior variance.
    """

    def __init__(
        self, dim: int, hidden: int = 0, gate: Gate = "sigmoid", gate_init: float = 2.0
    ) -> None:
        super().__init__()
        if gate not in ("sigmoid", "exp"):
            raise ValueError(f"gate={gate!r}: expected 'sigmoid' or 'exp'")
        self.dim = dim
        self.hidden = hidden or dim
        self.gate = gate
        self.mlp = nn.Sequential(
            nn.Linear(dim, self.hidden), nn.GELU(), nn.Linear(self.hidden, 2 * dim)
        )
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        with torch.no_grad():  # exp gate: start at the same pass-through as sigmoid's
            start = gate_init if gate == "sigmoid" else math.log(1 / (1 + math.exp(-gate_init)))
            self.mlp[2].bias[:dim] = start
        self.prior_mean = nn.Parameter(torch.zeros(dim))
        self.prior_logvar = nn.Parameter(torch.zeros(dim))

    def posterior(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of Q_θ(Z | V') for v (..., d): eq. 3 for the mean. Each (..., d)."""
        gate_logits, logvar = self.mlp(v).chunk(2, dim=-1)
        return posterior_mean(v, gate_logits, self.prior_mean, self.gate), logvar

    def kl(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-token KL (..., N) of eq. 2, posterior mean, posterior logvar)."""
        mean, logvar = self.posterior(v)
        return token_kl(mean, logvar, self.prior_mean, self.prior_logvar), mean, logvar

    def scores(self, v: torch.Tensor) -> torch.Tensor:
        """Importance of each visual token: (N, d) hidden states -> (N,) float32 KL (eq. 2)."""
        param = self.prior_mean
        return self.kl(v.to(param.device, param.dtype))[0].float()
