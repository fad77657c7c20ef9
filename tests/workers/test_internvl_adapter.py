"""InternVL-specific checks: tiling, coordinates, CLS signals vs eager, image block, FLOPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_models import load_tiny
from torch.utils.flop_counter import FlopCounterMode

import prunelab.methods as M
from prunelab.workers.adapters.internvl import tile_ids, tokens_per_tile
from prunelab.workers.benchmarks.base import Sample
from prunelab.workers.benchmarks.shapes import ShapesBenchmark

TILE_TOKENS = 16  # 32 x 32 tiles, patch 4: 8 x 8 patches -> 4 x 4 after pixel shuffle


@pytest.fixture(scope="module")
def internvl():
    return load_tiny("tiny-internvl")


def _sample(index: int = 0, shape: tuple[int, int] | None = None) -> Sample:
    sample = ShapesBenchmark().sample(index)
    if shape is not None:
        rng = np.random.default_rng(index)
        sample.image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    return sample


def _pool(values: torch.Tensor) -> torch.Tensor:
    """(T, P, c) per-patch values -> (T * P / 4, c): 2 x 2 average pooling, row-major tokens."""
    tiles, patches, channels = values.shape
    side = int(patches**0.5)
    grid = values.reshape(tiles, side, side, channels).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, 2)  # (T, c, side / 2, side / 2)
    return pooled.permute(0, 2, 3, 1).reshape(-1, channels)


@torch.inference_mode()
def test_prompt_has_one_image_block_of_all_tiles(internvl):
    loaded, adapter = internvl
    prepared = adapter.prepare(_sample(0))
    tiles = prepared.extra["tiles"]
    assert tiles == 5 and prepared.pixel_values.shape == (5, 3, 32, 32)  # 2 x 2 grid + thumbnail
    assert tokens_per_tile(adapter.model.config) == TILE_TOKENS
    assert prepared.n_visual == tiles * TILE_TOKENS == loaded.info.n_visual
    ids = prepared.input_ids[0]
    first, last = int(prepared.visual_positions[0]), int(prepared.visual_positions[-1])
    tokens = adapter.tokenizer.convert_ids_to_tokens(ids[first - 1 : last + 2].tolist())
    assert tokens == ["<img>", *["<IMG_CONTEXT>"] * prepared.n_visual, "</img>"]
    assert int((ids == adapter.processor.start_image_token_id).sum()) == 1


@torch.inference_mode()
def test_tiles_depend_on_the_image_and_the_thumbnail_is_tile_zero(internvl):
    _, adapter = internvl
    wide = adapter.prepare(_sample(1, shape=(32, 96)))  # 3 x 1 grid + thumbnail
    assert wide.extra["tiles"] == 4 and wide.n_visual == 4 * TILE_TOKENS
    tiles = wide.coords[:, 0].reshape(4, TILE_TOKENS)
    assert tiles[:, 0].tolist() == [1, 2, 3, 0] == tile_ids(4)  # the thumbnail comes last
    # the thumbnail tile is the whole image resized to one tile
    image = Image.fromarray(_sample(1, shape=(32, 96)).image)
    thumb = adapter.processor.image_processor(image, crop_to_patches=False, return_tensors="pt")
    assert torch.allclose(wide.pixel_values[-1], thumb["pixel_values"][0], atol=1e-6)
    single = adapter.prepare(_sample(2, shape=(32, 32)))  # one tile, no thumbnail
    assert single.extra["tiles"] == 1 and single.n_visual == TILE_TOKENS
    assert single.coords[:, 0].unique().tolist() == [0]
    for prepared in (wide, single):
        assert len({tuple(c) for c in prepared.coords.tolist()}) == prepared.n_visual
        flops = adapter.vision_flops(prepared)
        assert flops == adapter.info.vision_flops * prepared.extra["tiles"] / 5


@torch.inference_mode()
def test_coords_follow_the_pixel_shuffle_order(internvl):
    """A map of each patch's row / column index, merged like the tokens: 2 * (row, col) + 0.5."""
    _, adapter = internvl
    prepared = adapter.prepare(_sample(3))
    side = 8
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    per_patch = torch.stack([r, c], dim=-1).reshape(1, side * side, 2).float()
    merged = adapter.merge_patches(per_patch.expand(prepared.extra["tiles"], -1, -1).contiguous())
    assert torch.equal(merged, 2 * prepared.coords[:, 1:].float() + 0.5)


