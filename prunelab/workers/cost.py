"""Cost accounting from the lengths every LLM layer actually saw.

FLOPs conventions (per decoder layer with n tokens, hidden size d, FFN size m):

- ``fastv`` (FastV paper): 4nd^2 + 2n^2d + 2ndm
- ``pdrop`` (PyramidDrop; used by PREP and SparseVLM): 4nd^2 + 2n^2d + 3ndm

Prefill sums the formula over layers with each layer's own n. Decoding a token with a KV
cache of c entries at a layer costs the same formula with one query row: 4d^2 + 2cd + k*dm
(k = 2 or 3), summed over layers and generated tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["FLOPS_CONVENTIONS", "decode_flops", "kv_cache_bytes", "prefill_flops"]

FLOPS_CONVENTIONS = {"fastv": 2, "pdrop": 3}  # FFN multiplier k in k*n*d*m


def _ffn_factor(convention: str) -> int:
    try:
        return FLOPS_CONVENTIONS[convention]
    except KeyError:
        raise ValueError(
            f"flops_convention={convention!r}: expected one of {', '.join(FLOPS_CONVENTIONS)}"
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
