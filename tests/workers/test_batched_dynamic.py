"""Batched evaluation of the dynamic-resolution families (Qwen2-VL / Qwen2.5-VL: M-RoPE;
LLaVA-NeXT, InternVL: tiles): samples whose images make different numbers of visual tokens
share one left-padded prefill and decode, each with its own 3-D positions, budget and kept
tokens, and give the outputs of batch 1 (fp32: predictions, scores and kept counts equal,
``fidelity_kl`` within 1e-5); what cannot batch runs at batch 1 and says why."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import assert_same_outputs, load_tiny, tiny_trial

import prunelab.workers.runner as runner
from prunelab.methods.base import LayerStep, Plan
from prunelab.trial import Trial, TrialResult
from prunelab.workers.benchmarks import build_benchmark
from prunelab.workers.benchmarks.base import Sample
from prunelab.workers.runner import (
    _plan,
    _sample_generator,
    batch_problem,
    build_method,
    run_batch,
    run_sample,
    run_trial,
)
from prunelab.workers.timing import Timer

# (height, width) of each sample's image in turn: 6x6, 5x11, 8x4, 3x7, ... merged Qwen grids
SIZES = [(48, 48), (40, 88), (64, 32), (24, 56), (56, 40), (32, 72), (48, 24), (72, 48)]
SAMPLES = 8  # one timed sample, then 7: batches of 3, 3, 1 and of 4, 3 (ragged last batches)
QWEN = ("tiny-qwen2-vl", "tiny-qwen2.5-vl")
# the methods that batch on these families; the vision stage keeps original (3-D) positions,
# the only numbering Qwen2-VL has; fastv / random at layer 2 keep original positions too
METHODS: dict[str, dict[str, Any]] = {
    "none": {},
    "random": {"keep_ratio": 0.25, "seed": 1},  # vision stage (prune_layer 0)
    "random@2": {"keep_ratio": 0.25, "seed": 1, "prune_layer": 2},  # layer stage
    "fastv": {"keep_ratio": 0.25, "prune_layer": 2},
    "visionzip": {"keep_ratio": 0.25},
    "divprune": {"keep_ratio": 0.25},
}
_RESULTS: dict[tuple[str, str, int], TrialResult] = {}


def resized(sample: Sample, size: tuple[int, int]) -> Sample:
    height, width = size
    image = np.asarray(Image.fromarray(sample.image).resize((width, height)))
    return dataclasses.replace(sample, image=image)


class VariedSizes:
    """A benchmark whose samples' images are resized to :data:`SIZES` in turn."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "sizes": SIZES}

    def samples(self, limit: int | None, seed: int = 0) -> list[Sample]:
        samples = self.inner.samples(limit, seed)
        return [resized(s, SIZES[i % len(SIZES)]) for i, s in enumerate(samples)]


@pytest.fixture
def varied_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        runner, "build_benchmark", lambda config: VariedSizes(build_benchmark(config))
    )


def batched(trial: Trial, batch_size: int | str) -> Trial:
    settings = {"batch_size": batch_size, "timed_samples": 1, "max_new_tokens": 6}
    return dataclasses.replace(trial, eval=dataclasses.replace(trial.eval, **settings))


def trial_of(model: str, method: str, limit: int = SAMPLES) -> Trial:
    return tiny_trial(model, method.split("@")[0], limit, **METHODS[method])


def result(model: str, method: str, batch_size: int) -> TrialResult:
    key = (model, method, batch_size)
    if key not in _RESULTS:
        loaded, adapter = load_tiny(model)
        _RESULTS[key] = run_trial(loaded, adapter, batched(trial_of(model, method), batch_size))
    return _RESULTS[key]


@pytest.mark.usefixtures("varied_sizes")
@pytest.mark.parametrize("batch_size", [3, 4])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model", QWEN)
def test_qwen_batched_trial_equals_batch_1(model: str, method: str, batch_size: int) -> None:
    one, many = result(model, method, 1), result(model, method, batch_size)
    kept = {p["visual_kept"] for p in one.predictions}
    assert len(kept) > 2  # the images make different numbers of visual tokens
    assert many.metrics["batch_size"] == many.metrics["effective_batch_size"] == batch_size
    assert many.metrics["samples"] == SAMPLES
    assert_same_outputs(one, many)


@pytest.mark.usefixtures("varied_sizes")
@pytest.mark.parametrize("method", ["none", "fastv", "visionzip"])
@pytest.mark.parametrize("model", ["tiny-llava-next", "tiny-internvl"])
def test_tiled_families_batched_trial_equals_batch_1(model: str, method: str) -> None:
    one, many = result(model, method, 1), result(model, method, 4)
    assert len({p["visual_kept"] for p in one.predictions}) > 1
    assert many.metrics["effective_batch_size"] == 4
    assert_same_outputs(one, many)


@pytest.mark.usefixtures("varied_sizes")
def test_llava_next_original_positions_batch() -> None:
    """A vision stage's kept tokens at their original 1-D positions (given position ids and
    decode positions after the unpruned length), per sample, in one batch."""
    loaded, adapter = load_tiny("tiny-llava-next")
    trial = dataclasses.replace(
        trial_of("tiny-llava-next", "visionzip"), vision_positions="original"
    )
    one = run_trial(loaded, adapter, batched(trial, 1))
    many = run_trial(loaded, adapter, batched(trial, 4))
    assert many.metrics["effective_batch_size"] == 4
    assert_same_outputs(one, many)


