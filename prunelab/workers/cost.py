"""Cost accounting from the lengths every LLM layer actually saw.

FLOPs conventions (per decoder layer with n tokens, hidden size d, FFN size m):

- ``fastv`` (FastV paper): 4nd^2 + 2n^2d + 2ndm
- ``pdrop`` (PyramidDrop; used by PREP and SparseVLM): 4nd^2 + 2n^2d + 3ndm

Prefill sums the formula over layers with each layer's own n. Decoding a token with a KV
cache of c entries at a layer costs the same formula with one query row: 4d^2 + 2cd + k*dm
(k = 2 or 3), summed over layers and generated tokens.

``exact`` counts 2 FLOPs per multiply-add of every matrix product, as
``torch.utils.flop_counter.FlopCounterMode`` does: per layer with n new tokens attending over
c keys, 2nd(Hh + 2H_kv h) + 2nHhd (q, k, v, o; GQA-aware) + 4ncHh (scores and values) +
2 * mlp_matrices * ndm, plus the LM head on the kept logits (one row per forward) and the vision
tower + projector once per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prunelab.workers.models import ModelInfo

__all__ = [
    "FLOPS_CONVENTIONS",
    "decode_flops",
    "exact_generation_flops",
    "exact_layer_flops",
    "kv_cache_bytes",
    "prefill_flops",
    "projector_flops",
    "trial_flops",
    "vit_flops",
]

FLOPS_CONVENTIONS = {"fastv": 2, "pdrop": 3}  # FFN multiplier k in k*n*d*m; plus "exact"


def _ffn_factor(convention: str) -> int:
    try:
        return FLOPS_CONVENTIONS[convention]
    except KeyError:
        raise ValueError(
            f"flops_convention={convention!r}: expected one of "
            f"{', '.join([*FLOPS_CONVENTIONS, 'exact'])}"
        ) from None


def prefill_flops(tokens_per_layer: Sequence[int], d: int, m: int, convention: str) -> float:
    """Prefill FLOPs of the LLM: sum over layers of 4nd^2 + 2n^2d + k*ndm."""
    k = _ffn_factor(convention)
    return float(sum(4 * n * d * d + 2 * n * n * d + k * n * d * m for n in tokens_per_layer))


def decode_flops(
    tokens_per_layer: Sequence[int], new_tokens: int, d: int, m: int, convention: str
) -> float:
    """FLOPs of ``new_tokens`` - 1 decode steps after a prefill that left n_l entries per layer.

    The first generated token comes from the prefill; step t (1-based) attends over n_l + t keys.
    """
    k = _ffn_factor(convention)
    total = 0
    for t in range(1, new_tokens):
        for n in tokens_per_layer:
            total += 4 * d * d + 2 * (n + t) * d + k * d * m
    return float(total)


def kv_cache_bytes(
    tokens_per_layer: Sequence[int], new_tokens: int, n_kv_heads: int, head_dim: int, itemsize: int
) -> int:
    """Bytes of keys and values held at the end of generation (all layers)."""
    per_token = 2 * n_kv_heads * head_dim * itemsize
    return sum((n + max(new_tokens - 1, 0)) * per_token for n in tokens_per_layer)


def exact_layer_flops(new: int, context: int, info: ModelInfo) -> float:
    """Exact FLOPs of one decoder layer for ``new`` query tokens over ``context`` keys."""
    d, h = info.hidden_size, info.head_dim
    q_width, kv_width = info.n_heads * h, info.n_kv_heads * h
    projections = 2 * new * d * (q_width + 2 * kv_width) + 2 * new * q_width * d
    attention = 4 * new * context * q_width
    mlp = 2 * info.mlp_matrices * new * d * info.intermediate_size
    return float(projections + attention + mlp)


def vit_flops(
    patches: int, patch_inputs: int, width: int, mlp_width: int, layers: int, extra_tokens: int = 1
) -> float:
    """Exact FLOPs of a ViT encoder (CLIP, InternViT) on one image or crop.

    Patch embedding: a linear over ``patch_inputs`` (channels * patch area) values per patch,
    2 * patches * patch_inputs * d. Every layer runs (transformers computes all hidden states),
    over n = patches + ``extra_tokens`` (CLS) tokens of width d with MLP width m: q, k, v, o
    projections 8nd^2, attention scores and values 4n^2d, MLP 4ndm (norms: no matmul).
    """
    n, d, m = patches + extra_tokens, width, mlp_width
    per_layer = 8 * n * d * d + 4 * n * n * d + 4 * n * d * m
    return float(layers * per_layer + 2 * patches * patch_inputs * d)


def projector_flops(rows: int, d_in: int, d_out: int) -> float:
    """Exact FLOPs of a two-linear projector d_in -> d_out -> d_out over ``rows`` tokens."""
    return float(2 * rows * d_in * d_out + 2 * rows * d_out * d_out)


def exact_generation_flops(
    tokens_per_layer: Sequence[int],
    new_tokens: int,
    info: ModelInfo,
    vision_flops: float | None = None,
) -> float:
    """Exact FLOPs of one greedy generation: vision, prefill, decode and LM head.

    ``tokens_per_layer``: tokens each layer processed in the prefill (its KV entries after it);
    ``new_tokens``: generated tokens (the first comes from the prefill); ``vision_flops``: the
    vision tower + projector for this sample (default: ``info.vision_flops``, one nominal image;
    dynamic-resolution and tiling families report it per sample).
    """
    head = 2 * info.hidden_size * info.vocab_size  # one logits row per forward
    total = info.vision_flops if vision_flops is None else vision_flops
    total += sum(exact_layer_flops(n, n, info) for n in tokens_per_layer) + head
    for t in range(1, new_tokens):
        total += sum(exact_layer_flops(1, n + t, info) for n in tokens_per_layer) + head
    return total


def trial_flops(
    tokens_per_layer: Sequence[int],
    new_tokens: int,
    info: ModelInfo,
    convention: str,
    vision_flops: float | None = None,
) -> float:
    """FLOPs of one sample's generation under ``convention`` (fastv, pdrop or exact).

    ``fastv`` and ``pdrop`` count the LLM only, as the papers do; ``exact`` adds the vision side.
    """
    if convention == "exact":
        return exact_generation_flops(tokens_per_layer, new_tokens, info, vision_flops)
    d, m = info.hidden_size, info.intermediate_size
    return prefill_flops(tokens_per_layer, d, m, convention) + decode_flops(
        tokens_per_layer, new_tokens, d, m, convention
    )
