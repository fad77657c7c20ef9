"""The adapter interface and the greedy generation loop shared by decoder-only families."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from prunelab.methods.base import VisionSignals
from prunelab.workers.benchmarks.base import Sample
from prunelab.workers.pruning import LayerLengths, LayerPruner

__all__ = ["Adapter", "Generation", "Prepared", "greedy_generate"]


@dataclass
class Prepared:
    """One sample, tokenised and preprocessed on the model's device."""

    input_ids: torch.Tensor  # (1, L) with one placeholder per visual token
    pixel_values: torch.Tensor  # family-specific image tensor
    visual_positions: torch.Tensor  # (N,) positions of the visual placeholders in input_ids
    grid: tuple[int, int]  # token grid of the image, rows * cols == N
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Generation:
    token_ids: list[int]
    first_logprobs: torch.Tensor  # (vocab,) float32 log-softmax of the first generated token
    lengths: LayerLengths  # what each LLM layer saw in the prefill
    visual_in: int  # visual tokens the LLM would have received unpruned
    prefill_s: float  # vision encoding + method + LLM prefill, to the first token's logits
    decode_s: float  # the remaining tokens


class Adapter(Protocol):
    family: str

    def prepare(self, sample: Sample) -> Prepared: ...

    def vision_signals(self, prepared: Prepared, wanted: frozenset[str]) -> VisionSignals: ...

    attention_modules: frozenset[int]  # id() of the LLM attention modules the probe watches

    def generate(
        self,
        prepared: Prepared,
        visual_tokens: torch.Tensor,
        make_pruner: Callable[[int, torch.Tensor], LayerPruner],
        max_new_tokens: int,
        clock: Callable[[], float],
    ) -> tuple[Generation, float]:
        """Generate with ``visual_tokens`` (M, D) in place of the N visual placeholders.

        Returns the generation and the clock time at which the first token's logits were ready.
        """
        ...

    def layer_pruner(
        self, seq_len: int, visual_positions: torch.Tensor, **kwargs: Any
    ) -> LayerPruner: ...

    def decode(self, token_ids: list[int]) -> str: ...


def greedy_generate(
    forward: Callable[..., torch.Tensor],
    embed: Callable[[torch.Tensor], torch.Tensor],
    inputs_embeds: torch.Tensor,
    pruner: LayerPruner,
    max_new_tokens: int,
    eos_token_id: int | None,
    cache: Any,
    clock: Callable[[], float],
) -> tuple[list[int], torch.Tensor, float]:
    """Prefill ``inputs_embeds`` (1, L, D) under ``pruner``, then decode greedily.

    ``forward(inputs_embeds=..., past_key_values=cache)`` returns last-position logits (1, V).
    Returns the generated ids, the first token's log-probabilities (V,), and the clock time at
    which the first token's logits were ready.
    """
    with pruner:
        logits = forward(inputs_embeds=inputs_embeds, past_key_values=cache)
        pruner.end_prefill()
        first_logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        first_ready = clock()
        token = int(logits[0].argmax())
        tokens = [token]
        while len(tokens) < max_new_tokens and token != eos_token_id:
            step = embed(torch.tensor([[token]], device=inputs_embeds.device))
            logits = forward(inputs_embeds=step, past_key_values=cache)
            token = int(logits[0].argmax())
            tokens.append(token)
    return tokens, first_logprobs.cpu(), first_ready
