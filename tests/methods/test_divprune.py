"""DivPrune: greedy max-min diversity by hand, duplicates, hparams, whole trials."""

from __future__ import annotations

import pytest
import tiny_models as TINY
import torch

import prunelab.methods as M
from prunelab.methods.divprune import cosine_distances, divprune_order
from prunelab.workers.adapters.base import grid_coords
from prunelab.workers.runner import ReferenceCache, run_trial

_trial = TINY.tiny_trial


# x0 = east, x1 = almost east, x2 = north, x3 = west (lengths do not matter: cosine)
FOUR = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 3.0], [-2.0, 0.0]])


def test_cosine_distances():
    d = cosine_distances(FOUR)
    assert torch.allclose(d.diagonal(), torch.zeros(4), atol=1e-6)
    assert d[0, 3] == pytest.approx(2.0) and d[0, 2] == pytest.approx(1.0)
    assert d[0, 1] == pytest.approx(1 - 0.99 / (0.99**2 + 0.14**2) ** 0.5, abs=1e-6)


def test_max_min_order_on_four_vectors():
    # nearest-neighbour distances: x0, x1 ~0.01; x2 0.86 (to x1); x3 1.0 (to x2) -> first x3;
    # then the farthest from {x3}: x0 (2.0, vs x1 1.99, x2 1.0); then from {x3, x0}: x2
    # (min 1.0, vs x1 0.01); x1 last.
    assert divprune_order(FOUR, 4).tolist() == [3, 0, 2, 1]
    method = M.get("divprune")()
    signals = M.VisionSignals(tokens=FOUR, coords=grid_coords(2, 2))
    sel = method.select_vision(signals, 2)
    assert sel.kept.tolist() == [0, 3]  # original order
    assert torch.equal(sel.tokens, FOUR[[0, 3]])  # unchanged tokens
    assert sel.assignment.tolist() == [0, -1, -1, 1]
    assert method.select_vision(signals, 3).kept.tolist() == [0, 2, 3]


def test_duplicates_are_never_selected_twice():
    tokens = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]])
    order = divprune_order(tokens, 6)
    assert sorted(order.tolist()) == list(range(6))
    assert order[:2].tolist() == [5, 0]  # the odd one out, then the first of the duplicates
    assert divprune_order(tokens[:1], 1).tolist() == [0]


def test_every_keep_gives_distinct_sorted_tokens():
    torch.manual_seed(0)
    signals = M.VisionSignals(tokens=torch.randn(50, 8), coords=grid_coords(5, 10))
    for keep in (1, 7, 49, 50):
        sel = M.get("divprune")().select_vision(signals, keep)
        assert sel.kept.tolist() == sorted(set(sel.kept.tolist())) and len(sel.kept) == keep


def test_plan_and_hyperparameters():
    plan = M.get("divprune")().plan(M.PlanContext(576, 32, M.Budget(keep_tokens=64), None, 0))
    assert plan.vision_keep == 64 and plan.vision_signals == frozenset() and plan.layers == ()
    assert M.get("divprune").hyperparameters() == {}
    with pytest.raises(M.HyperparameterError, match="unknown hyperparameter"):
        M.get("divprune").from_hparams({"ratio": 0.1})


def test_whole_trial_on_tiny_llava():
    loaded, adapter = TINY.load_tiny("tiny-llava")
    config = _trial("tiny-llava", "divprune", 6, keep_ratio=0.25)
    metrics = run_trial(loaded, adapter, config, ReferenceCache()).metrics
    assert metrics["visual_tokens_in"] == 144
    assert metrics["visual_tokens_kept"] == metrics["avg_visual_tokens"] == 36


@pytest.mark.parametrize("model", TINY.TINY_MODELS)
def test_whole_trial_on_every_family(model):
    loaded, adapter = TINY.load_tiny(model)
    metrics = run_trial(loaded, adapter, _trial(model, "divprune", 2, keep_ratio=0.25)).metrics
    n = metrics["visual_tokens_in"]
    assert metrics["visual_tokens_kept"] == M.Budget(keep_ratio=0.25).tokens(int(n))
