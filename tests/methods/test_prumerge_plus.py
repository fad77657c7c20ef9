"""PruMerge+: IQR outliers, spatial samples (budget / adaptive), kNN merge by hand, hparams,
whole trials."""

from __future__ import annotations

import pytest
import tiny_models as TINY
import torch

import prunelab.methods as M
from prunelab.methods.prumerge_plus import (
    iqr_outliers,
    prumerge_merge,
    spatial_order,
    spatial_samples_adaptive,
    spatial_samples_budget,
)
from prunelab.workers.adapters.base import grid_coords
from prunelab.workers.runner import ReferenceCache, run_trial

_trial = TINY.tiny_trial


def test_iqr_finds_the_one_clear_outlier():
    # sorted 1..7, 100: Q1 = 2.75, Q3 = 6.25 (linear interpolation), IQR = 3.5, bound 11.5
    a = torch.tensor([1.0, 2.0, 100.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert iqr_outliers(a).tolist() == [2]
    assert iqr_outliers(torch.tensor([1.0, 2.0, 11.0, 3.0, 4.0, 5.0, 6.0, 7.0])).tolist() == []
    assert iqr_outliers(torch.tensor([1.0, 2.0, 12.0, 3.0, 4.0, 5.0, 6.0, 7.0])).tolist() == [2]
    # sorted 1..6, 12, 100: Q1 = 2.75, Q3 = 7.5, IQR = 4.75; fence 10: 7.5 + 47.5 = 55
    wide = torch.tensor([1.0, 2.0, 12.0, 3.0, 4.0, 5.0, 6.0, 100.0])
    assert iqr_outliers(wide, 10.0).tolist() == [7]
    assert iqr_outliers(wide).tolist() == [7]  # fence 1.5: 7.5 + 7.125 = 14.625 > 12
    assert iqr_outliers(wide, 0.5).tolist() == [7, 2]  # fence 0.5: 9.875 < 12


def test_outliers_come_by_decreasing_attention():
    a = torch.ones(16)
    a[2], a[7], a[9] = 10.0, 30.0, 20.0  # Q1 = Q3 = 1: everything above 1 is an outlier
    assert iqr_outliers(a).tolist() == [7, 9, 2]


def test_spatial_order_follows_tile_row_col():
    coords = torch.cat([grid_coords(2, 2, tile=1), grid_coords(2, 2, tile=0)])  # thumbnail last
    assert spatial_order(coords).tolist() == [4, 5, 6, 7, 0, 1, 2, 3]


def test_budget_samples_are_evenly_spaced_over_the_non_outliers():
    # 15 non-outliers (all but 5), 4 samples at positions floor(i * 15 / 4) = 0, 3, 7, 11
    samples = spatial_samples_budget(grid_coords(4, 4), torch.tensor([5]), 4)
    assert samples.tolist() == [0, 3, 8, 12]


def test_adaptive_samples_follow_the_official_stride():
    # N = 36, one outlier: step = 36, stride = 12, positions 0, 12, 24 (< 35)
    assert spatial_samples_adaptive(grid_coords(6, 6), 1).tolist() == [0, 12, 24]
    # N = 576, 32 outliers: step 18, stride 6 (96 samples, as the official arange(0, 575, 6))
    assert spatial_samples_adaptive(grid_coords(24, 24), 32).tolist() == list(range(0, 575, 6))


def _signals(a: torch.Tensor, side: int) -> M.VisionSignals:
    n = side * side
    torch.manual_seed(0)
    return M.VisionSignals(tokens=torch.randn(n, 3), coords=grid_coords(side, side),
                           cls_attention=a, key_metric=torch.randn(n, 4))  # fmt: skip


def test_budget_mode_fills_with_spatial_samples():
    a = torch.ones(16)
    a[5] = 50.0
    method = M.get("prumerge_plus")(knn=0, extra_token=False)
    signals = _signals(a, 4)
    sel = method.select_vision(signals, 5)
    assert sel.kept.tolist() == [0, 3, 5, 8, 12]
    assert torch.equal(sel.tokens, signals.tokens[[0, 3, 5, 8, 12]])  # knn=0: nothing merged


def test_budget_mode_trims_outliers_by_attention():
    a = torch.ones(16)
    a[2], a[7], a[9] = 10.0, 30.0, 20.0
    method = M.get("prumerge_plus")(knn=0, extra_token=False)
    assert method.select_vision(_signals(a, 4), 2).kept.tolist() == [7, 9]


def test_knn_merge_official_and_weighted_mean():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [7.0, 7.0]])
    a = torch.tensor([0.1, 0.6, 0.1, 0.2])
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]])  # NN(1) = 0
    kept = torch.tensor([1])
    official = prumerge_merge(x, a, keys, kept, knn=1, merge="official")
    assert torch.allclose(official, torch.tensor([[0.1, 1.0]]))  # x1 + 0.1 x0
    mean = prumerge_merge(x, a, keys, kept, knn=1, merge="weighted_mean")
    assert torch.allclose(mean, torch.tensor([[0.1 / 0.7, 0.6 / 0.7]]))  # (0.6 x1 + 0.1 x0) / 0.7
    # knn=2: NN(1) = {0, 2} (cos 0.995 and 0.0995; x3 is opposite)
    two = prumerge_merge(x, a, keys, kept, knn=2, merge="official")
    assert torch.allclose(two, torch.tensor([[0.1 + 0.5, 1.0 + 0.5]]))


