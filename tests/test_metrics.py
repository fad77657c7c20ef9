"""The metrics table: one definition per metric, used by the worker, the orchestrator and the
per-trial table. Values are checked against hand computation."""

from __future__ import annotations

import statistics
from types import SimpleNamespace

import pytest
import torch

import prunelab.metrics as M
from prunelab.orchestrator import results, tables
from prunelab.workers.cost import kv_cache_bytes, trial_flops
from prunelab.workers.models import ModelInfo
from prunelab.workers.runner import SampleResult, aggregate

INFO = ModelInfo(
    family="llava", n_layers=2, n_visual=8, hidden_size=16, intermediate_size=32, n_heads=2,
    n_kv_heads=2, head_dim=8, vocab_size=50, revision="test",
)  # fmt: skip
CPU = SimpleNamespace(device=torch.device("cpu"), model=torch.nn.Linear(2, 2))  # float32


def sample(index: int, **fields) -> SampleResult:
    values = {
        "id": f"s{index}",
        "category": "",
        "question": "q",
        "answers": ["a"],
        "prediction": "a",
        "score": 1.0,
        "visual_in": 8,
        "visual_kept": 4,
        "avg_visual": 6.0,
        "tokens_per_layer": [12, 8],
        "new_tokens": 1,
        "vision_flops": 0.0,
        "prefill_s": 0.01 * (index + 1),
        "decode_s": 0.0,
    }
    return SampleResult(**{**values, **fields})


def plain_samples() -> list[SampleResult]:
    """Three samples with nothing optional: one token each, no guidance, fidelity, categories."""
    return [sample(0, score=1.0), sample(1, score=0.0), sample(2, score=0.5, visual_kept=2)]


def full_samples() -> list[SampleResult]:
    """Samples that make every conditional metric appear."""
    return [
        sample(0, category="a", score=1.0, new_tokens=3, decode_s=0.02, guidance_flops=2e9,
               fidelity_kl=0.1, fidelity_top1=1.0, pre_inference_layer=2),
        sample(1, category="b", score=0.0, new_tokens=1, fidelity_kl=0.3, fidelity_top1=0.0,
               pre_inference_layer=3),
        sample(2, category="a", score=0.5, new_tokens=4, decode_s=0.06, fidelity_kl=0.2,
               fidelity_top1=1.0),
    ]  # fmt: skip


# -- the table ----------------------------------------------------------------------------------
def test_names_are_unique_and_entries_consistent():
    names = [m.name for m in M.METRICS]
    assert len(names) == len(set(names))
    for metric in M.METRICS:
        assert metric.unit and metric.description
        if metric.relative_to is not None:
            source = M.lookup(metric.relative_to)
            assert source is not None and source.aggregate != "relative"
    assert M.lookup("score.chart") is M.lookup("score.{category}")
    assert M.lookup("score.") is None and M.lookup("pope_f1") is None
    with pytest.raises(ValueError, match="unknown aggregate"):
        M.Metric("x", "u", "mode", "d")
    with pytest.raises(ValueError, match="relative_to"):
        M.Metric("x", "u", "relative", "d")
    with pytest.raises(ValueError, match="family"):
        M.Metric("x", "u", "mean", "d", value="score", group_by="category")


def test_every_aggregated_metric_is_in_the_table():
    metrics = aggregate(full_samples(), INFO, "pdrop", CPU)
    assert set(metrics) == {
        "score", "score.a", "score.b", "visual_tokens_in", "visual_tokens_kept",
        "avg_visual_tokens", "tflops", "tflops_guidance", "prefill_ms", "latency_ms",
        "decode_ms_per_token", "kv_cache_mb", "samples", "prep_layer", "fidelity_kl",
        "fidelity_top1",
    }  # fmt: skip
    for name in metrics:
        metric = M.lookup(name)
        assert metric is not None, name
        assert metric.aggregate != "relative"  # the orchestrator's, not the worker's


