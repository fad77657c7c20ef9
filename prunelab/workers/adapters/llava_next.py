"""LLaVA-NeXT / LLaVA-1.6 (``LlavaNextForConditionalGeneration``): any-resolution CLIP + Llama.

The image processor picks the ``image_grid_pinpoints`` resolution that best fits the image,
resizes and pads the image to it and cuts it into ``image_size`` tiles; a downscaled copy of the
whole image (the *base* crop) comes first. Every crop goes through CLIP; the patch features of
layer ``vision_feature_layer`` (CLS dropped, ``default`` strategy) of *all* crops are projected
(HF projects before unpadding), then ``pack_image_features`` lays them out as

    base (side x side, row-major) | tile grid row 0, newline | tile grid row 1, newline | ...

where the tile grid is the tiles' patch grids stitched together and *unpadded* (rows or columns
that only cover the padding are cut), and ``image_newline`` is a learned embedding after each row.
The prompt holds one ``<image>`` placeholder per entry of that layout.

Design (what methods see):

- The N prunable visual tokens are the base tokens and the unpadded tile tokens, in layout order.
  The newline tokens are structural: they are not in ``visual_positions`` (methods and the
  layer-stage pruner treat them as text and always keep them) and keep their place.
- ``coords``: tile 0 = the base crop, (row, col) on its side x side grid; tile 1 = the combined
  unpadded tile grid, (row, col) on that grid.
- The layout is never re-derived: ``prepare`` runs the model's own ``pack_image_features`` on a
  map of patch indices (crop * patches + patch, newline = -1), which gives for every placeholder
  the patch it comes from. Tokens, CLS attention and keys are all gathered through that map, so
  they are unpadded exactly as the features are.
- Vision stage (``_sequence``): kept / merged tokens take the placeholders of the tokens they are
  anchored on (sorted ``kept``), so they stay in their original order and row; every newline
  stays (a row whose tokens were all dropped keeps its newline, so the newline count is
  constant); positions are contiguous (plain 1-D RoPE).
- ``cls_attention`` / ``key_metric``: attention of each crop's CLS query and head-mean keys at the
  encoder layer that produces the features, read from that layer's q / k projections for all
  crops of the batched encoder call (one token per patch: no aggregation needed). The attention
  is divided by the number of crops so that the N values are a share of one softmax row, as for
  single-crop families (a uniform scale: rankings across crops are unchanged).
- ``ModelInfo.n_visual`` / ``vision_flops`` describe a nominal image whose size is the
  largest-area pinpoint (it fits that resolution exactly: all tiles, nothing unpadded), the
  largest count the model produces; ``vision_flops(prepared)`` is exact per image.

transformers (its model and processor classes, and the word-level tokenizer) is imported by the
functions that build, load or run a model, not with the module: :func:`model_info` reads the
config it is given, so a sweep is planned without the model library's model code.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
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
from prunelab.workers.adapters.llava import vision_flops as clip_vision_flops
from prunelab.workers.benchmarks.base import Sample
from prunelab.workers.benchmarks.shapes import shapes_vocabulary
from prunelab.workers.models import ModelInfo, ModelSpec

if TYPE_CHECKING:
    import torch
    from transformers import LlavaNextConfig, LlavaNextProcessor

__all__ = [
    "LlavaNextAdapter",
    "adapter_class",
    "build_tiny",
    "from_pretrained",
    "model_info",
    "tiny_config",
    "vision_flops",
]

TINY_DEFAULTS: dict[str, Any] = {
    "vision": {**TINY_VISION, "image_size": 32, "patch_size": 8},
    "text": TINY_TEXT,
    # a 48x48 image fits 64x64 best: 2x2 tiles of 32x32 (plus the base crop)
    "image_grid_pinpoints": [[64, 64], [32, 64], [64, 32]],
}


def _image_processor(image_size: int, pinpoints: list[list[int]]):
    try:
        from transformers import LlavaNextImageProcessorPil as processor_cls
    except ImportError:  # older transformers
        from transformers import LlavaNextImageProcessor as processor_cls
    return processor_cls(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )


def tiny_config(spec: ModelSpec) -> LlavaNextConfig:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    from prunelab.workers.text import IMAGE_TOKEN, build_word_tokenizer

    overrides = spec.tiny
    vision = {**TINY_DEFAULTS["vision"], **overrides.get("vision", {})}
    pinpoints = overrides.get("image_grid_pinpoints", TINY_DEFAULTS["image_grid_pinpoints"])
    tokenizer = build_word_tokenizer(shapes_vocabulary())
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=tiny_text_config(LlamaConfig, spec, TINY_DEFAULTS["text"], tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=[list(p) for p in pinpoints],
        vision_feature_layer=overrides.get("vision_feature_layer", -2),
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def nominal_resolution(config: LlavaNextConfig) -> tuple[int, int]:
    """(height, width) of the nominal image: the largest-area pinpoint (first of equals)."""
    return tuple(max(config.image_grid_pinpoints, key=lambda p: p[0] * p[1]))


def model_info(config: LlavaNextConfig, revision: str, processor: dict | None = None) -> ModelInfo:
    """Shapes from the config; ``n_visual`` / ``vision_flops`` for the nominal image."""
    vision, text = config.vision_config, config.text_config
    height, width = nominal_resolution(config)
    side = vision.image_size // vision.patch_size
    # the nominal image fits its resolution exactly: no unpadding, every tile patch is a token;
    # its crops are the base crop and the tiles that cover that resolution (what transformers'
    # image_size_to_num_patches counts for it, without importing the model code)
    n_visual = side * side + (height // vision.patch_size) * (width // vision.patch_size)
    crops = 1 + math.ceil(height / vision.image_size) * math.ceil(width / vision.image_size)
    return ModelInfo.from_text_config(
        "llava_next", text, n_visual, revision, vision_flops(config, crops)
    )


def vision_flops(config: LlavaNextConfig, crops: int) -> float:
    """Exact FLOPs (2 per multiply-add) of CLIP and the projector over ``crops`` crops: per crop
    as LLaVA-1.5 (:func:`prunelab.workers.adapters.llava.vision_flops`). The projector runs on
    the patch features of every crop *before* unpadding, so padded patches count too."""
    return crops * clip_vision_flops(config)


def build_tiny(
    spec: ModelSpec, config: LlavaNextConfig
) -> tuple[torch.nn.Module, LlavaNextProcessor]:
    """A randomly initialised LLaVA-NeXT from ``config`` (seeded) and its word-level processor."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    from prunelab.workers.text import build_word_tokenizer

    model = seeded_model(LlavaNextForConditionalGeneration, spec, config)
    vision = config.vision_config
    processor = LlavaNextProcessor(
        image_processor=_image_processor(vision.image_size, config.image_grid_pinpoints),
        tokenizer=build_word_tokenizer(shapes_vocabulary()),
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    return model, processor


def from_pretrained(spec: ModelSpec, dtype: torch.dtype, device: torch.device):
    """Load weights and processor from a hub id or a local directory."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    model = pretrained_model(LlavaNextForConditionalGeneration, spec, dtype, device)
    # the PIL image processor, as ``build_tiny``: the same pixels with or without torchvision
    processor = LlavaNextProcessor.from_pretrained(
        spec.path, revision=spec.revision, **spec.processor, backend="pil"
    )
    return model, processor


class LlavaNextAdapter(VLMAdapter):
    """Any-resolution LLaVA-NeXT; see the module docstring for the token layout.

    ``Prepared.extra``: ``image_sizes`` (1, 2) original (H, W); ``crops`` (base + tiles);
    ``is_visual`` (T,) bool over the image's T placeholders (False: newline); ``source`` (N,)
    flat index crop * patches + patch of each prunable token; ``newline_positions`` (R,).
    """

    family = "llava_next"
    batches = True  # left-padded batches: each sample its own tiles and visual-token count
    sorts_kept = True  # ``_sequence`` lays the kept tokens out in input order

    def _vision_attention(self) -> list[torch.nn.Module]:
        return [layer.self_attn for layer in self.model.model.vision_tower.encoder.layers]

    def _feature_layer(self) -> int:
        config = self.model.config
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError("the llava_next adapter supports one int vision_feature_layer")
        return feature_attention_layer(
            config.vision_feature_layer, config.vision_config.num_hidden_layers
        )

    def _layout(self, image_sizes: torch.Tensor, crops: int) -> torch.Tensor:
        """(T,) long: for each placeholder of the image, the flat patch index crop * patches +
        patch its feature comes from, or -1 for a newline; the model's ``pack_image_features``
        applied to a map of patch indices."""
        import torch

        vision = self.model.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        ids = torch.arange(crops * patches, dtype=torch.float64).view(crops, patches, 1)
        packed, _ = self.model.model.pack_image_features(
            [ids],
            image_sizes.cpu(),
            vision_feature_select_strategy=self.model.config.vision_feature_select_strategy,
            image_newline=torch.tensor([-1.0], dtype=torch.float64),
        )
        return packed[0][:, 0].round().long()

    @staticmethod
    def _coords(layout: torch.Tensor, side: int) -> torch.Tensor:
        """(N, 3) (tile, row, col) of the prunable tokens of ``layout`` (T,): the base grid
        (tile 0), then the unpadded tile grid (tile 1), row-major, one newline per row."""
        import torch

        base, rest = layout[: side * side], layout[side * side :]
        if not torch.equal(base, torch.arange(side * side)):
            raise RuntimeError("llava_next layout: the base crop's patches do not come first")
        coords = [grid_coords(side, side, tile=0)]
        rows = int((rest < 0).sum())
        if rest.numel():
            grid = rest.view(rows, -1)  # (R, C + 1): each row ends with its newline
            if not (bool((grid[:, -1] < 0).all()) and bool((grid[:, :-1] >= 0).all())):
                raise RuntimeError("llava_next layout: tile rows do not end with one newline")
            coords.append(grid_coords(rows, grid.shape[1] - 1, tile=1))
        return torch.cat(coords)

    def prepare(self, sample: Sample) -> Prepared:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        if config.vision_feature_select_strategy != "default":
            raise ValueError(
                "the llava_next adapter supports vision_feature_select_strategy='default'"
            )
        prompt = self.spec.prompt_template.format(question=sample.question)
        batch = self.processor(
            images=Image.fromarray(np.asarray(sample.image)), text=prompt, return_tensors="pt"
        )
        input_ids = batch["input_ids"].to(self.device)
        image_sizes = batch["image_sizes"]  # (1, 2) original (H, W)
        vision = config.vision_config
        crops = image_size_to_num_patches(
            image_sizes[0], config.image_grid_pinpoints, vision.image_size
        )
        layout = self._layout(image_sizes, crops)  # (T,) source patch, -1: newline
        placeholders = self._check_placeholders(input_ids, layout.numel())
        is_visual = (layout >= 0).to(self.device)
        side = vision.image_size // vision.patch_size
        return Prepared(
            input_ids=input_ids,
            pixel_values=batch["pixel_values"].to(self.device, self.model.dtype),
            visual_positions=placeholders[is_visual],
            coords=self._coords(layout, side).to(self.device),
            extra={
                "image_sizes": image_sizes.to(self.device),
                "crops": crops,
                "is_visual": is_visual,
                "source": layout[layout >= 0].to(self.device),
                "newline_positions": placeholders[~is_visual],
            },
        )

    def vision_signals(self, prepared: Prepared, wanted: frozenset[str]) -> VisionSignals:
        """Projected base + tile tokens (N, D) (newlines left out); CLS attention (N,) and
        head-mean keys (N, hd) of each crop at the feature layer, gathered like the features."""
        import torch

        config = self.model.config
        layer = self._feature_layer()
        captured: dict[str, torch.Tensor] = {}
        hooks = []
        if wanted & {"cls_attention", "key_metric"}:
            attention = self._vision_attention()[layer]
            for name in ("q_proj", "k_proj"):
                hooks.append(
                    getattr(attention, name).register_forward_hook(
                        lambda _m, _i, out, name=name: captured.__setitem__(name, out)
                    )
                )
        try:
            features = self.model.model.get_image_features(
                pixel_values=prepared.pixel_values,
                image_sizes=prepared.extra["image_sizes"],
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            ).pooler_output[0]  # (T, D) with the newlines
        finally:
            for hook in hooks:
                hook.remove()
        signals = VisionSignals(
            tokens=features[prepared.extra["is_visual"]], coords=prepared.coords
        )
        if not hooks:
            return signals
        attention = self._vision_attention()[layer]
        heads = attention.num_heads
        source = prepared.extra["source"]

        def split(x: torch.Tensor) -> torch.Tensor:  # (C, S, H * hd) -> (C, H, S, hd)
            return x.view(*x.shape[:2], heads, -1).transpose(1, 2).float()

        keys = split(captured["k_proj"])
        if "cls_attention" in wanted:
            query = split(captured["q_proj"][:, :1])  # (C, H, 1, hd) the CLS query
            scaling = getattr(attention, "scaling", None) or attention.scale
            rows = torch.softmax(query @ keys.transpose(-1, -2) * scaling, dim=-1)  # (C,H,1,S)
            per_patch = rows[:, :, 0, 1:].mean(dim=1)  # (C, P) head mean, CLS dropped
            # one CLS row per crop: divided by the crop count, the values are a share of one
            # softmax row (a uniform scale: rankings are the raw attention's)
            signals.cls_attention = per_patch.reshape(-1)[source] / per_patch.shape[0]
        if "key_metric" in wanted:
            per_patch = keys[:, :, 1:].mean(dim=1)  # (C, P, hd)
            signals.key_metric = per_patch.reshape(-1, per_patch.shape[-1])[source]
        return signals

    def vision_flops(self, prepared: Prepared) -> float:
        return vision_flops(self.model.config, prepared.extra["crops"])

    def _sequence(
        self, prepared: Prepared, visual_tokens: torch.Tensor, kept: torch.Tensor | None
    ) -> LLMInput:
        """Kept tokens on the placeholders of their anchors (original order), every newline in
        place with ``image_newline``, the other placeholders removed; contiguous positions."""
        import torch

        ids = prepared.input_ids[0]
        placeholders = prepared.visual_positions
        if kept is None:
            if visual_tokens.shape[0] != placeholders.numel():
                raise ValueError("visual tokens without `kept` must be one per placeholder")
            kept = torch.arange(placeholders.numel(), device=placeholders.device)
        kept = kept.to(placeholders.device)
        order = torch.argsort(kept)
        kept, visual_tokens = kept[order], visual_tokens[order.to(visual_tokens.device)]
        if kept.numel() > 1 and not bool((kept[1:] > kept[:-1]).all()):
            raise ValueError("`kept` must anchor each visual token on a distinct input token")
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[placeholders] = False
        keep[placeholders[kept]] = True
        new_index = torch.cumsum(keep, dim=0) - 1  # position of each kept token in L'
        embeds = self.model.get_input_embeddings()(ids[keep][None]).clone()  # (1, L', D)
        visual_positions = new_index[placeholders[kept]]
        newlines = new_index[prepared.extra["newline_positions"]]
        embeds[0, visual_positions] = visual_tokens.to(embeds.dtype)
        embeds[0, newlines] = self.model.model.image_newline.to(embeds.dtype)
        return LLMInput(inputs_embeds=embeds, visual_positions=visual_positions)


def adapter_class(family: str) -> type[VLMAdapter]:
    return LlavaNextAdapter
