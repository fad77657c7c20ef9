"""Pre-inference: a cheap extra prefill that chooses the plan's layer (PREP).

The method pools the N visual tokens into r tokens (``PruningMethod.pool_pre_inference``); the
model's own LLM runs a prefill over the prompt with the pooled tokens in place of the visual
tokens (the adapter's ``llm_input`` with ``kept`` anchors, so every family lays them out as it
lays out a vision-stage selection, then its ``generate``), records the signals the plan's
:class:`~prunelab.methods.PreInferenceStep` asks for, and stops at the input of decoder layer
``max(step.layers)``: a forward pre-hook there raises a private exception, so the remaining
layers, the LM head and decoding never run. Attention rows come from the
:class:`~prunelab.workers.attention.AttentionProbe` (SDPA / FlashAttention stay on); hidden
states from forward pre-hooks. All hooks are removed before returning, whatever happens.

Its cost (:func:`pre_inference_flops`) counts every token of the pass's sequence through the
decoder layers that actually ran, plus the pooling, under the trial's FLOPs convention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunelab.methods.base import Plan, PreInferenceSignals, PruningMethod, VisionSignals
from prunelab.workers.adapters.base import Adapter, Prepared
from prunelab.workers.attention import AttentionProbe, probe_attention
from prunelab.workers.cost import exact_layer_flops, prefill_flops

__all__ = ["PreInference", "pre_inference_flops", "run_pre_inference"]


class _StopPreInference(Exception):
    """Raised by the pre-hook of the first decoder layer the pass does not need."""


@dataclass
class PreInference:
    plan: Plan  # the final plan of the sample (its pre_inference step resolved)
    layer: int  # the layer the method chose
    tokens_per_layer: list[int] = field(default_factory=list)  # (layers run,) sequence lengths
    n_pooled: int = 0  # r: pooled tokens in the pass
    n_visual: int = 0  # N: visual tokens that were pooled
    hidden_size: int = 0  # D of the pooled tokens


def _text_after_visual(seq_len: int, visual: torch.Tensor) -> torch.Tensor:
    """(M,) positions after the last visual token (the prompt text; excludes newline tokens
    inside the image block and the system prompt before it)."""
    start = int(visual.max()) + 1 if visual.numel() else 0
    return torch.arange(start, seq_len, device=visual.device)


def run_pre_inference(
    adapter: Adapter,
    prepared: Prepared,
    method: PruningMethod,
    plan: Plan,
    signals: VisionSignals,
    clock: Callable[[], Any],
) -> PreInference:
    """Run ``plan.pre_inference`` for one sample and let ``method`` turn it into its plan.

    ``signals``: the sample's vision signals (``tokens`` (N, D) and ``coords`` (N, 3)), already
    computed for the real forward, so the vision tower runs once.
    """
    step = plan.pre_inference
    if step is None:
        raise ValueError(f"{method.name}'s plan has no pre-inference step")
    layers: list[nn.Module] = list(adapter.layers)
    stop = max(step.layers)
    if not 1 <= stop < len(layers):
        raise ValueError(f"pre-inference up to layer {stop}: must be in [1, {len(layers) - 1}]")
    pooled = method.pool_pre_inference(signals)
    hidden: dict[int, torch.Tensor] = {}
    llm_input = adapter.llm_input(prepared, pooled.tokens, pooled.kept)
    visual = llm_input.visual_positions
    text = _text_after_visual(llm_input.inputs_embeds.shape[1], visual)
    probe = AttentionProbe(modules=adapter.attention_modules)
    if step.text_attention:
        for k in step.layers:
            if k >= 1:
                probe.queries[k - 1] = text
    pruner = adapter.layer_pruner(llm_input)  # no steps: it records the lengths (the cost)

    def record(depth: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if step.hidden:
                states = args[0] if args else kwargs["hidden_states"]
                hidden[depth] = states[0].detach()
            if depth == stop:
                raise _StopPreInference

        return hook

    handles = [
        layers[k].register_forward_pre_hook(record(k), with_kwargs=True) for k in step.layers
    ]
    try:
        with probe_attention(probe):
            adapter.generate(prepared, llm_input, 1, clock, pruner=pruner)
        raise RuntimeError("the pre-inference pass ran past its last layer")
    except _StopPreInference:
        pass
    finally:
        for handle in handles:
            handle.remove()
    recorded = PreInferenceSignals(
        visual=visual,
        text=text,
        hidden=hidden,
        attention={k: probe.rows[k - 1] for k in step.layers if k - 1 in probe.rows},
    )
    final, layer = method.after_pre_inference(plan, recorded)
    if final.pre_inference is not None:
        raise RuntimeError(f"{method.name} left a pre-inference step in its final plan")
    if plan.average is not None:  # budget_mode=average: the chosen layer's keep
        final = plan.average.solve(final)
    return PreInference(
        plan=final,
        layer=layer,
        tokens_per_layer=list(pruner.lengths.tokens),
        n_pooled=int(pooled.tokens.shape[0]),
        n_visual=int(signals.tokens.shape[0]),
        hidden_size=int(signals.tokens.shape[1]),
    )


def pre_inference_flops(run: PreInference, info: Any, convention: str) -> float:
    """FLOPs of a pre-inference pass: its decoder layers (all its tokens, each layer it ran) under
    ``convention`` (``exact``: 2 per multiply-add, GQA-aware; ``fastv`` / ``pdrop``: the papers'
    per-layer formulas), plus N * D additions of the pooling (eq. 27's pooling term)."""
    if convention == "exact":
        layers = sum(exact_layer_flops(n, n, info) for n in run.tokens_per_layer)
    else:
        layers = prefill_flops(
            run.tokens_per_layer, info.hidden_size, info.intermediate_size, convention
        )
    return float(layers + run.n_visual * run.hidden_size)
