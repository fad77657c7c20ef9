"""InternVL3 (``InternVLForConditionalGeneration``): tiled InternViT, pixel shuffle, Qwen2.

The GotOcr2 image processor (``crop_to_patches``) resizes the image onto a grid of
``columns x rows`` tiles of the encoder's input size, chosen by aspect ratio within
``[min_patches, max_patches]``, and appends a thumbnail (the whole image resized to one tile)
when there is more than one grid tile. Each of the T tiles goes through the InternViT tower
(with a CLS token); the patch features of ``vision_feature_layer`` (CLS dropped) are pixel-shuffled
(``downsample_ratio`` 0.5: each 2 x 2 block of patches becomes one token with 4x the channels) and
projected by the multi-modal projector (layer norm + two linears).

Prompt layout (``InternVLProcessor``): the one ``<IMG_CONTEXT>`` of the prompt template expands to
``<img>`` + T * n ``<IMG_CONTEXT>`` + ``</img>``, n = (image_size / patch_size * 0.5)^2 tokens per
tile: ONE wrapper per image around all tiles (the processor puts no marker between tiles). The
visual tokens are the N = T * n ``<IMG_CONTEXT>`` placeholders in the processor's order: grid
tiles row-major over the canvas, then the thumbnail. ``<img>`` / ``</img>`` are text.

Coordinates (tile, row, col): the thumbnail (the whole-image view; it comes LAST in the sequence)
is tile 0, grid tile k (processor order, row-major) is tile k + 1; a single-tile image (no
thumbnail) is tile 0. (row, col) is the token's cell on its tile's pixel-shuffled grid.

transformers (and the word-level tokenizer) is imported by the functions that build or load a
model, not with the module: :func:`model_info` reads the config it is given, so a sweep is
planned without the model library's model code.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from prunelab.methods.base import VisionSignals
from prunelab.workers.adapters.base import (
    TINY_TEXT,
    TINY_VISION,
    LLMInput,
    Prepared,
    VLMAdapter,
    feature_attention_layer,
    grid_coords,
    pretrained_model,
    seeded_model,
    tiny_text_config,
)
from prunelab.workers.benchmarks.base import Sample
from prunelab.workers.benchmarks.shapes import shapes_vocabulary
from prunelab.workers.cost import projector_flops, vit_flops
from prunelab.workers.models import ModelInfo, ModelSpec

if TYPE_CHECKING:
    from transformers import InternVLConfig

    from prunelab.workers.adapters._processors import InternVLImageProcessor

__all__ = [
    "InternVLAdapter",
    "adapter_class",
    "build_tiny",
    "from_pretrained",
    "model_info",
    "tile_coords",
    "tile_ids",
    "tiny_config",
    "tokens_per_tile",
    "vision_flops",
]

CONTEXT_TOKEN = "<IMG_CONTEXT>"
SPECIAL_TOKENS = {
    "context_image_token": CONTEXT_TOKEN,
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "video_token": "<video>",
}
NOMINAL_TILES = 5  # a 2 x 2 grid + thumbnail: ModelInfo.n_visual / vision_flops of one image

TINY_DEFAULTS: dict[str, Any] = {
    "vision": {**TINY_VISION, "image_size": 32, "patch_size": 4},
    "text": TINY_TEXT,
    "min_patches": 1,
    "max_patches": 6,  # a 48 x 48 image on 32 x 32 tiles: 2 x 2 grid + thumbnail = 5 tiles
}


def _image_processor(tile: int, min_patches: int, max_patches: int):
    """GotOcr2 tiling processor for ``tile`` x ``tile`` tiles (same backend as a reload picks)."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import GotOcr2ImageProcessor as processor_cls
    else:
        from transformers import GotOcr2ImageProcessorPil as processor_cls
    return processor_cls(
        size={"height": tile, "width": tile},
        crop_to_patches=True,
        min_patches=min_patches,
        max_patches=max_patches,
    )


