"""Faults of the stores themselves, injected from outside the code under test: the orchestrator
killed before its MLflow parent run is recorded, two orchestrators creating a new store's
tables at once, both stores in one database, MLflow's database connection terminated
(``pg_terminate_backend`` from an admin connection), the MLflow store lost (its SQLite file
deleted), a store file overwritten or truncated, a missing database. Each ends in a finished
sweep, or in exit status 2 with one line naming the store; ``prunelab resume`` then finishes
the sweep with each trial logged once under its parent.

Sweeps are the tiny quickstart of ``test_signals`` (5 trials, one worker) run as CLI
subprocesses, or a copy of the session's ``finished_sweep`` (the same 5 trials,
tests/orchestrator/conftest.py) where a finished sweep is all a fault needs;
``test_faults.check_agree`` checks the database and MLflow agree afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy import Connection, create_engine, make_url, text
from sqlalchemy.pool import NullPool
from test_cli_sweep import check_mlflow
from test_faults import check_agree, counts, trials_of
from test_signals import ARGS, TRIALS, descendants, store_flags

from prunelab.db import init_db
from prunelab.db.engine import VERSION_TABLE
from prunelab.orchestrator.cli import main
from prunelab.orchestrator.tracking import Tracker
from prunelab.workers.faults import FAULTS_ENV

SLOW_TRIALS = {FAULTS_ENV: json.dumps([{"fault": "sleep", "seconds": 2}])}
"""Every trial sleeps in its worker: the sweep is still running when a fault comes."""


# --------------------------------------------------------------------------- helpers


def flags(db_url: str, tracking_uri: str, directory: Path) -> list[str]:
    return [
        "--db-url", db_url,
        "--tracking-uri", tracking_uri,
        "--artifact-root", str(directory / "artifacts"),
    ]  # fmt: skip


def start(command: str, *args: str, cwd: Path, env: dict[str, str] | None = None):
    """``prunelab COMMAND ARGS`` as a subprocess (stdout and stderr in files of ``cwd``)."""
    out = (cwd / f"{command}.out").open("w")
    err = (cwd / f"{command}.err").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prunelab.orchestrator.cli", command, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=err,
    )
    out.close()
    err.close()
    return proc


def finish(proc: subprocess.Popen, cwd: Path, command: str) -> tuple[int, str]:
    """Wait for a subprocess of `start`; its exit status and its stdout + stderr."""
    try:
        returncode = proc.wait(timeout=500)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = (cwd / f"{command}.out").read_text() + (cwd / f"{command}.err").read_text()
    return returncode, output


def run(command: str, *args: str, cwd: Path, env: dict[str, str] | None = None):
    return finish(start(command, *args, cwd=cwd, env=env), cwd, command)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    """Poll ``condition`` while ``proc`` runs (a guard against a hang, not a timing check)."""
    deadline = time.monotonic() + 300
    while not condition():
        assert proc.poll() is None, f"the sweep exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the orchestrator, then the Ray processes it had started (they would outlive
    it), each by its id."""
    below = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    for pid in below:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def check_parent(db_url: str, tracking_uri: str) -> None:
    """Every trial run hangs under the sweep's recorded parent run, which exists and ended."""
    from prunelab.db import make_engine, repo, session_factory

    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as session:
            (sweep,) = repo.list_sweeps(session)
            parent_id = sweep.mlflow_run_id
    finally:
        engine.dispose()
    assert parent_id is not None
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_id)
    assert parent.data.tags["prunelab.role"] == "sweep" and parent.info.status == "FINISHED"
    experiment = parent.info.experiment_id
    runs = client.search_runs([experiment], "tags.`prunelab.role` = 'trial'", max_results=1000)
    assert len(runs) == TRIALS
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent_id}
    parents = client.search_runs([experiment], "tags.`prunelab.role` = 'sweep'")
    assert [r.info.run_id for r in parents] == [parent_id]


class Admin:
    """Connections of the test's own to a PostgreSQL database: its lock holder and killer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.database = make_url(url).database
        self.engine = create_engine(url, poolclass=NullPool)
        self.autocommit = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")

    def lock_runs(self) -> Connection:
        """Hold an exclusive lock on MLflow's ``runs`` table (until rolled back): any
        MLflow call that reads or writes runs waits for it."""
        connection = self.engine.connect()
        connection.execute(text("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE"))
        return connection

    def waiting(self) -> list[int]:
        """Backends of the database waiting for a lock (blocked on `lock_runs`)."""
        with self.autocommit.connect() as connection:
            return list(
                connection.scalars(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = :d "
                        "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                    ),
                    {"d": self.database},
                )
            )

    def terminate(self, pids: list[int]) -> None:
        with self.autocommit.connect() as connection:
            for pid in pids:
                connection.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})

    def dispose(self) -> None:
        self.engine.dispose()
        self.autocommit.dispose()


# --------------------------------------------------------------------------- schema set-up

SET_UP = """
import pathlib, sys, time
from prunelab.db import init_db
from prunelab.orchestrator.tracking import Tracker
url, go = sys.argv[1], pathlib.Path(sys.argv[2])
pathlib.Path(sys.argv[3]).touch()
while not go.exists():
    time.sleep(0.01)
