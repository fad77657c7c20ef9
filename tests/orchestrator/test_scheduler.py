"""The worker pool: model affinity (loads), dispatch choice, and faults seen by the pool."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from tiny_models import trial_config

from prunelab.orchestrator.config import range_problems
from prunelab.orchestrator.scheduler import Dispatch, WorkerPool, _Slot
from prunelab.trial import Trial, TrialResult


def slot(name: str, model: str | None) -> _Slot:
    return _Slot(name=name, actor=None, ready_ref=None, model=model, ready=True)


def trial(i: int, model: str, priority: int = 1) -> Dispatch:
    """A dispatch of priority 0 (a baseline) or 1 (a pruning trial)."""
    method = "none" if priority == 0 else "random"
    return Dispatch(i, Trial(model=model, benchmark="shapes", method=method, hparams={}))


def picker(*slots: _Slot) -> WorkerPool:
    """A pool object without actors, to call `_pick` on."""
    pool = WorkerPool.__new__(WorkerPool)
    pool.slots = list(slots)
    return pool


def test_pick_keeps_the_model_then_takes_one_nobody_holds() -> None:
    a, b = slot("w0", "A"), slot("w1", "B")
    pool = picker(a, b)
    pending = [trial(1, "B", 0), trial(2, "C"), trial(3, "A")]
    assert pool._pick(a, pending).trial_id == 3  # its own model, even behind other priorities
    a.model = "Z"  # no trial left for its model: a model no other worker holds, not B
    assert pool._pick(a, pending).trial_id == 2
    # every pending model is held: help the one with the most pending trials per holder
    pending = [trial(4, "B"), trial(5, "C"), trial(6, "C"), trial(7, "C")]
    c = slot("w2", "C")
    pool = picker(a, b, c)
    assert pool._pick(a, pending).model == "C"
    pending = [trial(4, "B"), trial(5, "B"), trial(6, "B"), trial(7, "C")]
    assert pool._pick(a, pending).model == "B"


class Log:
    """The pool's callbacks, recording what happened."""

    def __init__(self, retries: int = 1) -> None:
        self.claims: list[tuple[int, str]] = []
        self.results: dict[int, TrialResult] = {}
        self.failures: list[tuple[int, str, bool]] = []
        self.retries = retries

    def claim(self, dispatch: Dispatch, worker: str) -> bool:
        self.claims.append((dispatch.trial_id, worker))
        return True

    def done(self, dispatch: Dispatch, result: TrialResult) -> None:
        assert dispatch.trial_id not in self.results, "a trial finished twice"
        self.results[dispatch.trial_id] = result

    def failed(self, dispatch: Dispatch, error: str, retryable: bool) -> bool:
        self.failures.append((dispatch.trial_id, error, retryable))
        tries = sum(f[0] == dispatch.trial_id for f in self.failures)
        return retryable and tries <= self.retries


def grid(models: list[str], per_model: int) -> list[Dispatch]:
    trials = []
    for model in models:
        for i in range(per_model):
            config = trial_config(model, "random", limit=1, keep_ratio=0.5, seed=i, prune_layer=1)
            config["eval"] |= {"warmup": 0, "fidelity": False}
            trials.append(Dispatch(len(trials), Trial.from_dict(config)))
    # interleave the models, the worst order for a pool without affinity
    return sorted(trials, key=lambda t: (t.trial_id % per_model, t.model))


@pytest.mark.slow
@pytest.mark.parametrize("per_model", [2, 6])
def test_model_loads_are_workers_times_models_at_most(local_ray: Path, per_model: int) -> None:
    models = ["tiny-llava", "tiny-llava-small"]
    pool = WorkerPool(2, cpus=1)
    log = Log()
    try:
        pool.run(grid(models, per_model), log.claim, log.done, log.failed)
    finally:
        pool.shutdown()
    assert not log.failures and len(log.results) == per_model * len(models)
    loads: dict[str, int] = {}
    for result in log.results.values():
        loads[result.worker] = max(loads.get(result.worker, 0), result.model_loads)
    assert sum(loads.values()) <= 2 * len(models)  # however many trials


@pytest.mark.slow
def test_out_of_memory_is_final_and_the_worker_keeps_going(local_ray: Path) -> None:
    models = ["tiny-llava"]
    trials = grid(models, 3)
    victim = trials[0]
    local_ray.write_text(f'[{{"fault": "oom", "match": {{"seed": {victim.trial.seed}}}}}]')
    pool = WorkerPool(1, cpus=1)
    log = Log(retries=5)
    try:
        pool.run(trials, log.claim, log.done, log.failed)
        pid = pool.slots[0].pid
    finally:
        pool.shutdown()
        local_ray.write_text("[]")
    (failure,) = log.failures
    assert failure[0] == victim.trial_id and not failure[2]  # not retryable
    assert failure[1].startswith("out of memory")
    assert set(log.results) == {t.trial_id for t in trials[1:]}
    assert pool.replaced == 0
    assert {r.pid for r in log.results.values()} == {pid}  # the same process went on
    assert max(r.model_loads for r in log.results.values()) == 1


