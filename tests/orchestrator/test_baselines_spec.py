"""The shipped baseline specs (baselines*.yaml) validate and expand to the papers' budgets.

Their models are pretrained hub checkpoints, and validation reads each model's hub config
(``describe_model`` -> ``AutoConfig.from_pretrained``), which tests cannot download. So the
specs are validated as copies in a temporary directory next to copies of their model configs
whose ``path`` is a local directory holding a ``config.json`` written by the transformers config
classes with the checkpoints' shapes (config groups are looked up in the spec's directory first).
``model.path`` cannot be overridden on the command line: ``model`` is a grid axis naming config
files, not a config tree.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

import prunelab.methods as M
from prunelab.orchestrator.spec import SWEEPS_DIR, SweepPlan, load_sweep

BASELINES = ("random", "fastv", "pdrop", "sparsevlm", "visionzip", "tome", "divprune",
             "prumerge_plus")  # fmt: skip
LLAVA_TOKENS = (192, 128, 64)
RATIOS = (0.5, 0.25)
HAS_SGP = (SWEEPS_DIR / "baselines-sgp.yaml").is_file() and "sgp" in M.available()


# -- local copies of the checkpoints' configs ------------------------------------------------
def _llava_config(text: dict[str, Any]):
    """llava-hf/llava-1.5-{7,13}b-hf: CLIP ViT-L/14 at 336 px (576 patches), Vicuna LLM."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
            num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
        ),
        text_config=LlamaConfig(vocab_size=32064, max_position_embeddings=4096, **text),
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )  # fmt: skip


def _qwen2_vl_config():
    """Qwen/Qwen2-VL-7B-Instruct: 32-block ViT (1280 wide), 2x2 merger, Qwen2-7B LLM."""
    from transformers import Qwen2VLConfig, Qwen2VLTextConfig, Qwen2VLVisionConfig

    return Qwen2VLConfig(
        vision_config=Qwen2VLVisionConfig(
            depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
        ),
        text_config=Qwen2VLTextConfig(
            hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "mrope_section": [16, 24, 24]},
        ),
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


CHECKPOINTS = {
    "llava-1.5-7b": lambda: _llava_config(
        {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32}
    ),
    "llava-1.5-13b": lambda: _llava_config(
        {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
         "num_attention_heads": 40, "num_key_value_heads": 40}
    ),
    "qwen2-vl-7b": _qwen2_vl_config,
    "internvl3-8b": _internvl3_config,
}  # fmt: skip

# (layers, visual tokens of the nominal image) the local configs must describe
SHAPES = {
    "llava-1.5-7b": (32, 576),
    "llava-1.5-13b": (40, 576),
    "qwen2-vl-7b": (28, 256),  # 48 x 48 nominal image raised to min_pixels = 448^2: 16 x 16
    "internvl3-8b": (28, 1280),  # 2 x 2 tiles + thumbnail, 256 tokens each
}


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The baseline specs and their model configs, each model's `path` a local config dir."""
    root = tmp_path_factory.mktemp("baseline-specs")
    (root / "model").mkdir()
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
    for spec in SWEEPS_DIR.glob("baselines*.yaml"):
        shutil.copy(spec, root / spec.name)
    return root


def _load(spec_dir: Path, spec: str, overrides: tuple[str, ...] = ()) -> SweepPlan:
    return load_sweep(str(spec_dir / f"{spec}.yaml"), list(overrides))


def _budgets(plan: SweepPlan, model: str, method: str, axis: str) -> list[Any]:
    """The ``axis`` values of the trials of ``method`` on ``model``, in trial order."""
    return [getattr(t, axis) for t in plan.trials if t.model == model and t.method == method]


