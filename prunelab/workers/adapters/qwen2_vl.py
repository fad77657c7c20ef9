"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``): dynamic-resolution ViT, 2x2 patch merger, M-RoPE LLM.

Layout. The processor resizes an image to multiples of ``patch_size * merge_size`` (within its
pixel limits), cuts it into an (h, w) grid of patches (``image_grid_thw`` = (1, h, w) for an
image) and orders the patches so that each merge x merge window is consecutive, windows in
row-major order. The merger turns every window into one token: N = (h / m) * (w / m) visual
tokens (no CLS), row-major on the merged grid, scattered over N ``<|image_pad|>`` placeholders
between ``<|vision_start|>`` and ``<|vision_end|>``. Qwen2.5-VL's encoder additionally permutes
the merge windows into attention windows (``window_index``) for all its blocks and undoes the
permutation after the merger; its ``fullatt_block_indexes`` blocks attend over the whole image,
the others within a window.

Positions. The LLM uses M-RoPE: position ids (3, 1, L) = (temporal, height, width) rows, computed
once for the full unpruned prompt with the model's own ``get_rope_index``. A vision stage keeps
the columns of the kept tokens (each kept visual token keeps its original 3-D position, text its
own); the t-th generated token fed back gets max position + t in all rows (what transformers'
``rope_deltas`` gives). Renumbering at a layer stage (``positions="renumber"``) rebuilds cos/sin
from 1-D ids expanded to all three rows: from that layer on, M-RoPE collapses to plain 1-D RoPE.
Batched (``eval.batch_size``): each sample's (3, L_b) rows, left-padded into (3, B, L), its
own next position when decoding (its max + t), its own grid and budget
(:mod:`prunelab.workers.batched`).

Signals (at ``vision_signal_layer``, default the last encoder block, whose output the merger
projects): ``cls_attention`` = attention each patch receives, head mean, averaged over all the
image's query patches (0 from queries outside its window in a windowed block), then averaged
over the merge x merge patches of each token; ``key_metric`` = head-mean keys averaged the same
way. Both are mapped back from the encoder's (window-permuted) order to merged-token order.

Nominal image (``ModelInfo.n_visual`` / ``vision_flops``): a 48 x 48 image (the ``shapes``
benchmark) resized under the processor's default pixel limits, i.e. min 56^2 / max 28^2 * 1280
pixels at patch size 14, scaled to the model's patch size: 6 x 6 = 36 tokens for the tiny
models (patch 4), 2 x 2 = 4 for the 7B models (patch 14). Per-sample counts come from the
processor (``prepare``) and ``vision_flops(prepared)``.

transformers is imported by the functions that need it, not with the module: the config classes
by :func:`tiny_config`, the model and processor classes (which load the model code) where a
model is built or loaded, the processor's ``smart_resize`` by :func:`nominal_grid`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from prunelab.methods.base import VisionSignals
from prunelab.workers.adapters.base import (
    TINY_TEXT,
    LLMInput,
    Prepared,
    VLMAdapter,
    grid_coords,
)
from prunelab.workers.attention import wrap_attention
from prunelab.workers.benchmarks.base import Sample
from prunelab.workers.benchmarks.shapes import shapes_vocabulary
from prunelab.workers.models import ModelInfo, ModelSpec

__all__ = [
    "NOMINAL_IMAGE",
    "Qwen2VLAdapter",
    "Qwen2_5_VLAdapter",
    "adapter_class",
    "build_tiny",
    "from_pretrained",
    "model_info",
    "nominal_grid",
    "pixel_limits",
    "tiny_config",
    "vision_flops",
]

NOMINAL_IMAGE = (48, 48)  # (height, width) of the image ModelInfo describes
SPECIAL_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}

_PATCHES: dict[str, Any] = {"patch_size": 4, "temporal_patch_size": 2, "spatial_merge_size": 2}
TINY_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2_vl": {
        "vision": {"depth": 2, "embed_dim": 32, "num_heads": 4, "mlp_ratio": 2, **_PATCHES},
        "text": TINY_TEXT,
    },
    "qwen2_5_vl": {
        "vision": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 4,
            **_PATCHES,
            # windows of 4 x 4 merged tokens: a 6 x 6 grid splits into 4 x 4, 4 x 2, 2 x 4, 2 x 2
            "window_size": 32,
            "fullatt_block_indexes": [1],
        },
        "text": TINY_TEXT,
    },
}


def _config_classes(family: str) -> tuple[type, type, type]:
    """(config, vision config, text config) classes of ``family``."""
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig

        return Qwen2_5_VLConfig, Qwen2_5_VLVisionConfig, Qwen2_5_VLTextConfig
    from transformers import Qwen2VLConfig, Qwen2VLTextConfig, Qwen2VLVisionConfig

    return Qwen2VLConfig, Qwen2VLVisionConfig, Qwen2VLTextConfig