@pytest.mark.slow
def test_timeout_and_death_replace_the_worker(local_ray: Path, tmp_path: Path) -> None:
    trials = grid(["tiny-llava"], 3)
    hang, die = trials[0].trial.seed, trials[1].trial.seed
    local_ray.write_text(
        f'[{{"fault": "sleep", "seconds": 300, "match": {{"seed": {hang}}}, '
        f'"once": "{tmp_path / "hung"}"}}, '
        f'{{"fault": "kill", "match": {{"seed": {die}}}, "once": "{tmp_path / "died"}"}}]'
    )
    pool = WorkerPool(1, cpus=1, trial_timeout_s=8)
    log = Log(retries=1)
    try:
        pool.run(trials, log.claim, log.done, log.failed)
    finally:
        pool.shutdown()
        local_ray.write_text("[]")
    errors = {trial_id: error for trial_id, error, _ in log.failures}
    assert errors[trials[0].trial_id] == "timeout after 8s"
    assert "died" in errors[trials[1].trial_id]
    assert all(retryable for _, _, retryable in log.failures)
    assert set(log.results) == {t.trial_id for t in trials}  # both retried and finished
    assert pool.replaced == 2
    assert len({r.pid for r in log.results.values()}) >= 2  # replacements ran them


def test_trial_timeout_must_be_positive() -> None:
    assert range_problems("workers", {"trial_timeout_s": 0}) == {"trial_timeout_s": "must be > 0"}
    assert range_problems("workers", {"trial_timeout_s": None}) == {}
    assert range_problems("workers", {"trial_timeout_s": 0.5}) == {}


def test_a_worker_gets_its_next_trial_before_the_last_result_is_recorded(
    local_ray: Path,
) -> None:
    """Recording a result (database, MLflow) overlaps the worker's next trial: the next
    claim comes before ``done`` of the previous trial, and every trial is recorded once."""

    class Instant:  # defined here so that Ray ships it by value to the worker process
        """A worker whose trials take no time (the pool's own ordering is under test)."""

        def __init__(self, name: str, threads: int = 1) -> None:
            self.name = name

        def identity(self) -> dict[str, Any]:
            return {"pid": os.getpid(), "node": "node-of-" + self.name}

        def run(self, trial: Trial) -> TrialResult:
            return TrialResult(metrics={}, worker=self.name)

    events: list[tuple[str, int]] = []
    nodes: set[str | None] = set()  # where each claimed trial runs, known at its claim
    log = Log()

    def claim(dispatch: Dispatch, worker: str) -> bool:
        events.append(("claim", dispatch.trial_id))
        nodes.add(pool.node_of(worker))
        return log.claim(dispatch, worker)

    def done(dispatch: Dispatch, result: TrialResult) -> None:
        events.append(("done", dispatch.trial_id))
        log.done(dispatch, result)

    trials = [Dispatch(i, Trial(model="m", benchmark="b", method="random", hparams={}, seed=i))
              for i in range(5)]  # fmt: skip
    pool = WorkerPool(1, cpus=1, worker_cls=Instant)
    try:
        pool.run(trials, claim, done, log.failed)
    finally:
        pool.shutdown()
    assert sorted(log.results) == list(range(5)) and not log.failures
    assert [i for kind, i in events if kind == "done"] == list(range(5))
    for i in range(4):  # trial i+1 was on the worker before trial i was recorded
        assert events.index(("claim", i + 1)) < events.index(("done", i))
    (name,) = {name for _, name in log.claims}
    assert nodes == {f"node-of-{name}"}  # a running trial's node is recorded at its claim


def test_workers_that_cannot_start_stop_the_pool_with_their_error(local_ray: Path) -> None:
    """A worker that dies in its constructor is replaced, but not forever: after three
    deaths per worker in a row the pool gives up with the worker's own error."""

    class Broken:
        def __init__(self, name: str, threads: int = 1) -> None:
            raise OSError("no such model directory: /nowhere")

        def identity(self) -> dict[str, Any]:
            return {"pid": os.getpid()}

        def run(self, trial: Trial) -> TrialResult:
            return TrialResult(metrics={})

    log = Log()
    pool = WorkerPool(1, cpus=1, worker_cls=Broken)
    try:
        with pytest.raises(RuntimeError, match="3 workers in a row died while starting"):
            pool.run([trial(0, "m")], log.claim, log.done, log.failed)
    finally:
        pool.shutdown()
    assert pool.replaced == 2 and log.claims == []
