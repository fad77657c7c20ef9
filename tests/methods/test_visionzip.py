"""VisionZip: split, dominant selection, contextual merging by hand, hparams, whole trials."""

from __future__ import annotations

import pytest
import tiny_models as TINY
import torch

import prunelab.methods as M
from prunelab.methods.visionzip import visionzip_select, visionzip_split
from prunelab.workers.adapters.base import grid_coords
from prunelab.workers.runner import ReferenceCache, run_trial

_trial = TINY.tiny_trial


def test_split_reproduces_the_published_settings():
    # README / paper: LLaVA-1.5 54+10, 108+20, 162+30; LLaVA-NeXT 135+25, 270+50, 540+100
    for keep, expected in [(64, (54, 10)), (128, (108, 20)), (192, (162, 30)),
                           (160, (135, 25)), (320, (270, 50)), (640, (540, 100))]:  # fmt: skip
        assert visionzip_split(keep, 10 / 64) == expected
    assert visionzip_split(1, 10 / 64) == (1, 0)
    assert visionzip_split(36, 10 / 64) == (30, 6)  # 5.625 rounds to 6
    assert visionzip_split(8, 1.0) == (0, 8)


def test_dominant_tokens_are_the_top_cls_attention_tokens():
    tokens = torch.arange(16.0).reshape(8, 2)
    cls = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.02, 0.01, 0.01, 0.01])
    keys = torch.randn(8, 4)
    method = M.get("visionzip")(contextual_fraction=0.0)
    sel = method.select_vision(
        M.VisionSignals(tokens=tokens, coords=grid_coords(2, 4), cls_attention=cls,
                        key_metric=keys), 2)  # fmt: skip
    assert sel.kept.tolist() == [1, 3]
    assert torch.equal(sel.tokens, tokens[[1, 3]])
    assert sel.assignment.tolist() == [-1, 0, -1, 1, -1, -1, -1, -1]


def _merge_case():
    # token 0 dominates; the rest R = [1..5], K_c = 2, step = 5 // 2 = 2: targets 1 and 3.
    # Keys: 2 and 5 point like 3's, 4 like 1's -> M_1 = {4}, M_3 = {2, 5}.
    tokens = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [3.0, 1.0], [4.0, 1.0], [5.0, 1.0]])
    cls = torch.tensor([0.9, 0.02, 0.02, 0.02, 0.02, 0.02])
    keys = torch.tensor([[5.0, 5.0], [1.0, 0.0], [0.1, 1.0], [0.0, 1.0], [1.0, 0.2], [0.0, 2.0]])
    return tokens, cls, keys


def test_contextual_tokens_official_add_the_mean_of_their_members_to_the_target():
    tokens, cls, keys = _merge_case()
    sel = visionzip_select(tokens, cls, keys, dominant=1, contextual=2, merge="official")
    assert sel.kept.tolist() == [0, 1, 3]
    expected = torch.tensor([[0.0, 1.0], [1.0 + 4.0, 2.0], [3.0 + 3.5, 2.0]])  # x1 + x4; x3 + mean
    assert torch.allclose(sel.tokens, expected)
    assert sel.assignment.tolist() == [0, 1, 2, 2, 1, 2]


def test_contextual_tokens_mean_average_target_and_members():
    tokens, cls, keys = _merge_case()
    sel = visionzip_select(tokens, cls, keys, dominant=1, contextual=2, merge="mean")
    expected = torch.tensor([[0.0, 1.0], [2.5, 1.0], [10.0 / 3.0, 1.0]])  # (1+4)/2; (3+2+5)/3
    assert torch.allclose(sel.tokens, expected)


def test_method_uses_the_fraction_and_keeps_exactly_keep():
    tokens, cls, keys = _merge_case()
    method = M.get("visionzip")(contextual_fraction=2 / 3)  # keep 3 -> 1 dominant + 2 contextual
    signals = M.VisionSignals(tokens=tokens, coords=grid_coords(2, 3), cls_attention=cls,
                              key_metric=keys)  # fmt: skip
    sel = method.select_vision(signals, 3)
    assert sel.kept.tolist() == [0, 1, 3]
    assert torch.allclose(sel.tokens[1], torch.tensor([5.0, 2.0]))
    for keep in range(1, 7):
        assert method.select_vision(signals, keep).tokens.shape == (keep, 2)


def test_plan_and_hyperparameters():
    method = M.get("visionzip")()
    plan = method.plan(M.PlanContext(576, 32, M.Budget(keep_tokens=64), None, 0))
    assert plan.vision_keep == 64 and plan.layers == ()
    assert plan.vision_signals == {"cls_attention", "key_metric"}
    assert M.get("visionzip").hyperparameters() == {
        "contextual_fraction": 0.15625,
        "contextual_merge": "official",
    }
    with pytest.raises(M.HyperparameterError, match=r"visionzip.contextual_fraction=1.5"):
        M.get("visionzip").from_hparams({"contextual_fraction": 1.5})
    with pytest.raises(M.HyperparameterError, match=r"visionzip.contextual_merge='sum'"):
        M.get("visionzip").from_hparams({"contextual_merge": "sum"})
    with pytest.raises(ValueError, match="cls_attention and key_metric"):
        method.select_vision(M.VisionSignals(tokens=torch.ones(4, 2), coords=grid_coords(2, 2)), 2)


@pytest.mark.parametrize("merge", ["official", "mean"])
def test_whole_trial_on_tiny_llava(merge):
    loaded, adapter = TINY.load_tiny("tiny-llava")
    config = _trial("tiny-llava", "visionzip", 6, keep_ratio=0.25,
                    hparams={"contextual_merge": merge})  # fmt: skip
    metrics = run_trial(loaded, adapter, config, ReferenceCache()).metrics
    assert metrics["visual_tokens_in"] == 144
    assert metrics["visual_tokens_kept"] == metrics["avg_visual_tokens"] == 36


@pytest.mark.parametrize("model", TINY.TINY_MODELS)
def test_whole_trial_on_every_family(model):
    loaded, adapter = TINY.load_tiny(model)
    metrics = run_trial(loaded, adapter, _trial(model, "visionzip", 2, keep_ratio=0.25)).metrics
    n = metrics["visual_tokens_in"]
    assert metrics["visual_tokens_kept"] == M.Budget(keep_ratio=0.25).tokens(int(n))
