"""Alembic environment for prunelab's tables.

The database comes from ``config.attributes["connection"]`` (an open connection, as
`prunelab.db.engine.init_db` passes it), else from the config's ``sqlalchemy.url``, else from
`prunelab.db.engine.default_db_url` (``$PRUNELAB_DB_URL``). Nothing is read from a file.
prunelab's revision is kept in ``prunelab_alembic_version`` (`VERSION_TABLE`), apart from
MLflow's ``alembic_version`` when both stores share a database.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from prunelab.db.engine import (
    VERSION_TABLE,
    adopt_legacy_version,
    default_db_url,
    lock_schema,
    make_engine,
    normalize_db_url,
)
from prunelab.db.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or default_db_url()
    return normalize_db_url(url).render_as_string(hide_password=False)


def _run(connection: Connection) -> None:
    """Under the schema lock and in one transaction: move a revision recorded the old way
    (in ``alembic_version``) to prunelab's version table, then migrate."""
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        version_table=VERSION_TABLE,
    )
    with context.begin_transaction():
        lock_schema(connection)
        revisions = {script.revision for script in context.script.walk_revisions()}
        adopt_legacy_version(connection, revisions)
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit the migration SQL without connecting (``alembic upgrade --sql``)."""
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        version_table=VERSION_TABLE,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the given connection, or on a new engine for the URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as new_connection:
            _run(new_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
