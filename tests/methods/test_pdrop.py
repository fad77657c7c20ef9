"""PyramidDrop: stage layers and keeps for a budget, the average-equals-budget property,
ranking by the last token's attention, hyperparameters, whole trials on the tiny models."""

from __future__ import annotations

import pytest
import tiny_models as TINY
import torch

import prunelab.methods as M
from prunelab.methods.pdrop import (
    average_visual,
    pdrop_scores,
    plan_average,
    scale_layers,
    solve_keeps,
)


def _plan(n_visual, n_layers, hparams=None, **budget):
    method = M.get("pdrop").from_hparams(hparams or {})
    return method.plan(M.PlanContext(n_visual, n_layers, M.Budget(**budget), None, 0))


def test_average_visual_by_hand():
    # the official default: 8 layers each with 576, 288, 144, 72 tokens
    assert average_visual(576, 32, [8, 16, 24], [288, 144, 72]) == 270.0
    # 1 layer with 10 tokens, 2 with 4, 1 with 2
    assert average_visual(10, 4, [1, 3], [4, 2]) == (10 + 4 + 4 + 2) / 4


def test_scale_layers_to_depth():
    assert scale_layers((8, 16, 24), 32, 1, 31) == (8, 16, 24)
    assert scale_layers((8, 16, 24), 4, 1, 3) == (1, 2, 3)
    assert scale_layers((2, 8, 16), 4, 1, 3) == (1, 2, 3)  # 0.25 -> at least 1, then increasing
    assert scale_layers((2, 8, 16), 28, 1, 27) == (2, 7, 14)
    assert scale_layers((8, 16, 24), 2, 1, 1) == (1,)  # later stages do not fit


def test_official_default_setting_is_lambda_one_half():
    # keep_ratio 270/576: the README's layer_list [8,16,24], ratios [0.5, 0.25, 0.125]
    plan = _plan(576, 32, keep_tokens=270)
    assert plan.vision_keep is None
    assert plan.layers == tuple(
        M.LayerStep(
            layer=layer, keep=keep, queries="last", positions="renumber", attention_from="self"
        )
        for layer, keep in [(8, 288), (16, 144), (24, 72)]
    )
    # the FastV-style variant reads layer l_s - 1's attention row instead
    previous = _plan(576, 32, {"rank_attention": "previous"}, keep_tokens=270)
    assert [s.attention_from for s in previous.layers] == ["previous"] * 3


def test_low_budgets_move_the_stages_earlier_as_the_author_advises():
    # official issue #29: layers 2, 8, 16 and lambda = 0.19 for 64 tokens on LLaVA-1.5
    plan = _plan(576, 32, keep_tokens=64)
    assert [s.layer for s in plan.layers] == [2, 8, 16]
    for s, step in enumerate(plan.layers, start=1):
        assert abs(step.keep - 576 * 0.19**s) <= 3
    assert abs(plan_average(plan, 576, 32) - 64) <= 1


def test_fixed_lambda_solves_the_first_stage_ratio():
    # layers 2,10,20 with ratios 0.32/0.16/0.08 (lambda 0.5) average 128.16 tokens
    plan = _plan(576, 32, {"layers": [2, 10, 20], "lam": 0.5}, keep_tokens=128)
    assert [(s.layer, s.keep) for s in plan.layers] == [(2, 184), (10, 92), (20, 46)]


def test_tiny_depth_keep_ratio_quarter():
    # 4 layers: layer 0 always sees all 144, so the closest average keeps 1 token from layer 1
    plan = _plan(144, 4, keep_ratio=0.25)
    assert [(s.layer, s.keep) for s in plan.layers] == [(1, 1)]
    assert plan_average(plan, 144, 4) == 36.75
    plan = _plan(144, 4, keep_ratio=0.5)
    assert [s.layer for s in plan.layers] == [1, 2, 3]
    assert plan_average(plan, 144, 4) == 72.0