def _check_common(plan: SweepPlan, methods: tuple[str, ...], models: tuple[str, ...]) -> None:
    assert len({t.key for t in plan.trials}) == len(plan.trials)
    assert {t.method for t in plan.trials} == {"none", *methods}
    assert {t.model for t in plan.trials} == set(models)
    assert {t.benchmark for t in plan.trials} == {"shapes"}
    for model in models:
        group = [t for t in plan.trials if t.model == model]
        assert group[0].is_baseline and group[0].method == "none"  # the reference comes first
        assert sum(t.is_baseline for t in group) == 1
        info = plan.model_infos[model]
        assert (info.n_layers, info.n_visual) == SHAPES[model]
        assert plan.models[model]["source"] == "pretrained"
    assert plan.workers["gpus_per_worker"] >= 1  # 7B models: a GPU per worker


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_local_configs_keep_the_shipped_model_settings(spec_dir: Path, name: str) -> None:
    shipped = SWEEPS_DIR / "model" / f"{name}.yaml"
    if not shipped.is_file():
        pytest.skip(f"no shipped model config {name}")
    copy = yaml.safe_load((spec_dir / "model" / f"{name}.yaml").read_text())
    original = yaml.safe_load(shipped.read_text())
    assert {k: v for k, v in copy.items() if k != "path"} == {
        k: v for k, v in original.items() if k != "path"
    }


def test_llava_baselines_keep_192_128_64_tokens(spec_dir: Path) -> None:
    plan = _load(spec_dir, "baselines")
    assert plan.name == "baselines"
    _check_common(plan, BASELINES, ("llava-1.5-7b",))
    assert len(plan.trials) == 1 + len(BASELINES) * len(LLAVA_TOKENS)  # 25
    for method in BASELINES:
        assert _budgets(plan, "llava-1.5-7b", method, "keep_tokens") == list(LLAVA_TOKENS)
        assert _budgets(plan, "llava-1.5-7b", method, "keep_ratio") == [None] * 3
    by_method = {t.method: t for t in plan.trials}
    assert by_method["fastv"].prune_layer == 2  # the method's default K
    assert by_method["random"].prune_layer == 0  # the vision stage
    assert by_method["random"].seed == 0


def test_ratio_baselines_keep_half_and_quarter(spec_dir: Path) -> None:
    plan = _load(spec_dir, "baselines-ratio")
    assert plan.name == "baselines-ratio"
    models = ("qwen2-vl-7b", "internvl3-8b")
    _check_common(plan, BASELINES, models)
    assert len(plan.trials) == len(models) * (1 + len(BASELINES) * len(RATIOS))  # 34
    for model in models:
        for method in BASELINES:
            assert _budgets(plan, model, method, "keep_ratio") == list(RATIOS)
            assert _budgets(plan, model, method, "keep_tokens") == [None] * 2


@pytest.mark.skipif(not HAS_SGP, reason="no sgp method or no baselines-sgp.yaml")
def test_sgp_runs_guided_on_llava_13b(spec_dir: Path) -> None:
    plan = _load(spec_dir, "baselines-sgp")
    _check_common(plan, ("sgp",), ("llava-1.5-13b",))
    assert len(plan.trials) == 1 + len(LLAVA_TOKENS)
    assert _budgets(plan, "llava-1.5-13b", "sgp", "keep_tokens") == list(LLAVA_TOKENS)
    for trial in plan.trials:
        if trial.method == "sgp":
            assert trial.guidance_config["name"] == "llava-1.5-7b"
            assert trial.guidance_config["path"] == str(spec_dir / "checkpoints/llava-1.5-7b")


def test_same_trials_as_the_shipped_spec_on_tiny_models() -> None:
    """The shipped files themselves (not copies) compose, with the models swapped for tiny ones
    (the budget axes are the specs' own)."""
    plan = load_sweep("baselines", ["model=tiny-llava", "keep_tokens=96,48"])
    assert len(plan.trials) == 1 + len(BASELINES) * 2
    ratio = load_sweep("baselines-ratio", ["model=tiny-llava"])
    assert len(ratio.trials) == 1 + len(BASELINES) * len(RATIOS)
    assert {t.keep_ratio for t in ratio.trials if not t.is_baseline} == set(RATIOS)
