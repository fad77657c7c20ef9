"""A layer stage that merges: kept tokens' hidden states replaced, the sequence still shrinks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import prunelab.methods as M
from prunelab.workers.benchmarks.shapes import ShapesBenchmark


@dataclass(frozen=True)
class MeanMerge(M.PruningMethod):
    """Keep the first k visual tokens; the first one becomes the mean of all dropped ones."""

    scale: float = 1.0
    name: ClassVar[str] = "test-mean-merge"

    def select_layer(self, step, signals):
        keep = torch.arange(step.keep)
        hidden = signals.hidden[signals.visual[keep]].clone()
        dropped = signals.hidden[signals.visual[step.keep :]]
        hidden[0] = self.scale * dropped.mean(dim=0)
        return M.LayerSelection(keep=keep, hidden=hidden)


def _run(adapter, method, step):
    prepared = adapter.prepare(ShapesBenchmark().sample(4))
    tokens = adapter.vision_signals(prepared, frozenset()).tokens
    llm_input = adapter.llm_input(prepared, tokens)
    pruner = adapter.layer_pruner(llm_input, method=method, steps=(step,))
    out, _ = adapter.generate(prepared, llm_input, 3, time.perf_counter, pruner=pruner)
    return out


@torch.inference_mode()
def test_merged_hidden_states_reach_later_layers(tiny_llava):
    _, adapter = tiny_llava
    step = M.LayerStep(layer=2, keep=10, queries=None, needs_hidden=True)
    a = _run(adapter, MeanMerge(), step)
    b = _run(adapter, MeanMerge(scale=0.0), step)
    assert a.lengths.visual == b.lengths.visual == [144, 144, 10, 10]
    assert not torch.allclose(a.first_logprobs, b.first_logprobs)


@torch.inference_mode()
def test_merged_hidden_states_of_the_wrong_shape_are_rejected(tiny_llava):
    _, adapter = tiny_llava

    @dataclass(frozen=True)
    class Broken(MeanMerge):
        def select_layer(self, step, signals):
            return M.LayerSelection(keep=torch.arange(step.keep), hidden=signals.hidden[:3])

    step = M.LayerStep(layer=2, keep=10, queries=None, needs_hidden=True)
    with pytest.raises(RuntimeError, match="merged hidden states of shape"):
        _run(adapter, Broken(), step)
