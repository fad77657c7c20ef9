"""Background preparation of the next samples (:class:`~prunelab.workers.runner.Prefetcher`):
the processor of sample i + 1 (or of the next batch) runs while the model generates for sample
i, not while a timed sample runs; results are those without it, bit for bit (vision cache
included); an error in preparing a sample is raised where the loop reaches that sample."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest
from tiny_models import load_tiny, tiny_trial

from prunelab.trial import Trial, TrialResult
from prunelab.workers.benchmarks import build_benchmark
from prunelab.workers.benchmarks.base import Sample
from prunelab.workers.caches import VisionCache
from prunelab.workers.runner import Prefetcher, run_trial

WAIT_S = 20.0  # how long a generation waits to see the next preparation start


def evaluated(trial: Trial, batch_size: int, samples: int, **settings: Any) -> Trial:
    settings = {
        "batch_size": batch_size,
        "timed_samples": 1,
        "max_new_tokens": 4,
        "limit": samples,
        **settings,
    }
    return dataclasses.replace(trial, eval=dataclasses.replace(trial.eval, **settings))


class Recorder:
    """Wraps an adapter's ``prepare`` and generations: which thread prepared each sample, and
    whether the preparation of the sample after a generation's samples (``next_of``) had
    started before that generation returned; each generation waits up to :data:`WAIT_S` for
    it (a sequential loop would never start it there)."""

    def __init__(self, adapter: Any, samples: list[Sample], monkeypatch: pytest.MonkeyPatch):
        self.order = [s.id for s in samples]
        self.started = {s.id: threading.Event() for s in samples}
        self.thread: dict[str, str] = {}
        self.sample_of: dict[int, str] = {}  # id(prepared) -> sample id
        self.ahead: dict[str, bool] = {}  # first sample of a generation -> next one started
        self.late = False  # a wait timed out: do not wait again
        prepare, generate = adapter.prepare, adapter.generate
        generate_batch = adapter.generate_batch

        def recording_prepare(sample: Sample):
            self.thread[sample.id] = threading.current_thread().name
            self.started[sample.id].set()
            prepared = prepare(sample)
            self.sample_of[id(prepared)] = sample.id
            return prepared

        def recording_generate(prepared, *args, **kwargs):
            out = generate(prepared, *args, **kwargs)
            self._saw(self.sample_of[id(prepared)], 1)
            return out

        def recording_generate_batch(prepared, *args, **kwargs):
            out = generate_batch(prepared, *args, **kwargs)
            self._saw(self.sample_of[id(prepared[0])], len(prepared))
            return out

        monkeypatch.setattr(adapter, "prepare", recording_prepare)
        monkeypatch.setattr(adapter, "generate", recording_generate)
        monkeypatch.setattr(adapter, "generate_batch", recording_generate_batch)

    def _saw(self, first: str, size: int) -> None:
        index = self.order.index(first) + size
        if index >= len(self.order):
            return
        event = self.started[self.order[index]]
        if index <= 1:  # after the timed sample: nothing ran alongside it
            self.ahead[first] = event.is_set()
            return
        self.ahead[first] = not self.late and event.wait(WAIT_S)
        self.late = self.late or not self.ahead[first]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_next_samples_are_prepared_while_the_model_runs(
    batch_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded, adapter = load_tiny("tiny-llava")
    trial = evaluated(tiny_trial("tiny-llava", "none", 9), batch_size, 9)
    samples = build_benchmark(dict(trial.benchmark_config)).samples(9, 0)
    recorder = Recorder(adapter, samples, monkeypatch)
    result = run_trial(loaded, adapter, trial)
    assert len(result.predictions) == 9
    first = [s.id for s in samples]
    generations = [first[0], *first[1::batch_size]][:-1] if batch_size > 1 else first[:-1]
    assert recorder.ahead == {
        sample: sample != first[0] for sample in generations
    }  # the timed sample ran alone; every later generation overlapped the next preparation
    assert not recorder.thread[first[0]].startswith("prunelab-prefetch")
    assert all(recorder.thread[s].startswith("prunelab-prefetch") for s in first[1:])


def _same(one: TrialResult, other: TrialResult) -> None:
    assert other.predictions == one.predictions  # fidelity_kl included: bit for bit
    for name in ("score", "visual_tokens_kept", "fidelity_kl", "tflops", "samples"):
        assert other.metrics[name] == one.metrics[name], name


@pytest.mark.parametrize(
    ("model", "method", "axes", "batch_size"),
    [
        ("tiny-llava", "fastv", {"keep_ratio": 0.25, "prune_layer": 2}, 3),
        ("tiny-qwen2-vl", "visionzip", {"keep_ratio": 0.25}, 1),
    ],
)
def test_results_equal_with_prefetch_and_the_vision_cache(
    model: str, method: str, axes: dict[str, Any], batch_size: int
) -> None:
    loaded, adapter = load_tiny(model)
    trial = evaluated(tiny_trial(model, method, 7, **axes), batch_size, 7)
    plain = run_trial(loaded, adapter, trial, prefetch=False)
    _same(plain, run_trial(loaded, adapter, trial))
    cache = VisionCache(1 << 30)
    filling = run_trial(loaded, adapter, trial, vision_cache=cache)
    hitting = run_trial(loaded, adapter, trial, vision_cache=cache)
    assert cache.stats.input_misses == cache.stats.input_hits == 7  # the second trial's hit
    assert cache.stats.vision_hits >= 6  # the untimed samples' vision outputs, at least
    _same(plain, filling)
    _same(plain, hitting)


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("prefetch", [False, True])
def test_a_preparation_error_is_raised_at_its_sample(
    prefetch: bool, batch_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error of today (the adapter's own exception), where the loop reaches the sample:
    the samples before it have run, none after it."""
    loaded, adapter = load_tiny("tiny-llava")
    trial = evaluated(tiny_trial("tiny-llava", "none", 7), batch_size, 7)
    bad = build_benchmark(dict(trial.benchmark_config)).samples(7, 0)[5].id
    prepare = adapter.prepare

    def failing(sample: Sample):
        if sample.id == bad:
            raise ValueError(f"cannot read the image of {sample.id}")
        return prepare(sample)

    monkeypatch.setattr(adapter, "prepare", failing)
    done: list[int] = []
    with pytest.raises(ValueError, match=f"cannot read the image of {bad}$"):
        run_trial(loaded, adapter, trial, progress=lambda i, n: done.append(i), prefetch=prefetch)
    # at batch 3, samples 1-3 ran as a batch; sample 4 waits for the batch sample 5 was to join
    assert done == ([1, 2, 3, 4, 5] if batch_size == 1 else [1, 2, 3, 4])


def test_prefetcher_runs_a_bounded_distance_ahead() -> None:
    started: list[int] = []

    def work(item: int) -> int:
        started.append(item)
        return item * item

    results = []
    with Prefetcher(work, range(8), ahead=lambda index: 2) as ahead:
        for index, (item, value) in enumerate(ahead):
            assert max(started) <= index + 2  # never further ahead than asked
            results.append((item, value))
    assert results == [(i, i * i) for i in range(8)]
    assert sorted(started) == list(range(8))  # each item once
    assert not any(t.name.startswith("prunelab-prefetch") for t in threading.enumerate())


def test_prefetcher_without_work_ahead_computes_on_the_caller() -> None:
    threads: list[str] = []

    def work(item: int) -> int:
        threads.append(threading.current_thread().name)
        return item

    with Prefetcher(work, range(3), ahead=lambda index: 0) as inline:
        assert [value for _, value in inline] == [0, 1, 2]
    with Prefetcher(work, range(3), enabled=False) as disabled:
        assert [value for _, value in disabled] == [0, 1, 2]
    assert threads == [threading.current_thread().name] * 6
