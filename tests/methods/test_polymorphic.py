"""Polymorphic: density-peak clustering, raters and their importance, the consolidation count
contract, both stages by hand, plans whose average equals the budget, hyperparameters, whole
trials on the tiny models."""

from __future__ import annotations

import math

import pytest
import tiny_models as TINY
import torch

import prunelab.methods as M
from prunelab.methods.dpc import density_peaks, merge_clusters
from prunelab.methods.pdrop import plan_average, scale_layers
from prunelab.methods.polymorphic import (
    consolidate,
    cross_modal_raters,
    rater_importance,
)
from prunelab.workers.runner import ReferenceCache, run_trial

PLUS = torch.tensor([[0.0, 0.0], [0.1, 0.0], [-0.1, 0.0], [0.0, 0.1], [0.0, -0.1]])


def _blobs() -> torch.Tensor:
    """Three '+'-shaped blobs of 5 points far apart; the centers are rows 0, 5 and 10."""
    return torch.cat([PLUS + torch.tensor(c) for c in ([0.0, 0.0], [10.0, 0.0], [0.0, 10.0])])


def test_dpc_finds_the_centers_of_well_separated_blobs():
    points = _blobs()
    # k = 3 (the point itself and two at 0.1): a center's neighbours are at 0, 0.1, 0.1, an
    # arm's at 0, 0.1, 0.14, so each center is its blob's density peak; its delta is the
    # distance to another blob (or the largest distance), an arm's only 0.1
    centers, assignment, density = density_peaks(points, 3, k=3)
    assert sorted(centers.tolist()) == [0, 5, 10]
    cluster = {int(c): i for i, c in enumerate(centers)}
    assert assignment.tolist() == [cluster[0]] * 5 + [cluster[5]] * 5 + [cluster[10]] * 5
    assert density[0] == pytest.approx(math.exp(-(0.01 + 0.01) / 2 / 3), rel=1e-5)
    merged = merge_clusters(points, assignment, 3)
    assert torch.allclose(merged[cluster[5]], torch.tensor([10.0, 0.0]), atol=1e-6)


def test_density_weighted_merge_is_the_minimiser_of_eq_8():
    tokens = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
    assignment = torch.tensor([0, 0, 0, 1])
    weighted = merge_clusters(tokens, assignment, 2, torch.tensor([1.0, 1.0, 2.0, 7.0]))
    assert weighted[:, 0].tolist() == pytest.approx([(0 + 1 + 6) / 4, 5.0])
    assert merge_clusters(tokens, assignment, 2)[:, 0].tolist() == pytest.approx([4 / 3, 5.0])


def test_raters_are_the_text_tokens_above_the_mean_alignment():
    d = 2  # eq. (9) divides by sqrt(d)
    visual = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = math.sqrt(d) * torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)], [math.log(2), 0]])
    # rows of M: logits (ln 3, 0, ln 2) -> (1/2, 1/6, 1/3); (0, ln 3, 0) -> (1/5, 3/5, 1/5)
    similarity, raters = cross_modal_raters(visual, text)
    assert torch.allclose(similarity, torch.tensor([[1 / 2, 1 / 6, 1 / 3], [0.2, 0.6, 0.2]]))
    # s = (0.35, 0.383, 0.267), mean 1/3: the first two rate
    assert raters.tolist() == [True, True, False]
    # eq. (11): alpha = mean over the rater columns
    importance = rater_importance(similarity, raters)
    assert importance.tolist() == pytest.approx([1 / 3, 2 / 5])
    # all alike: nobody is above the mean and every column rates
    _, none = cross_modal_raters(visual, torch.zeros(3, 2))
    assert not none.any()
    assert rater_importance(similarity, none).tolist() == pytest.approx([1 / 3, 1 / 3])


def test_consolidation_keeps_the_count_contract():
    torch.manual_seed(0)
    tokens, importance = torch.randn(30, 8), torch.rand(30)
    for keep, clusters in [(10, 2), (12, 0), (30, 4), (5, 5), (1, 0)]:
        retained, anchors, merged, owner = consolidate(tokens, importance, keep, clusters, None,
                                                       "mean")  # fmt: skip
        assert retained.numel() + anchors.numel() == keep
        assert merged.shape == (anchors.numel(), 8)
        assert torch.equal(retained, torch.sort(retained).values)
        best = importance.argsort(descending=True)[: keep - clusters]
        assert sorted(retained.tolist()) == sorted(best.tolist())
        kept = set(retained.tolist()) | set(anchors.tolist())
        assert len(kept) == keep
        assert set(owner.tolist()) <= kept | {-1}
        assert bool((owner == -1).any()) == (clusters == 0 and keep < 30)  # dropped, not merged
        for k, anchor in enumerate(anchors.tolist()):  # each merged token is its members' mean
            assert torch.allclose(merged[k], tokens[owner == anchor].mean(dim=0), atol=1e-5)