init_db(url).dispose()
Tracker(url).experiment_id("quickstart")
"""


@pytest.mark.slow
@pytest.mark.postgres
def test_concurrent_set_up_of_both_schemas_in_one_new_postgres_database(
    pg_url: str, tmp_path: Path
) -> None:
    """Four processes create prunelab's and MLflow's tables in one new database at once."""
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SET_UP, pg_url, str(go), str(path)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for path in ready
    ]
    try:
        deadline = time.monotonic() + 300
        while not all(path.exists() for path in ready) and time.monotonic() < deadline:
            time.sleep(0.05)
        go.touch()
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out
    engine = create_engine(pg_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            ours = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).all()
            theirs = connection.execute(text("SELECT version_num FROM alembic_version")).all()
            experiments = connection.execute(
                text("SELECT count(*) FROM experiments WHERE name = 'quickstart'")
            ).scalar()
    finally:
        engine.dispose()
    assert len(ours) == 1 and len(theirs) == 1 and ours != theirs
    assert experiments == 1


@pytest.mark.parametrize("first", ["prunelab", "mlflow"])
def test_both_schemas_share_one_database_in_either_order(
    db_url: str, first: str, tmp_path: Path
) -> None:
    def mlflow() -> None:
        tracker = Tracker(db_url, str(tmp_path / "artifacts"))
        tracker.start_sweep("shared", "sweep1", {})
        if db_url.startswith("postgresql"):
            tracker.client._tracking_client.store.engine.dispose()

    steps = [lambda: init_db(db_url).dispose(), mlflow]
    for step in steps if first == "prunelab" else steps[::-1]:
        step()
    init_db(db_url).dispose()  # again: each finds its own revision
    mlflow()
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            ours = connection.scalars(text(f"SELECT version_num FROM {VERSION_TABLE}")).all()
            theirs = connection.scalars(text("SELECT version_num FROM alembic_version")).all()
    finally:
        engine.dispose()
    assert len(ours) == 1 and len(theirs) == 1 and ours != theirs


# --------------------------------------------------------------------------- connections


@pytest.mark.postgres
def test_tracker_call_survives_its_connection_terminated(
    pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = Tracker(pg_url, str(tmp_path / "artifacts"))
    parent = tracker.start_sweep("terminated", "sweep1", {})
    admin = Admin(pg_url)
    lock = admin.lock_runs()
    errors: list[BaseException] = []

    def log() -> None:
        try:
            tracker.log_trial("terminated", parent, "sweep1", "key1", "t", {"a": 1}, {"m": 1}, {})
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=log)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not (blocked := admin.waiting()):
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        admin.terminate(blocked)  # mid-call: MLflow's connection dies under the query
    finally:
        lock.rollback()
        lock.close()
        thread.join(timeout=120)
        admin.dispose()
    assert errors == []
    lost = [r for r in caplog.records if "lost its database connection" in r.getMessage()]
    assert lost and "AdminShutdown" in lost[0].getMessage()  # the fault hit the call
    (run,) = tracker.trial_runs("terminated", "sweep1")
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
    tracker.client._tracking_client.store.engine.dispose()


@pytest.mark.slow
@pytest.mark.postgres
def test_one_postgres_database_from_env_survives_a_kill_and_a_terminated_connection(
    pg_url: str, tmp_path: Path
) -> None:
    """Both stores in one PostgreSQL database (each with its own version table), named by
    ``PRUNELAB_DB_URL`` and ``PRUNELAB_TRACKING_URI``: nothing but artifacts is written under
    the working directory. The orchestrator is killed while its parent run waits for MLflow,
    before the run is recorded; ``prunelab resume`` then has an MLflow connection terminated
    while a trial is being logged, and finishes the sweep: every trial logged once under the
    one parent run, with all its params, tags and artifacts. A second ``prunelab sweep`` then
    has nothing to run."""
    ours = theirs = pg_url
    env = {"PRUNELAB_DB_URL": ours, "PRUNELAB_TRACKING_URI": theirs}
    Tracker(theirs).experiment_id("quickstart")  # MLflow's tables, as a server creates them
    admin = Admin(theirs)
    try:
        lock = admin.lock_runs()  # the sweep's first MLflow run call waits here
        try:
            proc = start("sweep", *ARGS, cwd=tmp_path, env=env)
            try:
                wait_for(lambda: bool(admin.waiting()), proc, "the parent run waiting for MLflow")
                kill_tree(proc)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        finally:
            lock.rollback()
            lock.close()
        trials = trials_of(ours)
        assert len(trials) == TRIALS and all(t.status == "pending" for t in trials)

        proc = start("resume", "quickstart", cwd=tmp_path, env={**env, **SLOW_TRIALS})
        try:
            wait_for(lambda: counts(ours).get("logged", 0) >= 1, proc, "a trial logged")
            lock = admin.lock_runs()  # the next trial's logging waits: then its connection dies
            try:
                wait_for(lambda: bool(admin.waiting()), proc, "the next trial's logging")
                admin.terminate(admin.waiting())
            finally:
                lock.rollback()
                lock.close()
            returncode, output = finish(proc, tmp_path, "resume")
        finally:
            if proc.poll() is None:
                kill_tree(proc)
    finally:
        admin.dispose()
    assert returncode == 0, output
    assert "lost its database connection" in output and "Traceback" not in output, output
    check_agree(ours, theirs)
    check_parent(ours, theirs)
    check_mlflow(theirs, trials=TRIALS)
    default = tmp_path / "prunelab-runs"  # where the stores would be without the variables
    assert not (default / "prunelab.db").exists() and not (default / "mlflow.db").exists()
    init_db(pg_url).dispose()  # prunelab's revision is its own: a second upgrade is a no-op

    returncode, output = run("sweep", *ARGS, cwd=tmp_path, env=env)
    assert returncode == 0 and "0 to run" in output, output


# --------------------------------------------------------------------------- lost store


@pytest.mark.slow
def test_mlflow_sqlite_store_deleted_resume_logs_every_trial_again(
    finished_sweep: Any, tmp_path: Path
) -> None:
    stores = finished_sweep.copy_to(tmp_path)  # every trial finished and logged
    for name in ("mlflow.db", "mlflow.db-wal", "mlflow.db-shm"):
        (stores / name).unlink(missing_ok=True)

    returncode, output = run("resume", "quickstart", *store_flags(stores), cwd=tmp_path)
    assert returncode == 0, output
    assert f"{TRIALS} finished trial(s) whose MLflow run is gone will be logged again" in output
    db_url = f"sqlite:///{stores / 'prunelab.db'}"
    tracking_uri = f"sqlite:///{stores / 'mlflow.db'}"
    check_agree(db_url, tracking_uri)
    check_parent(db_url, tracking_uri)


# --------------------------------------------------------------------------- bad stores


def sqlite_database(path: Path) -> None:
    """A SQLite database of several pages."""
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE t (x TEXT)")
    connection.executemany("INSERT INTO t VALUES (?)", [("x" * 1000,)] * 50)
    connection.commit()
    connection.close()


def garbage(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


def truncated(path: Path) -> None:
    sqlite_database(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [garbage, truncated], ids=["garbage", "truncated"])
@pytest.mark.parametrize("store", ["prunelab.db", "mlflow.db"])
@pytest.mark.parametrize("command", ["sweep", "resume"])
def test_damaged_sqlite_store_is_bad_input(
    command: str, store: str, damage: Callable[[Path], None], tmp_path: Path, capsys
) -> None:
    stores = tmp_path / "stores"
    stores.mkdir()
    damaged = stores / store
    damage(damaged)
    content = damaged.read_bytes()
    args = [*ARGS[1:]] if command == "sweep" else []
    target = ["quickstart", *args]
    assert main([command, *target, *store_flags(stores)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(damaged) in lines[0], err
    flag = "--db-url" if store == "prunelab.db" else "--tracking-uri"
    assert lines[0].startswith(f"prunelab: error: {flag}"), err
    assert damaged.read_bytes() == content
    assert sorted(p.name for p in stores.iterdir()) == [store]  # nothing else written


@pytest.mark.postgres
@pytest.mark.parametrize("command", ["sweep", "resume"])
def test_missing_postgres_mlflow_database_is_bad_input(
    command: str, pg_url: str, tmp_path: Path, capsys
) -> None:
    missing = make_url(pg_url).set(database="prunelab_no_such_database")
    missing_url = missing.render_as_string(hide_password=False)
    db = tmp_path / "prunelab.db"
    target = ["quickstart", *ARGS[1:]] if command == "sweep" else ["quickstart"]
    store_args = flags(f"sqlite:///{db}", missing_url, tmp_path)
    assert main([command, *target, *store_args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("prunelab: error: --tracking-uri / PRUNELAB_TRACKING_URI")
    assert "prunelab_no_such_database" in lines[0] and "does not exist" in lines[0]
    assert not db.exists()


@pytest.mark.parametrize("command", [["status"], ["report", "quickstart"]])
def test_damaged_sqlite_database_read_only_commands(
    command: list[str], tmp_path: Path, capsys
) -> None:
    damaged = tmp_path / "prunelab.db"
    garbage(damaged)
    content = damaged.read_bytes()
    assert main([*command, "--db-url", f"sqlite:///{damaged}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunelab: error: --db-url"), lines
    assert str(damaged) in lines[0] and damaged.read_bytes() == content