def _samples(model: str, method: str, count: int) -> tuple[Trial, list[Sample]]:
    trial = trial_of(model, method, count)
    samples = build_benchmark(dict(trial.benchmark_config)).samples(count, 0)
    return trial, [resized(s, SIZES[i]) for i, s in enumerate(samples)]


@pytest.mark.parametrize("method", ["none", "fastv", "random@2", "divprune"])
@pytest.mark.parametrize("model", QWEN)
def test_qwen_batched_tokens_equal_batch_1(model: str, method: str) -> None:
    """Token for token over a longer decode, each sample with its own grid, plan (its budget
    is a share of its own visual tokens) and 3-D decode positions."""
    loaded, adapter = load_tiny(model)
    trial, samples = _samples(model, method, 5)
    pruning, budget = build_method(trial)
    timer = Timer(loaded.device)
    with torch.inference_mode():
        prepared = [adapter.prepare(s) for s in samples]
        assert len({p.n_visual for p in prepared}) == len(prepared)
        plans = [_plan(pruning, budget, trial, adapter, p, loaded.info.n_layers) for p in prepared]
        assert all(batch_problem(adapter, pruning, plan) is None for plan in plans)
        one = [
            run_sample(adapter, p, pruning, plan, _sample_generator(trial.seed, s.id), 12, timer)
            for s, p, plan in zip(samples, prepared, plans, strict=True)
        ]
        runs = run_batch(
            adapter, prepared, pruning, plans,
            [_sample_generator(trial.seed, s.id) for s in samples], 12,
        )  # fmt: skip
    for single, (many, _) in zip(one, runs, strict=True):
        assert many.token_ids == single.generation.token_ids
        assert many.lengths == single.generation.lengths
        assert many.vision_flops == single.generation.vision_flops
        torch.testing.assert_close(
            many.first_logprobs, single.generation.first_logprobs, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-llava"])
def test_same_length_samples_with_different_budgets(model: str) -> None:
    """Samples of one length (no pad columns: the model builds no mask) that keep different
    numbers of tokens at a layer stage: the shorter rows get masked fillers."""
    loaded, adapter = load_tiny(model)
    trial, samples = _samples(model, "fastv", 1)
    pruning, _ = build_method(trial)
    timer = Timer(loaded.device)
    keeps = [3, 9, 6]
    with torch.inference_mode():
        prepared = adapter.prepare(samples[0])
        plans = [Plan(layers=(LayerStep(layer=2, keep=k),)) for k in keeps]
        one = [
            run_sample(adapter, prepared, pruning, plan, _sample_generator(0, "x"), 8, timer)
            for plan in plans
        ]
        runs = run_batch(
            adapter, [prepared] * len(keeps), pruning, plans,
            [_sample_generator(0, "x") for _ in keeps], 8,
        )  # fmt: skip
    for keep, single, (many, _) in zip(keeps, one, runs, strict=True):
        assert many.lengths.visual[-1] == keep
        assert many.token_ids == single.generation.token_ids
        assert many.lengths == single.generation.lengths
        torch.testing.assert_close(
            many.first_logprobs, single.generation.first_logprobs, atol=1e-5, rtol=0
        )


def test_plans_at_different_layers_do_not_share_a_batch() -> None:
    _, adapter = load_tiny("tiny-qwen2-vl")
    trial, samples = _samples("tiny-qwen2-vl", "fastv", 2)
    pruning, _ = build_method(trial)
    plans = [Plan(layers=(LayerStep(layer=layer, keep=4),)) for layer in (1, 2)]
    with torch.inference_mode(), pytest.raises(ValueError, match="different layers"):
        run_batch(
            adapter, [adapter.prepare(s) for s in samples], pruning, plans,
            [_sample_generator(0, s.id) for s in samples], 4,
        )  # fmt: skip


@pytest.mark.usefixtures("varied_sizes")
@pytest.mark.parametrize("model", QWEN)
def test_qwen_multi_stage_schedule_batches(model: str) -> None:
    """Several layer stages at original positions, each ranking by the text's attention at
    the layer before (recorded over rows that already hold fillers): batch 1's outputs."""
    loaded, adapter = load_tiny(model)
    axes = {"keep_ratio": 0.25, "hparams": {"positions": "original", "score": "attention"}}
    trial = tiny_trial(model, "polymorphic", SAMPLES, **axes)
    one = run_trial(loaded, adapter, batched(trial, 1))
    many = run_trial(loaded, adapter, batched(trial, 4))
    assert many.metrics["effective_batch_size"] == 4
    assert_same_outputs(one, many)


@pytest.mark.usefixtures("varied_sizes")
@pytest.mark.parametrize(
    ("method", "axes", "reason"),
    [
        ("pdrop", {"keep_ratio": 0.25}, "pdrop: its layer stage renumbers positions"),
        ("sparsevlm", {"keep_ratio": 0.25}, "sparsevlm: its layer stage renumbers positions"),
        ("prep", {"keep_ratio": 0.25}, "prep runs a pre-inference pass per sample"),
    ],
)
def test_qwen_methods_that_cannot_batch_fall_back(
    method: str, axes: dict[str, Any], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    loaded, adapter = load_tiny("tiny-qwen2-vl")
    trial = tiny_trial("tiny-qwen2-vl", method, 5, **axes)
    with caplog.at_level(logging.INFO, logger="prunelab.workers.runner"):
        many = run_trial(loaded, adapter, batched(trial, 3))
    one = run_trial(loaded, adapter, batched(trial, 1))
    assert many.metrics["effective_batch_size"] == 1
    said = [r.getMessage() for r in caplog.records if "running at batch 1" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith(reason)
    assert [p["prediction"] for p in many.predictions] == [p["prediction"] for p in one.predictions]
