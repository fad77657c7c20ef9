"""The shipped baseline specs (baselines*.yaml) validate and expand to the papers' budgets.

Their models are pretrained hub checkpoints, and validation reads each model's hub config
(``describe_model`` -> ``AutoConfig.from_pretrained``), which tests cannot download. So the
specs are validated as copies in a temporary directory next to copies of their model configs
whose ``path`` is a local directory holding a ``config.json`` written by the transformers config
classes with the checkpoints' shapes (``checkpoint_configs``; config groups are looked up in the
spec's directory first). ``model.path`` cannot be overridden on the command line: ``model`` is a
grid axis naming config files, not a config tree. The paper specs: ``test_paper_specs.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from checkpoint_configs import CHECKPOINTS, SHAPES, local_spec_dir

import prunelab.methods as M
from prunelab.orchestrator.spec import SWEEPS_DIR, SweepPlan, load_sweep

BASELINES = ("random", "fastv", "pdrop", "sparsevlm", "visionzip", "tome", "divprune",
             "prumerge_plus")  # fmt: skip
LLAVA_TOKENS = (192, 128, 64)
RATIOS = (0.5, 0.25)
HAS_SGP = (SWEEPS_DIR / "baselines-sgp.yaml").is_file() and "sgp" in M.available()


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The baseline specs and their model configs, each model's `path` a local config dir."""
    return local_spec_dir(tmp_path_factory.mktemp("baseline-specs"), "baselines*.yaml")


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
    assert plan.workers.gpus_per_worker >= 1  # 7B models: a GPU per worker


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