def test_unconditional_metrics_only_without_optional_measurements():
    metrics = aggregate(plain_samples(), INFO, "fastv", CPU)
    assert set(metrics) == {
        "score", "visual_tokens_in", "visual_tokens_kept", "avg_visual_tokens", "tflops",
        "prefill_ms", "latency_ms", "kv_cache_mb", "samples",
    }  # fmt: skip


def test_aggregated_values_by_hand():
    samples = full_samples()
    metrics = aggregate(samples, INFO, "pdrop", CPU)
    flops = [
        trial_flops(s.tokens_per_layer, s.new_tokens, INFO, "pdrop", s.vision_flops)
        + s.guidance_flops
        for s in samples
    ]
    kv = [kv_cache_bytes(s.tokens_per_layer, s.new_tokens, 2, 8, 4) for s in samples]
    assert metrics == {
        "score": 100.0 * statistics.fmean([1.0, 0.0, 0.5]),
        "score.a": 75.0,
        "score.b": 0.0,
        "visual_tokens_in": 8.0,
        "visual_tokens_kept": 4.0,
        "avg_visual_tokens": 6.0,
        "tflops": statistics.fmean(flops) / 1e12,
        "tflops_guidance": statistics.fmean([2e9, 0.0, 0.0]) / 1e12,
        "prefill_ms": 1000 * statistics.median(s.prefill_s for s in samples),
        "latency_ms": 1000 * statistics.median(s.prefill_s + s.decode_s for s in samples),
        "decode_ms_per_token": 1000 * statistics.median([0.02 / 2, 0.06 / 3]),
        "kv_cache_mb": statistics.fmean(kv) / 2**20,
        "samples": 3.0,
        "prep_layer": 2.5,
        "fidelity_kl": statistics.fmean([0.1, 0.3, 0.2]),
        "fidelity_top1": statistics.fmean([1.0, 0.0, 1.0]),
    }


def test_peak_memory_on_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**20)
    cuda = SimpleNamespace(device=SimpleNamespace(type="cuda"), model=CPU.model)
    assert aggregate(plain_samples(), INFO, "pdrop", cuda)["peak_mem_mb"] == 3.0
    assert "peak_mem_mb" not in aggregate(plain_samples(), INFO, "pdrop", CPU)


def test_a_benchmarks_own_aggregate_replaces_score_and_categories():
    own = aggregate(full_samples(), INFO, "pdrop", CPU)
    official = {"score": 12.5, "score.x": 40, "pope_f1": 0.5}
    metrics = aggregate(full_samples(), INFO, "pdrop", CPU, official)
    assert metrics["score"] == 12.5 and metrics["score.x"] == 40.0 and metrics["pope_f1"] == 0.5
    assert "score.a" not in metrics and "score.b" not in metrics  # its categories, not ours
    rest = {k: v for k, v in own.items() if k != "score" and not k.startswith("score.")}
    assert {k: metrics[k] for k in rest} == rest
    assert set(metrics) == set(rest) | set(official)


def test_no_samples_is_an_error():
    with pytest.raises(ValueError, match="at least one sample"):
        aggregate([], INFO, "pdrop", CPU)


def test_a_new_table_entry_reaches_aggregate_and_trials_csv(monkeypatch):
    extra = M.Metric(
        "generated_tokens", "tokens", "sum", "tokens generated over the trial",
        value="new_tokens", column="generated", fmt=".0f",
    )  # fmt: skip
    monkeypatch.setattr(M, "METRICS", (*M.METRICS, extra))
    metrics = aggregate(full_samples(), INFO, "pdrop", CPU)
    assert metrics["generated_tokens"] == 8.0
    config = {"model": "m", "benchmark": "gqa", "method": "none", "hparams": {}}
    rows = tables.results_rows([(config, "finished", metrics)])
    csv_lines = tables.trials_csv(rows).splitlines()
    assert csv_lines[0].endswith(",fidelity_top1,generated_tokens")
    assert csv_lines[1].endswith(",8.0")
    markdown = tables.trials_markdown(rows).splitlines()
    assert markdown[0].endswith("| top-1 agree | generated |")
    assert markdown[2].endswith("| 66.7% | 8 |")


