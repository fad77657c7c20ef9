"""The pre-inference pass (PREP): what it records equals a plain forward over the pooled
sequence, it stops at its last layer, leaves the model untouched, and its FLOPs and chosen
layer reach the trial's metrics."""

from __future__ import annotations

import time

import pytest
import torch
from tiny_models import load_tiny, tiny_trial

import prunelab.methods as M
from prunelab.methods.prep import alignment_from_hidden, choose_layer, layer_scores
from prunelab.workers.benchmarks import build_benchmark
from prunelab.workers.benchmarks.shapes import ShapesBenchmark
from prunelab.workers.cost import prefill_flops
from prunelab.workers.models import ModelInfo
from prunelab.workers.preinference import PreInference, pre_inference_flops, run_pre_inference
from prunelab.workers.runner import ReferenceCache, run_trial


def _setup(model: str, **hparams):
    loaded, adapter = load_tiny(model)
    method = M.get("prep")(**hparams)
    prepared = adapter.prepare(ShapesBenchmark().sample(3))
    ctx = M.PlanContext(prepared.n_visual, loaded.info.n_layers, M.Budget(keep_ratio=0.5), None, 0)
    plan = method.plan(ctx)
    signals = adapter.vision_signals(prepared, plan.vision_signals)
    return loaded, adapter, method, prepared, plan, signals


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-qwen2-vl", "tiny-llava-next"])
def test_records_the_hidden_states_of_a_plain_forward_and_stops(model: str) -> None:
    _, adapter, method, prepared, plan, signals = _setup(model)
    step = plan.pre_inference
    assert step is not None
    stop = max(step.layers)
    calls = [0] * len(adapter.layers)

    def count(index: int):
        def hook(module, args, output) -> None:
            calls[index] += 1

        return hook

    hooks_before = [len(layer._forward_hooks) for layer in adapter.layers]
    handles = [layer.register_forward_hook(count(i)) for i, layer in enumerate(adapter.layers)]
    try:
        with torch.inference_mode():
            run = run_pre_inference(adapter, prepared, method, plan, signals, time.perf_counter)
    finally:
        for handle in handles:
            handle.remove()
    # nothing of the pass is left on the model
    assert [len(layer._forward_hooks) for layer in adapter.layers] == hooks_before
    assert all(not layer._forward_pre_hooks for layer in adapter.layers)
    # decoder layers 0 .. stop-1 ran once, the rest never
    assert calls == [1] * stop + [0] * (len(adapter.layers) - stop)
    pooled = method.pool_pre_inference(signals)
    r = pooled.tokens.shape[0]
    assert run.n_pooled == r < prepared.n_visual
    seq = prepared.input_ids.shape[1] - prepared.n_visual + r
    if model == "tiny-llava-next":  # newline tokens of the image block stay in the sequence
        seq = adapter._sequence(prepared, pooled.tokens, pooled.kept).inputs_embeds.shape[1]
    assert run.tokens_per_layer == [seq] * stop

    # the same pooled sequence through a plain forward: hidden_states[k] = after k layers
    llm_input = adapter._sequence(prepared, pooled.tokens, pooled.kept)
    kwargs = {}
    if llm_input.position_ids is not None:
        kwargs["position_ids"] = llm_input.position_ids
    with torch.inference_mode():
        out = adapter.model(
            inputs_embeds=llm_input.inputs_embeds, output_hidden_states=True, **kwargs
        )
    visual = llm_input.visual_positions
    text = torch.arange(int(visual.max()) + 1, seq)
    q = {k: alignment_from_hidden(out.hidden_states[k][0], visual, text) for k in step.layers}
    expected = choose_layer(step.candidates, layer_scores(q, step.candidates))
    assert run.layer == expected
    assert run.plan.pre_inference is None
    assert [s.layer for s in run.plan.layers] == [expected]


def test_hidden_states_match_the_plain_forward() -> None:
    _, adapter, method, prepared, plan, signals = _setup("tiny-llava")
    assert plan.pre_inference is not None
    recorded: dict = {}
    original = method.after_pre_inference

    class Spy(type(method)):  # records what the pass hands the method
        def after_pre_inference(self, plan, signals):
            recorded.update(signals.hidden)
            return original(plan, signals)

    spy = Spy()
    with torch.inference_mode():
        run_pre_inference(adapter, prepared, spy, plan, signals, time.perf_counter)
        pooled = method.pool_pre_inference(signals)
        llm_input = adapter._sequence(prepared, pooled.tokens, pooled.kept)
        out = adapter.model(inputs_embeds=llm_input.inputs_embeds, output_hidden_states=True)
    assert sorted(recorded) == list(plan.pre_inference.layers)
    for k, states in recorded.items():
        assert torch.allclose(states, out.hidden_states[k][0], atol=1e-5), k


def test_attention_alignment_on_qwen() -> None:
    _, adapter, method, prepared, plan, signals = _setup("tiny-qwen2-vl", alignment="attention")
    assert plan.pre_inference is not None and plan.pre_inference.candidates == (2,)
    with torch.inference_mode():
        run = run_pre_inference(adapter, prepared, method, plan, signals, time.perf_counter)
    assert run.layer == 2 and len(run.tokens_per_layer) == 2


def test_pre_inference_flops_hand_computed() -> None:
    info = ModelInfo("llava", 4, 5, 4, 8, 2, 2, 2, 10, "x")
    run = PreInference(plan=M.Plan(), layer=1, tokens_per_layer=[3, 3], n_visual=5, hidden_size=4)
    # per layer (pdrop): 4*3*16 + 2*9*4 + 3*3*4*8 = 192 + 72 + 288 = 552; two layers 1104;
    # pooling 5 tokens * 4 dims = 20
    assert pre_inference_flops(run, info, "pdrop") == 1124
    assert pre_inference_flops(run, info, "fastv") == prefill_flops([3, 3], 4, 8, "fastv") + 20
    # exact per layer, n = c = 3, d = 4, q width 4, kv width 4: projections 2*3*4*12 + 2*3*4*4
    # = 384; attention 4*3*3*4 = 144; mlp 2*3*3*4*8 = 576 -> 1104; two layers 2208 + 20
    assert pre_inference_flops(run, info, "exact") == 2228


def test_trial_metrics_carry_the_layer_and_the_flops() -> None:
    loaded, adapter = load_tiny("tiny-llava")
    trial = tiny_trial("tiny-llava", "prep", limit=2, keep_ratio=0.25)
    output = run_trial(loaded, adapter, trial, ReferenceCache())
    metrics = output.metrics
    assert 1.0 <= metrics["prep_layer"] <= 2.0  # candidates of the 4-layer model: 1, 2
    # per sample: its pooled sequence through 2 layers (last candidate 2), under pdrop
    info = loaded.info
    expected = []
    for sample in build_benchmark(trial.benchmark_config).samples(2, 0):
        prepared = adapter.prepare(sample)
        signals = adapter.vision_signals(prepared, frozenset())
        r = M.get("prep")().pool_pre_inference(signals).tokens.shape[0]
        seq = prepared.input_ids.shape[1] - prepared.n_visual + r
        flops = prefill_flops([seq, seq], info.hidden_size, info.intermediate_size, "pdrop")
        expected.append(flops + prepared.n_visual * info.hidden_size)
    assert metrics["tflops_guidance"] == pytest.approx(sum(expected) / len(expected) / 1e12)
    assert metrics["visual_tokens_kept"] == round(0.25 * prepared.n_visual)
