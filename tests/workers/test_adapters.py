"""Adapter invariants, run on every tiny family (``tiny`` fixture, see conftest.TINY_MODELS).

- attention rows read through the SDPA wrapper equal eager attention;
- keeping every token gives the unpruned outputs; after the pruner exits the model is untouched;
- decoding through a layer-pruned KV cache equals re-running the pruned prefill;
- a vision stage may change the number of visual tokens;
- vision signals have the documented shapes;
- the real loading path (``save_pretrained`` / ``from_pretrained``) reproduces the model,
  without a ``Loading weights`` progress bar;
- a pruned generation uses no argument transformers deprecates (no FutureWarning);
- the ``exact`` FLOPs convention agrees with ``FlopCounterMode`` within 1%.
"""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from tiny_models import TINY_MODELS, load_tiny, model_config
from torch.utils.flop_counter import FlopCounterMode

import prunelab.methods as M
from prunelab.workers.adapters import LLMInput, adapter_for
from prunelab.workers.adapters.base import greedy_generate
from prunelab.workers.attention import AttentionProbe, probe_attention
from prunelab.workers.benchmarks.shapes import ShapesBenchmark
from prunelab.workers.cost import exact_generation_flops
from prunelab.workers.models import describe_model, load_model
from prunelab.workers.pruning import LayerPruner


def _prepared(adapter, index=0):
    return adapter.prepare(ShapesBenchmark().sample(index))


def _ctx(prepared, adapter, keep_ratio=None, prune_layer=None):
    budget = M.Budget(keep_ratio=keep_ratio) if keep_ratio else None
    return M.PlanContext(prepared.n_visual, len(adapter.layers), budget, prune_layer, 0)


def _generate(adapter, prepared, method=None, plan=None, max_new_tokens=3, seed=0):
    """Vision stage (if the plan has one), then generation under the layer-stage pruner."""
    generator = torch.Generator().manual_seed(seed)
    signals = adapter.vision_signals(prepared, plan.vision_signals if plan else frozenset())
    signals.generator = generator
    tokens, kept = signals.tokens, None
    if plan is not None and plan.vision_keep is not None:
        selection = method.select_vision(signals, plan.vision_keep)
        tokens, kept = selection.tokens, selection.kept
    probe = AttentionProbe(modules=adapter.attention_modules)
    steps = plan.layers if plan is not None else ()
    llm_input = adapter.llm_input(prepared, tokens, kept)
    pruner = adapter.layer_pruner(
        llm_input, method=method, steps=steps, probe=probe, generator=generator
    )
    with probe_attention(probe):
        generation, _ = adapter.generate(
            prepared, llm_input, max_new_tokens, time.perf_counter, pruner=pruner
        )
    return generation


def test_describe_model_without_weights(tiny):
    loaded, adapter = tiny
    info = describe_model(loaded.spec)
    assert info == loaded.info
    assert info.n_layers == len(adapter.layers)
    assert info.revision.startswith("tiny-")
    assert info.vision_flops > 0


@torch.inference_mode()
def test_llm_attention_rows_match_eager(tiny):
    _, adapter = tiny
    prepared = _prepared(adapter)
    tokens = adapter.vision_signals(prepared, frozenset()).tokens
    llm_input = adapter._sequence(prepared, tokens, None)
    length = llm_input.inputs_embeds.shape[1]
    queries = torch.tensor([0, int(prepared.visual_positions[3]), length - 1])
    n_layers = len(adapter.layers)
    probe = AttentionProbe(
        modules=adapter.attention_modules, queries=dict.fromkeys(range(n_layers), queries)
    )
    kwargs = {"inputs_embeds": llm_input.inputs_embeds}
    if llm_input.position_ids is not None:
        kwargs["position_ids"] = llm_input.position_ids
    with probe_attention(probe):
        adapter.model(**kwargs)
    with adapter.attention_implementation("eager"):
        eager = adapter.model(**kwargs, output_attentions=True).attentions
    for layer in range(n_layers):
        expected = eager[layer][0][:, queries]  # (H, Q, S)
        assert torch.allclose(probe.rows[layer], expected, atol=1e-5), layer


