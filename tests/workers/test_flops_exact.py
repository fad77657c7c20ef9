"""The `exact` FLOPs convention agrees with torch's FlopCounterMode, unpruned and pruned.

On CPU the counter does not count SDPA kernels, so the counted forwards run eager attention.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import prunelab.methods as M
from prunelab.sweeps import group_config
from prunelab.workers.adapters import adapter_for
from prunelab.workers.benchmarks.shapes import ShapesBenchmark
from prunelab.workers.cost import exact_generation_flops
from prunelab.workers.models import load_model


@pytest.fixture(scope="module")
def eager_tiny_llava():
    loaded = load_model(group_config("model", "tiny-llava"))
    adapter = adapter_for(loaded)
    loaded.model.config.vision_config._attn_implementation = "eager"
    adapter.model.model.language_model.config._attn_implementation = "eager"
    return loaded, adapter


@pytest.mark.parametrize(
    ("method", "keep_ratio", "prune_layer"),
    [("none", None, None), ("random", 0.25, 2), ("random", 0.5, 0)],
)
@torch.inference_mode()
def test_exact_flops_match_flop_counter(eager_tiny_llava, method, keep_ratio, prune_layer):
    loaded, adapter = eager_tiny_llava
    prepared = adapter.prepare(ShapesBenchmark().sample(5))
    instance = M.get(method)()
    budget = M.Budget(keep_ratio=keep_ratio) if keep_ratio else None
    plan = instance.plan(M.PlanContext(144, 4, budget, prune_layer, 0))
    generator = torch.Generator().manual_seed(0)
    counter = FlopCounterMode(display=False)
    with counter:
        signals = adapter.vision_signals(prepared, frozenset())
        signals.generator = generator
        tokens = signals.tokens
        if plan.vision_keep is not None:
            tokens = instance.select_vision(signals, plan.vision_keep).tokens
        generation, _ = adapter.generate(
            prepared,
            tokens,
            lambda n, v: adapter.layer_pruner(
                n, v, method=instance, steps=plan.layers, generator=generator
            ),
            3,
            time.perf_counter,
        )
    counted = counter.get_total_flops()
    predicted = exact_generation_flops(
        generation.lengths.tokens, len(generation.token_ids), loaded.info
    )
    assert predicted == pytest.approx(counted, rel=0.01)


@torch.inference_mode()
def test_pruned_decoding_is_the_same_with_an_explicit_mask(eager_tiny_llava, tiny_llava):
    """Eager attention passes a 4-D mask at decode; pruned layers must slice its key axis."""
    outputs = []
    for _, adapter in (eager_tiny_llava, tiny_llava):
        prepared = adapter.prepare(ShapesBenchmark().sample(6))
        method = M.get("random")()
        plan = method.plan(M.PlanContext(144, 4, M.Budget(keep_ratio=0.3), 2, 0))
        generator = torch.Generator().manual_seed(3)
        generation, _ = adapter.generate(
            prepared,
            adapter.vision_signals(prepared, frozenset()).tokens,
            lambda n, v, a=adapter, m=method, p=plan, g=generator: a.layer_pruner(
                n, v, method=m, steps=p.layers, generator=g
            ),
            4,
            time.perf_counter,
        )
        outputs.append(generation)
    eager, sdpa = outputs
    assert eager.token_ids == sdpa.token_ids
    assert torch.allclose(eager.first_logprobs, sdpa.first_logprobs, atol=1e-5)