def _vision(keep: int, **hparams) -> tuple[M.VisionSelection, torch.Tensor]:
    tokens = torch.cat([_blobs(), torch.tensor([[20.0, 20.0], [30.0, -5.0]])])  # (17, 2)
    attention = torch.zeros(17)
    attention[15], attention[16] = 0.5, 0.4  # the two lone tokens are the CLS's favourites
    signals = M.VisionSignals(tokens=tokens, coords=torch.zeros(17, 3, dtype=torch.long),
                              cls_attention=attention)  # fmt: skip
    return M.get("polymorphic")(**hparams).select_vision(signals, keep), tokens


def test_stage_1_retains_by_attention_and_merges_the_rest_into_density_peaks():
    # keep 5 with merge_fraction 0.6: 2 retained (15, 16) + 3 clusters, the three blobs
    selection, tokens = _vision(5, merge_fraction=0.6, knn=3)
    assert selection.kept.tolist() == [0, 5, 10, 15, 16]
    expected = torch.stack([tokens[0], tokens[5], tokens[10], tokens[15], tokens[16]])
    assert torch.allclose(selection.tokens, expected, atol=1e-6)  # '+' blobs average to center
    assert selection.assignment.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3, 4]
    # the paper's 5.4:1 (10/64): keep 7 -> 1 merged token of the 11 left after 6 retained
    selection, tokens = _vision(7)
    assert selection.tokens.shape == (7, 2)
    assert (selection.assignment >= 0).all() and selection.assignment.max() == 6


def _stage(hparams=None):
    """One stage by hand: text at 0, visual tokens at 1..8, text after the image at 9, 10."""
    hidden = torch.zeros(11, 2)
    hidden[1:9] = torch.tensor(
        [[3.0, 0], [0, 1], [2.0, 0], [0, 2], [1.0, 0], [0, 3], [0.5, 0], [0, 4]]
    )
    hidden[9] = torch.tensor([4.0, 0.0])  # aligned with the tokens on the first axis
    hidden[10] = torch.tensor([0.0, 0.0])
    text = torch.tensor([0, 9, 10])
    signals = M.LayerSignals(visual=torch.arange(1, 9), text=text, hidden=hidden)
    method = M.get("polymorphic").from_hparams({"merge_fraction": 0.25, **(hparams or {})})
    step = M.LayerStep(layer=3, keep=4, queries=None, needs_hidden=True)
    return method.select_layer(step, signals), hidden[1:9]


def test_stage_2_keeps_the_rater_favourites_and_merges_the_pruned():
    # keep 4 = 3 by importance + 1 merged (0.25). Only text 9 rates (it aligns with visual
    # tokens on the first axis), so the importance follows the first coordinate: 0, 2, 4 stay;
    # the other five (1, 3, 5, 6, 7) merge into one token at the slot of their density peak
    selection, states = _stage()
    assert isinstance(selection, M.LayerSelection)
    merged = states[[1, 3, 5, 6, 7]].mean(dim=0)
    kept_slots = selection.keep.tolist()
    assert {0, 2, 4} < set(kept_slots) and len(kept_slots) == 4
    (anchor,) = set(kept_slots) - {0, 2, 4}
    assert anchor in (1, 3, 5, 6, 7)
    expected = {0: states[0], 2: states[2], 4: states[4], anchor: merged}
    assert torch.allclose(selection.hidden, torch.stack([expected[k] for k in kept_slots]))
    # "end": the kept tokens' states in order, then the merged one
    selection, _ = _stage({"merged_position": "end"})
    assert torch.allclose(selection.hidden, torch.stack([states[0], states[2], states[4], merged]))
    # no merging: plain top-4 by importance
    selection, _ = _stage({"merge_fraction": 0.0})
    assert selection.tolist() == [0, 2, 4, 6]


def _plan(n_visual, n_layers, hparams=None, family=None, **budget):
    method = M.get("polymorphic").from_hparams(hparams or {})
    return method.plan(M.PlanContext(n_visual, n_layers, M.Budget(**budget), None, 0, family))