def _model_class(family: str) -> Any:
    """The model class of ``family`` (imports transformers' model code)."""
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration


def _processor_class(family: str) -> Any:
    """The image-only processor class of ``family`` (imports transformers' model code)."""
    from prunelab.workers.adapters import _processors

    if family == "qwen2_5_vl":
        return _processors.ImageOnlyQwen2_5_VLProcessor
    return _processors.ImageOnlyQwen2VLProcessor


def _family(config) -> str:
    return "qwen2_5_vl" if config.model_type == "qwen2_5_vl" else "qwen2_vl"


def _mrope_section(head_dim: int) -> list[int]:
    """(temporal, height, width) split of the head_dim / 2 rotary frequencies, Qwen's 1:1.5:1.5."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def pixel_limits(patch_size: int, processor: dict | None = None) -> tuple[int, int]:
    """(min_pixels, max_pixels): the processor's defaults, 56^2 and 28^2 * 1280 at patch 14,
    scaled to ``patch_size`` (same limits in patches), unless ``processor`` overrides them."""
    processor = processor or {}
    low = processor.get("min_pixels", (4 * patch_size) ** 2)
    high = processor.get("max_pixels", (2 * patch_size) ** 2 * 1280)
    return int(low), int(high)


def nominal_grid(config, processor: dict | None = None) -> torch.Tensor:
    """(1, 3) image_grid_thw of the nominal image (:data:`NOMINAL_IMAGE`) under the default
    pixel limits or the ``min_pixels`` / ``max_pixels`` of the model config's ``processor``."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    vision = config.vision_config
    low, high = pixel_limits(vision.patch_size, processor)
    factor = vision.patch_size * vision.spatial_merge_size
    height, width = smart_resize(*NOMINAL_IMAGE, factor=factor, min_pixels=low, max_pixels=high)
    return torch.tensor([[1, height // vision.patch_size, width // vision.patch_size]])


def tiny_config(spec: ModelSpec):
    """The tiny model's config: ``TINY_DEFAULTS[family]`` updated by ``spec.tiny``."""
    config_cls, vision_cls, text_cls = _config_classes(spec.family)
    defaults = TINY_DEFAULTS[spec.family]
    vision = {**defaults["vision"], **spec.tiny.get("vision", {})}
    text = {**defaults["text"], **spec.tiny.get("text", {})}
    tokenizer = _tokenizer()
    text.setdefault("vocab_size", len(tokenizer))
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text.setdefault(
        "rope_parameters",
        {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim)},
    )
    # the merger projects into the LLM's width
    vision["out_hidden_size" if spec.family == "qwen2_5_vl" else "hidden_size"] = text[
        "hidden_size"
    ]
    ids = {
        f"{name.removesuffix('_token')}_token_id": tokenizer.convert_tokens_to_ids(token)
        for name, token in SPECIAL_TOKENS.items()
    }
    return config_cls(
        vision_config=vision_cls(**vision),
        text_config=text_cls(
            **text,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        **ids,
    )


def model_info(config, revision: str, processor: dict | None = None) -> ModelInfo:
    """Shapes and costs; ``n_visual`` / ``vision_flops`` for the nominal image."""
    text, vision = config.text_config, config.vision_config
    grid = nominal_grid(config, processor)
    return ModelInfo.from_text_config(
        _family(config),
        text,
        int(grid.prod()) // vision.spatial_merge_size**2,
        revision,
        vision_flops(config, grid),
    )


def _lengths(cu_seqlens: torch.Tensor) -> list[int]:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()


def vision_flops(config, grid_thw: torch.Tensor) -> float:
    """Exact FLOPs (2 per multiply-add) of the vision tower and merger for images ``grid_thw``
    (I, 3) (t, h, w patches each).

    With n patches of width e: patch embedding (a Conv3d, i.e. a linear over C*T*p*p inputs)
    2n(CTp^2)e; per block qkv 6ne^2 + proj 2ne^2 + attention scores and values 4s^2e for each
    chunk of s patches attending together (one per frame; a window in Qwen2.5-VL's windowed
    blocks) + MLP 4nem (Qwen2-VL fc1/fc2, m = mlp_ratio * e) or 6nem (Qwen2.5-VL gate/up/down);
    merger (merge size m): n / m^2 rows through linears m^2 e -> m^2 e -> D. Rotary embeddings
    and norms have no matmul.
    """
    vision = config.vision_config
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

    qwen25 = _family(config) == "qwen2_5_vl"
    grid_thw = grid_thw.cpu()
    n = int(grid_thw.prod(dim=-1).sum())
    p, t_p, merge = vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size
    if qwen25:
        width, out = vision.hidden_size, vision.out_hidden_size
        mlp = 6 * n * width * vision.intermediate_size
        _, cu_windows = get_vision_window_index(grid_thw, merge, vision.window_size, p)
        windows = _lengths(cu_windows)
    else:
        width, out = vision.embed_dim, vision.hidden_size
        mlp = 4 * n * width * int(width * vision.mlp_ratio)
    full = _lengths(get_vision_cu_seqlens(grid_thw))
    total = 2 * n * vision.in_channels * t_p * p * p * width
    for block in range(vision.depth):
        chunks = full if not qwen25 or block in vision.fullatt_block_indexes else windows
        total += 8 * n * width * width + mlp + sum(4 * s * s * width for s in chunks)
    rows, merged = n // merge**2, width * merge**2
    total += 2 * rows * merged * merged + 2 * rows * merged * out
    return float(total)


def _tokenizer():
    from prunelab.workers.text import build_word_tokenizer

    return build_word_tokenizer(shapes_vocabulary(), extra_special_tokens=SPECIAL_TOKENS)


def _image_processor_class():
    try:
        from transformers import Qwen2VLImageProcessorPil as processor_cls
    except ImportError:  # older transformers
        from transformers import Qwen2VLImageProcessor as processor_cls
    return processor_cls


def build_tiny(spec: ModelSpec, config) -> tuple[torch.nn.Module, Any]:
    """A randomly initialised model from ``config`` (seeded) and its word-level processor."""
    torch.manual_seed(spec.seed)
    config.text_config._attn_implementation = spec.attn_implementation
    config.vision_config._attn_implementation = spec.attn_implementation
    model = _model_class(spec.family)(config)
    vision = config.vision_config
    low, high = pixel_limits(vision.patch_size, spec.processor)
    image_processor = _image_processor_class()(
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
        min_pixels=low,
        max_pixels=high,
    )
    processor = _processor_class(spec.family)(
        image_processor=image_processor, tokenizer=_tokenizer()
    )
    return model, processor


def from_pretrained(spec: ModelSpec, dtype: torch.dtype, device: torch.device):
    """Load weights and processor from a hub id or a local directory."""
    model = (
        _model_class(spec.family)
        .from_pretrained(
            spec.path,
            revision=spec.revision,
            dtype=dtype,
            attn_implementation=spec.attn_implementation,
        )
        .to(device)
    )
    processor = _processor_class(spec.family).from_pretrained(
        spec.path, revision=spec.revision, **spec.processor
    )
    return model, processor


class Qwen2VLAdapter(VLMAdapter):
    family = "qwen2_vl"
    # left-padded batches: each sample its own grid (visual-token count) and M-RoPE position
    # rows, (3, B, L), and its own next position (max + t) when decoding
    batches = True
    # M-RoPE: a kept token keeps its 3-D (t, h, w) position; packing has no 1-D meaning here
    vision_positions: ClassVar[tuple[str, ...]] = ("original",)
    vision_signal_layer: ClassVar[int] = -1  # encoder block of cls_attention / key_metric

    def _vision_attention(self) -> list[torch.nn.Module]:
        return [block.attn for block in self.model.model.visual.blocks]

    @property
    def _merge(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    def prepare(self, sample: Sample) -> Prepared:
        prompt = self.spec.prompt_template.format(question=sample.question)
        batch = self.processor(
            images=Image.fromarray(np.asarray(sample.image)), text=prompt, return_tensors="pt"
        )
        input_ids = batch["input_ids"].to(self.device)
        grid = batch["image_grid_thw"].to(self.device)  # (1, 3)
        mm_token_type_ids = batch["mm_token_type_ids"].to(self.device)
        _, height, width = (int(v) for v in grid[0])
        rows, cols = height // self._merge, width // self._merge
        position_ids, _ = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=grid
        )  # (3, 1, L)
        return Prepared(
            input_ids=input_ids,
            pixel_values=batch["pixel_values"].to(self.device, self.model.dtype),
            visual_positions=self._check_placeholders(input_ids, rows * cols),
            coords=grid_coords(rows, cols, device=self.device),
            extra={
                "image_grid_thw": grid,
                "mm_token_type_ids": mm_token_type_ids,
                "position_ids": position_ids,
            },
        )

    def _sequence(
        self, prepared: Prepared, visual_tokens: torch.Tensor, kept: torch.Tensor | None
    ) -> LLMInput:
        """Drop the placeholders of unkept tokens; every kept token keeps its M-RoPE position."""
        ids = prepared.input_ids[0]
        placeholders = prepared.visual_positions
        keep = torch.ones_like(ids, dtype=torch.bool)
        if kept is not None:
            kept = kept.to(placeholders.device)
            if kept.numel() > 1 and not bool((kept[1:] > kept[:-1]).all()):
                raise ValueError("`kept` must be strictly increasing (visual tokens in order)")
            keep[placeholders] = False
            keep[placeholders[kept]] = True
        if int(keep[placeholders].sum()) != visual_tokens.shape[0]:
            raise ValueError(
                f"{visual_tokens.shape[0]} visual tokens for {int(keep[placeholders].sum())} "
                "kept placeholders"
            )
        index = keep.nonzero().squeeze(-1)  # (L',) original positions of the kept tokens
        is_visual = torch.zeros_like(keep)
        is_visual[placeholders] = True
        visual_positions = is_visual[index].nonzero().squeeze(-1)  # (M,)
        embeds = self.model.get_input_embeddings()(ids[index][None]).clone()  # (1, L', D)
        embeds[0, visual_positions] = visual_tokens.to(embeds.dtype)
        full = prepared.extra["position_ids"]  # (3, 1, L)
        last = int(full.max())

        def next_position_ids(t: int) -> torch.Tensor:
            return torch.full((3, 1, 1), last + t, dtype=full.dtype, device=full.device)

        return LLMInput(
            inputs_embeds=embeds,
            visual_positions=visual_positions,
            position_ids=full[..., index],
            next_position_ids=next_position_ids,
        )

    def _rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) for renumbered 1-D ``position_ids`` (1, L), the same id in all three
        M-RoPE rows (plain 1-D RoPE)."""
        return self.llm.rotary_emb(hidden, position_ids=position_ids.expand(3, -1, -1))

    def _patch_order(self, grid: torch.Tensor) -> torch.Tensor:
        """(n,) processor-order patch index at each position of the encoder's sequence."""
        return torch.arange(int(grid.prod()), device=self.device)

    @contextlib.contextmanager
    def _probeable_vision(self, probing: bool) -> Iterator[None]:
        """FlashAttention 2 runs the encoder as one packed call, whose probed rows would span
        all windows: run it through probed SDPA (one call per chunk) while probing."""
        config = self.model.config.vision_config
        saved = config._attn_implementation
        if probing and "flash" in (saved or ""):
            config._attn_implementation = wrap_attention("sdpa")
        try:
            yield
        finally:
            config._attn_implementation = saved

    def vision_signals(self, prepared: Prepared, wanted: frozenset[str]) -> VisionSignals:
        """Merged tokens (N, D) in placeholder order; see the module docstring for the rest."""
        grid = prepared.extra["image_grid_thw"]
        if grid.shape[0] != 1 or int(grid[0, 0]) != 1:
            raise ValueError(f"expected one image (image_grid_thw (1, 3), t=1), got {grid}")
        layer = self.vision_signal_layer % len(self.vision_attention_modules)
        queries = "all" if "cls_attention" in wanted else None
        keys = "key_metric" in wanted
        probing = queries is not None or keys
        with (
            self._probeable_vision(probing),
            self.probe_vision(layer, queries=queries, keys=keys, chunks=True) as probe,
        ):
            features = self.model.model.get_image_features(
                pixel_values=prepared.pixel_values, image_grid_thw=grid
            ).pooler_output[0]  # (N, D)
        signals = VisionSignals(tokens=features, coords=prepared.coords)
        if not probing:
            return signals
        order = self._patch_order(grid)  # (n,)
        n, group = order.numel(), self._merge**2

        def merged(values: torch.Tensor) -> torch.Tensor:
            """(n, ...) in encoder order -> (N, ...) mean over each token's patches."""
            original = torch.empty_like(values)
            original[order] = values
            return original.reshape(n // group, group, *values.shape[1:]).mean(dim=1)

        if queries is not None:
            # each chunk (H, s, s): head mean, summed over its queries; / n: mean over all queries
            received = torch.cat([rows.mean(dim=0).sum(dim=0) for rows in probe.rows[layer]])
            signals.cls_attention = merged(received / n)  # (N,)
        if keys:
            key_states = torch.cat(probe.key_states[layer], dim=1)  # (H, n, hd)
            signals.key_metric = merged(key_states.float().mean(dim=0))  # (N, hd)
        return signals

    def vision_flops(self, prepared: Prepared) -> float:
        return vision_flops(self.model.config, prepared.extra["image_grid_thw"])


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"

    def _patch_order(self, grid: torch.Tensor) -> torch.Tensor:
        """Merge windows permuted into attention windows (``window_index``), patches of a
        window consecutive."""
        from transformers.vision_utils import get_vision_window_index

        vision = self.model.config.vision_config
        window_index, _ = get_vision_window_index(
            grid.cpu(), vision.spatial_merge_size, vision.window_size, vision.patch_size
        )
        group = vision.spatial_merge_size**2
        order = window_index[:, None] * group + torch.arange(group)
        return order.reshape(-1).to(self.device)


def adapter_class(family: str) -> type[VLMAdapter]:
    return Qwen2_5_VLAdapter if family == "qwen2_5_vl" else Qwen2VLAdapter
