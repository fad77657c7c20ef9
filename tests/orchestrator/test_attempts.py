"""Each attempt of a trial is recorded with its error: in the database (``trial_attempts``),
by ``prunelab status`` and on the trial's MLflow run; only infrastructure faults are retried,
an exception of the trial's own code fails the trial at once."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from mlflow.tracking import MlflowClient
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from prunelab.db import Trial as TrialRow
from prunelab.db import init_db, make_engine, repo, session_factory
from prunelab.db.engine import alembic_config
from prunelab.db.models import TrialAttempt, utcnow
from prunelab.orchestrator.cli import main
from prunelab.orchestrator.scheduler import Dispatch, WorkerPool
from prunelab.orchestrator.spec import load_sweep
from prunelab.orchestrator.sweep import Stores, submit_sweep
from prunelab.trial import Trial, TrialResult

Factory = sessionmaker[Session]


def _trial_ids(factory: Factory, keys: list[str]) -> tuple[str, list[int]]:
    with factory.begin() as session:
        sweep = repo.create_sweep(session, "s", {}, "", "o")
        rows, _ = repo.add_trials(session, sweep.id, [(k, {"key": k}, False) for k in keys])
        return sweep.id, [row.id for row in rows]


def _attempts(factory: Factory, trial_id: int) -> list[tuple[int, str | None, str, str]]:
    with factory() as session:
        found = repo.trial_attempts(session, [trial_id]).get(trial_id, [])
        return [(a.attempt, a.worker, a.kind, a.error) for a in found]


# --------------------------------------------------------------------------- database


def test_every_failed_attempt_is_kept_with_its_kind(factory: Factory) -> None:
    _, (trial_id,) = _trial_ids(factory, ["k"])
    with factory.begin() as session:
        assert repo.claim_trial(session, trial_id, "o", "w0", "n0")
        assert repo.release_trial(session, trial_id, "worker w0 died", 3) == "pending"
        assert repo.claim_trial(session, trial_id, "o", "w1", "n1")
        assert repo.release_trial(session, trial_id, "timeout after 5s", 3, "timeout") == "pending"
        assert repo.claim_trial(session, trial_id, "o", "w2", None)
        repo.fail_trial(session, trial_id, "RuntimeError: bad", "error")
    assert _attempts(factory, trial_id) == [
        (1, "w0", "worker_died", "worker w0 died"),
        (2, "w1", "timeout", "timeout after 5s"),
        (3, "w2", "error", "RuntimeError: bad"),
    ]
    with factory() as session:
        (first, *_) = repo.trial_attempts(session, [trial_id])[trial_id]
        assert first.node == "n0" and first.started is not None
        assert first.ended >= first.started
        row = session.get(TrialRow, trial_id)
        assert row is not None and (row.status, row.error) == ("failed", "RuntimeError: bad")
    # a trial that is not running any more is not recorded again
    with factory.begin() as session:
        assert repo.release_trial(session, trial_id, "late", 5) == "failed"
    assert len(_attempts(factory, trial_id)) == 3
    # a rerun starts with a clean slate: attempts and their rows
    with factory.begin() as session:
        assert repo.reset_for_rerun(session, [trial_id]) == 1
    assert _attempts(factory, trial_id) == []


def test_interrupted_and_unrecorded_attempts(factory: Factory) -> None:
    sweep_id, (stale, done) = _trial_ids(factory, ["stale", "done"])
    with factory.begin() as session:
        assert repo.claim_trial(session, stale, "gone", "w0", None)
        assert repo.claim_trial(session, done, "o", "w1", None)
        repo.finish_trial(session, done, {"score": 1.0}, "w1", None, [1.0, 2.0])
        assert repo.recover_stale(session, sweep_id) == 1
        assert repo.return_unrecorded(session, done, "cannot write artifacts under /x: full")
        assert not repo.return_unrecorded(session, done, "again")  # not finished any more
    assert _attempts(factory, stale) == [
        (1, "w0", "interrupted", "the orchestrator stopped during the trial")
    ]
    assert _attempts(factory, done) == [
        (1, "w1", "recording", "cannot write artifacts under /x: full")
    ]
    with factory() as session:
        row = session.get(TrialRow, done)
        assert row is not None and row.status == "pending" and row.attempts == 1
        assert row.metrics is None and row.replicates is None and row.finished is None
    with factory.begin() as session:  # the next attempt has the next number
        assert repo.claim_trial(session, done, "o", "w2", None)
        assert repo.release_trial(session, done, "worker w2 died", 3) == "pending"
    assert [a[0] for a in _attempts(factory, done)] == [1, 2]


def test_attempt_kinds_and_numbers_are_checked(factory: Factory) -> None:
    _, (trial_id,) = _trial_ids(factory, ["k"])
    with factory.begin() as session:
        assert repo.claim_trial(session, trial_id, "o", "w0", None)
        with pytest.raises(ValueError, match="invalid attempt kind"):
            repo.release_trial(session, trial_id, "x", 3, "cosmic rays")
    with pytest.raises(IntegrityError), factory.begin() as session:  # one row per attempt
        for _ in range(2):
            session.add(TrialAttempt(trial_id=trial_id, attempt=1, kind="error", error="x",
                                     ended=utcnow()))  # fmt: skip
            session.flush()
    with pytest.raises(IntegrityError), factory.begin() as session:  # the database checks kinds
        session.add(TrialAttempt(trial_id=trial_id, attempt=1, kind="bogus", error="x",
                                 ended=utcnow()))  # fmt: skip
        session.flush()


def test_migration_keeps_existing_rows(db_url: str) -> None:
    """A database at 0002 with a retried trial: after the upgrade the trial is unchanged and
    has no attempt rows; a downgrade drops only the new table."""
    config = alembic_config(db_url)
    command.upgrade(config, "0002")
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO sweeps (id, name, spec, spec_yaml, created, status) "
                "VALUES ('s1', 'old', '{}', '', CURRENT_TIMESTAMP, 'finished')"
            ))  # fmt: skip
            connection.execute(text(
                "INSERT INTO trials (sweep_id, trial_key, config, status, attempts, error, "
                "is_baseline) VALUES ('s1', 'k1', '{}', 'finished', 2, 'worker died', true)"
            ))  # fmt: skip
        command.upgrade(config, "head")
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT attempts, error FROM trials")).all()
            attempts = connection.execute(text("SELECT count(*) FROM trial_attempts")).scalar()
        assert [tuple(r) for r in rows] == [(2, "worker died")] and attempts == 0
        with session_factory(engine)() as session:  # readable through the models
            (trial,) = session.query(TrialRow).all()
            assert repo.trial_attempts(session, [trial.id]) == {}
        command.downgrade(config, "0002")
        assert "trial_attempts" not in inspect(engine).get_table_names()
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM trials")).scalar() == 1
    finally:
        engine.dispose()


def test_status_lists_each_failed_attempt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    url = f"sqlite:///{tmp_path}/prunelab.db"
    plan = load_sweep("quickstart", ["keep_ratio=0.111", "eval.limit=4"])
    sessions = session_factory(init_db(url))
    with sessions.begin() as session:
        sweep = repo.create_sweep(session, "quickstart", plan.spec, plan.spec_yaml, "h:1:x")
        rows, _ = repo.add_trials(
            session, sweep.id, [(t.key, t.to_dict(), t.is_baseline) for t in plan.trials]
        )
        retried, broken = rows[0].id, rows[1].id
        assert repo.claim_trial(session, retried, "h:1:x", "worker-0", None)
        repo.release_trial(session, retried, "worker worker-0 died: gone\nmore", 3)
        assert repo.claim_trial(session, retried, "h:1:x", "worker-1", None)
        repo.finish_trial(session, retried, {"score": 50.0}, "worker-1", None)
        assert repo.claim_trial(session, broken, "h:1:x", "worker-1", None)
        repo.fail_trial(session, broken, "RuntimeError: broken", "error")
    assert main(["status", "quickstart", "--db-url", url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "      attempt 1 on worker-0: worker_died: worker worker-0 died: gone" in out
    assert "      attempt 1 on worker-1: error: RuntimeError: broken" in out
    assert main(["status", "quickstart", "--json", "--db-url", url]) == 0
    trials = {t["id"]: t for t in json.loads(capsys.readouterr().out)["trials"]}
    (died,) = trials[retried]["failed_attempts"]
    assert (died["attempt"], died["worker"], died["kind"]) == (1, "worker-0", "worker_died")
    assert died["error"] == "worker worker-0 died: gone\nmore" and died["ended"]
    assert trials[retried]["attempts"] == 2 and trials[retried]["status"] == "finished"
    assert [a["kind"] for a in trials[broken]["failed_attempts"]] == ["error"]
    assert all(t["failed_attempts"] == [] for i, t in trials.items() if i not in (retried, broken))


# --------------------------------------------------------------------------- on Ray


def test_an_error_of_the_trial_is_final_and_the_worker_keeps_going(local_ray: Path) -> None:
    class Picky:  # defined here so that Ray ships it by value to the worker process
        """Trial seed 1 raises, the others finish at once."""

        def __init__(self, name: str, threads: int = 1) -> None:
            self.name = name

        def identity(self) -> dict[str, Any]:
            return {"pid": os.getpid()}

        def run(self, trial: Trial) -> TrialResult:
            if trial.seed == 1:
                raise KeyError("no such column")
            return TrialResult(metrics={}, worker=self.name)

    failures: list[tuple[int, str, str, bool]] = []
    results: dict[int, TrialResult] = {}

    def failed(dispatch: Dispatch, error: Any, retryable: bool) -> bool:
        failures.append((dispatch.trial_id, str(error), error.kind, retryable))
        return True  # asked to retry: a final failure must not be run again anyway

    trials = [Dispatch(i, Trial(model="m", benchmark="b", method="random", hparams={}, seed=i))
              for i in range(3)]  # fmt: skip
    pool = WorkerPool(1, cpus=1, worker_cls=Picky)
    try:
        pool.run(trials, lambda d, w: True, lambda d, r: results.update({d.trial_id: r}), failed)
    finally:
        pool.shutdown()
    assert failures == [(1, "KeyError: 'no such column'", "error", False)]
    assert sorted(results) == [0, 2] and pool.replaced == 0


def _stores(directory: Path) -> Stores:
    return Stores(
        db_url=f"sqlite:///{directory / 'prunelab.db'}",
        tracking_uri=f"sqlite:///{directory / 'mlflow.db'}",
        artifact_root=str(directory / "artifacts"),
        ray_address=None,
    )


@pytest.mark.slow
def test_sweep_records_attempts_and_retries_only_infrastructure_faults(
    local_ray: Path, tmp_path: Path
) -> None:
    """fastv 11.1% loses its worker once (retried, finished on the second attempt); random
    33.3% raises in its own code (failed at once, one attempt, though 3 are allowed)."""
    killed = tmp_path / "killed"
    local_ray.write_text(json.dumps([
        {"fault": "kill", "match": {"method": "fastv", "keep_ratio": 0.111}, "once": str(killed)},
        {"fault": "error", "message": "bug in the trial",
         "match": {"method": "random", "keep_ratio": 0.333}},
    ]))  # fmt: skip
    stores = _stores(tmp_path)
    args = ["model=tiny-llava", "benchmark=shapes", "method=none,random,fastv",
            "keep_ratio=0.111,0.333", "eval.limit=2", "eval.warmup=0",
            "workers.count=1", "workers.max_attempts=3"]  # fmt: skip
    try:
        assert submit_sweep(load_sweep("quickstart", args), stores) == 1  # one trial failed
    finally:
        local_ray.write_text("[]")
    assert killed.exists()
    engine = make_engine(stores.db_url)
    try:
        with session_factory(engine)() as session:
            trials = {
                (t.config["method"], t.config.get("keep_ratio")): t
                for t in session.query(TrialRow).all()
            }
            attempts = repo.trial_attempts(session, [t.id for t in trials.values()])
            retried, broken = trials["fastv", 0.111], trials["random", 0.333]
            assert (retried.status, retried.attempts) == ("finished", 2)
            assert [(a.attempt, a.kind) for a in attempts[retried.id]] == [(1, "worker_died")]
            assert "died" in attempts[retried.id][0].error
            assert (broken.status, broken.attempts) == ("failed", 1)
            assert [(a.kind, a.error) for a in attempts[broken.id]] == [
                ("error", "RuntimeError: bug in the trial")
            ]
            others = [t for t in trials.values() if t not in (retried, broken)]
            assert all(t.status == "finished" and t.attempts == 1 for t in others)
            assert all(t.id not in attempts for t in others)
            runs = {t.mlflow_run_id: t for t in trials.values() if t.mlflow_run_id}
    finally:
        engine.dispose()
    client = MlflowClient(stores.tracking_uri)
    assert len(runs) == 4  # the failed trial has no child run
    for run_id, trial in runs.items():
        run = client.get_run(run_id)
        assert run.data.tags["prunelab.attempts"] == str(trial.attempts)
        path = client.download_artifacts(run_id, "attempts.json", str(tmp_path))
        logged = json.loads(Path(path).read_text())
        assert [a["attempt"] for a in logged] == list(range(1, trial.attempts + 1))
        assert logged[-1]["kind"] == "finished" and logged[-1]["worker"] == trial.worker
        if trial is retried:
            assert logged[0]["kind"] == "worker_died" and "died" in logged[0]["error"]