# -- baseline-relative metrics ------------------------------------------------------------------
def test_relative_metrics_by_hand():
    own, baseline = {"score": 40.0, "tflops": 1.5}, {"score": 50.0, "tflops": 6.0}
    assert M.relative_metrics(own, baseline) == {"score_ratio": 0.8, "flops_ratio": 0.25}
    assert M.relative_metrics(own, {"score": 0.0, "tflops": 6.0}) == {"flops_ratio": 0.25}
    assert M.relative_metrics({"score": 40.0}, baseline) == {"score_ratio": 0.8}
    assert M.relative_metrics(own, None) == {} and M.relative_metrics(own, {}) == {}
    assert results.relative_metrics is M.relative_metrics  # the orchestrator's name for it


def test_relative_metrics_follow_the_table(monkeypatch):
    extra = M.Metric("tokens_ratio", "fraction", "relative", "d", relative_to="avg_visual_tokens")
    monkeypatch.setattr(M, "METRICS", (*M.METRICS, extra))
    own, baseline = {"avg_visual_tokens": 16.0}, {"avg_visual_tokens": 64.0}
    assert M.relative_metrics(own, baseline) == {"tokens_ratio": 0.25}


# -- intervals ----------------------------------------------------------------------------------
def test_score_interval_comes_from_the_worker_through_the_context():
    context = M.TrialContext(info=INFO, convention="pdrop", itemsize=4,
                             score_interval=(41.5, 58.25))  # fmt: skip
    metrics = M.trial_metrics(full_samples(), context)
    assert (metrics["score_ci_low"], metrics["score_ci_high"]) == (41.5, 58.25)
    assert M.lookup("score_ci_low").bound == "low" and M.lookup("score_ci_high").unit == "%"
    # not computed: not reported (as by the runner's aggregate without replicates)
    assert "score_ci_low" not in aggregate(full_samples(), INFO, "pdrop", CPU)


def test_interval_bounds_follow_the_table_rules():
    for metric in M.METRICS:
        if metric.bound is not None:
            assert metric.aggregate in ("trial", "relative")
            assert metric.relative_to in (None, M.REPLICATED)
    with pytest.raises(ValueError, match="bound is one of"):
        M.Metric("x", "u", "trial", "d", bound="middle")
    with pytest.raises(ValueError, match="trial or relative"):
        M.Metric("x", "u", "mean", "d", value="score", bound="low")
    with pytest.raises(ValueError, match="only score"):
        M.Metric("x", "u", "relative", "d", relative_to="tflops", bound="low")


def test_relative_interval_from_both_trials_replicates():
    own, baseline = {"score": 40.0, "tflops": 1.5}, {"score": 50.0, "tflops": 6.0}
    base_reps = [50.0] * 101
    own_reps = [40.0 + k / 10 for k in range(101)]  # ratios 0.8 .. 1.0, evenly
    out = M.relative_metrics(own, baseline, own_reps, base_reps)
    assert out == {
        "score_ratio": 0.8,
        "score_ratio_ci_low": pytest.approx(0.8 + 0.025 * 0.2),
        "score_ratio_ci_high": pytest.approx(1.0 - 0.025 * 0.2),
        "flops_ratio": 0.25,
    }
    # without replicates, with unequal lengths, or against a zero baseline score: no interval
    assert M.relative_metrics(own, baseline) == {"score_ratio": 0.8, "flops_ratio": 0.25}
    assert "score_ratio_ci_low" not in M.relative_metrics(own, baseline, own_reps, base_reps[1:])
    zero = M.relative_metrics(own, {"score": 0.0, "tflops": 6.0}, own_reps, base_reps)
    assert zero == {"flops_ratio": 0.25}