def _side(config: InternVLConfig) -> int:
    """Patches per side of one tile (square tiles)."""
    vision = config.vision_config
    rows, cols = (s // p for s, p in zip(vision.image_size, vision.patch_size, strict=True))
    if rows != cols:
        raise ValueError(f"InternVL tiles must be square, got {rows} x {cols} patches")
    return rows


def _check_strategy(config: InternVLConfig) -> None:
    if config.vision_feature_select_strategy != "default":
        raise ValueError("the internvl adapter supports vision_feature_select_strategy='default'")


def tokens_per_tile(config: InternVLConfig) -> int:
    """Visual tokens of one tile after pixel shuffle: (patches per side * ratio)^2."""
    merged = int(_side(config) * config.downsample_ratio)
    return merged * merged


def tiny_config(spec: ModelSpec) -> InternVLConfig:
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    from prunelab.workers.text import build_word_tokenizer

    overrides = spec.tiny
    vision = {**TINY_DEFAULTS["vision"], **overrides.get("vision", {})}
    tokenizer = build_word_tokenizer(shapes_vocabulary(), extra_special_tokens=SPECIAL_TOKENS)
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(**vision),
        text_config=tiny_text_config(
            Qwen2Config, spec, TINY_DEFAULTS["text"], tokenizer, tie_word_embeddings=False
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(CONTEXT_TOKEN),
        downsample_ratio=overrides.get("downsample_ratio", 0.5),
        vision_feature_layer=overrides.get("vision_feature_layer", -1),
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    config.image_seq_length = tokens_per_tile(config)
    return config


def model_info(config: InternVLConfig, revision: str, processor: dict | None = None) -> ModelInfo:
    """Shapes from the config; n_visual and vision_flops are for a nominal image of
    ``NOMINAL_TILES`` tiles (2 x 2 grid + thumbnail, e.g. a square image of twice the tile
    side with max_patches >= 4; the tiny model's 48 x 48 shapes images tile exactly so)."""
    text = config.text_config
    return ModelInfo.from_text_config(
        "internvl",
        text,
        NOMINAL_TILES * tokens_per_tile(config),
        revision,
        vision_flops(config, NOMINAL_TILES),
    )


def vision_flops(config: InternVLConfig, tiles: int) -> float:
    """Exact FLOPs (2 per multiply-add) of the InternViT tower and projector for ``tiles`` tiles.

    Per tile: patch embedding (a p x p conv) 2 * P * (C * p^2) * d over P patches; every encoder
    layer runs (all hidden states are computed) with n = P + 1 tokens of width d and MLP width m:
    q, k, v, o projections 8nd^2, attention scores and values 4n^2d, MLP 4ndm (norms: no matmul).
    Pixel shuffle is a reshape (no FLOPs); the projector maps the t = P / 4 merged tokens of
    width 4d: 2 * t * 4d * D + 2 * t * D^2.
    """
    _check_strategy(config)
    vision, text = config.vision_config, config.text_config
    patches = _side(config) ** 2
    p_h, p_w = vision.patch_size
    encoder = vit_flops(
        patches,
        vision.num_channels * p_h * p_w,
        vision.hidden_size,
        vision.intermediate_size,
        vision.num_hidden_layers,
    )
    merged = tokens_per_tile(config)
    projector = projector_flops(merged, patches * vision.hidden_size // merged, text.hidden_size)
    return float(tiles * (encoder + projector))


def build_tiny(
    spec: ModelSpec, config: InternVLConfig
) -> tuple[torch.nn.Module, InternVLImageProcessor]:
    """A randomly initialised InternVL from ``config`` (seeded) and its word-level processor."""
    from transformers import InternVLForConditionalGeneration

    from prunelab.workers.adapters._processors import InternVLImageProcessor
    from prunelab.workers.text import build_word_tokenizer

    model = seeded_model(InternVLForConditionalGeneration, spec, config)
    tokenizer = build_word_tokenizer(shapes_vocabulary(), extra_special_tokens=SPECIAL_TOKENS)
    if tokenizer.context_image_token_id != config.image_token_id:
        raise ValueError("config.image_token_id does not match the tokenizer's <IMG_CONTEXT>")
    overrides = {**TINY_DEFAULTS, **spec.tiny}
    processor = InternVLImageProcessor(
        image_processor=_image_processor(
            config.vision_config.image_size[0], overrides["min_patches"], overrides["max_patches"]
        ),
        tokenizer=tokenizer,
        image_seq_length=tokens_per_tile(config),
    )
    return model, processor


def from_pretrained(spec: ModelSpec, dtype: torch.dtype, device: torch.device):
    """Load weights and processor from a hub id or a local directory."""
    from transformers import InternVLForConditionalGeneration

    from prunelab.workers.adapters._processors import InternVLImageProcessor

    model = pretrained_model(InternVLForConditionalGeneration, spec, dtype, device)
    processor = InternVLImageProcessor.from_pretrained(
        spec.path, revision=spec.revision, **spec.processor
    )
    return model, processor


def tile_ids(tiles: int) -> list[int]:
    """Coordinate tile index of each tile in processor order: the thumbnail (last) is 0."""
    return [0] if tiles == 1 else [*range(1, tiles), 0]


def tile_coords(tiles: int, side: int, device: Any = None) -> torch.Tensor:
    """(tiles * side^2, 3) (tile, row, col) of the tokens in sequence order (see module doc)."""
    return torch.cat([grid_coords(side, side, tile=t, device=device) for t in tile_ids(tiles)])


class InternVLAdapter(VLMAdapter):
    family = "internvl"
    batches = True  # left-padded batches: each sample its own tiles and visual-token count
    sorts_kept = True  # ``_sequence`` lays the kept tokens out in input order

    def _vision_attention(self) -> list[torch.nn.Module]:
        return [layer.attention for layer in self.model.model.vision_tower.encoder.layer]

    def prepare(self, sample: Sample) -> Prepared:
        """Tiles (T, 3, s, s) as ``pixel_values``; ``extra["tiles"]`` = T."""
        config = self.model.config
        _check_strategy(config)
        prompt = self.spec.prompt_template.format(question=sample.question)
        batch = self.processor(
            images=Image.fromarray(np.asarray(sample.image)), text=prompt, return_tensors="pt"
        )
        input_ids = batch["input_ids"].to(self.device)
        pixel_values = batch["pixel_values"].to(self.device, self.model.dtype)
        tiles = pixel_values.shape[0]
        positions = self._check_placeholders(input_ids, tiles * tokens_per_tile(config))
        first, last = int(positions[0]), int(positions[-1])
        ids = input_ids[0]
        if (
            last - first + 1 != positions.numel()
            or int(ids[first - 1]) != self.processor.start_image_token_id
            or int(ids[last + 1]) != self.processor.end_image_token_id
        ):
            raise RuntimeError("expected one <img> ... </img> block of contiguous image tokens")
        side = int(_side(config) * config.downsample_ratio)
        return Prepared(
            input_ids=input_ids,
            pixel_values=pixel_values,
            visual_positions=positions,
            coords=tile_coords(tiles, side, device=self.device),
            extra={"tiles": tiles},
        )

    def merge_patches(self, values: torch.Tensor) -> torch.Tensor:
        """(T, P, c) per-patch values -> (T * P / 4, c): the mean over the 2 x 2 patches each
        visual token merges, through the model's own ``pixel_shuffle`` (same order as tokens)."""
        tiles, patches, channels = values.shape
        side = math.isqrt(patches)
        ratio = self.model.config.downsample_ratio
        grid = values.reshape(tiles, side, side, channels)
        shuffled = self.model.model.pixel_shuffle(grid, scale_factor=ratio)  # (T, s', s', k*c)
        merged = shuffled.reshape(tiles, -1, round(1 / ratio**2), channels)  # k blocks of c
        return merged.mean(dim=2).reshape(-1, channels)

    def vision_signals(self, prepared: Prepared, wanted: frozenset[str]) -> VisionSignals:
        """Projected tokens of all tiles (N, D); CLS attention and keys at the feature layer.

        cls_attention: per tile, the head-mean attention row of that tile's CLS query over its
        patches (CLS dropped), averaged over the 2 x 2 patches of each token, divided by T (each
        tile's CLS row weighs 1 / T, so the N values are a share of one mean softmax row).
        key_metric: head-mean keys (N, hd), averaged over the 2 x 2 patches the same way.
        """
        config = self.model.config
        layer = feature_attention_layer(
            config.vision_feature_layer, config.vision_config.num_hidden_layers
        )
        queries = torch.tensor([0]) if "cls_attention" in wanted else None
        keys = "key_metric" in wanted
        with self.probe_vision(layer, queries=queries, keys=keys, chunks=True) as probe:
            features = self.model.model.get_image_features(
                pixel_values=prepared.pixel_values,
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            ).pooler_output  # (T, n, D)
        tiles = features.shape[0]
        signals = VisionSignals(
            tokens=features.reshape(-1, features.shape[-1]), coords=prepared.coords
        )
        if queries is not None:
            rows = torch.stack([r[:, 0, 1:].mean(dim=0) for r in probe.rows[layer]])  # (T, P)
            signals.cls_attention = self.merge_patches(rows[..., None])[:, 0] / tiles  # (N,)
        if keys:
            states = torch.stack([k[:, 1:].float().mean(dim=0) for k in probe.key_states[layer]])
            signals.key_metric = self.merge_patches(states)  # (N, hd)
        return signals

    def vision_flops(self, prepared: Prepared) -> float:
        return vision_flops(self.model.config, prepared.pixel_values.shape[0])

    def _sequence(
        self, prepared: Prepared, visual_tokens: torch.Tensor, kept: torch.Tensor | None
    ) -> LLMInput:
        """The kept tokens, in input order (tiles, then the thumbnail), fill the image block
        from its start; the unused placeholders are removed, so the block stays
        ``<img>`` + M tokens + ``</img>`` (a one-wrapper-per-image layout has no per-tile
        markers) and positions stay contiguous (1-D RoPE)."""
        if kept is not None:
            order = torch.argsort(kept)
            visual_tokens = visual_tokens[order.to(visual_tokens.device)]
        return super()._sequence(prepared, visual_tokens, kept)


def adapter_class(family: str) -> type[VLMAdapter]:
    return InternVLAdapter
