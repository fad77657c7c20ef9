"""FLOPs conventions and KV-cache size, checked against hand computation."""

import pytest

from prunelab.workers.cost import decode_flops, kv_cache_bytes, prefill_flops


def test_prefill_flops_per_convention():
    # one layer, n=10, d=4, m=8
    assert prefill_flops([10], 4, 8, "fastv") == 4 * 10 * 16 + 2 * 100 * 4 + 2 * 10 * 4 * 8
    assert prefill_flops([10], 4, 8, "pdrop") == 4 * 10 * 16 + 2 * 100 * 4 + 3 * 10 * 4 * 8
    assert prefill_flops([10, 5], 4, 8, "pdrop") == prefill_flops([10], 4, 8, "pdrop") + (
        4 * 5 * 16 + 2 * 25 * 4 + 3 * 5 * 4 * 8
    )
    with pytest.raises(ValueError, match="flops_convention='exact'"):
        prefill_flops([1], 1, 1, "exact")


def test_decode_flops_counts_growing_cache():
    # 2 new tokens -> one decode step at t=1, cache 10+1 entries in the single layer
    assert decode_flops([10], 2, 4, 8, "pdrop") == 4 * 16 + 2 * 11 * 4 + 3 * 4 * 8
    assert decode_flops([10], 1, 4, 8, "pdrop") == 0


def test_kv_cache_bytes():
    # two layers holding 10 and 4 tokens, 3 new tokens (2 appended after the prefill)
    assert (
        kv_cache_bytes([10, 4], 3, n_kv_heads=2, head_dim=8, itemsize=4) == (12 + 6) * 2 * 2 * 8 * 4
    )
