"""SGP: the global attention score, selection by guidance, planning."""

from __future__ import annotations

import pytest
import torch

import prunelab.methods as M
from prunelab.methods.sgp import sgp_scores


def test_scores_sum_attention_over_layers_heads_and_queries() -> None:
    visual = torch.tensor([1, 2])
    prefill = torch.zeros(2, 1, 4)  # (H=2, Q=1, S=4)
    prefill[0, 0] = torch.tensor([0.1, 0.6, 0.2, 0.1])
    prefill[1, 0] = torch.tensor([0.0, 0.1, 0.8, 0.1])
    decode = torch.zeros(2, 1, 5)
    decode[:, 0] = torch.tensor([0.2, 0.3, 0.1, 0.2, 0.2])
    scores = sgp_scores([prefill, decode], visual)
    # token at 1: 0.6 + 0.1 + 0.3 + 0.3 = 1.3; token at 2: 0.2 + 0.8 + 0.1 + 0.1 = 1.2
    assert torch.allclose(scores, torch.tensor([1.3, 1.2]))
    assert torch.allclose(sgp_scores([prefill, decode], visual, "mean"), scores / 4)
    with pytest.raises(ValueError, match="no guidance"):
        sgp_scores([], visual)


def test_selects_the_top_guidance_scores_in_order() -> None:
    method = M.get("sgp")()
    step = M.LayerStep(layer=2, keep=2, queries=None)
    signals = M.LayerSignals(
        visual=torch.tensor([3, 4, 5, 6]),
        text=torch.tensor([0, 1, 2]),
        guidance=torch.tensor([0.1, 0.9, 0.2, 0.8]),
    )
    assert method.select_layer(step, signals).tolist() == [1, 3]
    with pytest.raises(RuntimeError, match="guidance"):
        method.select_layer(step, M.LayerSignals(visual=signals.visual, text=signals.text))


def test_plan_and_validation() -> None:
    method = M.get("sgp")()
    plan = method.plan(M.PlanContext(576, 32, M.Budget(keep_tokens=64), None, 0))
    assert plan.layers == (M.LayerStep(layer=2, keep=64, queries=None),)
    assert M.get("sgp").needs_guidance
    with pytest.raises(ValueError, match="prune_layer=40"):
        method.plan(M.PlanContext(576, 32, M.Budget(keep_tokens=64), 40, 0))
    with pytest.raises(M.HyperparameterError):
        M.get("sgp").from_hparams({"aggregate": "max"})
