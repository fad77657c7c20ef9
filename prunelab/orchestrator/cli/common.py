"""What every command shares: bad input as :class:`UsageError`, the stores from the flags and
environment, and read-only access to an existing database."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "SCORING",
    "UsageError",
    "check_stores",
    "engine_if_exists",
    "stores_from_args",
    "write_output",
]

SCORING = ("lmms_eval", "official")  # prunelab.orchestrator.config.SCORING_RULES (not imported)


class UsageError(Exception):
    """Bad input: each line of ``problems`` is printed on stderr and the exit status is 2."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def stores_from_args(args: argparse.Namespace):
    from prunelab.db.engine import default_db_url
    from prunelab.orchestrator.sweep import Stores
    from prunelab.orchestrator.tracking import default_artifact_root, default_tracking_uri

    tracking_uri = args.tracking_uri or default_tracking_uri()
    # an MLflow server decides where artifacts go (it serves them); a local store gets ours
    served = tracking_uri.startswith(("http://", "https://"))
    return Stores(
        db_url=args.db_url or default_db_url(),
        tracking_uri=tracking_uri,
        artifact_root=args.artifact_root or (None if served else default_artifact_root()),
        ray_address=args.ray_address or os.environ.get("RAY_ADDRESS"),
    )


def stores_line(stores) -> str:
    """Where a sweep's records go, on one line (passwords hidden): printed as a sweep starts,
    since the default stores are relative to the working directory."""
    from sqlalchemy.engine import make_url

    def shown(url: str) -> str:
        try:
            parsed = make_url(url)
        except Exception:  # not a SQLAlchemy URL (an MLflow server, a file: URI)
            return url
        if parsed.drivername.startswith("sqlite") and parsed.database not in (None, ":memory:"):
            parsed = parsed.set(database=str(Path(parsed.database).resolve()))  # cwd-relative
        return parsed.render_as_string(hide_password=True)

    artifacts = stores.artifact_root or "kept by the MLflow server"
    if stores.artifact_root and "://" not in stores.artifact_root:
        artifacts = str(Path(stores.artifact_root).resolve())
    ray = stores.ray_address or "a local Ray started for this sweep"
    return (
        f"prunelab: stores: database {shown(stores.db_url)}; MLflow "
        f"{shown(stores.tracking_uri)}; artifacts {artifacts}; Ray {ray}"
    )


def check_stores(stores) -> None:
    """Reject unusable stores before anything runs or is written: a bad URL, a PostgreSQL
    server that does not answer or lacks the database, a SQLite file that is no intact
    database (prunelab's and MLflow's alike, `prunelab.db.engine.check_db_url`)."""
    from prunelab.db.engine import DatabaseUnavailableError, check_db_url

    problems = []
    try:
        check_db_url(stores.db_url, create=False)
    except DatabaseUnavailableError as exc:
        problems.append(f"--db-url / PRUNELAB_DB_URL: {exc}")
    scheme = stores.tracking_uri.split(":", 1)[0]
    if scheme not in ("sqlite", "postgresql", "postgresql+psycopg", "http", "https", "file"):
        problems.append(
            f"--tracking-uri / PRUNELAB_TRACKING_URI={stores.tracking_uri!r}: expected a "
            "sqlite://, postgresql://, http(s):// or file: URI"
        )
    elif scheme.startswith(("sqlite", "postgresql")):  # MLflow's database
        try:
            check_db_url(stores.tracking_uri, create=False)
        except DatabaseUnavailableError as exc:
            problems.append(f"--tracking-uri / PRUNELAB_TRACKING_URI: {exc}")
    if problems:
        raise UsageError(problems)


def engine_if_exists(db_url: str):
    """An engine on an existing database, or None (read-only commands never create one).
    A database that cannot be used (a damaged SQLite file, a missing PostgreSQL database)
    is bad input."""
    from sqlalchemy import inspect

    from prunelab.db.engine import (
        DatabaseUnavailableError,
        check_db_url,
        make_engine,
        normalize_db_url,
    )

    url = normalize_db_url(db_url)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        return None
    try:
        check_db_url(url, create=False)
    except DatabaseUnavailableError as exc:
        raise UsageError([f"--db-url / PRUNELAB_DB_URL: {exc}"]) from None
    engine = make_engine(db_url)
    if not inspect(engine).has_table("trials"):
        return None
    return engine


def write_output(flag: str, path: str, content: bytes) -> None:
    """Write a file the user named; one that cannot be written is bad input."""
    try:
        Path(path).write_bytes(content)
    except OSError as exc:
        raise UsageError([f"{flag} {path}: cannot write: {exc.strerror or exc}"]) from None
