"""``eval.batch_size``: samples through prefill and greedy decode together, each with its own
pruning selection, give the outputs of batch 1 (fp32); what cannot batch runs at batch 1 and
says so."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from tiny_models import assert_same_outputs, load_tiny, tiny_trial

import prunelab.methods as M
from prunelab.trial import Trial, TrialResult
from prunelab.workers.benchmarks import build_benchmark
from prunelab.workers.runner import (
    AUTO_BATCH_CPU,
    _plan,
    _sample_generator,
    batch_problem,
    build_method,
    resolve_batch_size,
    run_batch,
    run_sample,
    run_trial,
)
from prunelab.workers.timing import Timer

BATCHED_METHODS = {
    "none": {},
    "random": {"keep_ratio": 0.25, "seed": 1},
    "fastv": {"keep_ratio": 0.25, "prune_layer": 2},
    "visionzip": {"keep_ratio": 0.25},
    "divprune": {"keep_ratio": 0.25},
}
MODELS = ("tiny-llava", "toy-llava")
SAMPLES = 8  # one timed sample, then 7: batches of 3, 3, 1 and of 4, 3 (ragged last batches)
_RESULTS: dict[tuple[str, str, int], TrialResult] = {}


def batched(trial: Trial, batch_size: int | str, **eval_settings: object) -> Trial:
    settings = {"batch_size": batch_size, "timed_samples": 1, "max_new_tokens": 6}
    return dataclasses.replace(
        trial, eval=dataclasses.replace(trial.eval, **{**settings, **eval_settings})
    )


def result(model: str, method: str, batch_size: int) -> TrialResult:
    key = (model, method, batch_size)
    if key not in _RESULTS:
        loaded, adapter = load_tiny(model)
        trial = tiny_trial(model, method, SAMPLES, **BATCHED_METHODS[method])
        _RESULTS[key] = run_trial(loaded, adapter, batched(trial, batch_size))
    return _RESULTS[key]


@pytest.mark.parametrize("batch_size", [3, 4])
@pytest.mark.parametrize("method", list(BATCHED_METHODS))
@pytest.mark.parametrize("model", MODELS)
def test_batched_trial_equals_batch_1(model: str, method: str, batch_size: int) -> None:
    one, many = result(model, method, 1), result(model, method, batch_size)
    assert "effective_batch_size" not in one.metrics  # batch 1: the metrics of before
    assert many.metrics["batch_size"] == many.metrics["effective_batch_size"] == batch_size
    assert_same_outputs(one, many)
    assert many.metrics["samples"] == SAMPLES


@pytest.mark.parametrize("method", ["none", "fastv", "random", "visionzip"])
def test_batched_tokens_equal_batch_1(method: str) -> None:
    """Token for token, over a longer decode (samples stop at different steps)."""
    loaded, adapter = load_tiny("tiny-llava")
    trial = tiny_trial("tiny-llava", method, 5, **BATCHED_METHODS[method])
    pruning, budget = build_method(trial)
    samples = build_benchmark(dict(trial.benchmark_config)).samples(5, 0)
    timer = Timer(loaded.device)
    with torch.inference_mode():
        prepared = [adapter.prepare(s) for s in samples]
        plan = _plan(pruning, budget, trial, adapter, prepared[0], loaded.info.n_layers)
        assert batch_problem(adapter, pruning, plan) is None
        one = [
            run_sample(
                adapter, p, pruning, plan, _sample_generator(trial.seed, s.id), 12, timer
            ).generation
            for s, p in zip(samples, prepared, strict=True)
        ]
        runs = run_batch(
            adapter, prepared, pruning, plan,
            [_sample_generator(trial.seed, s.id) for s in samples], 12,
        )  # fmt: skip
    assert runs is not None
    for single, (many, _) in zip(one, runs, strict=True):
        assert many.token_ids == single.token_ids
        assert many.lengths == single.lengths
        torch.testing.assert_close(many.first_logprobs, single.first_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", ["tiny-llava-next", "tiny-qwen2-vl"])
def test_families_that_cannot_batch_fall_back(
    model: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter without a batched path (``batches`` False) runs at batch 1 and says why."""
    loaded, adapter = load_tiny(model)
    monkeypatch.setattr(adapter, "batches", False)
    trial = tiny_trial(model, "fastv", 5, keep_ratio=0.25, prune_layer=2)
    with caplog.at_level(logging.INFO, logger="prunelab.workers.runner"):
        many = run_trial(loaded, adapter, batched(trial, 4))
    one = run_trial(loaded, adapter, batched(trial, 1))
    assert many.metrics["batch_size"] == 4 and many.metrics["effective_batch_size"] == 1
    said = [r.getMessage() for r in caplog.records if "running at batch 1" in r.getMessage()]
    assert len(said) == 1 and f"the {adapter.family} family does not batch" in said[0]  # once
    assert [p["prediction"] for p in many.predictions] == [p["prediction"] for p in one.predictions]


def test_methods_that_cannot_batch_fall_back(caplog: pytest.LogCaptureFixture) -> None:
    loaded, adapter = load_tiny("tiny-llava")
    trial = tiny_trial("tiny-llava", "pdrop", 5, keep_ratio=0.25)  # renumbers positions
    with caplog.at_level(logging.INFO, logger="prunelab.workers.runner"):
        many = run_trial(loaded, adapter, batched(trial, 3))
    one = run_trial(loaded, adapter, batched(trial, 1))
    assert many.metrics["effective_batch_size"] == 1
    assert sum("running at batch 1" in r.getMessage() for r in caplog.records) == 1
    assert [p["prediction"] for p in many.predictions] == [p["prediction"] for p in one.predictions]


@pytest.mark.parametrize("name", ["sgp", "prep", "pdrop", "sparsevlm"])
def test_batch_problem_names_why(name: str) -> None:
    _, adapter = load_tiny("tiny-llava")
    method = M.get(name)()
    trial = tiny_trial("tiny-llava", name, 1, keep_ratio=0.25)
    prepared = adapter.prepare(build_benchmark(dict(trial.benchmark_config)).samples(1, 0)[0])
    plan = _plan(method, M.Budget(keep_ratio=0.25), trial, adapter, prepared, 4)
    assert batch_problem(adapter, method, plan)


def test_auto_on_cpu_is_fixed() -> None:
    loaded, _ = load_tiny("tiny-llava")
    assert resolve_batch_size("auto", loaded, 200) == AUTO_BATCH_CPU
    assert resolve_batch_size(5, loaded, 200) == 5


@pytest.mark.parametrize("method", ["infoprune", "prumerge_plus", "tome"])
def test_other_batched_methods_equal_batch_1(method: str) -> None:
    """The other methods :func:`batch_problem` lets batch (a vision stage, and infoprune's one
    layer stage after it) give the outputs of batch 1 too."""
    loaded, adapter = load_tiny("tiny-llava")
    trial = tiny_trial("tiny-llava", method, SAMPLES, keep_ratio=0.25)
    one = run_trial(loaded, adapter, batched(trial, 1))
    many = run_trial(loaded, adapter, batched(trial, 4))
    assert many.metrics["effective_batch_size"] == 4
    fields = ("id", "prediction", "score", "visual_kept", "fidelity_top1")
    assert [{k: p[k] for k in fields} for p in many.predictions] == [
        {k: p[k] for k in fields} for p in one.predictions
    ]
    assert many.metrics["fidelity_kl"] == pytest.approx(one.metrics["fidelity_kl"], abs=1e-5)
