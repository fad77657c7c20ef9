"""LLaVA-NeXT specifics: any-resolution layout, newline tokens, CLS attention, per-image FLOPs.

The shapes images are 48x48 (best resolution 64x64: base + 2x2 tiles, nothing unpadded); crops
of them give other aspect ratios, so the unpadding path runs too (48x32: 2x1 tiles, 40x48: 2x2
tiles with a padded row cut from the top and the bottom of the tile grid).
"""

from __future__ import annotations

import time

import pytest
import torch
from tiny_models import load_tiny
from torch.utils.flop_counter import FlopCounterMode

import prunelab.methods as M
from prunelab.workers.benchmarks.base import Sample
from prunelab.workers.benchmarks.shapes import ShapesBenchmark

CROPS = {"square": None, "tall": (48, 32), "wide": (40, 48)}  # (H, W) of the top-left crop


@pytest.fixture(scope="module")
def tiny_next():
    return load_tiny("tiny-llava-next")


def _sample(shape: str, index: int = 0) -> Sample:
    sample = ShapesBenchmark().sample(index)
    if CROPS[shape] is not None:
        height, width = CROPS[shape]
        sample.image = sample.image[:height, :width].copy()
    return sample


def _features(adapter, prepared) -> torch.Tensor:
    """(T, D) the model's own packed features of the image, newlines included."""
    config = adapter.model.config
    return adapter.model.model.get_image_features(
        pixel_values=prepared.pixel_values,
        image_sizes=prepared.extra["image_sizes"],
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    ).pooler_output[0]


@pytest.mark.parametrize("shape", list(CROPS))
@torch.inference_mode()
def test_layout_matches_the_processor_and_the_model(tiny_next, shape):
    loaded, adapter = tiny_next
    prepared = adapter.prepare(_sample(shape))
    image = (prepared.input_ids[0] == adapter.model.config.image_token_id).nonzero()[:, 0]
    newlines = prepared.extra["newline_positions"]
    n, rows = prepared.n_visual, newlines.numel()
    assert image.numel() == n + rows  # the processor's count: tokens + one newline per row
    assert torch.equal(torch.sort(torch.cat([prepared.visual_positions, newlines]))[0], image)
    features = _features(adapter, prepared)
    is_visual = prepared.extra["is_visual"]
    newline = adapter.model.model.image_newline
    assert torch.equal(features[~is_visual], newline.expand(rows, -1))
    tokens = adapter.vision_signals(prepared, frozenset()).tokens
    assert torch.equal(tokens, features[is_visual])
    # coords: the base grid first, then the unpadded tile grid with one newline per row
    vision = adapter.model.config.vision_config
    side = vision.image_size // vision.patch_size
    coords = prepared.coords
    assert coords.shape == (n, 3) and len({tuple(c) for c in coords.tolist()}) == n
    base, tile = coords[: side * side], coords[side * side :]
    assert bool((base[:, 0] == 0).all()) and bool((tile[:, 0] == 1).all())
    assert int(tile[:, 1].max()) + 1 == rows
    cols = int(tile[:, 2].max()) + 1
    assert tile.shape[0] == rows * cols
    expected_rows = {"square": (8, 8), "tall": (6, 4), "wide": (6, 8)}[shape]
    assert (rows, cols) == expected_rows
    if shape == "square":  # the nominal image: ModelInfo describes it
        assert loaded.info.n_visual == n
        assert loaded.info.vision_flops == adapter.vision_flops(prepared)


@pytest.mark.parametrize("shape", ["square", "tall", "wide"])
@torch.inference_mode()
def test_cls_attention_and_keys_match_eager(tiny_next, shape):
    """Eager CLS rows / keys of every crop, packed by the model's own ``pack_image_features``."""
    _, adapter = tiny_next
    prepared = adapter.prepare(_sample(shape, 4))
    signals = adapter.vision_signals(prepared, frozenset({"cls_attention", "key_metric"}))
    config = adapter.model.config
    crops = prepared.extra["crops"]
    layer = adapter._feature_layer()
    tower = adapter.model.model.vision_tower
    with adapter.attention_implementation("eager"):
        out = tower(
            prepared.pixel_values[0, :crops], output_attentions=True, output_hidden_states=True
        )
    assert len(out.attentions) == config.vision_config.num_hidden_layers
    cls = out.attentions[layer][:, :, 0, 1:].mean(dim=1)  # (C, P)
    attention = tower.encoder.layers[layer]
    hidden = attention.layer_norm1(out.hidden_states[layer])  # the input of layer `layer`
    heads = attention.self_attn.num_heads
    keys = attention.self_attn.k_proj(hidden)  # (C, S, d)
    keys = keys.view(*keys.shape[:2], heads, -1).mean(dim=2)[:, 1:]  # (C, P, hd) head mean

    def pack(per_patch: torch.Tensor) -> torch.Tensor:  # (C, P, k) -> (N, k)
        packed, _ = adapter.model.model.pack_image_features(
            [per_patch], prepared.extra["image_sizes"], config.vision_feature_select_strategy
        )
        return packed[0]

    expected_cls = pack(cls[..., None])[:, 0] / crops
    assert signals.cls_attention.shape == (prepared.n_visual,)
    assert torch.allclose(signals.cls_attention, expected_cls, atol=1e-6)
    assert float(signals.cls_attention.sum()) <= 1.0 + 1e-5
    assert torch.allclose(signals.key_metric, pack(keys), atol=1e-5)


