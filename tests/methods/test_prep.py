"""PREP: pooling (eq. 5), Q^k (eq. 1), EKL (eq. 4), the multimodal score (eqs. 7-10), planning.

Every expected number is worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

import prunelab.methods as M
from prunelab.methods.base import PreInferenceSignals
from prunelab.methods.prep import (
    alignment_from_attention,
    alignment_from_hidden,
    block_shape,
    candidate_layers,
    choose_layer,
    entropy,
    kl_divergence,
    layer_scores,
    multimodal_scores,
    pool_groups,
    pool_tokens,
)
from prunelab.workers.adapters.base import grid_coords

LN2 = math.log(2.0)


def test_entropy_and_kl_on_known_distributions() -> None:
    assert float(entropy(torch.tensor([0.25, 0.25, 0.25, 0.25]))) == pytest.approx(math.log(4))
    assert float(entropy(torch.tensor([1.0, 0.0]))) == pytest.approx(0.0)
    # KL([.5,.5] || [.25,.75]) = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 (ln 2 + ln 2/3) = 0.143841
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    assert float(kl_divergence(p, q)) == pytest.approx(0.1438410362, abs=1e-7)
    assert float(kl_divergence(p, p)) == pytest.approx(0.0)
    # KL([1, 0] || [.5, .5]) = ln 2
    assert float(kl_divergence(torch.tensor([1.0, 0.0]), p)) == pytest.approx(LN2)


def test_ekl_scores_and_layer_choice() -> None:
    # Q^5 = [.25,.75], Q^6 = [.5,.5], Q^7 = [.5,.5], Q^8 = [.9,.1]
    q = {
        5: torch.tensor([0.25, 0.75]),
        6: torch.tensor([0.5, 0.5]),
        7: torch.tensor([0.5, 0.5]),
        8: torch.tensor([0.9, 0.1]),
    }
    candidates = (6, 7, 8)
    # EKL_6 = ln 2 + KL([.5,.5]||[.25,.75]) = 0.693147 + 0.143841 = 0.836988
    # EKL_7 = ln 2 + 0 = 0.693147
    # EKL_8 = H([.9,.1]) + KL([.9,.1]||[.5,.5]) = 0.325083 + 0.368064 = ln 2
    #   (H(p) + KL(p || uniform) = ln r for any p)
    ekl = layer_scores(q, candidates, "ekl")
    assert ekl.tolist() == pytest.approx([0.8369882, LN2, LN2], abs=1e-6)
    assert choose_layer(candidates, ekl) == 6
    assert choose_layer(candidates, ekl, rank=2) == 7  # 7 and 8 tie: the earlier layer
    assert choose_layer(candidates, ekl, rank=3) == 8
    h = layer_scores(q, candidates, "entropy")
    assert h.tolist() == pytest.approx([LN2, LN2, 0.3250830], abs=1e-6)
    assert choose_layer(candidates, h) == 6
    kl = layer_scores(q, candidates, "kl")
    assert kl.tolist() == pytest.approx([0.1438410, 0.0, 0.3680642], abs=1e-6)
    assert choose_layer(candidates, kl) == 8


def test_alignment_softmax_runs_over_the_visual_axis() -> None:
    # D = 4 (sqrt 2); visual v1 = e1, v2 = e2 at positions 1, 2; text at 3, 4:
    # t1 = 2 ln3 e1 -> logits (ln 3, 0) -> softmax over visual (3/4, 1/4); t2 = 0 -> (1/2, 1/2)
    # mean over text: (5/8, 3/8). (A softmax over the text axis would give (1/2, 1/2).)
    hidden = torch.zeros(5, 4)
    hidden[0] = torch.tensor([9.0, 9.0, 9.0, 9.0])  # system token: not used
    hidden[1, 0] = 1.0
    hidden[2, 1] = 1.0
    hidden[3, 0] = 2 * math.log(3)
    q = alignment_from_hidden(hidden, torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert q.tolist() == pytest.approx([5 / 8, 3 / 8])


def test_alignment_from_attention_rows() -> None:
    # (H=2, M=1, S=4): head means to the visual keys at 1, 2: (0.2+0.4)/2=0.3, (0.2+0.0)/2=0.1
    # -> normalised (0.75, 0.25)
    rows = torch.tensor([[[0.6, 0.2, 0.2, 0.0]], [[0.6, 0.4, 0.0, 0.0]]])
    q = alignment_from_attention(rows, torch.tensor([1, 2]))
    assert q.tolist() == pytest.approx([0.75, 0.25])


def test_block_shape() -> None:
    assert block_shape(64) == (8, 8)
    assert block_shape(144) == (12, 12)
    assert block_shape(32) == (4, 8)
    assert block_shape(192) == (12, 16)
    assert block_shape(7) == (1, 7)


def test_grid_pooling_groups_blocks_and_anchors_on_the_centre() -> None:
    # 24 x 24 LLaVA grid, 64 tokens per group: 9 blocks of 8 x 8
    assignment, anchors = pool_groups(grid_coords(24, 24), 64)
    assert anchors.numel() == 9
    assert torch.bincount(assignment).tolist() == [64] * 9
    # block (0, 0): rows/cols 0..7, centroid (3.5, 3.5): (3,3),(3,4),(4,3),(4,4) tie -> (3,3)
    assert anchors[0].item() == 3 * 24 + 3
    assert assignment[0].item() == assignment[7 * 24 + 7].item() == 0
    assert assignment[8].item() == 1  # (0, 8) starts the second block
    # 3 x 3 grid, 9 per group: one block, anchored on its centre (index 4)
    assignment, anchors = pool_groups(grid_coords(3, 3), 9)
    assert anchors.tolist() == [4] and assignment.tolist() == [0] * 9
    # 3 x 3 grid, 4 per group (2 x 2 blocks, partial at the edge): members
    # {0,1,3,4} -> 0 (all equidistant), {2,5} -> 2, {6,7} -> 6, {8} -> 8
    assignment, anchors = pool_groups(grid_coords(3, 3), 4)
    assert anchors.tolist() == [0, 2, 6, 8]
    assert assignment.tolist() == [0, 0, 1, 0, 0, 1, 2, 2, 3]


def test_grid_pooling_keeps_tiles_apart() -> None:
    coords = torch.cat([grid_coords(2, 2, tile=0), grid_coords(2, 2, tile=1)])
    assignment, anchors = pool_groups(coords, 64)
    assert assignment.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert anchors.tolist() == [0, 4]


def test_sequence_pooling_is_the_literal_reshape() -> None:
    # 3 x 3 grid, runs of 4: {0..3}, {4..7}, {8}. Run 0 = (0,0),(0,1),(0,2),(1,0): centroid
    # (0.25, 0.75); squared distances .625, .125, 1.625, 1.125 -> anchor 1. Run 1 = (1,1),(1,2),
    # (2,0),(2,1): centroid (1.5, 1.0); distances .25, 1.25, 1.25, .25 -> anchor 4 (index tie)
    assignment, anchors = pool_groups(grid_coords(3, 3), 4, "sequence")
    assert assignment.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    assert anchors.tolist() == [1, 4, 8]
    with pytest.raises(ValueError, match="pooling"):
        pool_groups(grid_coords(3, 3), 4, "cubes")


def test_pool_tokens_averages_each_group() -> None:
    tokens = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [5.0, 5.0]])
    pooled = pool_tokens(tokens, torch.tensor([0, 0, 1, 0]), 2)
    # group 0: mean of rows 0, 1, 3 = (9/3, 11/3); group 1: row 2
    assert torch.allclose(pooled, torch.tensor([[3.0, 11 / 3], [10.0, 0.0]]))


def _attention() -> tuple[torch.Tensor, torch.Tensor]:
    # sequence: 0 system, 1-2 visual, 3-4 prompt text; causal rows for all 5 queries
    a = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0, 0.0],
            [0.5, 0.5, 0.0, 0.0, 0.0],
            [0.2, 0.2, 0.6, 0.0, 0.0],
            [0.1, 0.3, 0.2, 0.4, 0.0],
            [0.1, 0.1, 0.5, 0.1, 0.2],
        ]
    )
    b = a.clone()
    b[2] = torch.tensor([0.4, 0.0, 0.6, 0.0, 0.0])
    return torch.stack([a, b]), torch.arange(5)


def test_multimodal_score_hand_computed() -> None:
    attention, queries = _attention()
    visual, text = torch.tensor([1, 2]), torch.tensor([0, 3, 4])
    # head mean: row 2 = (0.3, 0.1, 0.6); others as in head a
    # s_v (visual queries 1, 2): token 1: (0.5 + 0.1)/2 = 0.3; token 2: (0.0 + 0.6)/2 = 0.3
    # s_t (text after the image, 3, 4; the system token 0 is not a text query):
    #   token 1: (0.3 + 0.1)/2 = 0.2; token 2: (0.2 + 0.5)/2 = 0.35
    score = multimodal_scores(attention, queries, visual, text)
    assert score.tolist() == pytest.approx([0.5, 0.65])
    assert multimodal_scores(attention, queries, visual, text, "v2v").tolist() == pytest.approx(
        [0.3, 0.3]
    )
    assert multimodal_scores(attention, queries, visual, text, "v2t").tolist() == pytest.approx(
        [0.2, 0.35]
    )
    with pytest.raises(ValueError, match="attention rows"):
        multimodal_scores(attention[:, :2], queries[:2], visual, text)


def test_select_layer_keeps_the_top_scores() -> None:
    attention, queries = _attention()
    method = M.get("prep")()
    signals = M.LayerSignals(
        visual=torch.tensor([1, 2]),
        text=torch.tensor([0, 3, 4]),
        attention=attention,
        query_positions=queries,
    )
    step = M.LayerStep(layer=3, keep=1, queries="all")
    assert method.select_layer(step, signals).tolist() == [1]  # 0.65 > 0.5
    v2v = M.get("prep")(token_score="v2t")
    assert v2v.select_layer(step, signals).tolist() == [1]
    with pytest.raises(RuntimeError, match="attention"):
        method.select_layer(step, M.LayerSignals(visual=signals.visual, text=signals.text))


def test_candidate_layers_scale_with_depth() -> None:
    assert candidate_layers(6, 15, 32) == tuple(range(6, 16))
    # 4 layers: round(6*4/32)=round(.75)=1 ... round(15*4/32)=round(1.875)=2
    assert candidate_layers(6, 15, 4) == (1, 2)
    assert candidate_layers(6, 15, 4, lowest=2) == (2,)
    # 28 layers (Qwen2.5-VL-7B, InternVL3-8B) have layers 6-15: the paper's range as it is
    assert candidate_layers(6, 15, 28) == tuple(range(6, 16))
    # 12 layers: 6*12/32 = 2.25 -> 2, 2.625 -> 3, 3, 3.375 -> 3, 3.75 -> 4, 4.125 -> 4, 4.5 -> 4,
    # 4.875 -> 5, 5.25 -> 5, 5.625 -> 6
    assert candidate_layers(6, 15, 12) == (2, 3, 4, 5, 6)
    assert candidate_layers(6, 15, 16) == tuple(range(6, 16))  # 16 layers: 6-15 exist
    with pytest.raises(ValueError, match="decoder layers"):
        candidate_layers(6, 15, 1)


def test_plan_is_provisional_until_the_pre_inference() -> None:
    method = M.get("prep")()
    plan = method.plan(M.PlanContext(576, 32, M.Budget(keep_tokens=64), None, 0))
    assert plan.layers == (M.LayerStep(layer=15, keep=64, queries="all"),)
    step = plan.pre_inference
    assert step is not None and step.hidden and not step.text_attention
    assert step.candidates == tuple(range(6, 16))
    assert step.layers == tuple(range(5, 16))  # Q^{k-1} of the first candidate too
    assert not M.get("prep").uses_layer


def test_after_pre_inference_chooses_the_ekl_argmax() -> None:
    method = M.get("prep")(alignment="attention")
    plan = method.plan(M.PlanContext(576, 32, M.Budget(keep_ratio=0.25), None, 0))
    assert plan.pre_inference is not None and plan.pre_inference.text_attention

    def rows(q0: float) -> torch.Tensor:  # (H=1, M=1, S=4): half on the system token
        return torch.tensor([[[0.5, 0.5 * q0, 0.5 * (1 - q0), 0.0]]])

    # Q^k = [.5,.5] everywhere but Q^9 = [.25,.75]: EKL_k = ln 2 except
    # EKL_10 = ln 2 + KL([.5,.5]||[.25,.75]) = 0.836988 (EKL_9 = ln 2: H(p) + KL(p||U) = ln r)
    attention = {k: rows(0.25 if k == 9 else 0.5) for k in plan.pre_inference.layers}
    signals = PreInferenceSignals(
        visual=torch.tensor([1, 2]), text=torch.tensor([3]), hidden={}, attention=attention
    )
    final, layer = method.after_pre_inference(plan, signals)
    assert layer == 10
    assert final.pre_inference is None
    assert final.layers == (M.LayerStep(layer=10, keep=144, queries="all"),)
    # the entropy-only ablation: every H is ln 2 except H(Q^9) = 0.562335 -> earliest, 6
    entropy_only = M.get("prep")(alignment="attention", layer_score="entropy")
    assert entropy_only.after_pre_inference(plan, signals)[1] == 6


def test_pool_pre_inference_on_vision_signals() -> None:
    method = M.get("prep")(group_size=4)
    tokens = torch.arange(16, dtype=torch.float32).reshape(16, 1).expand(16, 3)
    selection = method.pool_pre_inference(M.VisionSignals(tokens=tokens, coords=grid_coords(4, 4)))
    # 2 x 2 blocks of a 4 x 4 grid: {0,1,4,5} -> 2.5, {2,3,6,7} -> 4.5, {8,9,12,13} -> 10.5, ...
    assert selection.tokens[:, 0].tolist() == pytest.approx([2.5, 4.5, 10.5, 12.5])
    assert selection.kept.tolist() == [0, 2, 8, 10]
    assert selection.assignment is not None and selection.assignment[5].item() == 0


@pytest.mark.parametrize(
    "hparams",
    [
        {"group_size": 0},
        {"first_layer": 9, "last_layer": 8},
        {"first_layer": 0},
        {"rank": 0},
        {"pooling": "hex"},
        {"alignment": "cosine"},
        {"layer_score": "ek"},
        {"token_score": "all"},
    ],
)
def test_rejects_bad_hyperparameters(hparams: dict) -> None:
    with pytest.raises(M.HyperparameterError):
        M.get("prep").from_hparams(hparams)
