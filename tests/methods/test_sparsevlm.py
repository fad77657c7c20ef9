"""SparseVLM: raters, rater scores, recycling counts, DPC-kNN, a whole stage by hand, plans
whose average equals the budget, hyperparameters, whole trials on the tiny models."""

from __future__ import annotations

import itertools
import math

import pytest
import tiny_models as TINY
import torch

import prunelab.methods as M
from prunelab.methods.pdrop import plan_average
from prunelab.methods.sparsevlm import (
    cluster_count,
    dpc_knn,
    merge_clusters,
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


def _stage(recycle_position="end", recycle=True, embeddings=None, rater_source="embeddings"):
    """One stage by hand: text at 0, visual tokens at 1..8, text after the image at 9, 10.
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
    method = M.get("sparsevlm")(
        recycle=recycle, recycle_position=recycle_position, rater_source=rater_source
    )
    step = M.LayerStep(layer=3, keep=4, queries="text", needs_hidden=True, positions="renumber")
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
    selection, _ = _stage("anchor")
    assert selection.keep.tolist() == [0, 2, 3, 4]
    assert torch.allclose(selection.hidden, torch.stack([states[0], states[2], merged, states[4]]))
    selection, _ = _stage(recycle=False)
    assert selection.tolist() == [0, 2, 3, 4]  # plain top-4


def test_raters_come_from_the_input_embeddings_by_default():
    # in the embeddings token 10 (not 9) is aligned with the visual tokens: it alone rates,
    # and its row (0.9 on visual index 1, zero elsewhere) decides; ties keep index order
    embeddings = torch.zeros(11, 2)
    embeddings[1:9] = torch.arange(16.0).view(8, 2) / 10
    embeddings[10] = torch.tensor([1.0, 1.0])
    selection, _ = _stage(recycle=False, embeddings=embeddings)
    assert selection.tolist() == [0, 1, 2, 3]
    # rater_source="hidden": the layer's hidden states choose token 9 as before
    selection, _ = _stage(recycle=False, embeddings=embeddings, rater_source="hidden")
    assert selection.tolist() == [0, 2, 3, 4]


def _plan(n_visual, n_layers, hparams=None, **budget):
    method = M.get("sparsevlm").from_hparams(hparams or {})
    return method.plan(M.PlanContext(n_visual, n_layers, M.Budget(**budget), None, 0))


def test_plan_prunes_after_layers_2_6_15_with_text_rows_and_hidden_states():
    plan = _plan(576, 32, keep_tokens=192)
    assert [s.layer for s in plan.layers] == [3, 7, 16]
    assert all(
        s.queries == "text" and s.needs_hidden and s.needs_embeddings and s.positions == "renumber"
        for s in plan.layers
    )
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
        "rater_source": "embeddings",
    }
    assert cls.budget_is_average and not cls.uses_layer
    assert cls.from_hparams({"layers": [0, 1]}).layers == (0, 1)
    with pytest.raises(M.HyperparameterError, match=r"sparsevlm.recycle_ratio=0: must be in"):
        cls.from_hparams({"recycle_ratio": 0})
    with pytest.raises(M.HyperparameterError, match=r"sparsevlm.cluster_ratio=2.0"):
        cls.from_hparams({"cluster_ratio": 2.0})
    with pytest.raises(M.HyperparameterError, match=r"sparsevlm.recycle_position='middle'"):
        cls.from_hparams({"recycle_position": "middle"})
    with pytest.raises(M.HyperparameterError, match=r"sparsevlm.layers=\[6, 2\]"):
        cls.from_hparams({"layers": [6, 2]})
    with pytest.raises(ValueError, match=r"sparsevlm.layers=\[2, 6, 15\]: layer 6 leaves no later"):
        _plan(144, 4, {"layers": [2, 6, 15]}, keep_ratio=0.5)
    with pytest.raises(ValueError, match=r"average of 28.8 .* out of reach .*at least 54.9"):
        _plan(576, 32, keep_ratio=0.05)


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


@pytest.mark.parametrize("model", TINY.TINY_MODELS)
def test_whole_trial_on_every_family(model):
    TINY.average_trial_metrics(model, "sparsevlm", 2, 0.5)
