"""``budget_mode``: a budget counted as tokens kept at the pruning point or as the average over
the LLM's layers, for every method (``PruningMethod.plan_trial``, :class:`AverageBudget`)."""

from __future__ import annotations

import dataclasses

import pytest

import prunelab.methods as M
from prunelab.methods.base import AverageBudget, LayerStep, Plan, PlanContext

N_VISUAL, N_LAYERS = 576, 32  # LLaVA-1.5-7B
BUDGETS = (192, 128, 64)


def _context(cls: type[M.PruningMethod], keep: int, mode: str | None, layer: int | None = None):
    if layer is None and cls.uses_layer:
        layer = cls.default_prune_layer if cls.default_prune_layer is not None else 2
    return PlanContext(
        N_VISUAL, N_LAYERS, M.Budget(keep_tokens=keep), layer, 0, "llava", budget_mode=mode
    )


def _budgeted() -> list[str]:
    return sorted(name for name in M.available() if M.get(name).uses_budget)


def _final_plans(plan: Plan) -> list[Plan]:
    """The plans a sample can end with: a pre-inference plan's stage at each candidate layer,
    solved as the worker solves it once the pass has chosen."""
    if plan.pre_inference is None:
        return [plan]
    (step,) = plan.layers
    finals = []
    for layer in plan.pre_inference.candidates:
        final = Plan(layers=(dataclasses.replace(step, layer=layer),))
        finals.append(plan.average.solve(final) if plan.average is not None else final)
    return finals


@pytest.mark.parametrize("name", _budgeted())
@pytest.mark.parametrize("keep", BUDGETS)
def test_average_mode_averages_the_budget_within_one_token(name: str, keep: int) -> None:
    """Every method at 192 / 128 / 64 of 576 tokens on 32 layers with budget_mode=average: each
    plan it can end with averages the budget within one token, or the budget is out of its
    reach and planning says so (the validation line of a sweep)."""
    method = M.get(name)()
    ctx = _context(type(method), keep, "average")
    problem = method.plan_problem(ctx)
    if problem is not None:
        assert "out of reach" in problem, problem
        assert name == "prep", f"{name} cannot average {keep}: {problem}"
        return
    for plan in _final_plans(method.plan_trial(ctx)):
        average = plan.average_visual(N_VISUAL, N_LAYERS)
        assert abs(average - keep) <= 1.0, f"{name} at {keep}: averages {average}"


def test_prep_cannot_average_these_budgets_at_its_candidate_layers() -> None:
    """PREP prunes once at a layer it chooses among 6-15 (scaled to the depth): the layers
    before it see all 576 tokens, so no kept count averages 192 (the lowest is 270.5)."""
    problem = M.get("prep")().plan_problem(_context(M.get("prep"), 192, "average"))
    assert problem is not None and "lowest average there is 270.5" in problem


def test_a_single_stage_solves_its_kept_count_for_the_average() -> None:
    """FastV at layer 2 keeping k of 576 on 32 layers averages (2 * 576 + 30 * k) / 32: the
    paper specs' "64" keeps 30 (average 64.125), "192" keeps 166 (191.875)."""
    fastv = M.get("fastv")()
    kept = fastv.plan_trial(_context(M.get("fastv"), 64, None))
    assert [s.keep for s in kept.layers] == [64]
    assert kept.average_visual(N_VISUAL, N_LAYERS) == 96.0  # 2 * 576 + 30 * 64 = 3072
    average = fastv.plan_trial(_context(M.get("fastv"), 64, "average"))
    assert [(s.layer, s.keep) for s in average.layers] == [(2, 30)]
    assert average.average_visual(N_VISUAL, N_LAYERS) == 64.125
    high = fastv.plan_trial(_context(M.get("fastv"), 192, "average"))
    assert [s.keep for s in high.layers] == [166]


def test_out_of_reach_average_names_the_layer_and_the_lowest_average() -> None:
    """At layer 16 of 32 the first half sees all 576 tokens: the lowest average is 288.5."""
    problem = M.get("fastv")().plan_problem(_context(M.get("fastv"), 64, "average", layer=16))
    assert problem == (
        "fastv: budget_mode=average: an average of 64 visual tokens is out of reach at layer 16 "
        "(the 16 layer(s) before it see all 576; the lowest average there is 288.5 over 32 "
        "layers); use budget_mode=kept, an earlier layer or a larger budget"
    )


def test_a_vision_stage_is_the_same_in_both_modes() -> None:
    for name in ("visionzip", "divprune", "tome", "prumerge_plus"):
        method = M.get(name)()
        plans = {
            mode: method.plan_trial(_context(type(method), 64, mode)) for mode in M.BUDGET_MODES
        }
        assert plans["kept"] == plans["average"], name
        assert plans["kept"].average_visual(N_VISUAL, N_LAYERS) == 64.0


@pytest.mark.parametrize("name", ["pdrop", "sparsevlm", "polymorphic", "infoprune"])
def test_kept_is_not_defined_for_a_multi_stage_schedule(name: str) -> None:
    cls = M.get(name)
    assert cls.own_budget_mode() == "average"
    problem = cls().plan_problem(_context(cls, 64, "kept"))
    assert problem is not None and problem.startswith(f"{name}: budget_mode=kept is not defined")


def test_average_budget_of_a_ratio_is_unrounded() -> None:
    """keep_ratio 1/9 of 576 asks for an average of 64.0; 0.111 asks for 63.936."""
    assert M.Budget(keep_ratio=0.111).average_target(576) == pytest.approx(63.936)
    solver = AverageBudget(63.936, 576, 32, "fastv")
    assert solver.keep(2) == 30  # (32 * 63.936 - 1152) / 30 = 29.8


def test_a_solved_stage_keeps_at_least_one_token() -> None:
    step = LayerStep(layer=1, keep=10)
    solved = AverageBudget(18.0, 576, 32, "x").solve(Plan(layers=(step,)))
    assert [s.keep for s in solved.layers] == [1]  # (576 + 31 * 1) / 32 = 18.97, within one


@pytest.mark.parametrize(
    ("method", "keep_ratio", "axes"),
    [("fastv", 0.5, {"prune_layer": 1}), ("prep", 0.75, {}), ("visionzip", 0.25, {})],
)
def test_whole_trials_average_their_budget(method: str, keep_ratio: float, axes: dict) -> None:
    """On tiny-llava (144 tokens, 4 layers) the worker's trial averages the budget over the
    layers: FastV at layer 1 keeps 48 of 144 for an average of 72; PREP solves its keep once
    its pre-inference has chosen layer 1 or 2 (96 or 72 kept, average 108 either way)."""
    import tiny_models as TINY

    metrics = TINY.average_trial_metrics(
        "tiny-llava", method, 2, keep_ratio, budget_mode="average", **axes
    )
    if method == "fastv":
        assert metrics["visual_tokens_kept"] == 48
