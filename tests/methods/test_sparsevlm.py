"""SparseVLM: raters (chosen once and carried to later stages), rater scores, recycling counts,
DPC-kNN, a whole stage by hand, solved plans whose average equals the budget, the official
schedule and its averages, hyperparameters, whole trials on the tiny models."""

from __future__ import annotations

import itertools
import math

import pytest
import tiny_models as TINY
import torch

import prunelab.methods as M
from prunelab.methods.pdrop import plan_average
from prunelab.methods.sparsevlm import (
    OFFICIAL_KEEPS,
    SparseVLM,
    cluster_count,
    dpc_knn,
    merge_clusters,
    official_keeps,
    rater_mask,
    rater_relevance,
    rater_scores,
    recycle_split,
)
from prunelab.workers.runner import ReferenceCache, run_trial


def test_raters_are_text_tokens_above_the_mean_relevance():
    visual = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # (V=2, D=2)
    # logits per visual token (ln 2, 0, 0): softmax (1/2, 1/4, 1/4), mean 1/3
    text = torch.tensor([[math.log(2), 0.0], [0.0, 0.0], [0.0, 5.0]])
    assert rater_relevance(visual, text).tolist() == [True, False, False]
    # logits (ln 3, ln 3, 0): softmax (3/7, 3/7, 1/7)
    text = torch.tensor([[math.log(3), 1.0], [math.log(3), -1.0], [0.0, 0.0]])
    assert rater_relevance(visual, text).tolist() == [True, True, False]
    # all equal: nobody is above the mean
    assert not rater_relevance(visual, torch.zeros(3, 2)).any()


def test_rater_scores_average_heads_and_rater_rows_only():
    # 2 heads; query rows at positions 3, 4, 5; visual tokens at 0, 1, 2
    attention = torch.zeros(2, 3, 6)
    attention[0, 0, :3] = torch.tensor([0.2, 0.4, 0.0])
    attention[1, 0, :3] = torch.tensor([0.4, 0.0, 0.2])
    attention[:, 1, :3] = torch.tensor([0.0, 0.0, 0.9])  # position 4 is not a rater
    attention[0, 2, :3] = torch.tensor([0.6, 0.0, 0.0])
    attention[1, 2, :3] = torch.tensor([0.0, 0.2, 0.2])
    scores = rater_scores(attention, torch.tensor([3, 4, 5]), torch.tensor([3, 5]),
                          torch.tensor([0, 1, 2]))  # fmt: skip
    assert torch.allclose(scores, torch.tensor([0.3, 0.15, 0.1]))
    # no rater among the rows: every row rates
    everyone = rater_scores(attention, torch.tensor([3, 4, 5]), torch.tensor([9]),
                            torch.tensor([0, 1, 2]))  # fmt: skip
    assert torch.allclose(everyone, attention[:, :, :3].mean(dim=(0, 1)))


def test_recycling_counts_follow_the_official_code():
    # 576 -> 300 kept: 276 pruned, top int(82.8) + 1 = 83 recycled into int(8.3) + 1 = 9
    assert cluster_count(276, 0.3, 0.1) == 9
    assert cluster_count(1, 0.3, 0.1) == 1 and cluster_count(0, 0.3, 0.1) == 0
    assert recycle_split(576, 309, 0.3, 0.1) == (300, 9)
    assert recycle_split(576, 576, 0.3, 0.1) == (576, 0)
    # too few slots for the official 18 clusters of 570 pruned: at most half the slots merge
    assert recycle_split(576, 6, 0.3, 0.1) == (3, 3)
    assert recycle_split(576, 1, 0.3, 0.1) == (1, 0)
    for slots in range(1 + cluster_count(575, 0.3, 0.1), 577):
        kept, clusters = recycle_split(576, slots, 0.3, 0.1)
        assert kept + clusters == slots and clusters == cluster_count(576 - kept, 0.3, 0.1)