def test_extra_token_sums_the_pruned_tokens_by_attention():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [7.0, 7.0]])
    a = torch.tensor([0.05, 0.8, 0.05, 0.1])  # Q1 = 0.05, Q3 = 0.275: only token 1 is an outlier
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    signals = M.VisionSignals(tokens=x, coords=grid_coords(2, 2), cls_attention=a, key_metric=keys)
    sel = M.get("prumerge_plus")(knn=1).select_vision(signals, 2)
    assert sel.kept.tolist() == [1, 3]  # the outlier, and the extra token on pruned token 3
    y1 = x[1] + 0.05 * x[0]
    extra = 0.05 * x[0] + 0.05 * x[2] + 0.1 * x[3]
    assert torch.allclose(sel.tokens, torch.stack([y1, extra]))
    mean = M.get("prumerge_plus")(knn=1, merge="weighted_mean").select_vision(signals, 2)
    assert torch.allclose(mean.tokens[1], extra / 0.2)


def test_adaptive_mode_count_depends_on_the_image():
    a = torch.ones(36)
    a[7] = 50.0
    method = M.get("prumerge_plus")(budget_mode="adaptive", knn=0)
    sel = method.select_vision(_signals(a, 6), 20)  # keep is ignored
    # outlier 7, samples 0, 12, 24, and the extra token on the first most-attended pruned (1)
    assert sel.kept.tolist() == [0, 1, 7, 12, 24]
    a[20] = 40.0  # two outliers: stride 36 // 2 // 3 = 6 -> 0, 6, ..., 30
    sel = method.select_vision(_signals(a, 6), 20)
    assert sel.kept.tolist() == [0, 1, 6, 7, 12, 18, 20, 24, 30]


def test_uniform_attention_falls_back_to_the_most_attended_token():
    a = torch.ones(16)
    method = M.get("prumerge_plus")(knn=0, extra_token=False)
    assert method.select_vision(_signals(a, 4), 1).kept.tolist() == [0]
    # O = {0}; 2 samples over the 15 others at positions 0 and floor(15 / 2) = 7: tokens 1, 8
    assert method.select_vision(_signals(a, 4), 3).kept.tolist() == [0, 1, 8]


def test_every_keep_gives_exactly_keep_tokens():
    torch.manual_seed(1)
    signals = _signals(torch.rand(144).softmax(0) ** 3, 12)
    for extra in (True, False):
        method = M.get("prumerge_plus")(extra_token=extra)
        for keep in (1, 2, 3, 36, 100, 143, 144):
            sel = method.select_vision(signals, keep)
            assert sel.tokens.shape == (keep, 3)
            assert sel.kept.tolist() == sorted(set(sel.kept.tolist()))


def test_plan_and_hyperparameters():
    plan = M.get("prumerge_plus")().plan(M.PlanContext(576, 32, M.Budget(keep_ratio=0.25), None, 0))
    assert plan.vision_keep == 144 and plan.vision_signals == {"cls_attention", "key_metric"}
    assert M.get("prumerge_plus").hyperparameters() == {
        "budget_mode": "budget", "knn": 32, "merge": "official", "extra_token": True,
        "iqr_factor": 1.5,
    }  # fmt: skip
    cls = M.get("prumerge_plus")
    with pytest.raises(M.HyperparameterError, match=r"prumerge_plus.knn=-1: must be >= 0"):
        cls.from_hparams({"knn": -1})
    with pytest.raises(M.HyperparameterError, match=r"prumerge_plus.iqr_factor=-0.5"):
        cls.from_hparams({"iqr_factor": -0.5})
    with pytest.raises(M.HyperparameterError, match=r"prumerge_plus.budget_mode='paper'"):
        cls.from_hparams({"budget_mode": "paper"})
    with pytest.raises(ValueError, match="cls_attention and key_metric"):
        cls().select_vision(M.VisionSignals(tokens=torch.ones(4, 2), coords=grid_coords(2, 2)), 2)


@pytest.mark.parametrize("merge", ["official", "weighted_mean"])
def test_whole_trial_on_tiny_llava(merge):
    loaded, adapter = TINY.load_tiny("tiny-llava")
    config = _trial("tiny-llava", "prumerge_plus", 6, keep_ratio=0.25, hparams={"merge": merge})
    metrics = run_trial(loaded, adapter, config, ReferenceCache()).metrics
    assert metrics["visual_tokens_in"] == 144
    assert metrics["visual_tokens_kept"] == metrics["avg_visual_tokens"] == 36


def test_adaptive_whole_trial_reports_the_realised_count():
    loaded, adapter = TINY.load_tiny("tiny-llava")
    config = _trial("tiny-llava", "prumerge_plus", 6, keep_ratio=0.25,
                    hparams={"budget_mode": "adaptive"})  # fmt: skip
    output = run_trial(loaded, adapter, config, ReferenceCache())
    kept = [p["visual_kept"] for p in output.predictions]
    assert all(1 <= k < 144 for k in kept)
    assert output.metrics["visual_tokens_kept"] == pytest.approx(sum(kept) / len(kept))


@pytest.mark.parametrize("model", TINY.TINY_MODELS)
def test_whole_trial_on_every_family(model):
    loaded, adapter = TINY.load_tiny(model)
    config = _trial(model, "prumerge_plus", 2, keep_ratio=0.25)
    metrics = run_trial(loaded, adapter, config).metrics
    n = metrics["visual_tokens_in"]
    assert metrics["visual_tokens_kept"] == M.Budget(keep_ratio=0.25).tokens(int(n))