@torch.inference_mode()
def test_vision_signals_shapes(tiny):
    _, adapter = tiny
    prepared = _prepared(adapter)
    signals = adapter.vision_signals(prepared, frozenset({"cls_attention", "key_metric"}))
    n = prepared.n_visual
    assert signals.tokens.shape == (n, adapter.info.hidden_size)
    assert signals.coords.shape == (n, 3)
    assert len({tuple(c) for c in signals.coords.tolist()}) == n  # distinct coordinates
    assert signals.cls_attention.shape == (n,)
    assert bool((signals.cls_attention >= 0).all())
    assert float(signals.cls_attention.sum()) <= 1.0 + 1e-4  # a share of one softmax row
    assert signals.key_metric.shape[0] == n and signals.key_metric.dim() == 2
    plain = adapter.vision_signals(prepared, frozenset())
    assert plain.cls_attention is None and plain.key_metric is None
    assert torch.equal(plain.tokens, signals.tokens)


@torch.inference_mode()
def test_keep_all_equals_unpruned_and_the_model_is_untouched_after(tiny):
    _, adapter = tiny
    prepared = _prepared(adapter, 1)
    n, layers = prepared.n_visual, len(adapter.layers)
    before = _generate(adapter, prepared)
    assert before.lengths.visual == [n] * layers
    fastv = M.get("fastv")()
    keep_all = _generate(adapter, prepared, fastv, fastv.plan(_ctx(prepared, adapter, 1.0, 2)))
    assert torch.allclose(keep_all.first_logprobs, before.first_logprobs, atol=1e-5)
    assert keep_all.token_ids == before.token_ids
    pruned = _generate(adapter, prepared, fastv, fastv.plan(_ctx(prepared, adapter, 0.25, 2)))
    keep = round(0.25 * n)
    assert pruned.lengths.visual == [n, n] + [keep] * (layers - 2)
    assert pruned.lengths.tokens[2] == pruned.lengths.tokens[0] - (n - keep)
    after = _generate(adapter, prepared)
    assert torch.equal(after.first_logprobs, before.first_logprobs)
    assert after.token_ids == before.token_ids
    for layer in adapter.layers:
        assert not layer._forward_pre_hooks


