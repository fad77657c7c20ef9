"""Alembic migrations: they build exactly the schema of models.py, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from prunelab.db import Base, init_db, make_engine, repo, session_factory
from prunelab.db.engine import VERSION_TABLE, alembic_config

TABLES = {"sweeps", "sweep_submissions", "trials", "sweep_trials", "trial_attempts"}


def _schema_diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "version_table": VERSION_TABLE}
            )
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {VERSION_TABLE}
    finally:
        engine.dispose()


def test_single_head() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert len(script.get_heads()) == 1


def test_migrated_schema_matches_models(db_url: str) -> None:
    init_db(db_url).dispose()
    assert _tables(db_url) == TABLES
    assert _schema_diff(db_url) == []


def test_downgrade_and_upgrade_again(db_url: str) -> None:
    config = alembic_config(db_url)  # env.py takes the URL from the config
    command.upgrade(config, "head")
    assert _tables(db_url) == TABLES
    command.downgrade(config, "base")
    assert _tables(db_url) == set()
    command.upgrade(config, "head")
    assert _schema_diff(db_url) == []


def test_init_db_is_idempotent_and_safe_concurrently(db_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def init() -> None:
        try:
            barrier.wait()
            init_db(db_url).dispose()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=init) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    init_db(db_url).dispose()
    assert _schema_diff(db_url) == []


def test_init_db_does_not_depend_on_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    init_db(sqlite_url).dispose()
    assert _tables(sqlite_url) == TABLES


def test_offline_sql(capsys: pytest.CaptureFixture[str]) -> None:
    command.upgrade(alembic_config("postgresql://u@h/db"), "head", sql=True)
    sql = capsys.readouterr().out
    for table in TABLES:
        assert f"CREATE TABLE {table}" in sql
    assert "CONSTRAINT uq_trials_trial_key UNIQUE (trial_key)" in sql


def test_replicates_column_added_to_existing_rows(db_url: str) -> None:
    """A database at revision 0001 with a finished trial: after the upgrade the trial and its
    sweep membership are kept, with NULL replicates; a downgrade drops only the column."""
    config = alembic_config(db_url)
    command.upgrade(config, "0001")
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO sweeps (id, name, spec, spec_yaml, created, status) "
                "VALUES ('s1', 'old', '{}', '', CURRENT_TIMESTAMP, 'finished')"
            ))  # fmt: skip
            connection.execute(text(
                "INSERT INTO trials (sweep_id, trial_key, config, status, attempts, metrics, "
                "is_baseline) VALUES ('s1', 'k1', '{}', 'finished', 1, '{\"score\": 50.0}', "
                "true)"
            ))  # fmt: skip
            connection.execute(text(
                "INSERT INTO sweep_trials (sweep_id, trial_id, position) "
                "SELECT 's1', id, 0 FROM trials"
            ))  # fmt: skip
        command.upgrade(config, "head")
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT trial_key, replicates FROM trials")).all()
            links = connection.execute(text("SELECT count(*) FROM sweep_trials")).scalar()
        assert [tuple(row) for row in rows] == [("k1", None)] and links == 1
        command.downgrade(config, "0001")
        columns = {c["name"] for c in inspect(engine).get_columns("trials")}
        assert "replicates" not in columns and "metrics" in columns
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM sweep_trials")).scalar() == 1
    finally:
        engine.dispose()


def test_submissions_added_for_existing_sweeps(db_url: str) -> None:
    """A database at revision 0003 with two sweeps of one name (as re-running a spec made
    them): after the upgrade each has one submission, its own spec at its creation; the
    sweeps, trials and memberships are kept; a downgrade drops only the new table."""
    config = alembic_config(db_url)
    command.upgrade(config, "0003")
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            for sweep_id, created in (("s1", "2026-01-01 10:00:00"), ("s2", "2026-01-02 10:00:00")):
                connection.execute(
                    text(
                        "INSERT INTO sweeps (id, name, spec, spec_yaml, created, status, "
                        "orchestrator) VALUES (:id, 'quickstart', :spec, :yaml, :created, "
                        "'finished', 'host:1')"
                    ),
                    {"id": sweep_id, "spec": f'{{"name": "{sweep_id}"}}',
                     "yaml": f"name: {sweep_id}\n", "created": created},
                )  # fmt: skip
            connection.execute(text(
                "INSERT INTO trials (sweep_id, trial_key, config, status, attempts, "
                "is_baseline) VALUES ('s1', 'k1', '{}', 'finished', 1, true)"
            ))  # fmt: skip
            connection.execute(text(
                "INSERT INTO sweep_trials (sweep_id, trial_id, position) "
                "SELECT s.id, t.id, 0 FROM trials t, sweeps s"
            ))  # fmt: skip
        command.upgrade(config, "head")
        sessions = session_factory(engine)
        with sessions() as session:
            for sweep_id in ("s1", "s2"):
                (submission,) = repo.sweep_submissions(session, sweep_id)
                assert submission.spec == {"name": sweep_id}
                assert submission.spec_yaml == f"name: {sweep_id}\n"
                assert submission.orchestrator == "host:1"
                assert submission.submitted == repo.get_sweep(session, sweep_id).created
            assert repo.get_sweep(session, "quickstart").id == "s2"  # the newest
            assert len(repo.sweep_trials(session, "s1")) == 1
        command.downgrade(config, "0003")
        assert "sweep_submissions" not in inspect(engine).get_table_names()
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM sweeps")).scalar() == 2
            assert connection.execute(text("SELECT count(*) FROM sweep_trials")).scalar() == 2
    finally:
        engine.dispose()


def _versions(url: str) -> dict[str, list[str]]:
    """The rows of each Alembic version table of the database, by table."""
    engine = make_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
        with engine.connect() as connection:
            return {
                table: sorted(connection.scalars(text(f"SELECT version_num FROM {table}")))
                for table in ("alembic_version", VERSION_TABLE)
                if table in tables
            }
    finally:
        engine.dispose()


def test_revision_recorded_in_alembic_version_moves_to_its_own_table(db_url: str) -> None:
    """A database migrated by a version that kept prunelab's revision in ``alembic_version``
    (the table MLflow uses too): concurrent upgrades move it over once, data kept."""
    command.upgrade(alembic_config(db_url), "0002")
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:  # as the old version left it
            connection.execute(text(f"DROP TABLE {VERSION_TABLE}"))
            connection.execute(text(
                "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
            ))  # fmt: skip
            connection.execute(text("INSERT INTO alembic_version VALUES ('0002')"))
            connection.execute(text(
                "INSERT INTO sweeps (id, name, spec, spec_yaml, created, status) "
                "VALUES ('s1', 'old', '{}', '', CURRENT_TIMESTAMP, 'finished')"
            ))  # fmt: skip
    finally:
        engine.dispose()
    assert _versions(db_url) == {"alembic_version": ["0002"]}

    test_init_db_is_idempotent_and_safe_concurrently(db_url)
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert _versions(db_url) == {VERSION_TABLE: [head]}
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT name FROM sweeps")).scalars().all() == ["old"]
    finally:
        engine.dispose()


def test_another_revision_in_alembic_version_is_left_alone(db_url: str) -> None:
    """Both stores in one database, MLflow's first: its ``alembic_version`` is not ours."""
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
            connection.execute(text("INSERT INTO alembic_version VALUES ('1b5f0d9ad7c1')"))
    finally:
        engine.dispose()
    init_db(db_url).dispose()
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert _versions(db_url) == {"alembic_version": ["1b5f0d9ad7c1"], VERSION_TABLE: [head]}
    assert _tables(db_url) == TABLES | {"alembic_version"}
