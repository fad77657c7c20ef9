"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP encoder with CLS, MLP projector, Llama.

Visual tokens are the N = (image_size / patch_size)^2 patch features of the encoder layer
``vision_feature_layer`` (CLS dropped by the ``default`` strategy), projected into the LLM's
embedding space and scattered over N ``<image>`` placeholders in the prompt.

transformers (and the word-level tokenizer) are imported by the functions that build or load a
model, not with the module: :func:`model_info` reads the config it is given, so a sweep is
planned without the model library's model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from prunelab.methods.base import VisionSignals
from prunelab.workers.adapters.base import (
    TINY_TEXT,
    TINY_VISION,
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
    import torch
    from transformers import LlavaConfig, LlavaNextConfig, LlavaProcessor

__all__ = [
    "LlavaAdapter",
    "adapter_class",
    "build_tiny",
    "from_pretrained",
    "model_info",
    "tiny_config",
]

TINY_DEFAULTS: dict[str, Any] = {
    "vision": {**TINY_VISION, "image_size": 48, "patch_size": 4},
    "text": TINY_TEXT,
}


def _image_processor(image_size: int):
    try:
        from transformers import CLIPImageProcessorPil as processor_cls
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as processor_cls
    return processor_cls(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def tiny_config(spec: ModelSpec) -> LlavaConfig:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from prunelab.workers.text import IMAGE_TOKEN, build_word_tokenizer

    overrides = spec.tiny
    vision = {**TINY_DEFAULTS["vision"], **overrides.get("vision", {})}
    tokenizer = build_word_tokenizer(shapes_vocabulary())
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=tiny_text_config(LlamaConfig, spec, TINY_DEFAULTS["text"], tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=overrides.get("vision_feature_layer", -2),
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def model_info(config: LlavaConfig, revision: str, processor: dict | None = None) -> ModelInfo:
    vision, text = config.vision_config, config.text_config
    per_side = vision.image_size // vision.patch_size
    n_visual = per_side * per_side
    if config.vision_feature_select_strategy == "full":
        n_visual += 1
    return ModelInfo.from_text_config("llava", text, n_visual, revision, vision_flops(config))


def vision_flops(config: LlavaConfig | LlavaNextConfig) -> float:
    """Exact FLOPs (2 per multiply-add) of the CLIP tower and projector for one image (crop):
    :func:`~prunelab.workers.cost.vit_flops` over the patches + CLS, and the projector
    (d -> D -> D) over the features it keeps (patches, plus CLS with the ``full`` strategy)."""
    vision, text = config.vision_config, config.text_config
    patches = (vision.image_size // vision.patch_size) ** 2
    encoder = vit_flops(
        patches,
        vision.num_channels * vision.patch_size**2,
        vision.hidden_size,
        vision.intermediate_size,
        vision.num_hidden_layers,
    )
    features = patches + (1 if config.vision_feature_select_strategy == "full" else 0)
    return encoder + projector_flops(features, vision.hidden_size, text.hidden_size)


def build_tiny(spec: ModelSpec, config: LlavaConfig) -> tuple[torch.nn.Module, LlavaProcessor]:
    """A randomly initialised LLaVA from ``config`` (seeded) and its word-level processor."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from prunelab.workers.text import build_word_tokenizer

    model = seeded_model(LlavaForConditionalGeneration, spec, config)
    tokenizer = build_word_tokenizer(shapes_vocabulary())
    processor = LlavaProcessor(
        image_processor=_image_processor(config.vision_config.image_size),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    return model, processor


def from_pretrained(spec: ModelSpec, dtype: torch.dtype, device: torch.device):
    """Load weights and processor from a hub id or a local directory."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model = pretrained_model(LlavaForConditionalGeneration, spec, dtype, device)
    processor = LlavaProcessor.from_pretrained(spec.path, revision=spec.revision, **spec.processor)
    return model, processor


class LlavaAdapter(VLMAdapter):
    family = "llava"
    batches = True  # fixed resolution, 1-D RoPE: left-padded batches

    def _vision_attention(self) -> list[torch.nn.Module]:
        return [layer.self_attn for layer in self.model.model.vision_tower.encoder.layers]

    def prepare(self, sample: Sample) -> Prepared:
        if self.model.config.vision_feature_select_strategy != "default":
            raise ValueError("the llava adapter supports vision_feature_select_strategy='default'")
        prompt = self.spec.prompt_template.format(question=sample.question)
        batch = self.processor(
            images=Image.fromarray(np.asarray(sample.image)), text=prompt, return_tensors="pt"
        )
        input_ids = batch["input_ids"].to(self.device)
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return Prepared(
            input_ids=input_ids,
            pixel_values=batch["pixel_values"].to(self.device, self.model.dtype),
            visual_positions=self._check_placeholders(input_ids, side * side),
            coords=grid_coords(side, side, device=self.device),
        )

    def vision_signals(self, prepared: Prepared, wanted: frozenset[str]) -> VisionSignals:
        """Projected patch tokens; CLS attention and keys at the feature layer (CLS dropped)."""
        import torch

        config = self.model.config
        layer = feature_attention_layer(
            config.vision_feature_layer, config.vision_config.num_hidden_layers
        )
        queries = torch.tensor([0]) if "cls_attention" in wanted else None
        with self.probe_vision(layer, queries=queries, keys="key_metric" in wanted) as probe:
            features = self.model.model.get_image_features(
                pixel_values=prepared.pixel_values,
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            ).pooler_output
        signals = VisionSignals(tokens=features[0], coords=prepared.coords)  # (N, D)
        if queries is not None:
            signals.cls_attention = probe.rows[layer][:, 0, 1:].mean(dim=0)  # (N,)
        if "key_metric" in wanted:
            signals.key_metric = probe.key_states[layer][:, 1:].float().mean(dim=0)  # (N, hd)
        return signals

    def vision_flops(self, prepared: Prepared) -> float:
        return self.info.vision_flops


def adapter_class(family: str) -> type[VLMAdapter]:
    return LlavaAdapter
