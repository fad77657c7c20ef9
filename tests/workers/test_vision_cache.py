"""The worker's cache of prepared inputs and vision-tower outputs (prunelab.workers.caches) is
exact: whole trials give bit-identical metrics, predictions, replicates and artifacts with it on
and off; a method that changes the encoder bypasses it; it is byte-bounded, hands out copies,
and its size and lookups reach the trial's worker info. Also the timed subset of a trial
(``eval.timed_samples``). Nothing here asserts on time."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
from tiny_models import load_tiny, trial_config

import prunelab.methods as M
import prunelab.workers.runner as runner
from prunelab.methods import registry
from prunelab.methods.base import VisionSignals
from prunelab.methods.visionzip import VisionZip
from prunelab.orchestrator.config import EvalConfig, WorkersConfig
from prunelab.trial import Trial, TrialResult
from prunelab.workers.actor import Worker
from prunelab.workers.caches import (
    DEFAULT_VISION_CACHE_MB,
    ByteLRU,
    CacheStats,
    VisionCache,
    model_identity,
)
from prunelab.workers.runner import ReferenceCache, run_trial

# the metrics that are measured times: they differ between any two runs
TIMINGS = {"prefill_ms", "latency_ms", "decode_ms_per_token", "samples_per_s", "peak_mem_mb"}
LIMIT, TIMED = 6, 2
# the tiny models of two layouts (CLS encoder; dynamic resolution without CLS, M-RoPE) and the
# shipped, trained toy-llava
MODELS = ["tiny-llava", "tiny-qwen2-vl", "toy-llava"]


class EncoderVisionZip(VisionZip):
    """VisionZip declared as changing the encoder (as a method merging inside it would):
    its trials must bypass the cache."""

    name: ClassVar[str] = "test_encoder_visionzip"
    changes_encoder: ClassVar[bool] = True


@pytest.fixture
def encoder_method(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(registry._REGISTRY, EncoderVisionZip.name, EncoderVisionZip)
    return EncoderVisionZip.name


def make_trial(model: str, method: str, **axes) -> Trial:
    """A trial of ``method`` on shapes: 6 samples, 2 of them timed, one warm-up, a heatmap."""
    config = trial_config(model, method, LIMIT, **axes)
    config["eval"].update(timed_samples=TIMED, warmup=1, heatmaps=1)
    return Trial.from_dict(config)


def sweep(model: str, encoder: str) -> list[Trial]:
    """Trials as a sweep sends them to one worker: the unpruned baseline first, methods asking
    for no encoder signal (fastv, divprune) and for CLS attention and keys (visionzip, twice),
    and an encoder-changing one."""
    return [
        make_trial(model, "none"),
        make_trial(model, "fastv", keep_ratio=0.25, prune_layer=2),
        make_trial(model, "visionzip", keep_ratio=0.25),
        make_trial(model, "divprune", keep_ratio=0.25),
        make_trial(model, "visionzip", keep_ratio=0.5),
        make_trial(model, encoder, keep_ratio=0.25),
    ]


def outputs(result: TrialResult) -> tuple:
    """Everything a trial reports but its measured times."""
    metrics = {k: v for k, v in result.metrics.items() if k not in TIMINGS}
    return metrics, result.predictions, result.replicates, dict(result.artifacts)


@pytest.mark.parametrize("model", MODELS)
def test_trials_are_bit_identical_with_the_cache_on_and_off(model, encoder_method):
    loaded, adapter = load_tiny(model)
    trials = sweep(model, encoder_method)
    cache = VisionCache(64 * 2**20)
    on_refs, off_refs = ReferenceCache(), ReferenceCache()
    lookups: list[CacheStats] = []
    for trial in trials:
        before = dataclasses.replace(cache.stats)
        cached = run_trial(loaded, adapter, trial, on_refs, vision_cache=cache)
        lookups.append(cache.stats.since(before))
        fresh = run_trial(loaded, adapter, trial, off_refs)
        assert outputs(cached) == outputs(fresh), trial.method
        assert TIMINGS - {"peak_mem_mb"} <= set(cached.metrics)
        assert len(cached.artifacts) == (0 if trial.method == "none" else 1)

    untimed = LIMIT - TIMED
    none, fastv, visionzip, divprune, visionzip_again, encoder = lookups
    # the baseline fills the cache (its heatmap pass reads one sample's inputs, then stops:
    # it prunes nothing); its timed samples run the vision tower and are not kept
    assert (none.input_misses, none.input_hits) == (LIMIT, 1)
    assert (none.vision_misses, none.vision_hits) == (untimed, 0)
    # every later trial reads every sample's inputs (and its heatmap sample's) from the cache
    for stats in (fastv, visionzip, divprune, visionzip_again):
        assert (stats.input_hits, stats.input_misses) == (LIMIT + 1, 0)
    # the baseline's vision outputs serve a method asking for no encoder signal (its heatmap
    # sample, a timed one of the baseline, is computed and kept) ...
    assert (fastv.vision_hits, fastv.vision_misses) == (untimed, 1)
    assert (divprune.vision_hits, divprune.vision_misses) == (untimed + 1, 0)
    # ... not one asking for CLS attention and keys (another probe), whose own are then reused
    assert (visionzip.vision_hits, visionzip.vision_misses) == (0, untimed + 1)
    assert (visionzip_again.vision_hits, visionzip_again.vision_misses) == (untimed + 1, 0)
    assert encoder == CacheStats()  # bypassed: neither read nor written


def test_model_identity_tells_settings_apart(tiny_llava):
    loaded, _ = tiny_llava
    other = dataclasses.replace(loaded, spec=dataclasses.replace(loaded.spec, dtype="bfloat16"))
    assert model_identity(loaded) == model_identity(loaded)
    assert model_identity(other) != model_identity(loaded)
    assert model_identity(loaded).startswith(loaded.info.revision)


def test_byte_lru_evicts_least_recently_used_first():
    lru: ByteLRU[str] = ByteLRU(max_bytes=10)
    lru.put("a", "A", 4)
    lru.put("b", "B", 4)
    assert lru.get("a") == "A"  # a is now the most recent
    lru.put("c", "C", 4)  # 12 > 10: b goes
    assert (lru.get("b"), lru.get("a"), lru.get("c"), lru.nbytes) == (None, "A", "C", 8)
    lru.put("c", "C2", 2)  # replacing an entry counts its new size only
    assert (lru.nbytes, len(lru)) == (6, 2)
    lru.put("big", "BIG", 30)  # the newest entry stays, alone
    assert (len(lru), lru.nbytes, lru.get("big")) == (1, 30, "BIG")


def signals_of(value: float, n: int = 4) -> VisionSignals:
    return VisionSignals(tokens=torch.full((n, 2), value), coords=torch.zeros(n, 3))


def test_vision_cache_is_bounded_and_hands_out_copies():
    entry = signals_of(0.0).tokens.nbytes + signals_of(0.0).coords.nbytes
    cache = VisionCache(max_bytes=2 * entry)
    cpu = torch.device("cpu")
    made: list[int] = []

    def get(sample: str, value: float = 1.0) -> VisionSignals:
        def make() -> VisionSignals:
            made.append(1)
            return signals_of(value)

        return cache.signals(("m", "b", sample), frozenset(), make, cpu)

    first = get("s0")
    first.tokens.add_(100.0)  # a trial may do what it likes with what it is handed ...
    again = get("s0")
    assert torch.equal(again.tokens, torch.ones(4, 2))  # ... the cache keeps its own copy
    again.tokens.mul_(0)
    assert torch.equal(get("s0").tokens, torch.ones(4, 2))
    assert (cache.stats.vision_misses, cache.stats.vision_hits, len(made)) == (1, 2, 1)
    get("s1"), get("s2")  # three entries of two's room: s0 is evicted
    assert len(cache) == 2 and cache.nbytes == 2 * entry
    get("s0")
    assert len(made) == 4
    # another set of wanted signals is another entry
    cache.signals(("m", "b", "s0"), frozenset({"cls_attention"}), lambda: signals_of(2.0), cpu)
    assert cache.stats.vision_misses == 5
    # larger than the whole cache: computed, never kept
    huge = cache.signals(("m", "b", "h"), frozenset(), lambda: signals_of(3.0, n=64), cpu)
    assert huge.tokens.shape == (64, 2) and len(cache) == 2


def test_a_cache_of_zero_bytes_is_off(tiny_llava):
    loaded, adapter = tiny_llava
    cache = VisionCache(0)
    for _ in range(2):
        run_trial(loaded, adapter, make_trial("tiny-llava", "none"), vision_cache=cache)
    assert cache.stats == CacheStats() and len(cache) == 0


def test_the_worker_reports_its_cache_size_and_each_trials_lookups():
    worker = Worker("w-cache", vision_cache_mb=64)
    first = worker.run(make_trial("tiny-llava", "none"))
    second = worker.run(make_trial("tiny-llava", "fastv", keep_ratio=0.25, prune_layer=2))
    assert first.environment["vision_cache_mb"] == second.environment["vision_cache_mb"] == "64"
    assert first.environment["vision_cache_hits"] == "0"
    assert first.environment["vision_cache_misses"] == str(LIMIT - TIMED)
    assert int(second.environment["vision_cache_hits"]) == LIMIT - TIMED
    assert int(second.environment["input_cache_hits"]) == LIMIT + 1
    off = Worker("w-off", vision_cache_mb=0).run(make_trial("tiny-llava", "none"))
    assert off.environment["vision_cache_mb"] == "0"
    assert off.environment["vision_cache_misses"] == off.environment["input_cache_hits"] == "0"


def test_default_size_is_the_spec_schemas():
    assert WorkersConfig().vision_cache_mb == DEFAULT_VISION_CACHE_MB
    assert Worker("w-default").vision_cache.max_bytes == int(DEFAULT_VISION_CACHE_MB * 2**20)


@pytest.mark.parametrize(("timed", "expected"), [(2, 2), (32, LIMIT)])
def test_only_the_timed_subset_carries_timings(tiny_llava, monkeypatch, timed, expected):
    """The first ``eval.timed_samples`` samples are timed (all of them when there are fewer);
    the latency metrics are their medians, ``samples_per_s`` is the whole loop's."""
    loaded, adapter = tiny_llava
    captured: list[list] = []
    real = runner.aggregate

    def spy(results, *args, **kwargs):
        captured.append(list(results))
        return real(results, *args, **kwargs)

    monkeypatch.setattr(runner, "aggregate", spy)
    config = trial_config("tiny-llava", "fastv", LIMIT, keep_ratio=0.25, prune_layer=2)
    config["eval"]["timed_samples"] = timed
    metrics = run_trial(loaded, adapter, Trial.from_dict(config)).metrics
    (results,) = captured
    timings = [(r.prefill_s is not None, r.decode_s is not None) for r in results]
    assert timings == [(True, True)] * expected + [(False, False)] * (LIMIT - expected)
    assert {"prefill_ms", "latency_ms", "decode_ms_per_token", "samples_per_s"} <= set(metrics)


def test_a_stored_trial_without_timed_samples_reads_back_with_the_default():
    config = trial_config("tiny-llava", "none")
    config["eval"].pop("timed_samples", None)
    assert Trial.from_dict(config).eval.timed_samples == EvalConfig().timed_samples == 32
    assert "timed_samples" not in EvalConfig.key_fields()  # times only: not in the key


def test_no_registered_method_changes_the_encoder():
    """Every method shares the cache today; one that merges or prunes inside the encoder
    must say so (``changes_encoder``) and its trials bypass the cache (checked above)."""
    assert [n for n in M.available() if M.get(n).changes_encoder] == []
