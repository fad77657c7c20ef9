"""Density-peak clustering with k nearest neighbours (DPC-kNN) and cluster merging.

Shared by SparseVLM (recycling of pruned tokens, official ``cluster_and_merge``) and Polymorphic
(stage 1 on the encoder output, eqs. (1)-(8); stage 2 re-merges the pruned tokens). Both papers
write the same equations; with x_i (D,) the features of n tokens:

    (1)  d_ij    = ||x_i - x_j|| / sqrt(D)                          (Polymorphic eq. 1)
    (2)  rho_i   = exp(-1/k sum_{j in kNN(i)} d_ij^2)                (eq. 3; kNN includes i itself)
    (3)  delta_i = min_{j : rho_j > rho_i} d_ij  (max_ij d_ij for the densest token)   (eq. 5)
    (4)  centers = top-c of rho_i * delta_i; each token joins its nearest center      (eqs. 5-6)
    (5)  merged_c = mean of the tokens of cluster c                                    (eq. 7)
         or the density-weighted mean sum rho_i x_i / sum rho_i, the minimiser of eq. 8

Ties of density are ordered by token index (deterministic; the official SparseVLM code adds
uniform noise * 1e-6 instead).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["density_peaks", "dpc_density", "dpc_knn", "merge_clusters"]


def _distances(tokens: torch.Tensor) -> torch.Tensor:
    """Eq. (1): (n, n) distances ||x_i - x_j|| / sqrt(D) of tokens (n, D), in float32."""
    import torch

    x = tokens.float()
    # direct differences, as the official ||x_i - x_j|| (the matmul form is inexact near 0)
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(x.shape[1])


def dpc_density(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. (2): (n,) density from the (n, n) distances and the k nearest (the token included)."""
    import torch

    k = max(1, min(k, dist.shape[0]))
    nearest = dist.topk(k, dim=-1, largest=False).values  # (n, k)
    return torch.exp(-(nearest**2).mean(dim=-1))


def density_peaks(
    tokens: torch.Tensor, n_clusters: int, k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eqs. (1)-(4): density-peak clustering of tokens (n, D) into ``n_clusters`` clusters with
    ``k`` nearest neighbours (None: k = n_clusters, as the official SparseVLM code).

    Returns centers (c,) token indices, best center score first; the assignment (n,) of every
    token to a cluster in [0, c) (a center to its own cluster); and the densities rho (n,)."""
    import torch

    n = tokens.shape[0]
    dist = _distances(tokens)  # (n, n)
    density = dpc_density(dist, n_clusters if k is None else k)  # (n,)
    index = torch.arange(n, device=tokens.device)
    # j is denser than i: higher density, or equal density and a lower index (deterministic)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None])
    )  # (n, n): [i, j]
    far = dist.max()
    delta = torch.where(denser, dist, far).min(dim=-1).values  # (n,)
    score = density * delta
    order = torch.sort(score, descending=True, stable=True).indices
    centers = order[: min(n_clusters, n)]  # (c,)
    assignment = dist[centers].argmin(dim=0)  # (n,)
    assignment[centers] = torch.arange(centers.numel(), device=tokens.device)
    return centers, assignment, density


def dpc_knn(
    tokens: torch.Tensor, n_clusters: int, k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`density_peaks` without the densities: centers (c,) and assignment (n,)."""
    centers, assignment, _ = density_peaks(tokens, n_clusters, k)
    return centers, assignment


def merge_clusters(
    tokens: torch.Tensor,
    assignment: torch.Tensor,
    n_clusters: int,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. (5): the (weighted) mean of each cluster's tokens, float32.

    tokens: (n, D); assignment: (n,) cluster of each token in [0, n_clusters); weights: (n,)
    positive per-token weights (e.g. the densities rho, the minimiser of Polymorphic eq. 8) or
    None for the plain mean (eq. 7). Returns (c, D); an empty cluster gives zeros."""
    import torch

    x = tokens.float()
    w = torch.ones(x.shape[0], device=x.device) if weights is None else weights.float()
    sums = torch.zeros(n_clusters, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, assignment, x * w[:, None])
    totals = torch.zeros(n_clusters, dtype=torch.float32, device=x.device)
    totals.index_add_(0, assignment, w)
    return sums / totals.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