@pytest.mark.parametrize("positions", ["original", "renumber"])
@torch.inference_mode()
def test_decoding_through_a_pruned_cache_equals_a_pruned_prefill(tiny, positions):
    """Token t+1 from the pruned KV cache == the first token of prompt + t generated tokens."""
    _, adapter = tiny
    prepared = _prepared(adapter, 2)
    n = prepared.n_visual
    step = M.LayerStep(layer=2, keep=max(1, n // 3), queries=None, positions=positions)
    method = M.get("random")()
    tokens = adapter.vision_signals(prepared, frozenset()).tokens
    llm_input = adapter._sequence(prepared, tokens, None)
    embed = adapter.model.get_input_embeddings()

    def run(llm_input: LLMInput, max_new: int) -> list[int]:
        from transformers import DynamicCache

        pruner = LayerPruner(
            adapter.layers,
            llm_input.inputs_embeds.shape[1],
            llm_input.visual_positions,
            method=method,
            steps=(step,),
            rotary=adapter._rotary,
            generator=torch.Generator().manual_seed(7),
        )
        ids, _, _ = greedy_generate(
            lambda **kw: adapter.model(use_cache=True, logits_to_keep=1, **kw).logits[:, -1],
            embed,
            llm_input,
            pruner,
            max_new,
            eos_token_id=None,
            cache=DynamicCache(config=adapter.llm.config),
            clock=time.perf_counter,
        )
        return ids

    generated = run(llm_input, 4)
    assert len(generated) == 4
    # the prompt followed by the first three generated tokens, prefilled in one forward
    extra = embed(torch.tensor([generated[:3]], device=adapter.device))
    longer = LLMInput(
        inputs_embeds=torch.cat([llm_input.inputs_embeds, extra], dim=1),
        visual_positions=llm_input.visual_positions,
    )
    if llm_input.position_ids is not None:
        steps = [llm_input.next_position_ids(t) for t in (1, 2, 3)]
        longer.position_ids = torch.cat([llm_input.position_ids, *steps], dim=-1)
    assert run(longer, 1) == generated[3:4]


@torch.inference_mode()
def test_vision_stage_changes_the_number_of_visual_tokens(tiny):
    _, adapter = tiny
    prepared = _prepared(adapter, 3)
    n, layers = prepared.n_visual, len(adapter.layers)
    method = M.get("random")()
    plan = method.plan(_ctx(prepared, adapter, 0.25, 0))
    assert plan.vision_keep == round(0.25 * n)
    generation = _generate(adapter, prepared, method, plan, max_new_tokens=3)
    assert generation.lengths.visual == [plan.vision_keep] * layers
    full = _generate(adapter, prepared)
    assert full.lengths.tokens[0] - generation.lengths.tokens[0] == n - plan.vision_keep
    assert generation.visual_in == n
    assert len(generation.token_ids) >= 1


@torch.inference_mode()
def test_from_pretrained_roundtrip(tiny, tmp_path):
    tiny_loaded, tiny_adapter = tiny
    tiny_loaded.model.save_pretrained(tmp_path)
    tiny_loaded.processor.save_pretrained(tmp_path)
    config = {
        "name": "local",
        "family": tiny_loaded.spec.family,
        "source": "pretrained",
        "path": str(tmp_path),
        "prompt_template": tiny_loaded.spec.prompt_template,
    }
    loaded = load_model(config)
    assert loaded.info.n_visual == tiny_loaded.info.n_visual
    assert loaded.info.revision.startswith("local-")
    adapter = adapter_for(loaded)
    sample = ShapesBenchmark().sample(3)
    pa, pb = tiny_adapter.prepare(sample), adapter.prepare(sample)
    assert torch.equal(pa.input_ids, pb.input_ids)
    assert torch.equal(pa.pixel_values, pb.pixel_values)
    ga, gb = _generate(tiny_adapter, pa), _generate(adapter, pb)
    assert torch.allclose(ga.first_logprobs, gb.first_logprobs, atol=1e-6)
    assert ga.token_ids == gb.token_ids


def test_from_pretrained_prints_no_loading_bar(tiny_llava, tmp_path, capfd):
    """``load_model`` switches transformers' ``Loading weights`` bar off for the load only."""
    from transformers.utils import logging as hf_logging

    loaded, _ = tiny_llava
    loaded.model.save_pretrained(tmp_path)
    loaded.processor.save_pretrained(tmp_path)
    capfd.readouterr()
    config = {"name": "local", "family": "llava", "source": "pretrained", "path": str(tmp_path)}
    load_model(config)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # restored after the load


@torch.inference_mode()
def test_generation_uses_no_deprecated_argument(tiny):
    """transformers 5.25 renamed ``past_key_values`` to ``cache`` (the old name warns until
    5.40): a layer-pruned prefill and its decode steps through the cache warn nothing."""
    _, adapter = tiny
    prepared = _prepared(adapter, 2)
    fastv = M.get("fastv")()
    plan = fastv.plan(_ctx(prepared, adapter, 0.25, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        generation = _generate(adapter, prepared, fastv, plan, max_new_tokens=3)
    assert generation.token_ids


@pytest.mark.parametrize(
    ("method", "keep_ratio", "prune_layer"),
    [("none", None, None), ("random", 0.25, 2), ("random", 0.5, 0)],
)
@torch.inference_mode()
def test_exact_flops_match_flop_counter(tiny, method, keep_ratio, prune_layer):
    """On CPU the counter does not count SDPA kernels, so the counted forwards run eager."""
    loaded, adapter = tiny
    prepared = _prepared(adapter, 5)
    instance = M.get(method)()
    plan = instance.plan(_ctx(prepared, adapter, keep_ratio, prune_layer))
    counter = FlopCounterMode(display=False)
    with adapter.attention_implementation("eager"), counter:
        generation = _generate(adapter, prepared, instance, plan, max_new_tokens=3)
    predicted = exact_generation_flops(
        generation.lengths.tokens, len(generation.token_ids), loaded.info, generation.vision_flops
    )
    assert predicted == pytest.approx(counter.get_total_flops(), rel=0.01)


@torch.inference_mode()
def test_pruned_decoding_is_the_same_with_an_explicit_mask(tiny):
    """Eager attention passes a 4-D mask at decode; pruned layers must slice its key axis."""
    _, adapter = tiny
    prepared = _prepared(adapter, 6)
    method = M.get("random")()
    plan = method.plan(_ctx(prepared, adapter, 0.3, 2))
    sdpa = _generate(adapter, prepared, method, plan, max_new_tokens=4, seed=3)
    with adapter.attention_implementation("eager"):
        eager = _generate(adapter, prepared, method, plan, max_new_tokens=4, seed=3)
    assert eager.token_ids == sdpa.token_ids
    assert torch.allclose(eager.first_logprobs, sdpa.first_logprobs, atol=1e-5)


def test_every_tiny_model_config_is_tested():
    from prunelab.sweeps import group_names

    assert {n for n in group_names("model") if n.startswith("tiny-")} == set(TINY_MODELS)


def test_bad_model_config_is_rejected():
    with pytest.raises(ValueError, match="family='gpt'"):
        describe_model({"name": "x", "family": "gpt"})
    with pytest.raises(ValueError, match="needs `path`"):
        describe_model({"name": "x", "family": "llava", "source": "pretrained"})
    with pytest.raises(ValueError, match="cannot read the config"):
        describe_model(
            {"name": "x", "family": "llava", "source": "pretrained", "path": "/nonexistent/dir"}
        )


@torch.inference_mode()
def test_llava_cls_attention_matches_eager():
    _, adapter = load_tiny("tiny-llava")
    prepared = _prepared(adapter)
    signals = adapter.vision_signals(prepared, frozenset({"cls_attention"}))
    vision = adapter.model.model.vision_tower
    with adapter.attention_implementation("eager"):
        out = vision(prepared.pixel_values, output_attentions=True)
    layer = adapter.model.config.vision_feature_layer  # -2: attentions[-2] made hidden_states[-2]
    expected = out.attentions[layer][0, :, 0, 1:].mean(dim=0)
    assert torch.allclose(signals.cls_attention, expected, atol=1e-6)


def test_model_config_names_match_files():
    for name in TINY_MODELS:
        assert model_config(name)["name"] == name


class _Recorder(M.PruningMethod):
    """Test-only layer method: keeps the first ``step.keep`` visual tokens and records the
    attention rows and embeddings each step receives."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: dict[int, M.LayerSignals] = {}

    def select_layer(self, step, signals):
        self.seen[step.layer] = signals
        return torch.arange(min(step.keep, signals.visual.numel()))


@pytest.mark.parametrize("positions", ["original", "renumber"])
@torch.inference_mode()
def test_own_layer_attention_matches_the_layers_attention(tiny, positions):
    """``attention_from="self"`` rows at layer l (computed from layer l's q/k on its input)
    equal the rows layer l's real attention produces (read by a step at l + 1), on the full
    sequence and after an earlier drop (original or renumbered positions)."""
    _, adapter = tiny
    prepared = _prepared(adapter, 2)
    n, half = prepared.n_visual, prepared.n_visual // 2
    embeds = adapter._sequence(prepared, adapter.vision_signals(prepared, frozenset()).tokens, None)

    def seen(*steps):
        recorder = _Recorder()
        _generate(adapter, prepared, recorder, M.Plan(layers=steps), max_new_tokens=1)
        return recorder.seen

    drop = M.LayerStep(1, half, queries=None, positions=positions)
    cases = [  # (own rows at layer l, real rows of layer l)
        (seen(M.LayerStep(1, n, "text", attention_from="self", needs_embeddings=True))[1],
         seen(M.LayerStep(2, n, "text"))[2]),
        (seen(drop, M.LayerStep(2, half, "text", attention_from="self"))[2],
         seen(drop, M.LayerStep(3, half, "text"))[3]),
        (seen(drop, M.LayerStep(2, half, "last", attention_from="self"))[2],
         seen(drop, M.LayerStep(3, half, "last"))[3]),
    ]  # fmt: skip
    for mine, real in cases:
        assert torch.equal(mine.query_positions, real.query_positions)
        assert mine.attention.shape == real.attention.shape
        assert torch.allclose(mine.attention, real.attention, atol=1e-5)
    assert torch.equal(cases[0][0].embeddings, embeds.inputs_embeds[0])
