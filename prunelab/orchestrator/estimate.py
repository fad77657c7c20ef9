"""Analytic compute estimate of a trial before it runs (for ``prunelab sweep --dry-run``)."""

from __future__ import annotations

import functools
import json
from typing import Any

from prunelab.methods.base import PlanContext
from prunelab.workers.cost import trial_flops
from prunelab.workers.models import ModelInfo, describe_model
from prunelab.workers.runner import build_method

__all__ = ["ASSUMED_TEXT_TOKENS", "estimate_tflops", "planned_visual_per_layer"]

ASSUMED_TEXT_TOKENS = 40  # prompt text around the image; the real count is measured per sample


@functools.lru_cache(maxsize=64)
def _info(model_config_json: str) -> ModelInfo:
    return describe_model(json.loads(model_config_json))


def planned_visual_per_layer(config: dict[str, Any], info: ModelInfo) -> list[int]:
    """Visual tokens each LLM layer will see under the trial's plan: (n_layers,)."""
    method, budget = build_method(config)
    plan = method.plan(
        PlanContext(
            n_visual=info.n_visual,
            n_layers=info.n_layers,
            budget=budget,
            prune_layer=config.get("prune_layer"),
            seed=config.get("seed") or 0,
        )
    )
    visual = plan.vision_keep if plan.vision_keep is not None else info.n_visual
    steps = {step.layer: step.keep for step in plan.layers}
    per_layer = []
    for layer in range(info.n_layers):
        visual = min(visual, steps.get(layer, visual))
        per_layer.append(visual)
    return per_layer


def estimate_tflops(config: dict[str, Any]) -> float:
    """Prefill TFLOPs over all the trial's samples (text length assumed; ``exact`` adds vision)."""
    info = _info(json.dumps(config["model_config"], sort_keys=True))
    tokens = [v + ASSUMED_TEXT_TOKENS for v in planned_visual_per_layer(config, info)]
    convention = config["eval"].get("flops_convention", "pdrop")
    per_sample = trial_flops(tokens, 1, info, convention)
    return per_sample * int(config["eval"]["limit"]) / 1e12
