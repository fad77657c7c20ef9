"""Every registered method on every tiny family it supports: kept counts, the adapter
invariants around a whole trial, and the trial's metrics logged to MLflow."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pytest
import torch
from tiny_models import (
    TINY_MODELS,
    guide_for,
    load_tiny,
    model_config,
    tiny_trial,
    trained_vib_head,
)

import prunelab.methods as M
from prunelab.orchestrator.tracking import Tracker
from prunelab.workers.benchmarks.shapes import ShapesBenchmark
from prunelab.workers.runner import ReferenceCache, run_trial

KEEP_RATIO = 0.25


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Tracker, str]]:
    root = tmp_path_factory.mktemp("mlflow")
    tracker = Tracker(f"sqlite:///{root}/mlflow.db", str(root / "artifacts"))
    yield tracker, tracker.start_sweep("every-method", "0123456789ab", {"spec": "test"})


def _unpruned(adapter) -> tuple[list[int], torch.Tensor]:
    prepared = adapter.prepare(ShapesBenchmark().sample(7))
    tokens = adapter.vision_signals(prepared, frozenset()).tokens
    generation, _ = adapter.generate(
        prepared, adapter.llm_input(prepared, tokens), 3, time.perf_counter
    )
    return generation.token_ids, generation.first_logprobs


@pytest.mark.parametrize("model", TINY_MODELS)
@pytest.mark.parametrize("method", M.available())
def test_method_on_family(method: str, model: str, tracker) -> None:
    loaded, adapter = load_tiny(model)
    cls = M.get(method)
    instance = cls()
    reason = instance.unsupported(loaded.spec.family)
    if reason is not None:
        pytest.skip(f"{method} on {loaded.spec.family}: {reason}")
    guide = guide_for(model) if cls.needs_guidance else None
    if cls.needs_guidance and guide is None:
        pytest.skip(f"{method} needs a guidance model; {model} has none configured")
    axes: dict = {}
    if cls.uses_budget:
        axes["keep_ratio"] = KEEP_RATIO
    if cls.uses_layer:
        axes["prune_layer"] = cls.default_prune_layer
    if cls.uses_seed:
        axes["seed"] = 0
    head = None
    if isinstance(cls(), M.TrainedHeadMethod):  # pgp: a VIB head trained for a few steps
        head = trained_vib_head(model_config(model)["guidance"])
    trial = tiny_trial(model, method, limit=2, vib_head=head, **axes)

    before = _unpruned(adapter)
    output = run_trial(loaded, adapter, trial, ReferenceCache(), guide=guide)
    after = _unpruned(adapter)
    assert after[0] == before[0] and torch.equal(after[1], before[1])  # model untouched
    for layer in adapter.layers:
        assert not layer._forward_pre_hooks

    metrics = output.metrics
    n = metrics["visual_tokens_in"]
    if not cls.uses_budget:
        assert metrics["visual_tokens_kept"] == metrics["avg_visual_tokens"] == n
    elif getattr(cls, "budget_is_average", False):
        assert abs(metrics["avg_visual_tokens"] - KEEP_RATIO * n) <= 1.0
    else:
        assert metrics["visual_tokens_kept"] == pytest.approx(round(KEEP_RATIO * n), abs=1)
    assert all(math.isfinite(v) for v in metrics.values())

    client, parent = tracker
    run_id = client.log_trial(
        "every-method",
        parent,
        "0123456789ab",
        f"{method}-{model}",
        f"{method}-{model}",
        {"method": method, "model": model, **axes},
        metrics,
        {},
    )
    logged = client.client.get_run(run_id).data.metrics
    assert logged == pytest.approx(metrics)
