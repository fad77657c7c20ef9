"""Engines, sessions and schema set-up for prunelab's database (SQLite or PostgreSQL)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from sqlalchemy import URL, Engine, create_engine, event, make_url, text
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

__all__ = [
    "DB_URL_ENV",
    "DatabaseUnavailableError",
    "alembic_config",
    "check_db_url",
    "default_db_url",
    "init_db",
    "make_engine",
    "normalize_db_url",
    "session_factory",
]

DB_URL_ENV: Final = "PRUNELAB_DB_URL"
"""Environment variable overriding the default database URL."""

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"

# Arbitrary constant key for pg_advisory_xact_lock: serialises concurrent `init_db` calls.
_MIGRATION_LOCK_KEY: Final = 0x70_72_75_6E_65  # "prune"

_WAL_ATTEMPTS: Final = 200  # x 50 ms


class DatabaseUnavailableError(RuntimeError):
    """The configured database cannot be used; the message says why, in one line."""


def default_db_url() -> str:
    """``$PRUNELAB_DB_URL``, else ``sqlite:///<cwd>/prunelab-runs/prunelab.db``."""
    env = os.environ.get(DB_URL_ENV)
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'prunelab-runs' / 'prunelab.db'}"


def normalize_db_url(url: str | URL) -> URL:
    """Parse ``url``; a ``postgresql://`` URL without a driver gets psycopg 3."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL, or None for an in-memory database."""
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Per-connection SQLite settings: wait up to 30 s for locks, foreign keys, WAL, NORMAL sync."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        # Switching a new file to WAL needs an exclusive lock and SQLite reports a competing
        # switch as "locked" at once, without waiting: retry briefly. The mode then persists.
        for attempt in range(_WAL_ATTEMPTS):
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                break
            except Exception as exc:
                if "locked" not in str(exc) or attempt == _WAL_ATTEMPTS - 1:
                    raise
                time.sleep(0.05)
        # WAL + NORMAL: a commit is atomic and survives a crash of the process, without an
        # fsync per commit (only the last commits can be lost on a power failure). A sweep
        # commits a few times per trial, so this is most of its database cost on SQLite.
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """Create an engine: SQLite in WAL mode with foreign keys, or a bounded PostgreSQL pool.

    For a SQLite file the parent directory is created. Extra ``kwargs`` go to
    ``create_engine`` and override the defaults chosen here.
    """
    parsed = normalize_db_url(url)
    backend = parsed.get_backend_name()
    options: dict[str, Any] = {}
    if backend == "postgresql":
        options.update(pool_size=5, max_overflow=5, pool_pre_ping=True)
    options.update(kwargs)
    if backend == "sqlite":
        path = _sqlite_file(parsed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, **options)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``; objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str | URL | None = None) -> Config:
    """An Alembic config for the packaged migrations, independent of the working directory."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if url is not None:
        rendered = normalize_db_url(url).render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


def _migration_engine(url: URL) -> Engine:
    """An engine for running migrations that holds the write lock for the whole upgrade.

    On SQLite the driver's own transaction handling is switched off and every transaction
    starts with ``BEGIN IMMEDIATE``, so DDL is transactional and concurrent upgrades queue.
    """
    engine = make_engine(url)
    if url.get_backend_name() == "sqlite":

        @event.listens_for(engine, "connect")
        def _no_driver_transactions(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin_immediate(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def init_db(url: str | URL) -> Engine:
    """Bring the database at ``url`` to the latest schema (Alembic ``upgrade head``).

    Safe to call from several processes at once. Returns an engine from `make_engine`.
    """
    parsed = normalize_db_url(url)
    check_db_url(parsed)
    migrator = _migration_engine(parsed)
    try:
        with migrator.begin() as connection:
            if parsed.get_backend_name() == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                )
            config = alembic_config(parsed)
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        migrator.dispose()
    return make_engine(parsed)


def check_db_url(url: str | URL, timeout: float = 10.0) -> None:
    """Raise `DatabaseUnavailableError` with a clear message if ``url`` cannot be used.

    SQLite: the file's directory must be creatable and writable. PostgreSQL: the server
    must answer and the database must exist. Other backends: a connection must open.
    """
    try:
        parsed = normalize_db_url(url)
    except ArgumentError as exc:
        raise DatabaseUnavailableError(f"invalid database URL {str(url)!r}: {exc}") from exc
    shown = parsed.render_as_string(hide_password=True)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        path = _sqlite_file(parsed)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseUnavailableError(
                f"cannot create the directory of SQLite database {shown}: {exc}"
            ) from exc
        target = path if path.exists() else path.parent
        if not os.access(target, os.W_OK):
            raise DatabaseUnavailableError(f"SQLite database {shown} is not writable")
        return
    connect_args: dict[str, Any] = {}
    if backend == "postgresql":
        connect_args["connect_timeout"] = max(1, round(timeout))
    try:
        engine = create_engine(parsed, connect_args=connect_args, poolclass=NullPool)
    except (ArgumentError, ImportError) as exc:
        raise DatabaseUnavailableError(f"cannot use database URL {shown}: {exc}") from exc
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        where = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
        if backend == "postgresql" and f'database "{parsed.database}" does not exist' in reason:
            raise DatabaseUnavailableError(
                f"PostgreSQL database {parsed.database!r} does not exist on {where}; create it "
                f"with: createdb -h {parsed.host or 'localhost'} -p {parsed.port or 5432} "
                f"{parsed.database}"
            ) from exc
        raise DatabaseUnavailableError(f"cannot connect to database {shown}: {reason}") from exc
    finally:
        engine.dispose()
