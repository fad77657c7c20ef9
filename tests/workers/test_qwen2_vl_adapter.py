"""Qwen2-VL / Qwen2.5-VL specifics: patch grouping and coords, signals against eager attention
(window permutation included), M-RoPE positions through a vision stage, per-image FLOPs."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from tiny_models import load_tiny
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache, Qwen2_5_VLConfig, Qwen2VLConfig

from prunelab.workers.adapters.qwen2_vl import model_info
from prunelab.workers.benchmarks.base import Sample
from prunelab.workers.benchmarks.shapes import ShapesBenchmark

MODELS = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]
MODELING = {
    "qwen2_vl": "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "qwen2_5_vl": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
}
QUESTION = "what color is the shape at the top left ?"


def _sample(height: int, width: int, seed: int = 0) -> Sample:
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Sample(id=f"{height}x{width}", image=image, question=QUESTION, answers=["red"])


@pytest.fixture(params=MODELS)
def qwen(request):
    return load_tiny(request.param)


@torch.inference_mode()
def test_tokens_are_row_major_merge_windows_of_consecutive_patches(qwen):
    """Merged token k covers pixel_values rows 4k..4k+3: the 2x2 patches at coords[k]."""
    _, adapter = qwen
    rows, cols, side = 5, 11, 8  # 40 x 88 pixels: no resize at patch 4 x merge 2
    image = np.zeros((rows * side, cols * side, 3), dtype=np.uint8)
    r, c = 3, 7
    image[r * side : (r + 1) * side, c * side : (c + 1) * side] = 255
    prepared = adapter.prepare(Sample(id="x", image=image, question=QUESTION, answers=[]))
    assert prepared.extra["image_grid_thw"].tolist() == [[1, 2 * rows, 2 * cols]]
    assert prepared.n_visual == rows * cols
    k = r * cols + c
    assert prepared.coords[k].tolist() == [0, r, c]
    lit = prepared.pixel_values.float().mean(dim=-1) > 0  # (n,) patches of the white block
    assert lit.nonzero().squeeze(-1).tolist() == [4 * k + i for i in range(4)]
    signals = adapter.vision_signals(prepared, frozenset())
    assert torch.equal(signals.coords, prepared.coords)


@pytest.mark.parametrize("layer", [-1, 0])
@torch.inference_mode()
def test_signals_match_eager_attention(qwen, layer, monkeypatch):
    """cls_attention / key_metric == eager attention weights and keys of the same encoder block,
    mapped to merged-token order through a permutation found by matching hidden states."""
    loaded, adapter = qwen
    prepared = adapter.prepare(_sample(40, 88))  # 5 x 11 merged grid: uneven 2.5-VL windows
    visual = adapter.model.model.visual
    target = visual.blocks[layer].attn
    module = importlib.import_module(MODELING[loaded.spec.family])
    original = module.eager_attention_forward
    weights, keys = [], []

    def recording(attn, query, key, value, attention_mask, **kwargs):
        out, probs = original(attn, query, key, value, attention_mask, **kwargs)
        if attn is target:
            weights.append(probs[0].float())  # (H, s, s)
            keys.append(key[0].float())  # (H, s, hd)
        return out, probs

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    embedded, ordered = {}, {}
    hooks = [
        visual.patch_embed.register_forward_hook(lambda m, a, out: embedded.update(x=out)),
        visual.blocks[0].register_forward_pre_hook(lambda m, a: ordered.update(x=a[0])),
    ]
    try:
        with adapter.attention_implementation("eager"):
            adapter.model.model.get_image_features(
                pixel_values=prepared.pixel_values,
                image_grid_thw=prepared.extra["image_grid_thw"],
            )
    finally:
        for hook in hooks:
            hook.remove()
    if loaded.spec.family == "qwen2_5_vl" and layer == 0:
        assert len(weights) > 1  # a windowed block: one eager call per window
    # the processor-order patch at each encoder position (identity for Qwen2-VL)
    perm = torch.cdist(ordered["x"].float(), embedded["x"].float()).argmin(dim=1)  # (n,)
    n = perm.numel()
    assert sorted(perm.tolist()) == list(range(n))
    windowed = loaded.spec.family == "qwen2_5_vl"
    assert torch.equal(perm, torch.arange(n)) != windowed  # 2.5-VL: patches permuted into windows
    received = torch.cat([w.mean(dim=0).sum(dim=0) for w in weights]) / n  # (n,) encoder order
    key_mean = torch.cat(keys, dim=1).mean(dim=0)  # (n, hd)
    expected_cls = torch.empty_like(received)
    expected_cls[perm] = received
    expected_keys = torch.empty_like(key_mean)
    expected_keys[perm] = key_mean

    monkeypatch.setattr(adapter, "vision_signal_layer", layer)
    signals = adapter.vision_signals(prepared, frozenset({"cls_attention", "key_metric"}))
    assert torch.allclose(signals.cls_attention, expected_cls.view(-1, 4).mean(dim=1), atol=1e-6)
    assert torch.allclose(signals.key_metric, expected_keys.view(n // 4, 4, -1).mean(1), atol=1e-5)
    assert float(signals.cls_attention.sum()) == pytest.approx(0.25, abs=1e-5)  # 1 / merge^2


@torch.inference_mode()
def test_vision_stage_keeps_each_tokens_3d_position(qwen):
    """Kept tokens keep their (t, h, w) positions: the pruned prefill equals the full prompt with
    the dropped tokens masked out, and decoding continues at max position + t."""
    _, adapter = qwen
    prepared = adapter.prepare(ShapesBenchmark().sample(4))
    full = prepared.extra["position_ids"]  # (3, 1, L)
    signals = adapter.vision_signals(prepared, frozenset())
    kept = torch.tensor([0, 1, 7, 8, 20, 33, 35])
    llm_input = adapter._sequence(prepared, signals.tokens[kept], kept)
    start = int(prepared.visual_positions[0])  # first image token: its text position
    expected = torch.stack([torch.full_like(kept, start), start + prepared.coords[kept, 1],
                            start + prepared.coords[kept, 2]])  # fmt: skip
    assert torch.equal(llm_input.position_ids[:, 0, llm_input.visual_positions], expected)
    dropped = prepared.n_visual - kept.numel()
    assert llm_input.inputs_embeds.shape[1] == prepared.input_ids.shape[1] - dropped
    assert torch.equal(llm_input.position_ids[..., -1], full[..., -1])  # text keeps its own
    assert torch.equal(llm_input.next_position_ids(2)[:, 0, 0], full.max().repeat(3) + 2)

    pruned = adapter.model(inputs_embeds=llm_input.inputs_embeds,
                           position_ids=llm_input.position_ids).logits[0, -1]  # fmt: skip
    unpruned = adapter._sequence(prepared, signals.tokens, None)
    mask = torch.ones_like(prepared.input_ids)
    mask[0, prepared.visual_positions] = 0
    mask[0, prepared.visual_positions[kept]] = 1
    masked = adapter.model(inputs_embeds=unpruned.inputs_embeds, position_ids=full,
                           attention_mask=mask).logits[0, -1]  # fmt: skip
    assert torch.allclose(pruned, masked, atol=1e-5)


@torch.inference_mode()
def test_decoding_positions_match_transformers_generate(qwen):
    """Prefill + decode with the adapter's positions gives the logits of the model's own generate
    (its get_rope_index and rope_deltas) at every step."""
    loaded, adapter = qwen
    prepared = adapter.prepare(ShapesBenchmark().sample(1))
    tokens = adapter.vision_signals(prepared, frozenset()).tokens
    llm_input = adapter._sequence(prepared, tokens, None)
    steps = 4
    output = loaded.model.generate(
        input_ids=prepared.input_ids,
        pixel_values=prepared.pixel_values,
        image_grid_thw=prepared.extra["image_grid_thw"],
        mm_token_type_ids=prepared.extra["mm_token_type_ids"],
        attention_mask=torch.ones_like(prepared.input_ids),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    generated = output.sequences[0, prepared.input_ids.shape[1] :]
    cache = DynamicCache(config=adapter.llm.config)
    embeds, positions = llm_input.inputs_embeds, llm_input.position_ids
    for t in range(steps):
        logits = adapter.model(inputs_embeds=embeds, position_ids=positions,
                               cache=cache, use_cache=True).logits[0, -1]  # fmt: skip
        assert torch.allclose(logits, output.logits[t][0], atol=1e-4), t
        embeds = adapter.model.get_input_embeddings()(generated[t].view(1, 1))
        positions = llm_input.next_position_ids(t + 1)


@torch.inference_mode()
def test_renumbering_collapses_mrope_to_1d(qwen):
    _, adapter = qwen
    hidden = torch.zeros(1, 5, adapter.info.hidden_size)
    ids = torch.arange(3, 8)[None]
    cos, sin = adapter._rotary(hidden, ids)
    inv_freq = adapter.llm.rotary_emb.inv_freq
    angles = ids[..., None].float() * inv_freq
    angles = torch.cat([angles, angles], dim=-1)  # (1, 5, head_dim)
    assert torch.allclose(cos, angles.cos(), atol=1e-6)
    assert torch.allclose(sin, angles.sin(), atol=1e-6)


@pytest.mark.parametrize("size", [(40, 88), (64, 24), (100, 70)])
@torch.inference_mode()
def test_vision_flops_follow_the_image_grid(qwen, size):
    _, adapter = qwen
    prepared = adapter.prepare(_sample(*size))
    counter = FlopCounterMode(display=False)
    with adapter.attention_implementation("eager"), counter:
        adapter.vision_signals(prepared, frozenset())
    assert adapter.vision_flops(prepared) == counter.get_total_flops()


def test_nominal_image_info():
    """ModelInfo describes a 48x48 image: 36 tokens at patch 4 (tiny), 4 at patch 14 (7B)."""
    for name in MODELS:
        loaded, _ = load_tiny(name)
        assert loaded.info.n_visual == 36
    for config_cls in (Qwen2VLConfig, Qwen2_5_VLConfig):
        info = model_info(config_cls(), "r")
        assert info.n_visual == 4 and info.vision_flops > 0


def test_saved_processor_names_the_family_class(qwen, tmp_path):
    loaded, _ = qwen
    loaded.processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    expected = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}
    assert saved["processor_class"] == expected[loaded.spec.family]


def test_processor_overrides_set_the_pixel_limits_and_the_nominal_tokens():
    from prunelab.sweeps import group_config
    from prunelab.workers.models import describe_model, load_model

    config = group_config("model", "tiny-qwen2-vl")
    assert describe_model(config).n_visual == 36
    bigger = {**config, "processor": {"min_pixels": 96 * 96}}
    assert describe_model(bigger).n_visual == (96 // 8) ** 2
    loaded = load_model(bigger)
    from prunelab.workers.adapters import adapter_for
    from prunelab.workers.benchmarks.shapes import ShapesBenchmark

    prepared = adapter_for(loaded).prepare(ShapesBenchmark().sample(0))
    assert prepared.n_visual == (96 // 8) ** 2
