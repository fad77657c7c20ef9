"""Local, config-only copies of the pretrained checkpoints the shipped sweep specs name.

Validating a spec reads each model's hub config (``describe_model`` ->
``AutoConfig.from_pretrained``), which tests cannot download. :func:`write_local_models` writes,
next to a spec copied into a temporary directory, the shipped model configs (``model/*.yaml``)
with their ``path`` replaced by a local directory holding a ``config.json`` made by the
transformers config classes with the checkpoint's shapes (no weights). Config groups are looked
up in the spec's directory first, so the copies win over the shipped files.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from prunelab.orchestrator.spec import SWEEPS_DIR

__all__ = ["CHECKPOINTS", "SHAPES", "local_spec_dir", "write_local_models"]

# CLIP ViT-L/14 at 336 px (576 patches), the vision tower of LLaVA-1.5 and LLaVA-NeXT
_CLIP_L_336 = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768,
}  # fmt: skip
_VICUNA_7B = {
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32,
}  # fmt: skip
_VICUNA_13B = {
    "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
    "num_attention_heads": 40, "num_key_value_heads": 40,
}  # fmt: skip
_QWEN2_7B = {
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                        "mrope_section": [16, 24, 24]},
}  # fmt: skip


def _llava_config(text: dict[str, Any]):
    """llava-hf/llava-1.5-{7,13}b-hf: CLIP ViT-L/14 at 336 px, Vicuna LLM."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(**_CLIP_L_336),
        text_config=LlamaConfig(vocab_size=32064, max_position_embeddings=4096, **text),
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def _llava_next_config():
    """llava-hf/llava-v1.6-vicuna-7b-hf: CLIP ViT-L/14 at 336 px on a base crop plus up to
    2 x 2 tiles (pinpoints up to 672 x 672), Vicuna-7B LLM."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_CLIP_L_336),
        text_config=LlamaConfig(vocab_size=32064, max_position_embeddings=4096, **_VICUNA_7B),
        image_token_index=32000,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=576,
    )


def _qwen2_vl_config():
    """Qwen/Qwen2-VL-7B-Instruct: 32-block ViT (1280 wide), 2x2 merger, Qwen2-7B LLM."""
    from transformers import Qwen2VLConfig, Qwen2VLTextConfig, Qwen2VLVisionConfig

    return Qwen2VLConfig(
        vision_config=Qwen2VLVisionConfig(
            depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
        ),
        text_config=Qwen2VLTextConfig(**_QWEN2_7B),
        image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653,
    )  # fmt: skip


def _qwen2_5_vl_config():
    """Qwen/Qwen2.5-VL-7B-Instruct: 32-block windowed ViT (1280 wide, full attention in blocks
    7, 15, 23, 31), 2x2 merger, Qwen2.5-7B LLM."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
    )

    return Qwen2_5_VLConfig(
        vision_config=Qwen2_5_VLVisionConfig(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31],
        ),
        text_config=Qwen2_5_VLTextConfig(**_QWEN2_7B),
        image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653,
    )  # fmt: skip


def _internvl3_config():
    """OpenGVLab/InternVL3-8B-hf: InternViT-300M on 448 px tiles (256 tokens each after pixel
    shuffle), Qwen2.5-7B LLM."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    return InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
            num_attention_heads=16, image_size=[448, 448], patch_size=[14, 14],
        ),
        text_config=Qwen2Config(
            hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, vocab_size=151674,
            max_position_embeddings=32768, tie_word_embeddings=False,
        ),
        image_token_id=151667,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )  # fmt: skip


CHECKPOINTS: dict[str, Callable[[], Any]] = {
    "llava-1.5-7b": lambda: _llava_config(_VICUNA_7B),
    "llava-1.5-13b": lambda: _llava_config(_VICUNA_13B),
    "llava-next-7b": _llava_next_config,
    "qwen2-vl-7b": _qwen2_vl_config,
    "qwen2.5-vl-7b": _qwen2_5_vl_config,
    "internvl3-8b": _internvl3_config,
}
"""Shipped model config name -> the transformers config of its checkpoint."""

SHAPES: dict[str, tuple[int, int]] = {
    "llava-1.5-7b": (32, 576),
    "llava-1.5-13b": (40, 576),
    "llava-next-7b": (32, 2880),  # 672 x 672 nominal image: 576 base + 48 x 48 tile tokens
    "qwen2-vl-7b": (28, 256),  # 48 x 48 nominal image raised to min_pixels = 448^2: 16 x 16
    "qwen2.5-vl-7b": (28, 256),  # the same processor limits
    "internvl3-8b": (28, 1280),  # 2 x 2 tiles + thumbnail, 256 tokens each
}
"""(decoder layers, visual tokens of the nominal image) the local configs must describe."""


def write_local_models(root: Path) -> None:
    """Write ``root/model/<name>.yaml`` for every shipped model of :data:`CHECKPOINTS`, its
    ``path`` a local config directory under ``root/checkpoints``."""
    (root / "model").mkdir(parents=True, exist_ok=True)
    for name, make in CHECKPOINTS.items():
        shipped = SWEEPS_DIR / "model" / f"{name}.yaml"
        if not shipped.is_file():
            continue
        checkpoint = root / "checkpoints" / name
        make().save_pretrained(checkpoint)
        model = yaml.safe_load(shipped.read_text())
        assert model["source"] == "pretrained"
        model["path"] = str(checkpoint)
        (root / "model" / f"{name}.yaml").write_text(yaml.safe_dump(model, sort_keys=False))


def local_spec_dir(root: Path, pattern: str) -> Path:
    """``root`` holding the shipped specs matching ``pattern`` (e.g. ``paper_*.yaml``) and the
    local copies of their model configs; returns ``root``."""
    write_local_models(root)
    for spec in SWEEPS_DIR.glob(pattern):
        shutil.copy(spec, root / spec.name)
    return root
