"""Shared pytest fixtures for the whole test suite."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import URL, create_engine, make_url, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

# tests never download: a hub id must fail at once instead of retrying the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# --------------------------------------------------------------------------- hermetic stores

STORE_ENV = (
    "PRUNELAB_TRACKING_URI",
    "PRUNELAB_DB_URL",
    "PRUNELAB_ARTIFACT_ROOT",
    "RAY_ADDRESS",
    "PRUNELAB_TEST_FAULTS",
)
"""The stores (and Ray, and the workers' fault rules) a user's shell may point prunelab at."""

SHELL_STORES = {name: os.environ.pop(name) for name in STORE_ENV if name in os.environ}
"""What the shell that started pytest had set, recorded and removed before any test runs:
no test reads or writes those stores, connects to that Ray or inherits those faults."""

# a bare ray.init() in a test starts a Ray of its own: never the shell's cluster, nor one
# found through /tmp/ray/ray_current_cluster (`ray start` on this machine)
os.environ["RAY_ADDRESS"] = "local"


@pytest.fixture(scope="session", autouse=True)
def _session_cwd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session works in a temporary directory: the default stores (``./prunelab-runs``)
    of anything that runs outside a test (module fixtures, Ray's processes) land there."""
    directory = tmp_path_factory.mktemp("cwd")
    previous = Path.cwd()
    os.chdir(directory)
    try:
        yield directory
    finally:
        os.chdir(previous)


@pytest.fixture(autouse=True)
def _test_cwd(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test starts in a directory of its own, so its default stores are temporary."""
    directory = tmp_path_factory.mktemp("cwd-test")
    monkeypatch.chdir(directory)
    return directory


# --------------------------------------------------------------------------- databases

PG_URL_ENV = "PRUNELAB_TEST_PG_URL"
"""Overrides the maintenance database the PostgreSQL tests connect to."""

PG_REQUIRED_ENV = "PRUNELAB_TEST_REQUIRE_PG"
"""When set (CI), an unreachable PostgreSQL fails the tests instead of skipping them."""

_PG_CANDIDATES = (
    "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "postgresql+psycopg://root@127.0.0.1:5432/test",
)


class PgDatabases:
    """Creates fresh, uniquely named databases on the test server and drops them."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url: URL = make_url(admin_url)
        self._admin = create_engine(
            self.admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool
        )
        self._created: set[str] = set()

    def create(self) -> str:
        """Create an empty database; return its URL (``postgresql+psycopg://``)."""
        name = f"prunelab_test_{uuid.uuid4().hex[:12]}"
        with self._admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        self._created.add(name)
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        """Drop a database made by `create`, closing connections still open to it."""
        name = make_url(url).database
        assert name in self._created, f"{name} was not created by this fixture"
        with self._admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self._created.discard(name)

    def drop_all(self) -> None:
        """Drop every database still left, then release the admin engine."""
        for name in list(self._created):
            self.drop(self.admin_url.set(database=name).render_as_string(hide_password=False))
        self._admin.dispose()


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """URL of the test server's maintenance database (skips if PostgreSQL is unreachable)."""
    candidates = [os.environ[PG_URL_ENV]] if os.environ.get(PG_URL_ENV) else _PG_CANDIDATES
    errors = []
    for url in candidates:
        engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return url
        except SQLAlchemyError as exc:
            errors.append(f"{make_url(url).username}: {str(exc).splitlines()[0]}")
        finally:
            engine.dispose()
    reason = f"PostgreSQL test server unreachable ({'; '.join(errors)})"
    if os.environ.get(PG_REQUIRED_ENV):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_databases(pg_admin_url: str) -> Iterator[PgDatabases]:
    """Factory of fresh PostgreSQL databases; whatever is left is dropped after the session."""
    databases = PgDatabases(pg_admin_url)
    yield databases
    databases.drop_all()


@pytest.fixture
def pg_url(pg_databases: PgDatabases) -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database, dropped after the test."""
    url = pg_databases.create()
    yield url
    pg_databases.drop(url)


@pytest.fixture
def sqlite_url(tmp_path: os.PathLike[str]) -> str:
    """URL of a SQLite database file (not yet created) in the test's tmp_path."""
    return f"sqlite:///{os.fspath(tmp_path)}/prunelab.db"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """URL of a fresh, empty database; the test runs once on SQLite, once on PostgreSQL."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return request.getfixturevalue(fixture)


@pytest.fixture
def factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on a freshly migrated database (SQLite or PostgreSQL)."""
    from prunelab.db import init_db, session_factory

    engine = init_db(db_url)
    yield session_factory(engine)
    engine.dispose()
