"""Repository functions and engines, on SQLite and on PostgreSQL."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from datetime import timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from prunelab.db import (
    DatabaseUnavailableError,
    Sweep,
    SweepTrial,
    Trial,
    check_db_url,
    default_db_url,
    init_db,
    make_engine,
    normalize_db_url,
    repo,
)

_R = TypeVar("_R")

Factory = sessionmaker[Session]


def _sweep(factory: Factory, name: str = "quick", orchestrator: str = "host:1") -> str:
    with factory.begin() as session:
        return repo.create_sweep(session, name, {"name": name}, f"name: {name}\n", orchestrator).id


def _trials(factory: Factory, sweep_id: str, keys: list[str]) -> list[int]:
    with factory.begin() as session:
        rows, _ = repo.add_trials(session, sweep_id, [(k, {"key": k}, False) for k in keys])
        return [row.id for row in rows]


def _get(factory: Factory, trial_id: int) -> Trial:
    with factory() as session:
        trial = session.get(Trial, trial_id)
        assert trial is not None
        return trial


def _run_concurrently(workers: list[Callable[[], _R]]) -> list[_R]:
    """Run the callables in threads released together; re-raise the first error."""
    barrier = threading.Barrier(len(workers))
    results: list[Any] = [None] * len(workers)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = workers[index]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


# --------------------------------------------------------------------------- sweeps


def test_create_get_and_list_sweeps(factory: Factory) -> None:
    first = _sweep(factory, "quick")
    second = _sweep(factory, "quick")
    other = _sweep(factory, "other", orchestrator="node-7:42")
    with factory() as session:
        sweep = repo.get_sweep(session, other)
        assert sweep is not None
        assert (sweep.name, sweep.status, sweep.orchestrator) == ("other", "running", "node-7:42")
        assert sweep.spec == {"name": "other"}
        assert sweep.spec_yaml == "name: other\n"
        assert sweep.mlflow_run_id is None
        assert len(sweep.id) == 12 and int(sweep.id, 16) >= 0
        assert sweep.created.tzinfo is not None and sweep.created.utcoffset().total_seconds() == 0
        by_name = repo.get_sweep(session, "quick")
        assert by_name is not None and by_name.id == second
        assert repo.get_sweep(session, "missing") is None
        assert [s.id for s in repo.list_sweeps(session)] == [other, second, first]


def test_sweep_setters(factory: Factory) -> None:
    sweep_id = _sweep(factory)
    with factory.begin() as session:
        sweep = repo.get_sweep(session, sweep_id)
        assert sweep is not None and sweep.status == "running"
        repo.set_sweep_status(session, sweep_id, "interrupted")
        repo.set_sweep_mlflow_run(session, sweep_id, "abc123")
        repo.set_sweep_orchestrator(session, sweep_id, "other:2")
        # The loaded object is refreshed, not stale.
        assert (sweep.status, sweep.mlflow_run_id, sweep.orchestrator) == (
            "interrupted",
            "abc123",
            "other:2",
        )
    with factory.begin() as session:
        with pytest.raises(ValueError, match="invalid sweep status"):
            repo.set_sweep_status(session, sweep_id, "done")
        with pytest.raises(LookupError):
            repo.set_sweep_status(session, "nope", "failed")
        with pytest.raises(LookupError):
            repo.set_sweep_mlflow_run(session, "nope", "x")


# --------------------------------------------------------------------------- trials


def test_add_trials_dedupes_keys_across_sweeps(factory: Factory) -> None:
    sweep_a = _sweep(factory, "a")
    sweep_b = _sweep(factory, "b")
    with factory.begin() as session:
        rows, done = repo.add_trials(
            session,
            sweep_a,
            [("k1", {"m": 1}, True), ("k2", {"m": 2}, False), ("k1", {"m": 1}, True)],
        )
        assert [t.trial_key for t in rows] == ["k1", "k2"]
        assert done == 0
        assert rows[0].is_baseline and not rows[1].is_baseline
        assert rows[0].config == {"m": 1}
        assert all(t.status == "pending" and t.attempts == 0 for t in rows)
        assert all(t.sweep_id == sweep_a for t in rows)
        k1 = rows[0].id
        assert repo.claim_trial(session, k1, "o", "w", None)
        repo.finish_trial(session, k1, {"score": 0.5}, "w", None)

    with factory.begin() as session:
        rows, done = repo.add_trials(session, sweep_b, [("k3", {}, False), ("k1", {}, False)])
        assert [t.trial_key for t in rows] == ["k3", "k1"]
        assert done == 1
        assert rows[1].id == k1 and rows[1].sweep_id == sweep_a  # reused, not recreated
        assert rows[1].metrics == {"score": 0.5}
        assert rows[0].sweep_id == sweep_b

    with factory.begin() as session:
        again, done = repo.add_trials(session, sweep_a, [("k1", {}, True), ("k2", {}, False)])
        assert [t.trial_key for t in again] == ["k1", "k2"] and done == 1
        assert session.scalar(select(func.count()).select_from(Trial)) == 3
        assert session.scalar(select(func.count()).select_from(SweepTrial)) == 4
        assert [t.trial_key for t in repo.sweep_trials(session, sweep_a)] == ["k1", "k2"]
        assert [t.trial_key for t in repo.sweep_trials(session, sweep_b)] == ["k3", "k1"]
        assert repo.trial_status_counts(session, sweep_b) == {"pending": 1, "finished": 1}
        found = repo.trials_by_keys(session, ["k2", "k3", "nope"])
        assert sorted(found) == ["k2", "k3"]
        assert found["k2"].trial_key == "k2"


def test_add_trials_many_keys(factory: Factory) -> None:
    sweep_id = _sweep(factory)
    keys = [f"{i:064x}" for i in range(1234)]  # more than one statement's chunk
    with factory.begin() as session:
        rows, done = repo.add_trials(session, sweep_id, [(k, {"i": k}, False) for k in keys])
        assert [t.trial_key for t in rows] == keys and done == 0
        assert len(repo.trials_by_keys(session, keys)) == len(keys)
        assert [t.trial_key for t in repo.sweep_trials(session, sweep_id)] == keys


def test_add_trials_concurrently_from_two_sweeps(factory: Factory) -> None:
    sweeps = [_sweep(factory, "a"), _sweep(factory, "b")]
    keys = [f"key-{i}" for i in range(200)]

    def add(sweep_id: str) -> list[str]:
        with factory.begin() as session:
            rows, _ = repo.add_trials(session, sweep_id, [(k, {}, False) for k in keys])
            return [t.trial_key for t in rows]

    results = _run_concurrently([lambda s=s: add(s) for s in sweeps])
    assert results == [keys, keys]
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Trial)) == len(keys)
        for sweep_id in sweeps:
            assert len(repo.sweep_trials(session, sweep_id)) == len(keys)


def test_add_trials_needs_an_existing_sweep(factory: Factory) -> None:
    with pytest.raises(IntegrityError), factory.begin() as session:
        repo.add_trials(session, "no-such-id", [("k", {}, False)])


def test_claim_trial(factory: Factory) -> None:
    sweep_id = _sweep(factory)
    (trial_id,) = _trials(factory, sweep_id, ["k"])
    with factory.begin() as session:
        trial = session.get(Trial, trial_id)
        assert trial is not None and trial.status == "pending"
        assert repo.claim_trial(session, trial_id, "host:1", "worker-0", "node-a")
        assert trial.status == "running"  # session objects are refreshed
        assert not repo.claim_trial(session, trial_id, "host:2", "worker-1", None)
    trial = _get(factory, trial_id)
    assert (trial.status, trial.attempts, trial.claimed_by) == ("running", 1, "host:1")
    assert (trial.worker, trial.node) == ("worker-0", "node-a")
    assert trial.started is not None and trial.started.tzinfo is not None
    assert trial.finished is None
    with factory.begin() as session:
        assert repo.running_claims(session, sweep_id) == {"host:1"}
        assert not repo.claim_trial(session, 999_999, "host:1", "w", None)


def test_concurrent_claims_give_each_trial_to_exactly_one(factory: Factory) -> None:
    sweep_id = _sweep(factory)
    trial_ids = _trials(factory, sweep_id, [f"k{i}" for i in range(40)])

    def claim_all(orchestrator: str, order: list[int]) -> set[int]:
        won = set()
        for trial_id in order:
            with factory.begin() as session:
                if repo.claim_trial(session, trial_id, orchestrator, "w", None):
                    won.add(trial_id)
        return won

    first, second = _run_concurrently(
        [
            lambda: claim_all("host:1", trial_ids),
            lambda: claim_all("host:2", trial_ids[::-1]),
        ]
    )
    assert first.isdisjoint(second)
    assert first | second == set(trial_ids)
    with factory() as session:
        trials = repo.sweep_trials(session, sweep_id)
        assert all(t.status == "running" and t.attempts == 1 for t in trials)
        assert {t.id for t in trials if t.claimed_by == "host:1"} == first


def test_release_counts_attempts(factory: Factory) -> None:
    sweep_id = _sweep(factory)
    (trial_id,) = _trials(factory, sweep_id, ["k"])
    with factory.begin() as session:
        assert repo.claim_trial(session, trial_id, "o", "w0", None)
        assert repo.release_trial(session, trial_id, "worker died", max_attempts=2) == "pending"
    trial = _get(factory, trial_id)
    assert (trial.status, trial.attempts, trial.error) == ("pending", 1, "worker died")
    assert trial.claimed_by is None and trial.finished is None
    with factory.begin() as session:
        assert repo.claim_trial(session, trial_id, "o", "w1", None)
        assert repo.release_trial(session, trial_id, "out of memory", max_attempts=2) == "failed"
        # Not running any more: unchanged, status reported.
        assert repo.release_trial(session, trial_id, "again", max_attempts=5) == "failed"
        assert not repo.claim_trial(session, trial_id, "o", "w2", None)
    trial = _get(factory, trial_id)
    assert (trial.status, trial.attempts, trial.error) == ("failed", 2, "out of memory")
    assert trial.finished is not None and trial.claimed_by is None
    with factory.begin() as session, pytest.raises(LookupError):
        repo.release_trial(session, 999_999, "x", 1)


def test_finish_fail_and_mlflow_run(factory: Factory) -> None:
    sweep_id = _sweep(factory)
    ok, bad = _trials(factory, sweep_id, ["ok", "bad"])
    metrics = {"score": 0.75, "tflops": 1.5, "fidelity_kl": math.nan, "samples": 64}
    with factory.begin() as session:
        assert repo.claim_trial(session, ok, "o", "w", None)
        repo.finish_trial(session, ok, metrics, "worker-3", "node-b")
        repo.set_trial_mlflow_run(session, ok, "run-1")
        assert repo.claim_trial(session, bad, "o", "w", None)
        repo.fail_trial(session, bad, "ValueError: bad config")
    trial = _get(factory, ok)
    assert trial.status == "finished"
    assert trial.metrics == {"score": 0.75, "tflops": 1.5, "fidelity_kl": None, "samples": 64}
    assert (trial.worker, trial.node, trial.mlflow_run_id) == ("worker-3", "node-b", "run-1")
    assert trial.claimed_by is None and trial.error is None
    assert trial.finished is not None and trial.started is not None
    assert trial.finished >= trial.started
    assert trial.finished.tzinfo == timezone.utc
    trial = _get(factory, bad)
    assert (trial.status, trial.error, trial.claimed_by) == (
        "failed",
        "ValueError: bad config",
        None,
    )
    with factory.begin() as session:
        assert repo.trial_status_counts(session, sweep_id) == {"finished": 1, "failed": 1}
        for call in (
            lambda: repo.finish_trial(session, 999_999, {}, "w", None),
            lambda: repo.fail_trial(session, 999_999, "x"),
            lambda: repo.set_trial_mlflow_run(session, 999_999, "r"),
        ):
            with pytest.raises(LookupError):
                call()


def test_reset_for_rerun(factory: Factory) -> None:
    sweep_id = _sweep(factory)
    done, failed, running = _trials(factory, sweep_id, ["done", "failed", "running"])
    with factory.begin() as session:
        for trial_id in (done, failed, running):
            assert repo.claim_trial(session, trial_id, "o", "w", "n")
        repo.finish_trial(session, done, {"score": 1.0}, "w", "n")
        repo.set_trial_mlflow_run(session, done, "run-1")
        repo.fail_trial(session, failed, "boom")
    with factory.begin() as session:
        assert repo.reset_for_rerun(session, [done, failed, running]) == 2
    for trial_id in (done, failed):
        trial = _get(factory, trial_id)
        assert (trial.status, trial.attempts) == ("pending", 0)
        assert trial.metrics is None and trial.error is None and trial.mlflow_run_id is None
        assert trial.started is None and trial.finished is None and trial.worker is None
    assert _get(factory, running).status == "running"


def test_recover_stale(factory: Factory) -> None:
    sweep_id = _sweep(factory, "a")
    other_sweep = _sweep(factory, "b")
    dead, alive, unclaimed = _trials(factory, sweep_id, ["dead", "alive", "pending"])
    (elsewhere,) = _trials(factory, other_sweep, ["elsewhere"])
    with factory.begin() as session:
        assert repo.claim_trial(session, dead, "host:1", "w", None)
        assert repo.claim_trial(session, alive, "host:2", "w", None)
        assert repo.claim_trial(session, elsewhere, "host:1", "w", None)
        assert repo.running_claims(session, sweep_id) == {"host:1", "host:2"}
    with factory.begin() as session:
        assert repo.recover_stale(session, sweep_id, live_claims={"host:2"}) == 1
    assert (_get(factory, dead).status, _get(factory, dead).claimed_by) == ("pending", None)
    assert _get(factory, dead).attempts == 1  # attempts are kept
    assert _get(factory, alive).status == "running"
    assert _get(factory, unclaimed).status == "pending"
    assert _get(factory, elsewhere).status == "running"  # not a member of this sweep
    with factory.begin() as session:
        assert repo.recover_stale(session, sweep_id) == 1  # no live claim: all reset
    assert _get(factory, alive).status == "pending"
    assert _get(factory, elsewhere).status == "running"


def test_status_is_checked_by_the_database(factory: Factory) -> None:
    sweep_id = _sweep(factory)
    (trial_id,) = _trials(factory, sweep_id, ["k"])
    with pytest.raises(IntegrityError), factory.begin() as session:
        trial = session.get(Trial, trial_id)
        assert trial is not None
        trial.status = "exploded"
    with pytest.raises(IntegrityError), factory.begin() as session:
        sweep = session.get(Sweep, sweep_id)
        assert sweep is not None
        sweep.status = "exploded"


# --------------------------------------------------------------------------- engines


def test_default_db_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PRUNELAB_DB_URL", raising=False)
    assert default_db_url() == f"sqlite:///{tmp_path}/prunelab-runs/prunelab.db"
    monkeypatch.setenv("PRUNELAB_DB_URL", "postgresql://u@db:5432/prunelab")
    assert default_db_url() == "postgresql://u@db:5432/prunelab"


def test_normalize_db_url() -> None:
    assert normalize_db_url("postgresql://u:p@h/db").drivername == "postgresql+psycopg"
    assert normalize_db_url("postgresql+psycopg2://u@h/db").drivername == "postgresql+psycopg2"
    assert normalize_db_url("sqlite:///x.db").drivername == "sqlite"


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "p.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            pragma = connection.exec_driver_sql
            assert pragma("PRAGMA journal_mode").scalar() == "wal"
            assert pragma("PRAGMA busy_timeout").scalar() == 30000
            assert pragma("PRAGMA foreign_keys").scalar() == 1
            assert pragma("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert path.exists()
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_engine_settings(pg_url: str) -> None:
    plain = pg_url.replace("postgresql+psycopg://", "postgresql://")
    engine = make_engine(plain)
    try:
        assert engine.dialect.driver == "psycopg"
        assert engine.pool.size() == 5  # type: ignore[attr-defined]
        assert engine.pool._max_overflow == 5  # type: ignore[attr-defined]
        assert engine.pool._pre_ping
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_check_db_url_postgres(pg_url: str) -> None:
    check_db_url(pg_url)
    missing = pg_url.rsplit("/", 1)[0] + "/prunelab_no_such_database"
    with pytest.raises(DatabaseUnavailableError, match=r"does not exist.*createdb"):
        check_db_url(missing)
    with pytest.raises(DatabaseUnavailableError, match="does not exist"):
        init_db(missing)


def test_check_db_url_problems(tmp_path: Path) -> None:
    check_db_url(f"sqlite:///{tmp_path}/new/p.db")
    assert (tmp_path / "new").is_dir()
    with pytest.raises(DatabaseUnavailableError, match="cannot connect"):
        check_db_url("postgresql://nobody@127.0.0.1:1/none", timeout=2)
    with pytest.raises(DatabaseUnavailableError, match="invalid database URL"):
        check_db_url("not a url")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DatabaseUnavailableError, match="cannot create the directory"):
        check_db_url(f"sqlite:///{blocker}/sub/p.db")


def test_finish_stores_replicates(factory: Factory) -> None:
    sweep_id = _sweep(factory)
    with_reps, without, empty = _trials(factory, sweep_id, ["with", "without", "empty"])
    with factory.begin() as session:
        for trial_id in (with_reps, without, empty):
            assert repo.claim_trial(session, trial_id, "o", "w", None)
        repo.finish_trial(session, with_reps, {"score": 50.0}, "w", None,
                          replicates=(48.5, math.nan, 51.25))  # fmt: skip
        repo.finish_trial(session, without, {"score": 50.0}, "w", None)
        repo.finish_trial(session, empty, {"score": 50.0}, "w", None, replicates=())
    assert _get(factory, with_reps).replicates == [48.5, None, 51.25]  # NaN stored as null
    assert _get(factory, without).replicates is None
    assert _get(factory, empty).replicates is None
    with factory.begin() as session:
        assert repo.reset_for_rerun(session, [with_reps]) == 1
    assert _get(factory, with_reps).replicates is None
