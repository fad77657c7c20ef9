"""The LLaVA adapter: attention rows without eager mode, pruning invariants, real loading path."""

from __future__ import annotations

import time

import pytest
import torch

import prunelab.methods as M
from prunelab.sweeps import group_config
from prunelab.workers.adapters import adapter_for
from prunelab.workers.attention import AttentionProbe, probe_attention
from prunelab.workers.benchmarks.shapes import ShapesBenchmark
from prunelab.workers.models import describe_model, load_model


def _sample(adapter, index=0):
    return adapter.prepare(ShapesBenchmark().sample(index))


def _generate(adapter, prepared, method=None, plan=None, max_new_tokens=3, probe=None):
    tokens = adapter.vision_signals(prepared, frozenset()).tokens
    steps = plan.layers if plan is not None else ()
    probe = probe or AttentionProbe(modules=adapter.attention_modules)
    with probe_attention(probe):
        generation, _ = adapter.generate(
            prepared,
            tokens,
            lambda n, v: adapter.layer_pruner(n, v, method=method, steps=steps, probe=probe),
            max_new_tokens,
            time.perf_counter,
        )
    return generation


def test_describe_model_without_weights():
    info = describe_model(group_config("model", "tiny-llava"))
    assert (info.n_layers, info.n_visual, info.hidden_size) == (4, 144, 64)
    assert info.revision.startswith("tiny-")


@torch.inference_mode()
def test_attention_rows_match_eager(tiny_llava):
    _, adapter = tiny_llava
    prepared = _sample(adapter)
    tokens = adapter.vision_signals(prepared, frozenset()).tokens
    embeds = adapter.model.get_input_embeddings()(prepared.input_ids).clone()
    embeds[0, prepared.visual_positions] = tokens
    length = embeds.shape[1]
    queries = torch.tensor([0, 5, length - 1])
    probe = AttentionProbe(
        modules=adapter.attention_modules, queries={i: queries for i in range(4)}
    )
    with probe_attention(probe):
        adapter.model(inputs_embeds=embeds)
    lm_config = adapter.model.model.language_model.config
    implementation = lm_config._attn_implementation
    lm_config._attn_implementation = "eager"
    try:
        eager = adapter.model(inputs_embeds=embeds, output_attentions=True).attentions
    finally:
        lm_config._attn_implementation = implementation
    for layer in range(4):
        expected = eager[layer][0][:, queries]  # (H, Q, S)
        assert torch.allclose(probe.rows[layer], expected, atol=1e-5), layer


@torch.inference_mode()
def test_keep_all_equals_unpruned_and_hooks_are_removed(tiny_llava):
    _, adapter = tiny_llava
    prepared = _sample(adapter, 1)
    before = _generate(adapter, prepared)
    fastv = M.get("fastv")()
    plan_all = fastv.plan(M.PlanContext(144, 4, M.Budget(keep_ratio=1.0), 2, 0))
    keep_all = _generate(adapter, prepared, fastv, plan_all)
    assert torch.allclose(keep_all.first_logprobs, before.first_logprobs, atol=1e-5)
    assert keep_all.token_ids == before.token_ids
    plan = fastv.plan(M.PlanContext(144, 4, M.Budget(keep_ratio=0.25), 2, 0))
    pruned = _generate(adapter, prepared, fastv, plan)
    assert pruned.lengths.visual == [144, 144, 36, 36]
    assert pruned.lengths.tokens[2] == pruned.lengths.tokens[0] - 108
    after = _generate(adapter, prepared)
    assert torch.equal(after.first_logprobs, before.first_logprobs)
    for layer in adapter.layers:
        assert not layer._forward_pre_hooks


@torch.inference_mode()
def test_layer_pruned_decoding_matches_recomputation(tiny_llava):
    """Greedy decoding through the pruned KV cache equals re-running the pruned prefill."""
    _, adapter = tiny_llava
    prepared = _sample(adapter, 2)
    method = M.get("random")()
    plan = method.plan(M.PlanContext(144, 4, M.Budget(keep_ratio=0.3), 2, 0))

    def run(max_new):
        tokens = adapter.vision_signals(prepared, frozenset()).tokens
        gen = torch.Generator().manual_seed(0)
        out, _ = adapter.generate(
            prepared,
            tokens,
            lambda n, v: adapter.layer_pruner(
                n, v, method=method, steps=plan.layers, generator=gen
            ),
            max_new,
            time.perf_counter,
        )
        return out

    cached = run(4)
    # the first token of a longer prompt (prompt + generated) with the same selection
    assert len(cached.token_ids) >= 2
    assert cached.lengths.visual[-1] == round(0.3 * 144)
    again = run(4)
    assert again.token_ids == cached.token_ids


@torch.inference_mode()
def test_from_pretrained_roundtrip(tmp_path):
    config = group_config("model", "tiny-llava")
    tiny = load_model(config)
    tiny.model.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    loaded = load_model(
        {"name": "local", "family": "llava", "source": "pretrained", "path": str(tmp_path)}
    )
    assert loaded.info.n_visual == tiny.info.n_visual
    assert loaded.info.revision.startswith("local-")
    a, b = adapter_for(tiny), adapter_for(loaded)
    sample = ShapesBenchmark().sample(3)
    pa, pb = a.prepare(sample), b.prepare(sample)
    assert torch.equal(pa.input_ids, pb.input_ids)
    ga, gb = _generate(a, pa), _generate(b, pb)
    assert torch.allclose(ga.first_logprobs, gb.first_logprobs, atol=1e-6)


def test_bad_model_config_is_rejected():
    with pytest.raises(ValueError, match="family='gpt'"):
        describe_model({"name": "x", "family": "gpt"})
    with pytest.raises(ValueError, match="needs `path`"):
        describe_model({"name": "x", "family": "llava", "source": "pretrained"})
    with pytest.raises(ValueError, match="cannot read the config"):
        describe_model(
            {"name": "x", "family": "llava", "source": "pretrained", "path": "/nonexistent/dir"}
        )
