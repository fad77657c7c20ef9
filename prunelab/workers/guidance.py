"""Guidance: run a smaller model of the same family on the sample and score the visual tokens
from its attention (SGP). The method decides how the rows are aggregated
(``PruningMethod.score_guidance``); this module only runs the guide and records the rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from prunelab.methods.base import PruningMethod
from prunelab.workers.adapters.base import Adapter, Generation
from prunelab.workers.attention import AttentionProbe, probe_attention
from prunelab.workers.benchmarks.base import Sample

__all__ = ["Guidance", "run_guidance"]


@dataclass
class Guidance:
    scores: torch.Tensor  # (N,) one score per visual token of the guide's (= the model's) input
    generation: Generation  # the guide's own generation (lengths per layer: its cost)


def run_guidance(
    adapter: Adapter,
    method: PruningMethod,
    sample: Sample,
    max_new_tokens: int,
    clock: Callable[[], Any],
) -> Guidance:
    """Generate the answer with the guide (unpruned), recording at every layer the attention
    rows of the prompt's text tokens (prefill) and of each generated token (decode).

    Methods with ``guidance_signal == "hidden"`` (pgp) instead get the guide's hidden states of
    the visual tokens at ``method.guidance_layer`` from one prefill (no generation), with the
    method's LoRA deltas (``method.guidance_lora``) applied to the guide during it."""
    if method.guidance_signal == "hidden":
        return _hidden_guidance(adapter, method, sample, clock)
    prepared = adapter.prepare(sample)
    visual = prepared.visual_positions
    n_layers = len(adapter.layers)
    prefill_length = prepared.input_ids.shape[1]

    def queries(length: int) -> torch.Tensor:
        if length != prefill_length:  # a decode step: the one new token
            return torch.arange(length, device=visual.device)
        text = torch.ones(length, dtype=torch.bool, device=visual.device)
        text[visual] = False
        return text.nonzero().squeeze(-1)

    probe = AttentionProbe(
        modules=adapter.attention_modules,
        queries=dict.fromkeys(range(n_layers), queries),
        chunks=True,
    )
    tokens = adapter.vision_signals(prepared, frozenset()).tokens
    with probe_attention(probe):
        generation, _ = adapter.generate(
            prepared, adapter.llm_input(prepared, tokens), max_new_tokens, clock
        )
    rows = [row for layer in range(n_layers) for row in probe.rows.get(layer, [])]
    return Guidance(scores=method.score_guidance(rows, visual), generation=generation)


def _hidden_guidance(
    adapter: Adapter, method: PruningMethod, sample: Sample, clock: Callable[[], Any]
) -> Guidance:
    """One prefill of the guide (the first token's logits only); the (N, d) hidden states of
    its visual tokens at the method's layer go to ``method.score_hidden``."""
    from prunelab.workers.vib import capture_hidden, lora_applied

    prepared = adapter.prepare(sample)
    tokens = adapter.vision_signals(prepared, frozenset()).tokens
    lora, scale = getattr(method, "guidance_lora", ({}, 1.0))
    layer = int(getattr(method, "guidance_layer", -1))
    with lora_applied(adapter, lora, scale), capture_hidden(adapter, layer) as captured:
        generation, _ = adapter.generate(prepared, adapter.llm_input(prepared, tokens), 1, clock)
    assert captured.value is not None
    hidden = captured.value[0, prepared.visual_positions]  # (N, d)
    return Guidance(scores=method.score_hidden(hidden), generation=generation)
