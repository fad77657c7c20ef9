"""Running whole trials on the tiny model: metrics, fidelity, determinism, every method."""

from __future__ import annotations

import os

import pytest
from tiny_models import guide_for, model_config, tiny_trial, trained_vib_head

import prunelab.methods as M
from prunelab.workers.actor import Worker
from prunelab.workers.runner import ReferenceCache, run_trial

CORE_METRICS = {
    "score", "visual_tokens_in", "visual_tokens_kept", "avg_visual_tokens", "tflops",
    "prefill_ms", "latency_ms", "decode_ms_per_token", "kv_cache_mb", "fidelity_kl",
    "fidelity_top1", "samples",
}  # fmt: skip


def axes_for(method: str) -> dict:
    """Trial axes a method reads: a quarter of the visual tokens, its default layer, seed 1."""
    cls = M.get(method)
    axes: dict = {}
    if cls.uses_budget:
        axes["keep_ratio"] = 0.25
    if cls.uses_layer:
        axes["prune_layer"] = 2 if cls.default_prune_layer is None else cls.default_prune_layer
    if cls.uses_seed:
        axes["seed"] = 1
    return axes


@pytest.mark.parametrize("method", M.available())
def test_registered_method_runs_on_tiny_llava(method, tiny_llava, make_trial):
    loaded, adapter = tiny_llava
    axes = axes_for(method)
    cls = M.get(method)
    guide = guide_for("tiny-llava") if cls.needs_guidance else None
    if isinstance(cls(), M.TrainedHeadMethod):  # pgp: a VIB head trained for a few steps
        axes["vib_head"] = trained_vib_head(model_config("tiny-llava")["guidance"])
    output = run_trial(loaded, adapter, make_trial(method, **axes), ReferenceCache(), guide=guide)
    metrics = output.metrics
    assert set(metrics) >= CORE_METRICS
    assert metrics["samples"] == 6 and len(output.predictions) == 6
    assert metrics["visual_tokens_in"] == 144
    if not cls.uses_budget:
        assert metrics["visual_tokens_kept"] == metrics["avg_visual_tokens"] == 144
    elif getattr(cls, "budget_is_average", False):
        assert abs(metrics["avg_visual_tokens"] - 36) <= 1
    elif "prep_layer" in metrics or (cls.uses_layer and axes["prune_layer"] > 0):
        # prep: the layer its pre-inference chose per sample (mean over samples: avg is linear)
        layer = metrics.get("prep_layer", axes.get("prune_layer"))
        assert metrics["visual_tokens_kept"] == 36
        assert metrics["avg_visual_tokens"] == pytest.approx((layer * 144 + (4 - layer) * 36) / 4)
    else:
        assert metrics["visual_tokens_kept"] == metrics["avg_visual_tokens"] == 36


def test_unpruned_fidelity_is_perfect_and_pruning_costs_less(tiny_llava, make_trial):
    loaded, adapter = tiny_llava
    cache = ReferenceCache()
    base = run_trial(loaded, adapter, make_trial("none"), cache).metrics
    assert base["fidelity_kl"] == 0.0 and base["fidelity_top1"] == 1.0
    pruned = run_trial(loaded, adapter, make_trial("fastv", keep_ratio=0.1, prune_layer=1),
                       cache).metrics  # fmt: skip
    assert pruned["tflops"] < base["tflops"]
    assert pruned["kv_cache_mb"] < base["kv_cache_mb"]
    assert pruned["fidelity_kl"] > 0.0


def test_random_is_reproducible_and_seed_dependent(tiny_llava, make_trial):
    loaded, adapter = tiny_llava

    def predictions(seed):
        trial = make_trial("random", keep_ratio=0.05, prune_layer=0, seed=seed)
        return [p["fidelity_kl"] for p in run_trial(loaded, adapter, trial).predictions]

    assert predictions(0) == predictions(0)
    assert predictions(0) != predictions(1)


def test_worker_keeps_its_model_across_trials(make_trial):
    worker = Worker("w-test")
    first = worker.run(make_trial("none", limit=2))
    second = worker.run(make_trial("fastv", limit=2, keep_ratio=0.5, prune_layer=2))
    assert first.model_loads == second.model_loads == 1
    assert second.load_s == 0.0 and second.run_s > 0.0
    assert (second.worker, second.pid) == ("w-test", os.getpid()) and second.node
    assert worker.holds() == "tiny-llava"


@pytest.mark.parametrize(
    ("method", "axes"),
    [
        ("none", {}),
        ("random", {"keep_ratio": 0.25, "prune_layer": 0, "seed": 0}),
        ("random", {"keep_ratio": 0.25, "prune_layer": 2, "seed": 0}),
        ("fastv", {"keep_ratio": 0.25, "prune_layer": 2}),
    ],
)
def test_every_family_runs_whole_trials(tiny, method, axes):
    """What `prunelab sweep quickstart model=<tiny-family>` runs, on each family."""
    loaded, adapter = tiny
    trial = tiny_trial(loaded.spec.name, method, limit=2, **axes)
    metrics = run_trial(loaded, adapter, trial, ReferenceCache()).metrics
    assert metrics["samples"] == 2
    n = metrics["visual_tokens_in"]
    if method == "none":
        assert metrics["visual_tokens_kept"] == n and metrics["fidelity_kl"] == 0.0
    else:
        assert metrics["visual_tokens_kept"] < n
        assert metrics["avg_visual_tokens"] < n


def test_worker_loads_the_guidance_model_once_and_counts_its_flops(make_trial):
    worker = Worker("w-guide")
    trial = make_trial(
        "sgp", limit=2, keep_ratio=0.25, prune_layer=2,
        guidance_config=model_config("tiny-llava-small"),
    )  # fmt: skip
    first = worker.run(trial)
    second = worker.run(trial)
    assert list(worker.guides) == ["tiny-llava-small"] and second.load_s == 0.0
    metrics = first.metrics
    assert metrics["visual_tokens_kept"] == 36
    assert 0.0 < metrics["tflops_guidance"] < metrics["tflops"]
    unguided = worker.run(make_trial("fastv", limit=2, keep_ratio=0.25, prune_layer=2))
    assert "tflops_guidance" not in unguided.metrics
    assert metrics["tflops"] - metrics["tflops_guidance"] == pytest.approx(
        unguided.metrics["tflops"], rel=0.02
    )