@pytest.mark.parametrize("n_layers", [4, 8, 24, 28, 32, 40, 80])
@pytest.mark.parametrize("n_visual", [36, 144, 576, 2880])
def test_average_equals_budget_within_one_token(n_visual, n_layers):
    for keep_ratio in [0.05, 0.1, 0.111, 0.222, 0.25, 0.333, 0.469, 0.5, 0.75, 0.9, 1.0]:
        target = keep_ratio * n_visual
        try:
            plan = _plan(n_visual, n_layers, keep_ratio=keep_ratio)
        except ValueError as exc:
            # only when one token kept from the earliest stage (2 of 32, scaled) is already more
            # than a token above the budget: every layer before it sees all N tokens
            first = scale_layers((2, 8, 16), n_layers, 1, n_layers - 1)[0]
            floor = (first * n_visual + (n_layers - first)) / n_layers
            assert floor > target + 1, (keep_ratio, exc)
            assert "out of reach" in str(exc)
            continue
        assert abs(plan_average(plan, n_visual, n_layers) - target) <= 1.0, keep_ratio
        keeps = [n_visual] + [s.keep for s in plan.layers]
        assert keeps == sorted(keeps, reverse=True) and len(set(keeps)) == len(keeps)
        assert all(1 <= s.layer < n_layers for s in plan.layers)


def test_solve_keeps_returns_none_out_of_reach():
    ratios = lambda x: [x, x * x]  # noqa: E731
    assert solve_keeps(100, 10, [5, 8], 20, ratios) is None  # at least (5*100 + 5) / 10
    keeps, x = solve_keeps(100, 10, [5, 8], 60, ratios)
    assert abs(average_visual(100, 10, [5, 8], keeps) - 60) <= 0.5 and 0 < x < 1


def test_ranks_by_last_token_attention_head_mean():
    # 2 heads, the last token's row over a sequence of 6; positions 1..4 are visual
    attention = torch.tensor([[[0.1, 0.1, 0.5, 0.0, 0.2, 0.1]], [[0.1, 0.3, 0.1, 0.0, 0.4, 0.1]]])
    visual = torch.tensor([1, 2, 3, 4])
    assert torch.allclose(pdrop_scores(attention, visual), torch.tensor([0.2, 0.3, 0.0, 0.3]))
    step = M.LayerStep(layer=8, keep=2, positions="renumber")
    signals = M.LayerSignals(visual=visual, text=torch.tensor([0, 5]), attention=attention)
    assert M.get("pdrop")().select_layer(step, signals).tolist() == [1, 3]


def test_hyperparameters():
    cls = M.get("pdrop")
    assert cls.hyperparameters() == {"layers": None, "lam": None, "rank_attention": "self"}
    assert cls.budget_is_average and cls.uses_budget and not cls.uses_layer
    assert cls.from_hparams({"layers": [2, 10, 20]}).layers == (2, 10, 20)
    with pytest.raises(M.HyperparameterError, match=r"pdrop.layers=\[16, 8\]: must be strictly"):
        cls.from_hparams({"layers": [16, 8]})
    with pytest.raises(M.HyperparameterError, match=r"pdrop.layers=\[0, 8\]: layers must be >= 1"):
        cls.from_hparams({"layers": [0, 8]})
    with pytest.raises(M.HyperparameterError, match=r"pdrop.layers=\[\]"):
        cls.from_hparams({"layers": []})
    with pytest.raises(M.HyperparameterError, match=r"pdrop.layers=.*expected"):
        cls.from_hparams({"layers": ["a"]})
    with pytest.raises(M.HyperparameterError, match=r"pdrop.lam=1.5: must be in \(0, 1\]"):
        cls.from_hparams({"lam": 1.5})
    with pytest.raises(M.HyperparameterError, match=r"pdrop.lam=0"):
        cls.from_hparams({"lam": 0})


def test_impossible_plans_name_the_value():
    with pytest.raises(ValueError, match=r"pdrop.layers=\[8, 16, 24\]: layer 8 is beyond .* 4 lay"):
        _plan(144, 4, {"layers": [8, 16, 24]}, keep_ratio=0.5)
    with pytest.raises(ValueError, match=r"average of 64 .* out of reach of stage layers \[8, 16"):
        _plan(576, 32, {"layers": [8, 16, 24]}, keep_tokens=64)
    with pytest.raises(ValueError, match=r"lam=0.1 .* give a larger method.lam"):
        _plan(576, 32, {"lam": 0.1}, keep_tokens=500)


@pytest.mark.parametrize("keep_ratio", [0.25, 0.5])
def test_whole_trial_on_tiny_llava(keep_ratio):
    metrics = TINY.average_trial_metrics("tiny-llava", "pdrop", 4, keep_ratio)
    assert metrics["visual_tokens_in"] == 144
    assert metrics["visual_tokens_kept"] < keep_ratio * 144


@pytest.mark.parametrize("model", TINY.TINY_MODELS)
def test_whole_trial_on_every_family(model):
    TINY.average_trial_metrics(model, "pdrop", 2, 0.5)
