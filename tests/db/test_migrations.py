"""Alembic migrations: they build exactly the schema of models.py, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from prunelab.db import Base, init_db, make_engine
from prunelab.db.engine import alembic_config

TABLES = {"sweeps", "trials", "sweep_trials"}


def _schema_diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
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
