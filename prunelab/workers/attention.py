"""Attention rows for chosen queries, without switching the model to eager attention.

transformers calls attention through ``AttentionInterface``: each layer hands the registered
function its post-RoPE query and key states. We register wrappers around SDPA and
FlashAttention-2 (``prunelab_sdpa``, ``prunelab_flash_attention_2``) that run the original kernel
and, when a probe asks for a layer, also compute ``softmax(q_rows k^T * scale + mask)`` for the
requested query rows only: O(Q * S) extra work instead of materialising the S x S matrix.

transformers' attention and mask registries are imported when a wrapper is registered
(:func:`wrap_attention`, as a model is set up), not with this module: importing it costs torch
only, so the modules that share :class:`AttentionProbe` stay cheap to import where no model runs.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "PROBED_IMPLEMENTATIONS",
    "AttentionProbe",
    "attention_rows",
    "probe_attention",
    "wrap_attention",
]

_PREFIX = "prunelab_"
PROBED_IMPLEMENTATIONS = ("sdpa", "flash_attention_2")


@dataclass
class AttentionProbe:
    """Which layers to read, which query positions, and where the rows land.

    ``modules`` maps ``id()`` of each watched attention module to its layer index (one stack:
    the LLM's decoder or a vision encoder). ``queries`` maps a layer index to a (Q,) tensor of
    query positions in that layer's current sequence, a callable of the sequence length that
    returns one, or ``"all"``. ``rows[layer]`` is filled with (H, Q, S) attention probabilities
    of batch element 0; with ``keys`` containing the layer, ``key_states[layer]`` gets that
    call's (H_kv, S, hd) post-RoPE keys.

    Encoders that call attention once per image or window within a layer (Qwen2-VL's vision
    tower), or batch several crops of one image (InternVL tiles), set ``chunks=True``: the rows
    and keys of each call and each batch element are then appended to a list, in order.
    """

    modules: Mapping[int, int]
    queries: dict[int, Any] = field(default_factory=dict)
    keys: frozenset[int] = frozenset()
    chunks: bool = False
    rows: dict[int, Any] = field(default_factory=dict)
    key_states: dict[int, Any] = field(default_factory=dict)
    query_positions: dict[int, torch.Tensor] = field(default_factory=dict)

    def _store(self, table: dict[int, Any], layer: int, value: torch.Tensor) -> None:
        if self.chunks:
            table.setdefault(layer, []).append(value)
        else:
            table[layer] = value


_ACTIVE: contextvars.ContextVar[AttentionProbe | None] = contextvars.ContextVar(
    "prunelab_attention_probe", default=None
)


@contextlib.contextmanager
def probe_attention(probe: AttentionProbe) -> Iterator[AttentionProbe]:
    token = _ACTIVE.set(probe)
    try:
        yield probe
    finally:
        _ACTIVE.reset(token)


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    query_positions: torch.Tensor,
    scaling: float,
    attention_mask: torch.Tensor | None,
    causal: bool = True,
) -> torch.Tensor:
    """Softmax attention rows for chosen queries.

    query: (B, H, L, hd) post-RoPE queries of the current forward (L new tokens).
    key: (B, Hkv, S, hd) post-RoPE keys over the whole context (cache included), H % Hkv == 0.
    query_positions: (Q,) indices into the L new tokens.
    attention_mask: None (``causal`` decides: a decoder's causal mask, or full attention in an
    encoder) or (B, 1|H, L, S) boolean (True = attend) or additive float.
    Returns (H, Q, S) float32 probabilities for batch element 0.
    """
    import torch

    q = query[0, :, query_positions].float()  # (H, Q, hd)
    k = key[0].float()  # (Hkv, S, hd)
    groups = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(groups, dim=0)  # (H, S, hd)  GQA: each kv head serves `groups` heads
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (H, Q, S)
    length, total = query.shape[2], key.shape[2]
    if attention_mask is None and causal:
        # causal: new token i sits at absolute index total - length + i
        absolute = query_positions.to(scores.device) + (total - length)
        allowed = torch.arange(total, device=scores.device)[None, :] <= absolute[:, None]
        scores = scores.masked_fill(~allowed[None], float("-inf"))
    elif attention_mask is not None:
        mask = attention_mask[0, :, query_positions, :total]  # (1|H, Q, S)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    return torch.softmax(scores, dim=-1)


def _make_wrapper(inner_name: str, kernels: Mapping[str, Any]):
    """The probing wrapper of the kernel registered as ``inner_name`` in ``kernels`` (looked up
    at each call, as transformers does)."""

    def prunelab_attention(module, query, key, value, attention_mask, **kwargs):
        import torch

        probe = _ACTIVE.get()
        layer = probe.modules.get(id(module)) if probe is not None else None
        if layer is not None:
            assert probe is not None
            batch = range(query.shape[0]) if probe.chunks else range(1)  # chunks: every element
            wanted = probe.queries.get(layer)
            if wanted is not None:
                if isinstance(wanted, str):  # "all"
                    positions = torch.arange(query.shape[2], device=query.device)
                elif callable(wanted):
                    positions = wanted(query.shape[2])
                else:
                    positions = wanted
                positions = positions.to(query.device)
                causal = kwargs.get("is_causal")
                if causal is None:
                    causal = getattr(module, "is_causal", True)
                scaling = kwargs.get("scaling") or module.scaling
                for b in batch:
                    mask = attention_mask
                    if mask is not None and mask.shape[0] > 1:
                        mask = mask[b : b + 1]
                    rows = attention_rows(
                        query[b : b + 1], key[b : b + 1], positions, scaling, mask, causal
                    )
                    probe._store(probe.rows, layer, rows)
                probe.query_positions[layer] = positions
            if layer in probe.keys:
                for b in batch:
                    probe._store(probe.key_states, layer, key[b])
        return kernels[inner_name](module, query, key, value, attention_mask, **kwargs)

    prunelab_attention.__name__ = f"{_PREFIX}{inner_name}"
    return prunelab_attention


def wrap_attention(implementation: str) -> str:
    """Register the probing wrapper of ``implementation``; return the name to set on the model."""
    if implementation.startswith(_PREFIX):
        return implementation
    if implementation not in PROBED_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={implementation!r}: prunelab reads attention rows through "
            f"{' or '.join(PROBED_IMPLEMENTATIONS)}"
        )
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = f"{_PREFIX}{implementation}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_wrapper(implementation, ALL_ATTENTION_FUNCTIONS))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    return name