def test_dpc_knn_finds_two_obvious_clusters():
    points = torch.tensor(
        [[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [10.0, 10.0], [10.1, 10.0], [10.0, 10.1], [9.9, 10.0]]
    )
    centers, assignment = dpc_knn(points, 2)
    assert sorted(int(c) < 3 for c in centers) == [False, True]  # one center in each group
    first = int(assignment[0])
    assert assignment.tolist() == [first] * 3 + [1 - first] * 4
    assert assignment[centers].tolist() == [0, 1]
    merged = merge_clusters(points, assignment, 2)
    assert torch.allclose(merged[first], torch.tensor([0.1 / 3, 0.1 / 3]))
    assert torch.allclose(merged[1 - first], torch.tensor([10.0, 10.025]))


def test_dpc_knn_centers_are_density_times_distance_peaks():
    # equal densities (every nearest neighbour at exactly 0.5): ties go to the lower index, so
    # token 0 is the peak (delta = the largest distance, |(0,0)-(3.5,4)| = 5.32) and token 2
    # the next (delta = |(3,4)-(0.5,0)| = 4.72 > 0.5 for tokens 1 and 3)
    points = torch.tensor([[0.0, 0.0], [0.5, 0.0], [3.0, 4.0], [3.5, 4.0]])
    centers, assignment = dpc_knn(points, 2)
    assert centers.tolist() == [0, 2]
    assert assignment.tolist() == [0, 0, 1, 1]


def _stage(recycle_position="end", recycle=True, embeddings=None, raters="once"):
    """One first stage by hand: text at 0, visual tokens at 1..8, text after the image at 9, 10.
    The raters come from ``embeddings`` (default: the same states as ``hidden``)."""
    hidden = torch.zeros(11, 2)
    hidden[1:9] = torch.arange(16.0).view(8, 2) / 10  # visual states (0, .1), (.2, .3), ...
    hidden[9] = torch.tensor([1.0, 1.0])  # aligned with every visual state: the only rater
    text = torch.tensor([0, 9, 10])
    attention = torch.zeros(1, 3, 11)  # one head, query rows at 0, 9, 10
    attention[0, 0, 2] = 0.9  # rows 0 and 10 are not raters: ignored
    attention[0, 2, 2] = 0.9
    scores = torch.tensor([0.30, 0.05, 0.20, 0.12, 0.15, 0.10, 0.02, 0.01])
    attention[0, 1, 1:9] = scores
    signals = M.LayerSignals(
        visual=torch.arange(1, 9),
        text=text,
        attention=attention,
        query_positions=text,
        hidden=hidden,
        embeddings=hidden if embeddings is None else embeddings,
    )
    method = M.get("sparsevlm")(recycle=recycle, recycle_position=recycle_position, raters=raters)
    step = M.LayerStep(
        layer=3, keep=4, queries="text", needs_hidden=True, positions="renumber",
        needs_embeddings=raters == "once",
    )  # fmt: skip
    return method.select_layer(step, signals), hidden[1:9]


def test_stage_keeps_top_rated_and_recycles_the_best_pruned():
    # 8 -> 4 slots: m=3 kept by score (0, 2, 4) + 1 cluster of the top int(5 * 0.3) + 1 = 2
    # pruned tokens (3 and 5) whose center (equal densities: the better-rated 3) anchors it
    selection, states = _stage("end")
    assert isinstance(selection, M.LayerSelection)
    assert selection.keep.tolist() == [0, 2, 3, 4]
    merged = (states[3] + states[5]) / 2
    # official order: the kept tokens, then the merged token
    assert torch.allclose(selection.hidden, torch.stack([states[0], states[2], states[4], merged]))
    assert selection.carry.tolist() == [False, True, False]  # the raters, for the next stages
    selection, _ = _stage("anchor")
    assert selection.keep.tolist() == [0, 2, 3, 4]
    assert torch.allclose(selection.hidden, torch.stack([states[0], states[2], merged, states[4]]))
    selection, _ = _stage(recycle=False)
    assert selection.keep.tolist() == [0, 2, 3, 4] and selection.hidden is None  # plain top-4
    selection, _ = _stage(recycle=False, raters="per_stage")
    assert selection.tolist() == [0, 2, 3, 4]  # nothing to carry


def test_first_stage_raters_come_from_the_input_embeddings():
    # in the embeddings token 10 (not 9) is aligned with the visual tokens: it alone rates,
    # and its row (0.9 on visual index 1, zero elsewhere) decides; ties keep index order
    embeddings = torch.zeros(11, 2)
    embeddings[1:9] = torch.arange(16.0).view(8, 2) / 10
    embeddings[10] = torch.tensor([1.0, 1.0])
    selection, _ = _stage(recycle=False, embeddings=embeddings)
    assert selection.keep.tolist() == [0, 1, 2, 3]
    assert selection.carry.tolist() == [False, False, True]
    # raters="per_stage": the layer's hidden states choose token 9 as before
    selection, _ = _stage(recycle=False, embeddings=embeddings, raters="per_stage")
    assert selection.tolist() == [0, 2, 3, 4]


def test_rater_mask_rates_with_the_text_after_the_image_only():
    states = torch.tensor([[0.0, 9.0], [1.0, 0.0], [0.0, 1.0], [5.0, 0.0], [0.0, 5.0]])
    # position 0 (before the image) would be the most aligned with visual 2 but never rates;
    # after the image: 3 -> (e^5, 1)/(e^5 + 1) for visual 1, 4 -> the same for visual 2: a tie
    mask = rater_mask(states, torch.tensor([1, 2]), torch.tensor([0, 3, 4]))
    assert mask.tolist() == [False, False, False]
    mask = rater_mask(states, torch.tensor([1]), torch.tensor([0, 3, 4]))
    assert mask.tolist() == [False, True, False]
    # no text after the image: every text token is a candidate (1 is aligned with visual 3)
    mask = rater_mask(states[:4], torch.tensor([3]), torch.tensor([0, 1, 2]))
    assert mask.tolist() == [False, True, False]


# Two stages by hand. Stage 1: system text at 0, visual tokens at 1..5, text after the image
# at 6 (A) and 7 (B). Input embeddings: visual 1-3 = (1, 0), 4-5 = (0, 1), A = (ln 3, 0),
# B = (0, ln 3); softmax over (A, B) is (3/4, 1/4) for a (1, 0) token, (1/4, 3/4) for (0, 1).
LN3 = math.log(3)
EMBEDDINGS = torch.tensor(
    [[0.0, 0.0], [1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [LN3, 0], [0, LN3]]
)  # (8, 2)


def _first_stage(method):
    # all five visual tokens: R_A = (3 * 3/4 + 2 * 1/4) / 5 = 0.55 > 0.5: A alone rates
    text = torch.tensor([0, 6, 7])
    attention = torch.zeros(1, 3, 8)  # rows of the text queries 0, 6, 7
    attention[0, 1, 1:6] = torch.tensor([0.30, 0.05, 0.10, 0.25, 0.20])  # A: keep 1, 4, 5
    attention[0, 2, 1:6] = torch.tensor([0.0, 0.50, 0.40, 0.0, 0.0])  # B: would keep 2, 3
    signals = M.LayerSignals(
        visual=torch.arange(1, 6), text=text, attention=attention, query_positions=text,
        hidden=EMBEDDINGS.clone(), embeddings=EMBEDDINGS.clone(),
    )  # fmt: skip
    step = M.LayerStep(3, 3, "text", needs_hidden=True, positions="renumber", needs_embeddings=True)
    return method.select_layer(step, signals)


def _second_stage(method, carry):
    # the survivors 1, 4, 5 now at 1, 2, 3; A at 4, B at 5
    present = torch.tensor([0, 1, 4, 5, 6, 7])  # their positions in the stage-1 sequence
    text = torch.tensor([0, 4, 5])
    attention = torch.zeros(1, 3, 6)
    attention[0, 1, 1:4] = torch.tensor([0.1, 0.2, 0.6])  # A: keep visual index 2
    attention[0, 2, 1:4] = torch.tensor([0.7, 0.1, 0.1])  # B: keep visual index 0
    signals = M.LayerSignals(
        visual=torch.tensor([1, 2, 3]), text=text, attention=attention, query_positions=text,
        hidden=EMBEDDINGS[present].clone(), carry=carry,
    )  # fmt: skip
    step = M.LayerStep(7, 1, "text", needs_hidden=True, positions="renumber")
    return method.select_layer(step, signals), signals


def test_later_stages_keep_the_first_stage_raters():
    method = M.get("sparsevlm")(recycle=False)
    first = _first_stage(method)
    assert first.keep.tolist() == [0, 3, 4]  # A's row: visual 1, 4, 5
    assert first.carry.tolist() == [False, True, False]  # A
    # on the survivors' embeddings the per-stage rule would now choose B:
    # R_A = (3/4 + 2 * 1/4) / 3 = 5/12 < 1/2
    second, signals = _second_stage(method, first.carry)
    assert rater_mask(signals.hidden, signals.visual, signals.text).tolist() == [False, False, True]
    # ... but A still rates: its row keeps visual index 2 (B's would keep 0)
    assert second.keep.tolist() == [2]
    assert torch.equal(second.carry, first.carry)
    # raters="per_stage" (here the hidden states are the embeddings) follows B at stage 2
    per_stage = M.get("sparsevlm")(recycle=False, raters="per_stage")
    assert _second_stage(per_stage, None)[0].tolist() == [0]
    # a later stage without the first stage's raters is an error, not a recomputation
    with pytest.raises(ValueError, match=r"layer step at 7 needs the first stage's rater mask"):
        _second_stage(method, None)
    with pytest.raises(ValueError, match=r"over its 3 text tokens .*got torch.bool \(2,\)"):
        _second_stage(method, torch.tensor([True, False]))


def test_the_pruner_carries_the_first_stage_raters(monkeypatch):
    """Whole trial on tiny-llava: every later step gets, and keeps, the mask the first step
    chose from the input embeddings of all tokens."""
    calls = []
    select = SparseVLM.select_layer

    def spy(self, step, signals):
        selection = select(self, step, signals)
        calls.append((step, signals, selection))
        return selection

    monkeypatch.setattr(SparseVLM, "select_layer", spy)
    TINY.average_trial_metrics("tiny-llava", "sparsevlm", 2, 0.5)
    assert [step.layer for step, _, _ in calls] == [1, 2, 3] * 2  # 2 samples x 3 stages
    for first, *later in (calls[:3], calls[3:]):
        step, signals, selection = first
        assert step.needs_embeddings and signals.carry is None
        assert signals.embeddings.shape[0] == signals.visual.numel() + signals.text.numel()
        expected = rater_mask(signals.embeddings, signals.visual, signals.text)
        assert torch.equal(selection.carry, expected)
        for step, signals, selection in later:
            assert not step.needs_embeddings and signals.embeddings is None
            assert torch.equal(signals.carry, expected) and torch.equal(selection.carry, expected)


def _plan(n_visual, n_layers, hparams=None, **budget):
    method = M.get("sparsevlm").from_hparams(hparams or {})
    return method.plan(M.PlanContext(n_visual, n_layers, M.Budget(**budget), None, 0))


def test_plan_prunes_after_layers_2_6_15_with_text_rows_and_hidden_states():
    plan = _plan(576, 32, keep_tokens=192)
    assert [s.layer for s in plan.layers] == [3, 7, 16]
    assert all(
        s.queries == "text" and s.needs_hidden and s.positions == "renumber" for s in plan.layers
    )
    # only the first stage asks for the input embeddings: it chooses the raters for all
    assert [s.needs_embeddings for s in plan.layers] == [True, False, False]
    per_stage = _plan(576, 32, {"raters": "per_stage"}, keep_tokens=192)
    assert not any(s.needs_embeddings for s in per_stage.layers)
    assert [s.keep for s in per_stage.layers] == [s.keep for s in plan.layers] == [319, 176, 97]
    assert abs(plan_average(plan, 576, 32) - 192) <= 1
    # below x = 0.5 each stage keeps half of the previous one (min_stage_ratio)
    keeps = [s.keep for s in _plan(576, 32, keep_tokens=128).layers]
    assert all(abs(b - a / 2) <= 1 for a, b in itertools.pairwise(keeps))
    # the paper's layers scale with depth: 2, 6, 15 of 32 -> 0, 1, 2 of 4
    assert [s.layer for s in _plan(144, 4, keep_ratio=0.5).layers] == [1, 2, 3]
    assert [s.layer for s in _plan(144, 4, {"layers": [1]}, keep_ratio=0.5).layers] == [2]


@pytest.mark.parametrize("n_layers", [4, 8, 24, 28, 32, 40])
@pytest.mark.parametrize("n_visual", [36, 144, 576, 2880])
def test_average_equals_budget_within_one_token(n_visual, n_layers):
    first = max(0, math.floor(2 * n_layers / 32 + 0.5)) + 1  # first layer with fewer tokens
    for keep_ratio in [0.05, 0.1, 0.111, 0.222, 0.25, 0.333, 0.5, 0.75, 1.0]:
        target = keep_ratio * n_visual
        try:
            plan = _plan(n_visual, n_layers, keep_ratio=keep_ratio)
        except ValueError as exc:
            floor = (first * n_visual + (n_layers - first)) / n_layers
            assert floor > target + 1 and "out of reach" in str(exc), (keep_ratio, exc)
            continue
        assert abs(plan_average(plan, n_visual, n_layers) - target) <= 1.0, keep_ratio
        assert all(1 <= s.layer < n_layers for s in plan.layers)


def test_hyperparameters_and_impossible_plans():
    cls = M.get("sparsevlm")
    assert cls.hyperparameters() == {
        "layers": None,
        "recycle": True,
        "recycle_ratio": 0.3,
        "cluster_ratio": 0.1,
        "recycle_position": "end",
        "min_stage_ratio": 0.5,
        "raters": "once",
        "schedule": "solved",
    }
    assert cls.version == "3"
    assert cls.budget_is_average and not cls.uses_layer
    assert cls.from_hparams({"layers": [0, 1]}).layers == (0, 1)
    with pytest.raises(M.HyperparameterError, match=r"sparsevlm.recycle_ratio=0: must be in"):
        cls.from_hparams({"recycle_ratio": 0})
    with pytest.raises(M.HyperparameterError, match=r"sparsevlm.cluster_ratio=2.0"):
        cls.from_hparams({"cluster_ratio": 2.0})
    with pytest.raises(M.HyperparameterError, match=r"sparsevlm.recycle_position='middle'"):
        cls.from_hparams({"recycle_position": "middle"})
    with pytest.raises(M.HyperparameterError, match=r"sparsevlm.raters='sometimes'"):
        cls.from_hparams({"raters": "sometimes"})
    with pytest.raises(M.HyperparameterError, match=r"sparsevlm.schedule='paper'"):
        cls.from_hparams({"schedule": "paper"})
    with pytest.raises(M.HyperparameterError, match=r"unknown hyperparameter\(s\) rater_source"):
        cls.from_hparams({"rater_source": "hidden"})
    with pytest.raises(M.HyperparameterError, match=r"sparsevlm.layers=\[6, 2\]"):
        cls.from_hparams({"layers": [6, 2]})
    with pytest.raises(ValueError, match=r"sparsevlm.layers=\[2, 6, 15\]: layer 6 leaves no later"):
        _plan(144, 4, {"layers": [2, 6, 15]}, keep_ratio=0.5)
    with pytest.raises(ValueError, match=r"average of 28.8 .* out of reach .*at least 54.9"):
        _plan(576, 32, keep_ratio=0.05)


# official score.py lists (kept by score at pruning_loc 2, 6, 15) and, worked by hand from the
# official code, the stages' cluster counts: stage 1 of "192" prunes 576 - 300 = 276, recycles
# int(276 * 0.3) + 1 = 83 into int(83 / 10) + 1 = 9, so K_1 = 309; then 309 -> 200 + 4, ...
OFFICIAL = {
    192: ((300, 200, 110), (9, 4, 3)),
    128: ((303, 110, 36), (9, 7, 3)),
    96: ((238, 48, 26), (11, 7, 1)),
    64: ((66, 30, 17), (16, 2, 1)),
}


def _project_average(keeps, first_reduced=(3, 7, 16), n=576, depth=32):
    """Layer by layer: a layer before ``first_reduced[s]`` sees the previous count (the rating
    layer l = first_reduced[s] - 1 attends over, and caches, all of them)."""
    counts, current = [], n
    for layer in range(depth):
        for start, keep in zip(first_reduced, keeps, strict=True):
            if layer == start:
                current = keep
        counts.append(current)
    return sum(counts) / depth


def _official_log_average(keeps, pruning_loc=(2, 6, 15), n=576, depth=32):
    """The official "Equal Tokens" log: ``num_token`` appends v_token_num after each layer, so
    a pruning layer counts at its output count."""
    counts, current = [], n
    for layer in range(depth):
        if layer in pruning_loc:
            current = keeps[pruning_loc.index(layer)]
        counts.append(current)
    return sum(counts) / depth


def test_official_schedule_is_the_official_lists_plus_recycled_tokens():
    assert {b: scored for b, (scored, _) in OFFICIAL.items()} == OFFICIAL_KEEPS
    expected = {192: (309, 204, 113), 128: (312, 117, 39), 96: (249, 55, 27), 64: (82, 32, 18)}
    for budget, (scored, clusters) in OFFICIAL.items():
        keeps = official_keeps(scored, 576, 0.3, 0.1)
        assert keeps == expected[budget]
        assert keeps == tuple(m + c for m, c in zip(scored, clusters, strict=True))
        # each stage recovers exactly the official split (m_s kept by score, c_s merged)
        previous = (576, *keeps[:-1])
        splits = [recycle_split(v, k, 0.3, 0.1) for v, k in zip(previous, keeps, strict=True)]
        assert splits == list(zip(scored, clusters, strict=True))
        plan = _plan(576, 32, {"schedule": "official"}, keep_tokens=budget)
        assert [(s.layer, s.keep) for s in plan.layers] == list(zip((3, 7, 16), keeps, strict=True))
        assert [s.needs_embeddings for s in plan.layers] == [True, False, False]
        no_merge = _plan(576, 32, {"schedule": "official", "recycle": False}, keep_tokens=budget)
        assert tuple(s.keep for s in no_merge.layers) == scored
    # capped at V - 1 as official (top-k of min(list, v_token_num - 1))
    assert official_keeps((300, 200), 250, None, 0.1) == (249, 200)


def test_official_lists_average_more_than_their_names():
    # this project's count (every layer up to the rating layer sees all): 206.5 / 145.4 / 82.25
    project = {192: 6608 / 32, 128: 4653 / 32, 96: 3651 / 32, 64: 2632 / 32}
    # the official log counts the rating layer already pruned: about the names
    logged = {192: 6145 / 32, 128: 4116 / 32, 96: 3102 / 32, 64: 2074 / 32}
    for budget, (scored, _) in OFFICIAL.items():
        keeps = official_keeps(scored, 576, 0.3, 0.1)
        plan = _plan(576, 32, {"schedule": "official"}, keep_tokens=budget)
        assert plan_average(plan, 576, 32) == _project_average(keeps) == project[budget]
        assert _official_log_average(keeps) == logged[budget]
    assert [round(project[b], 2) for b in (192, 128, 96, 64)] == [206.5, 145.41, 114.09, 82.25]
    assert [round(logged[b], 2) for b in (192, 128, 96, 64)] == [192.03, 128.62, 96.94, 64.81]


def _problem(n_visual, n_layers, hparams, **budget):
    method = M.get("sparsevlm").from_hparams(hparams)
    return method.plan_problem(M.PlanContext(n_visual, n_layers, M.Budget(**budget), None, 0))


def test_official_schedule_is_refused_where_the_authors_gave_none():
    official = {"schedule": "official"}
    assert _problem(576, 32, official, keep_ratio=1 / 3) is None  # 192 tokens
    assert _problem(576, 32, {**official, "layers": [2, 6, 15]}, keep_tokens=128) is None
    cases = [
        (576, 32, official, {"keep_tokens": 100}, "layers 2,6,15 at 100 tokens"),
        (576, 40, official, {"keep_tokens": 192}, "576 visual tokens, 40 layers"),
        (144, 4, official, {"keep_ratio": 0.5}, "144 visual tokens, 4 layers"),
        (576, 32, {**official, "layers": [1, 6, 15]}, {"keep_tokens": 64}, "layers 1,6,15 at 64"),
    ]
    for n_visual, n_layers, hparams, budget, shown in cases:
        problem = _problem(n_visual, n_layers, hparams, **budget)
        assert problem is not None and "\n" not in problem
        assert problem.startswith("sparsevlm.schedule='official': the official lists are for")
        assert shown in problem and problem.endswith("use schedule='solved'"), problem


@pytest.mark.parametrize("keep_ratio", [0.25, 0.5])
def test_whole_trial_on_tiny_llava(keep_ratio):
    metrics = TINY.average_trial_metrics("tiny-llava", "sparsevlm", 4, keep_ratio)
    assert metrics["visual_tokens_in"] == 144


def test_recycled_tokens_change_the_outputs():
    loaded, adapter = TINY.load_tiny("tiny-llava")
    cache = ReferenceCache()

    def kl(hparams):
        config = TINY.tiny_trial("tiny-llava", "sparsevlm", 2, keep_ratio=0.5, hparams=hparams)
        return [p["fidelity_kl"] for p in run_trial(loaded, adapter, config, cache).predictions]

    merged, dropped = kl({}), kl({"recycle": False})
    assert merged != dropped
    assert kl({"recycle_position": "anchor"}) != merged
    kl({"raters": "per_stage"})  # runs; the official schedule is refused on tiny models


@pytest.mark.parametrize("model", TINY.TINY_MODELS)
def test_whole_trial_on_every_family(model):
    TINY.average_trial_metrics(model, "sparsevlm", 2, 0.5)