def test_plan_keeps_twice_the_budget_then_prunes_at_the_paper_layers():
    plan = _plan(576, 32, keep_tokens=64)
    assert plan.vision_keep == 128 and plan.vision_signals == frozenset({"cls_attention"})
    assert [s.layer for s in plan.layers] == [3, 7, 16]
    # (3 * 128 + 4 * 91 + 9 * 64 + 16 * 45) / 32 = 63.9
    assert [s.keep for s in plan.layers] == [91, 64, 45]
    assert all(s.queries is None and s.needs_hidden for s in plan.layers)
    assert abs(plan_average(plan, 576, 32) - 64) <= 1
    assert [s.layer for s in _plan(1024, 28, family="qwen2_vl", keep_tokens=64).layers] == [
        3,
        7,
        13,
    ]
    assert [s.layer for s in _plan(576, 40, family="llava", keep_tokens=64).layers] == [4, 9, 20]
    assert [s.layer for s in _plan(144, 4, keep_ratio=0.25).layers] == [1, 2, 3]
    assert [s.layer for s in _plan(576, 40, {"layers": [3, 7, 16]}, keep_tokens=64).layers] == [
        3,
        7,
        16,
    ]
    assert _plan(576, 32, {"score": "attention"}, keep_tokens=64).layers[0].queries == "text"
    assert _plan(576, 32, {"redundancy": 3.0}, keep_tokens=64).vision_keep == 192
    high = _plan(576, 32, keep_ratio=0.75)  # 2 x 432 > 576: no vision stage
    assert high.vision_keep is None and abs(plan_average(high, 576, 32) - 432) <= 1
    assert scale_layers((3, 7, 13), 2, 1, 1, paper_depth=28) == (1,)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("n_layers", [4, 8, 28, 32, 40])
@pytest.mark.parametrize("n_visual", [36, 144, 576, 2880])
def test_average_equals_budget_within_one_token(n_visual, n_layers, family):
    for keep_ratio in [0.02, 0.111, 0.222, 0.25, 0.333, 0.5, 0.75, 1.0]:
        for redundancy in [1.0, 2.0, 3.0]:
            plan = _plan(n_visual, n_layers, {"redundancy": redundancy}, family,
                         keep_ratio=keep_ratio)  # fmt: skip
            assert abs(plan_average(plan, n_visual, n_layers) - keep_ratio * n_visual) <= 1.0
            assert all(1 <= s.layer < n_layers for s in plan.layers)


def test_hyperparameters_and_errors():
    cls = M.get("polymorphic")
    assert cls.hyperparameters() == {
        "redundancy": 2.0,
        "merge_fraction": 10 / 64,
        "layers": None,
        "knn": None,
        "merge_weights": "mean",
        "score": "similarity",
        "merged_position": "anchor",
        "positions": "renumber",
    }
    assert cls.budget_is_average and not cls.uses_layer
    for bad, match in [
        ({"redundancy": 0.5}, r"polymorphic.redundancy=0.5: must be >= 1"),
        ({"merge_fraction": 1.0}, r"polymorphic.merge_fraction=1.0"),
        ({"knn": 0}, r"polymorphic.knn=0"),
        ({"layers": [7, 3]}, r"polymorphic.layers=\[7, 3\]"),
        ({"score": "rank"}, r"polymorphic.score='rank'"),
    ]:
        with pytest.raises(M.HyperparameterError, match=match):
            cls.from_hparams(bad)
    with pytest.raises(ValueError, match=r"polymorphic.layers=\[3, 7, 16\]: layer 7 is beyond"):
        _plan(144, 4, {"layers": [3, 7, 16]}, keep_ratio=0.25)
    with pytest.raises(ValueError, match=r"out of reach of layers \[30\]"):
        _plan(576, 32, {"layers": [30]}, keep_tokens=64)


@pytest.mark.parametrize("hparams", [{}, {"score": "attention", "merged_position": "end"}])
def test_whole_trial_on_tiny_llava(hparams):
    loaded, adapter = TINY.load_tiny("tiny-llava")
    config = TINY.tiny_trial("tiny-llava", "polymorphic", 2, keep_ratio=0.25, hparams=hparams)
    metrics = run_trial(loaded, adapter, config, ReferenceCache()).metrics
    assert abs(metrics["avg_visual_tokens"] - 0.25 * metrics["visual_tokens_in"]) <= 1.0
