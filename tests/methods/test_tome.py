"""ToMe: bipartite soft matching by hand, size tracking, hparams, whole trials."""

from __future__ import annotations

import pytest
import tiny_models as TINY
import torch

import prunelab.methods as M
from prunelab.methods.tome import bipartite_merge_round, tome_merge
from prunelab.workers.adapters.base import grid_coords
from prunelab.workers.runner import ReferenceCache, run_trial

_trial = TINY.tiny_trial


def test_two_identical_tokens_merge_into_their_average():
    # A = {0, 2}, B = {1, 3}; keys of 2 and 3 are identical (cos 1), token 0 is orthogonal to
    # both B tokens: with r = 1, token 2 merges into token 3.
    tokens = torch.tensor([[9.0, 9.0], [5.0, 5.0], [2.0, 0.0], [0.0, 2.0]])
    keys = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    sel = tome_merge(tokens, keys, keep=3)
    assert sel.kept.tolist() == [0, 1, 3]
    assert torch.allclose(sel.tokens, torch.tensor([[9.0, 9.0], [5.0, 5.0], [1.0, 1.0]]))
    assert sel.assignment.tolist() == [0, 1, 2, 2]


def test_one_round_returns_targets_and_survivors():
    tokens = torch.tensor([[9.0, 9.0], [5.0, 5.0], [2.0, 0.0], [0.0, 2.0]])
    keys = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    x, m, size, target, alive = bipartite_merge_round(tokens, keys, torch.ones(4), r=1)
    assert alive.tolist() == [True, True, False, True]
    assert torch.allclose(x, torch.tensor([[9.0, 9.0], [5.0, 5.0], [1.0, 1.0]]))
    assert target.tolist() == [0, 1, 2, 2]
    assert size.tolist() == [1.0, 1.0, 2.0]
    assert torch.allclose(m[2], torch.tensor([0.0, 1.0, 0.0]))


def _chain():
    # round 1 (t=4, r=2): A = {0, 2} both best match B token 1 -> {0, 1, 2} (size 3) and {3};
    # round 2 (t=2, r=1): the size-3 token (A) merges into token 3 (B).
    tokens = torch.tensor([[0.0], [4.0], [8.0], [12.0]])
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 0.0], [0.0, 1.0]])
    return tokens, keys


def test_size_weighted_merging_gives_the_mean_of_all_absorbed_tokens():
    tokens, keys = _chain()
    sel = tome_merge(tokens, keys, keep=1, size_weighted=True)
    assert sel.kept.tolist() == [3]
    assert torch.allclose(sel.tokens, torch.tensor([[6.0]]))  # (0 + 4 + 8 + 12) / 4
    assert sel.assignment.tolist() == [0, 0, 0, 0]


def test_unweighted_merging_averages_the_merged_tokens_as_equals():
    tokens, keys = _chain()
    sel = tome_merge(tokens, keys, keep=1, size_weighted=False)
    assert torch.allclose(sel.tokens, torch.tensor([[8.0]]))  # ((0 + 4 + 8) / 3 + 12) / 2


def test_method_keeps_exactly_keep_in_index_order():
    torch.manual_seed(0)
    signals = M.VisionSignals(tokens=torch.randn(144, 8), coords=grid_coords(12, 12),
                              key_metric=torch.randn(144, 4))  # fmt: skip
    for metric in ("keys", "tokens"):
        method = M.get("tome")(metric=metric)
        for keep in (1, 5, 36, 71, 72, 143, 144):
            sel = method.select_vision(signals, keep)
            assert sel.tokens.shape == (keep, 8)
            assert sel.kept.tolist() == sorted(set(sel.kept.tolist()))
            assert sel.assignment.unique().tolist() == list(range(keep))
    sel = M.get("tome")().select_vision(signals, 144)
    assert torch.equal(sel.tokens, signals.tokens) and sel.kept.tolist() == list(range(144))


def test_plan_and_hyperparameters():
    ctx = M.PlanContext(576, 32, M.Budget(keep_ratio=0.25), None, 0)
    plan = M.get("tome")().plan(ctx)
    assert plan.vision_keep == 144 and plan.vision_signals == {"key_metric"}
    assert M.get("tome")(metric="tokens").plan(ctx).vision_signals == frozenset()
    assert M.get("tome").hyperparameters() == {"metric": "keys", "size_weighted": True}
    with pytest.raises(M.HyperparameterError, match=r"tome.metric='values'"):
        M.get("tome").from_hparams({"metric": "values"})
    with pytest.raises(M.HyperparameterError, match=r"tome.size_weighted=1"):
        M.get("tome").from_hparams({"size_weighted": 1})


@pytest.mark.parametrize("metric", ["keys", "tokens"])
def test_whole_trial_on_tiny_llava(metric):
    loaded, adapter = TINY.load_tiny("tiny-llava")
    config = _trial("tiny-llava", "tome", 6, keep_ratio=0.25, hparams={"metric": metric})
    metrics = run_trial(loaded, adapter, config, ReferenceCache()).metrics
    assert metrics["visual_tokens_in"] == 144
    assert metrics["visual_tokens_kept"] == metrics["avg_visual_tokens"] == 36


@pytest.mark.parametrize("model", TINY.TINY_MODELS)
def test_whole_trial_on_every_family(model):
    loaded, adapter = TINY.load_tiny(model)
    metrics = run_trial(loaded, adapter, _trial(model, "tome", 2, keep_ratio=0.25)).metrics
    n = metrics["visual_tokens_in"]
    assert metrics["visual_tokens_kept"] == M.Budget(keep_ratio=0.25).tokens(int(n))
