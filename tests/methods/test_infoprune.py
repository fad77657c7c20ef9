"""InfoPrune: attention prior, greedy residual selection, fill, merge, MFI/MGI curves, stage
counts whose average equals the budget, plans, hyperparameters, whole trials on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import tiny_models as TINY
import torch

import prunelab.methods as M
from prunelab.methods.infoprune import (
    attention_prior,
    candidate_pool,
    fill_by_prior,
    greedy_residual,
    infoprune_select,
    prototype_merge,
    selection_curves,
    stage_counts,
)
from prunelab.methods.pdrop import plan_average
from prunelab.workers.runner import ReferenceCache, run_trial


def test_attention_prior_is_a_sharpened_tempered_softmax():
    # a / 0.7 = (ln 3, 0, 0): softmax (3/5, 1/5, 1/5), then ^0.5
    a = torch.tensor([0.7 * math.log(3), 0.0, 0.0])
    q = attention_prior(a, 0.7, 0.5)
    assert torch.allclose(q, torch.tensor([0.6, 0.2, 0.2]).sqrt())
    assert candidate_pool(torch.tensor([0.1, 0.5, 0.3, 0.5]), 3).tolist() == [1, 3, 2]
    assert candidate_pool(torch.tensor([0.1, 0.5]), 9).tolist() == [1, 0]  # at most N


def test_greedy_picks_orthogonal_vectors_in_norm_order_and_stops_at_eps():
    z = torch.tensor(
        [
            [0.0, 2.0, 0.0, 0.0],  # norm 2
            [3.0, 0.0, 0.0, 0.0],  # norm 3
            [0.0, 0.0, 0.0, 1.0],  # norm 1
            [6.0, 0.0, 0.0, 0.0],  # norm 6, but the same direction as row 1 ...
            [0.0, 0.0, 0.1, 0.0],  # norm 0.1: energy 0.01 = 0.01 / 36 of the largest
        ]
    )
    # 6 first; row 1 then has no residual left; 2, 1, then 0.1 (energy 2.8e-4 of 36 > 1e-4)
    assert greedy_residual(z, 5, 1e-4).tolist() == [3, 0, 2, 4]
    # eps = 1e-3: 0.01 / 36 = 2.8e-4 is below it, the selection saturates after three
    assert greedy_residual(z, 5, 1e-3).tolist() == [3, 0, 2]
    assert greedy_residual(z, 2, 0.0).tolist() == [3, 0]  # the budget stops it first


def test_greedy_uses_the_residual_not_the_norm():
    # energies 9, 8, 6.25: (3,0) first; then the residuals are (0,2) -> 4 and (0,2.5) -> 6.25,
    # so (0, 2.5) is next; (2, 2) is then in the span: stop
    z = torch.tensor([[3.0, 0.0], [2.0, 2.0], [0.0, 2.5]])
    assert greedy_residual(z, 3, 1e-4).tolist() == [0, 2]


def test_fill_tops_up_with_the_best_prior_left_in_the_pool():
    prior = torch.tensor([0.0, 0.2, 0.5, 0.0, 0.0, 0.9, 0.0, 0.1])
    pool = torch.tensor([5, 2, 1, 7])  # by decreasing prior
    # the greedy picked pool position 2 (token 1); fill with 5 then 2
    assert fill_by_prior(torch.tensor([2]), pool, prior, 3).tolist() == [1, 5, 2]
    assert fill_by_prior(torch.tensor([3, 0]), pool, prior, 2).tolist() == [7, 5]


def test_merge_averages_each_kept_token_with_its_nearest_dropped_tokens():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.2], [0.0, 3.0], [0.1, 1.0]])
    merged, owner = prototype_merge(x, torch.tensor([0, 1]), beta=1.0)
    assert owner.tolist() == [0, 1, 0, 1, 1]
    assert torch.allclose(merged[0], (x[0] + x[2]) / 2)
    assert torch.allclose(merged[1], (x[1] + x[3] + x[4]) / 3)
    merged, _ = prototype_merge(x, torch.tensor([0, 1]), beta=3.0)  # inertia of the kept token
    assert torch.allclose(merged[0], (3 * x[0] + x[2]) / 4)


def test_select_keeps_the_count_contract_and_the_pool_factor_matters():
    # 6 tokens, attention decreasing with the index; tokens 0-2 share one direction
    x = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 1.0]])
    a = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    # alpha = 2: pool 0-3; 0 first, 1 and 2 add nothing, 3 is orthogonal
    selection, order = infoprune_select(x, a, 2, 2.0, 0.7, 0.5, 1e-4, 1.0)
    assert order.tolist() == [0, 3] and selection.kept.tolist() == [0, 3]
    assert selection.tokens.shape == (2, 3)
    assert selection.assignment.tolist() == [0, 0, 0, 1, 0, 0]  # 4, 5 orthogonal to both: first
    # token 0 (beta = 1) with 1, 2, 4, 5: (3, 0, 2) / 5
    assert torch.allclose(selection.tokens[0], torch.tensor([3.0, 0, 2.0]) / 5)
    # alpha = 1.5: pool 0-2, all one direction: the greedy stops at 1, the prior fills token 1
    selection, order = infoprune_select(x, a, 2, 1.5, 0.7, 0.5, 1e-4, 1.0)
    assert order.tolist() == [0, 1] and selection.kept.tolist() == [0, 1]
    method = M.get("infoprune")()
    assert method.pool_factor("llava") == 2.0 and method.pool_factor("llava_next") == 2.0
    assert method.pool_factor("qwen2_vl") == 3.0 and method.pool_factor("qwen2_5_vl") == 3.0
    assert M.get("infoprune")(alpha=2.5).pool_factor("qwen2_vl") == 2.5
    signals = M.VisionSignals(tokens=x, coords=torch.zeros(6, 3, dtype=torch.long),
                              cls_attention=a, family="qwen2_vl")  # fmt: skip
    # alpha = 3: pool of all 6 tokens, same picks here (0, then the first orthogonal: 3)
    assert method.select_vision(signals, 2).kept.tolist() == [0, 3]
    assert method.select_vision(signals, 2).diagnostics is None


def test_curves_are_mfi_and_mgi_of_the_selection_order():
    x = torch.diag(torch.tensor([3.0, 2.0, 1.0]))  # orthogonal tokens, norms 3, 2, 1
    x = torch.cat([x, x[:1]])  # and a copy of the first
    curves = selection_curves(x, torch.tensor([0, 1, 2, 3]), stride=1)
    assert curves["step"] == [0, 1, 2, 3]
    assert curves["mfi"] == pytest.approx([3.0, 2.0, 1.0, 0.0], abs=1e-6)
    e = 1e-3 * (9 + 4 + 1 + 9) / 12  # MGI's ridge: 1e-3 of the mean squared entry
    # MGI_t = log(1 + x^T (C_S + eI)^-1 x / (t + 1)), C_S the mean outer product of t tokens:
    # an orthogonal token sees only the ridge; the copy of token 0 sees C_S = diag(9, 4, 1) / 3
    expected = [
        math.log1p(9 / e),
        math.log1p(4 / e / 2),
        math.log1p(1 / e / 3),
        math.log1p(9 / (3 + e) / 4),
    ]
    assert curves["mgi"] == pytest.approx(expected, rel=1e-4)
    assert selection_curves(x, torch.tensor([0, 1, 2, 3]))["step"] == [0]  # every 8 steps


def test_diagnostics_only_when_asked():
    torch.manual_seed(0)
    x, a = torch.randn(40, 16), torch.rand(40)
    signals = M.VisionSignals(tokens=x, coords=torch.zeros(40, 3, dtype=torch.long),
                              cls_attention=a, want_diagnostics=True)  # fmt: skip
    selection = M.get("infoprune")().select_vision(signals, 20)
    curves = selection.diagnostics
    assert set(curves) == {"step", "mfi", "mgi", "mfi_attention", "mgi_attention"}
    assert curves["step"] == [0, 8, 16]
    assert all(len(curves[k]) == 3 for k in curves)


def test_stage_counts_match_the_paper_and_the_budget():
    # Table 4: R_1 = 16.7% (96 of 576), R_2 = 33.3% (32): (16 * 96 + 16 * 32) / 32 = 64
    assert stage_counts(576, 32, 16, 64.0, 0.33) == (96, 32)
    # above ~67% stage 1 keeps all and T_2 is solved: (16 * 576 + 16 * 424) / 32 = 500
    assert stage_counts(576, 32, 16, 500.0, 0.33) == (576, 424)
    assert stage_counts(576, 32, 16, 64.0, 1.0) == (64, 64)  # R_2 = 1: stage 1 only


def _plan(n_visual, n_layers, hparams=None, family=None, **budget):
    method = M.get("infoprune").from_hparams(hparams or {})
    return method.plan(M.PlanContext(n_visual, n_layers, M.Budget(**budget), None, 0, family))


def test_plan_is_stage_1_plus_one_step_after_layer_k():
    plan = _plan(576, 32, keep_tokens=64)
    assert plan.vision_keep == 96 and plan.vision_signals == frozenset({"cls_attention"})
    (step,) = plan.layers
    assert (step.layer, step.keep, step.queries, step.positions) == (16, 32, "last", "original")
    # K = 13 on 28-layer Qwen2.5-VL (15 * 28 / 32 = 13.1), K = 2 on 4 layers
    assert _plan(1024, 28, keep_ratio=0.111).layers[0].layer == 14
    assert _plan(144, 4, keep_ratio=0.25).layers[0].layer == 3
    assert _plan(576, 32, {"layer": 7}, keep_tokens=64).layers[0].layer == 8
    assert _plan(576, 32, {"positions": "renumber"}, keep_tokens=64).layers[0].positions == (
        "renumber"
    )
    full = _plan(576, 32, keep_ratio=1.0)
    assert full.vision_keep is None and not full.layers


@pytest.mark.parametrize("n_layers", [4, 8, 28, 32, 40])
@pytest.mark.parametrize("n_visual", [36, 144, 576, 2880])
def test_average_equals_budget_within_one_token(n_visual, n_layers):
    for keep_ratio in [0.02, 0.111, 0.222, 0.25, 0.333, 0.5, 0.7, 0.9, 1.0]:
        for r2 in [0.33, 0.5, 1.0]:
            plan = _plan(n_visual, n_layers, {"r2": r2}, keep_ratio=keep_ratio)
            assert abs(plan_average(plan, n_visual, n_layers) - keep_ratio * n_visual) <= 1.0
            assert all(1 <= s.layer < n_layers for s in plan.layers)


def test_hyperparameters_and_errors():
    cls = M.get("infoprune")
    assert cls.hyperparameters() == {
        "tau": 0.7,
        "gamma": 0.5,
        "alpha": None,
        "eps": 1e-4,
        "beta": 1.0,
        "r2": 0.33,
        "layer": None,
        "positions": "original",
    }
    assert cls.budget_is_average and not cls.uses_layer
    for bad, match in [
        ({"tau": 0}, r"infoprune.tau=0: must be > 0"),
        ({"alpha": 0.5}, r"infoprune.alpha=0.5: must be >= 1"),
        ({"r2": 1.5}, r"infoprune.r2=1.5: must be in"),
        ({"beta": -1.0}, r"infoprune.beta=-1.0"),
        ({"eps": 1.0}, r"infoprune.eps=1.0"),
        ({"positions": "middle"}, r"infoprune.positions='middle'"),
    ]:
        with pytest.raises(M.HyperparameterError, match=match):
            cls.from_hparams(bad)
    with pytest.raises(ValueError, match=r"infoprune.layer=3: leaves no later layer"):
        _plan(144, 4, {"layer": 3}, keep_ratio=0.5)


def test_whole_trial_logs_the_selection_curves():
    loaded, adapter = TINY.load_tiny("tiny-llava")
    config = TINY.tiny_trial("tiny-llava", "infoprune", 2, keep_ratio=0.25)
    output = run_trial(loaded, adapter, config, ReferenceCache())
    metrics = output.metrics
    assert abs(metrics["avg_visual_tokens"] - 0.25 * metrics["visual_tokens_in"]) <= 1.0
    curves = json.loads(output.artifacts["infoprune/curves.json"])
    assert len(curves) == 2 and {"sample", "step", "mfi", "mgi"} <= set(curves[0])
    assert curves[0]["mfi"][0] > 0
