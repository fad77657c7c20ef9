"""Engines, sessions and schema set-up for prunelab's database (SQLite or PostgreSQL)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import (
    URL,
    Column,
    Connection,
    Engine,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    create_engine,
    event,
    inspect,
    make_url,
    select,
    text,
)
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "DB_URL_ENV",
    "VERSION_TABLE",
    "DatabaseUnavailableError",
    "adopt_legacy_version",
    "alembic_config",
    "check_db_url",
    "default_db_url",
    "init_db",
    "lock_schema",
    "make_engine",
    "normalize_db_url",
    "schema_lock",
    "session_factory",
]

DB_URL_ENV: Final = "PRUNELAB_DB_URL"
"""Environment variable overriding the default database URL."""

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"

VERSION_TABLE: Final = "prunelab_alembic_version"
"""Alembic's version table for prunelab's migrations: not ``alembic_version``, which MLflow's
own migrations use when both stores share one database."""

LEGACY_VERSION_TABLE: Final = "alembic_version"
"""Where prunelab's revision was recorded before `VERSION_TABLE` (moved over on upgrade)."""

# Arbitrary constant key for pg_advisory_xact_lock: serialises concurrent schema set-ups, of
# prunelab's tables (`init_db`) and of MLflow's (`schema_lock`), in one PostgreSQL database
# (advisory locks are per database).
_MIGRATION_LOCK_KEY: Final = 0x70_72_75_6E_65  # "prune"

_SQLITE_MAGIC: Final = b"SQLite format 3\x00"

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


def _sqlite_header(path: Path) -> tuple[int, bytes]:
    """The size of the file ``path`` and its first 100 bytes (SQLite's database header)."""
    with path.open("rb") as file:
        return os.fstat(file.fileno()).st_size, file.read(100)


def _sqlite_truncated(path: Path) -> str | None:
    """Whether the SQLite file ``path`` is shorter than its header says (None: it is not).

    The header's page count is valid when its version-valid-for matches the change counter;
    a WAL file still holding pages (a checkpoint may be under way) makes it inconclusive."""
    try:
        if path.with_name(path.name + "-wal").stat().st_size > 0:
            return None
    except OSError:
        pass
    size, header = _sqlite_header(path)
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    expected = page_size * int.from_bytes(header[28:32], "big")
    if header[24:28] == header[92:96] and size < expected:
        return f"is truncated ({size} bytes, its header says {expected})"
    return None


def _sqlite_problem(path: Path) -> str | None:
    """Why the existing file ``path`` is no usable SQLite database (None: it looks like one).

    Reads only: the header's magic string, then, through a read-only connection that holds a
    read transaction (no writer changes the file meanwhile), the schema and the file's size
    against the header's page count, which a truncated copy fails.
    """
    try:
        size, header = _sqlite_header(path)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if size == 0:  # SQLite takes an empty file for an empty database
        return None
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        return "is not a SQLite database (overwritten or corrupt)"
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=5, isolation_level=None)
        try:
            connection.execute("BEGIN")
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return _sqlite_truncated(path)
        finally:
            connection.close()
    except sqlite3.OperationalError:  # locked, or not openable read-only: the real open says
        return None
    except sqlite3.DatabaseError as exc:  # not a database, malformed
        return f"is corrupt ({exc})"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"


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
    from alembic.config import Config  # alembic only where the schema is set up

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


def lock_schema(connection: Connection) -> None:
    """On PostgreSQL, wait for the schema lock, held until the connection's transaction ends
    (no-op elsewhere): one process at a time sets up prunelab's or MLflow's tables."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})


@contextlib.contextmanager
def schema_lock(url: str | URL) -> Iterator[None]:
    """Hold the schema lock of `init_db` in the PostgreSQL database ``url`` while the body
    runs, e.g. while MLflow creates its tables there (no lock for other backends)."""
    parsed = normalize_db_url(url)
    if parsed.get_backend_name() != "postgresql":
        yield
        return
    engine = create_engine(parsed, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            lock_schema(connection)
            yield
    finally:
        engine.dispose()


def adopt_legacy_version(connection: Connection, revisions: set[str]) -> str | None:
    """Move prunelab's revision from ``alembic_version`` (where versions before
    `VERSION_TABLE` recorded it) to `VERSION_TABLE`, in the connection's transaction.

    ``revisions``: prunelab's migration ids; another row (MLflow's) stays where it is, and
    the legacy table is dropped once empty. Returns the moved revision, or None.
    """
    tables = set(inspect(connection).get_table_names())
    if LEGACY_VERSION_TABLE not in tables:
        return None
    legacy = Table(
        LEGACY_VERSION_TABLE, MetaData(), Column("version_num", String(32), nullable=False)
    )
    rows = connection.execute(select(legacy.c.version_num)).scalars().all()
    ours = [row for row in rows if row in revisions]
    if not ours:
        return None
    current = Table(
        VERSION_TABLE,
        MetaData(),
        Column("version_num", String(32), nullable=False),
        PrimaryKeyConstraint("version_num", name=f"{VERSION_TABLE}_pkc"),
    )
    if VERSION_TABLE not in tables:
        current.create(connection)
    # a revision already in VERSION_TABLE is the newer record: the legacy one only goes
    if connection.execute(select(current.c.version_num)).first() is None:
        connection.execute(current.insert(), [{"version_num": row} for row in ours])
    connection.execute(legacy.delete().where(legacy.c.version_num.in_(ours)))
    if len(ours) == len(rows):
        legacy.drop(connection)
    return ours[0]


def init_db(url: str | URL) -> Engine:
    """Bring the database at ``url`` to the latest schema (Alembic ``upgrade head``).

    Safe to call from several processes at once, and on a database MLflow shares (prunelab's
    revision is kept in `VERSION_TABLE`). Returns an engine from `make_engine`.
    """
    from alembic import command

    parsed = normalize_db_url(url)
    check_db_url(parsed)
    migrator = _migration_engine(parsed)
    try:
        with migrator.begin() as connection:
            lock_schema(connection)
            config = alembic_config(parsed)
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        migrator.dispose()
    return make_engine(parsed)


def _creatable_from(path: Path, shown: str) -> Path:
    """The directory where the missing file ``path`` would be created (its nearest existing
    ancestor, whose write access decides); `DatabaseUnavailableError` if that is a file."""
    ancestor = next((parent for parent in path.parents if parent.exists()), Path(path.anchor))
    if not ancestor.is_dir():
        raise DatabaseUnavailableError(
            f"cannot create the directory of SQLite database {shown}: {ancestor} is not a directory"
        )
    return ancestor


def check_db_url(url: str | URL, timeout: float = 10.0, create: bool = True) -> None:
    """Raise `DatabaseUnavailableError` with a clear message if ``url`` cannot be used.

    SQLite: the file's directory must be creatable and writable (it is created, unless
    ``create`` is false: then nothing is written), and an existing file must be an intact
    SQLite database (read only). PostgreSQL: the server must answer and the database must
    exist. Other backends: a connection must open.
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
        if create:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabaseUnavailableError(
                    f"cannot create the directory of SQLite database {shown}: {exc}"
                ) from exc
        target = path if path.exists() else _creatable_from(path, shown)
        if not os.access(target, os.W_OK):
            raise DatabaseUnavailableError(f"SQLite database {shown} is not writable")
        problem = _sqlite_problem(path) if path.is_file() else None
        if problem is not None:
            raise DatabaseUnavailableError(f"SQLite database file {path} {problem}")
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