@torch.inference_mode()
def test_cls_attention_and_keys_match_eager(internvl):
    _, adapter = internvl
    prepared = adapter.prepare(_sample(4))
    signals = adapter.vision_signals(prepared, frozenset({"cls_attention", "key_metric"}))
    vision = adapter.model.model.vision_tower
    with adapter.attention_implementation("eager"):
        out = vision(prepared.pixel_values, output_attentions=True, output_hidden_states=True)
    layer = adapter.model.config.vision_feature_layer  # -1: the last layer's attention
    tiles = prepared.extra["tiles"]
    cls = out.attentions[layer][:, :, 0, 1:].mean(dim=1)  # (T, P) head mean, CLS dropped
    expected = _pool(cls[..., None])[:, 0] / tiles
    assert torch.allclose(signals.cls_attention, expected, atol=1e-6)
    # keys: the feature layer's k_proj of its normalised input, head mean, CLS dropped
    block = vision.encoder.layer[layer]
    hidden = out.hidden_states[layer - 1 if layer < 0 else layer]  # input of that layer
    keys = block.attention.k_proj(block.layernorm_before(hidden))  # (T, S, d)
    heads = block.attention.num_heads
    keys = keys.reshape(tiles, keys.shape[1], heads, -1).mean(dim=2)[:, 1:]  # (T, P, hd)
    assert torch.allclose(signals.key_metric, _pool(keys), atol=1e-5)
    # tokens are the model's own image features, flattened tile by tile
    features = adapter.model.model.get_image_features(pixel_values=prepared.pixel_values)
    assert torch.equal(signals.tokens, features.pooler_output.reshape(-1, signals.tokens.shape[1]))


@torch.inference_mode()
def test_vision_stage_keeps_the_image_block(internvl):
    """Kept tokens fill <img> ... </img> in input order; dropped placeholders are removed."""
    _, adapter = internvl
    prepared = adapter.prepare(_sample(5))
    n = prepared.n_visual
    signals = adapter.vision_signals(prepared, frozenset())
    signals.generator = torch.Generator().manual_seed(0)
    selection = M.get("random")().select_vision(signals, 20)
    kept = selection.kept
    assert kept.numel() == 20
    llm_input = adapter._sequence(prepared, selection.tokens, kept)
    embed = adapter.model.get_input_embeddings()
    positions = llm_input.visual_positions
    first = int(prepared.visual_positions[0])
    assert positions.tolist() == list(range(first, first + 20))
    assert llm_input.inputs_embeds.shape[1] == prepared.input_ids.shape[1] - (n - 20)
    start, end = adapter.processor.start_image_token_id, adapter.processor.end_image_token_id
    ids = torch.tensor([[start, end]])
    expected = embed(ids)[0]
    assert torch.equal(llm_input.inputs_embeds[0, first - 1], expected[0])
    assert torch.equal(llm_input.inputs_embeds[0, first + 20], expected[1])
    assert torch.equal(llm_input.inputs_embeds[0, positions], signals.tokens[kept])
    # the text after the block is unchanged
    tail = embed(prepared.input_ids[:, int(prepared.visual_positions[-1]) + 1 :])[0]
    assert torch.equal(llm_input.inputs_embeds[0, first + 20 :], tail)
    # anchors out of order: the tokens are laid out in input order all the same
    shuffle = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    shuffled = adapter._sequence(prepared, selection.tokens[shuffle], kept[shuffle])
    assert torch.equal(shuffled.inputs_embeds, llm_input.inputs_embeds)
    # keeping only thumbnail tokens (tile 0, last in the sequence) keeps the block too
    thumb = (prepared.coords[:, 0] == 0).nonzero()[:, 0][:5]
    only = adapter._sequence(prepared, signals.tokens[thumb], thumb)
    assert torch.equal(only.inputs_embeds[0, first - 1], expected[0])
    assert torch.equal(only.inputs_embeds[0, first + 5], expected[1])
    assert torch.equal(only.inputs_embeds[0, first : first + 5], signals.tokens[thumb])


@torch.inference_mode()
def test_vision_flops_match_flop_counter(internvl):
    """The vision tower over every tile and the projector, counted exactly (eager attention)."""
    _, adapter = internvl
    for sample in (_sample(6), _sample(7, shape=(32, 96))):
        prepared = adapter.prepare(sample)
        counter = FlopCounterMode(display=False)
        with adapter.attention_implementation("eager"), counter:
            adapter.vision_signals(prepared, frozenset())
        assert adapter.vision_flops(prepared) == counter.get_total_flops()
