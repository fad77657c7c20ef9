"""Workers start before the orchestrator's own set-up: a sweep's pool is started, and each
worker loads the model of its first trial, before MLflow's store is opened; the trials still
run only in ``WorkerPool.run``. Nothing here is about time (``bench/orchestration_overhead.py``
measures it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from tiny_models import trial_config

from prunelab.db import repo, session_factory
from prunelab.orchestrator import scheduler, sweep
from prunelab.orchestrator.config import WorkersConfig
from prunelab.orchestrator.scheduler import Dispatch, WorkerPool
from prunelab.orchestrator.spec import load_sweep
from prunelab.orchestrator.sweep import Stores, start_workers, submit_sweep
from prunelab.trial import Trial, TrialResult


def dispatch(i: int, model: str, method: str = "random") -> Dispatch:
    return Dispatch(i, Trial(model=model, benchmark="shapes", method=method, hparams={}, seed=i))


def preload_and_run(worker_cls: type, trials: list[Dispatch]) -> dict[str, list[str]]:
    """Two workers of ``worker_cls``: ``preload`` then ``run`` of ``trials``, which must all
    finish; each worker's calls in order (from its last result, which lists them)."""
    results: dict[int, TrialResult] = {}

    def done(d: Dispatch, result: TrialResult) -> None:
        results[d.trial_id] = result

    def failed(d: Dispatch, error: str, retryable: bool) -> bool:
        pytest.fail(f"trial {d.trial_id} failed: {error}")

    pool = WorkerPool(2, cpus=1, worker_cls=worker_cls)
    try:
        pool.preload(trials)
        if hasattr(worker_cls, "prepare"):  # the baseline's model first, then one nobody holds
            assert [slot.model for slot in pool.slots] == ["A", "B"]
        pool.run(trials, lambda d, worker: True, done, failed)
    finally:
        pool.shutdown()
    assert sorted(results) == [t.trial_id for t in trials]
    calls: dict[str, list[str]] = {}
    for result in results.values():
        listed = list(result.environment.values())
        if len(listed) > len(calls.get(result.worker, [])):
            calls[result.worker] = listed
    return calls


def test_each_worker_loads_the_model_of_its_first_trial_before_running_it(
    local_ray: Path,
) -> None:
    """``preload`` asks each worker for the model ``run`` then gives it first; ``run`` finds
    it there and runs every trial once. A worker class without ``prepare`` (a test's) loads
    nothing ahead and runs as before."""

    class Plain:  # identity and run only; defined here so that Ray ships it by value
        """A worker that lists, with each result, what it was asked so far."""

        def __init__(self, name: str, threads: int = 1) -> None:
            self.name, self.calls = name, []

        def identity(self) -> dict[str, Any]:
            return {"pid": os.getpid(), "node": "here"}

        def run(self, trial: Trial) -> TrialResult:
            self.calls.append(f"run {trial.model}")
            listed = {f"{i:02d}": call for i, call in enumerate(self.calls)}
            return TrialResult(metrics={}, worker=self.name, environment=listed)

    class Calls(Plain):  # and prepare
        def prepare(self, trial: Trial) -> bool:
            self.calls.append(f"prepare {trial.model}")
            return True

    trials = [dispatch(0, "B"), dispatch(1, "A", "none"), dispatch(2, "B"), dispatch(3, "A")]
    for calls in preload_and_run(Calls, trials).values():
        # loaded ahead, then its trials run on that model: nothing in between
        assert calls == [f"prepare {calls[1].split()[1]}", *calls[1:]], calls
        assert all(call.startswith("run ") for call in calls[1:]), calls
    for calls in preload_and_run(Plain, trials).values():
        assert all(call.startswith("run ") for call in calls), calls


def test_a_sweep_starts_its_workers_before_opening_mlflow(
    local_ray: Path, stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``submit_sweep`` starts the pool before it opens MLflow's store (its ``Tracker``), and
    the worker has the model loaded when its first trial arrives: that trial pays no load,
    the sweep loads the model once, and every trial is recorded."""
    events: list[str] = []
    results: list[TrialResult] = []
    pool_init, tracker_init, done = WorkerPool.__init__, sweep.Tracker.__init__, sweep.Recorder.done

    def new_pool(self: WorkerPool, *args: Any, **kwargs: Any) -> None:
        events.append("workers")
        pool_init(self, *args, **kwargs)

    def new_tracker(self: Any, *args: Any, **kwargs: Any) -> None:
        events.append("mlflow")
        tracker_init(self, *args, **kwargs)

    def recorded(self: Any, dispatch: Dispatch, result: TrialResult) -> None:
        results.append(result)
        done(self, dispatch, result)

    # as on the local Ray the command starts (the fixture's is the test's own)
    monkeypatch.setattr(scheduler, "runs_own_local_ray", lambda: True)
    monkeypatch.setattr(WorkerPool, "__init__", new_pool)
    monkeypatch.setattr(sweep.Tracker, "__init__", new_tracker)
    monkeypatch.setattr(sweep.Recorder, "done", recorded)
    plan = load_sweep(
        "quickstart",
        ["method=none,fastv", "keep_ratio=0.5", "eval.limit=1", "eval.warmup=0",
         "eval.fidelity=false", "workers.count=1", "name=early"],
    )  # fmt: skip
    assert submit_sweep(plan, stores) == 0
    assert events == ["workers", "mlflow"]
    assert [r.load_s for r in results] == [0.0, 0.0], "the model was loaded ahead"
    assert [r.model_loads for r in results] == [1, 1]


def test_no_workers_start_ahead_when_nothing_runs_or_a_vib_head_comes_first(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``start_workers`` leaves the start to ``execute`` (it returns None, no worker started)
    for a sweep with no pending trial, for one whose trials need a VIB head (heads train on a
    worker's resources before the workers start), and on a Ray this process did not start."""
    monkeypatch.setattr(scheduler, "WorkerPool", lambda *a, **k: pytest.fail("workers started"))
    sessions = session_factory(engine)
    head = {"key": "k" * 64, "stage": "vib", "train": {"guide": {"name": "tiny-llava"}}}
    with sessions.begin() as session:
        empty = repo.create_sweep(session, "empty", {}, "", "test:0").id
        vib = repo.create_sweep(session, "vib", {}, "", "test:0").id
        config = trial_config("tiny-llava", "pgp", keep_ratio=0.5, vib_head=head)
        repo.add_trials(session, vib, [("f" * 64, config, False)])
        pending = repo.create_sweep(session, "pending", {}, "", "test:0").id
        repo.add_trials(session, pending, [("e" * 64, trial_config("tiny-llava", "none"), True)])
    assert not scheduler.runs_own_local_ray()
    assert start_workers(sessions, pending, WorkersConfig()) is None  # not this process's Ray
    monkeypatch.setattr(scheduler, "runs_own_local_ray", lambda: True)
    assert start_workers(sessions, empty, WorkersConfig()) is None
    assert start_workers(sessions, vib, WorkersConfig()) is None