@torch.inference_mode()
def test_vision_selection_keeps_rows_and_newlines(tiny_next):
    """Drop a whole tile row and random others: the kept tokens stay in order and in their row,
    every newline stays (with ``image_newline``), the text is untouched."""
    _, adapter = tiny_next
    prepared = adapter.prepare(_sample("wide", 2))
    signals = adapter.vision_signals(prepared, frozenset())
    n, coords = prepared.n_visual, prepared.coords
    generator = torch.Generator().manual_seed(0)
    keep = torch.rand(n, generator=generator) < 0.5
    keep[(coords[:, 0] == 1) & (coords[:, 1] == 2)] = False  # all of tile row 2
    keep[(coords[:, 0] == 1) & (coords[:, 1] == 4)] = True  # all of tile row 4
    kept = keep.nonzero()[:, 0]
    tokens = signals.tokens[kept] * 2.0  # stand-ins for merged tokens
    shuffle = torch.randperm(kept.numel(), generator=generator)  # any order in, sorted out
    llm = adapter._sequence(prepared, tokens[shuffle], kept[shuffle])
    ids = prepared.input_ids[0]
    length, m = ids.numel(), kept.numel()
    embeds = llm.inputs_embeds[0]
    assert embeds.shape[0] == length - (n - m)
    assert llm.position_ids is None  # contiguous 1-D positions
    positions = llm.visual_positions
    assert bool((positions[1:] > positions[:-1]).all())
    assert torch.equal(embeds[positions], tokens)
    # newlines: same count, the model's embedding, after the base tokens
    image = (ids == adapter.model.config.image_token_id).nonzero()[:, 0]
    first, last = int(image[0]), int(image[-1])
    span = torch.zeros(embeds.shape[0], dtype=torch.bool)
    span[first : last + 1 - (n - m)] = True
    is_newline = span.clone()
    is_newline[positions] = False
    newlines = is_newline.nonzero()[:, 0]
    assert newlines.numel() == prepared.extra["newline_positions"].numel()
    newline = adapter.model.model.image_newline
    assert torch.equal(embeds[newlines], newline.expand(len(newlines), -1))
    # each kept tile token sits in its row: as many newlines before it as its row index
    before = torch.searchsorted(newlines, positions)
    tile = coords[kept, 0] == 1
    assert torch.equal(before[tile], coords[kept][tile, 1])
    assert bool((before[~tile] == 0).all())
    # row 2 lost all its tokens but kept its newline: two newlines in a row
    assert bool(((newlines[1:] - newlines[:-1]) == 1).any())
    # the text around the image is untouched
    original = adapter.model.get_input_embeddings()(ids)
    assert torch.equal(embeds[:first], original[:first])
    assert torch.equal(embeds[last + 1 - (n - m) :], original[last + 1 :])


@torch.inference_mode()
def test_generation_with_a_vision_stage_on_a_non_square_image(tiny_next):
    _, adapter = tiny_next
    prepared = adapter.prepare(_sample("tall", 5))
    n, layers = prepared.n_visual, len(adapter.layers)
    method = M.get("random")()
    plan = method.plan(M.PlanContext(n, layers, M.Budget(keep_ratio=0.3), 0, 0))
    signals = adapter.vision_signals(prepared, plan.vision_signals)
    signals.generator = torch.Generator().manual_seed(1)
    selection = method.select_vision(signals, plan.vision_keep)
    llm_input = adapter.llm_input(prepared, selection.tokens, selection.kept)
    generation, _ = adapter.generate(prepared, llm_input, 3, time.perf_counter)
    assert generation.lengths.visual == [plan.vision_keep] * layers
    assert generation.visual_in == n
    rows = prepared.extra["newline_positions"].numel()
    text = prepared.input_ids.shape[1] - n - rows
    assert generation.lengths.tokens == [text + rows + plan.vision_keep] * layers


@pytest.mark.parametrize("shape", list(CROPS))
@torch.inference_mode()
def test_vision_flops_are_exact_per_image(tiny_next, shape):
    """CLIP over every crop (their number depends on the image) + the projector before
    unpadding, as FlopCounterMode counts the adapter's vision pass."""
    _, adapter = tiny_next
    prepared = adapter.prepare(_sample(shape, 1))
    counter = FlopCounterMode(display=False)
    with adapter.attention_implementation("eager"), counter:
        adapter.vision_signals(prepared, frozenset())
    assert prepared.extra["crops"] == {"square": 5, "tall": 3, "wide": 5}[shape]
    assert adapter.vision_flops(prepared) == counter.get_total_flops()
