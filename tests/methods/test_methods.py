"""Method math on hand-built tensors, hyperparameter validation, and the registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import prunelab.methods as M
from prunelab.methods.fastv import fastv_scores
from prunelab.methods.random_subset import random_subset


def test_budget_tokens():
    assert M.Budget(keep_ratio=0.25).tokens(144) == 36
    assert M.Budget(keep_ratio=0.001).tokens(144) == 1
    assert M.Budget(keep_tokens=64).tokens(576) == 64
    assert M.Budget(keep_tokens=1000).tokens(576) == 576
    with pytest.raises(ValueError, match=r"keep_ratio=1.5: must be in \(0, 1\]"):
        M.Budget(keep_ratio=1.5)
    with pytest.raises(ValueError, match="exactly one"):
        M.Budget(keep_ratio=0.5, keep_tokens=3)


def test_fastv_scores_rank_by_last_token_attention_head_mean():
    # 2 heads, 1 query, sequence of 6: positions 1..4 are visual
    attention = torch.tensor(
        [
            [[0.1, 0.1, 0.5, 0.0, 0.2, 0.1]],
            [[0.1, 0.3, 0.1, 0.0, 0.4, 0.1]],
        ]
    )
    visual = torch.tensor([1, 2, 3, 4])
    scores = fastv_scores(attention, visual)
    assert torch.allclose(scores, torch.tensor([0.2, 0.3, 0.0, 0.3]))
    method = M.get("fastv")()
    step = M.LayerStep(layer=2, keep=2)
    kept = method.select_layer(step, M.LayerSignals(visual=visual, text=torch.tensor([0, 5]),
                                                     attention=attention))  # fmt: skip
    assert kept.tolist() == [1, 3]  # visual tokens at positions 2 and 4, in order


def test_fastv_plan_defaults_to_layer_two():
    plan = M.get("fastv")().plan(M.PlanContext(576, 32, M.Budget(keep_tokens=64), None, 0))
    assert plan.vision_keep is None
    assert plan.layers == (M.LayerStep(layer=2, keep=64, queries="last"),)


def test_random_subset_is_seeded_sorted_and_distinct():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a, b = random_subset(100, 10, g1), random_subset(100, 10, g2)
    assert torch.equal(a, b)
    assert a.tolist() == sorted(set(a.tolist()))
    assert len(a) == 10


def test_random_stage_follows_prune_layer():
    method = M.get("random")()
    vision = method.plan(M.PlanContext(144, 4, M.Budget(keep_ratio=0.5), 0, 0))
    assert vision.vision_keep == 72 and vision.layers == ()
    layer = method.plan(M.PlanContext(144, 4, M.Budget(keep_ratio=0.5), 2, 0))
    assert layer.vision_keep is None and layer.layers[0].layer == 2


def test_hyperparameter_validation():
    fastv = M.get("fastv")
    with pytest.raises(M.HyperparameterError, match=r"fastv.queries=5: expected one of"):
        fastv.from_hparams({"queries": 5})
    with pytest.raises(M.HyperparameterError, match=r"unknown hyperparameter.*ratio"):
        fastv.from_hparams({"ratio": 0.5})
    assert fastv.from_hparams({"queries": "all"}).queries == "all"
    assert fastv.hyperparameters() == {"queries": "last"}


def test_registry_rejects_duplicates_and_suggests():
    with pytest.raises(M.UnknownMethodError, match="did you mean 'fastv'"):
        M.get("fastvv")

    @dataclass(frozen=True)
    class Clash(M.PruningMethod):
        name: ClassVar[str] = "fastv"

    with pytest.raises(ValueError, match="already registered"):
        M.register(Clash)
    with pytest.raises(TypeError):
        M.register(int)  # type: ignore[arg-type]


def test_plan_rejects_unordered_steps():
    with pytest.raises(ValueError, match="strictly increasing"):
        M.Plan(layers=(M.LayerStep(layer=4, keep=2), M.LayerStep(layer=2, keep=1)))
