"""SQLAlchemy models of prunelab's own tables: sweeps, their submissions, trials, their
association and the trials' failed attempts.

MLflow keeps its own schema; these tables hold what the orchestrator needs to schedule,
deduplicate and resume trials. Every change here needs an Alembic migration in
``prunelab/db/migrations/versions`` (a test compares the migrated schema with this module).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Final

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import prunelab.trial

__all__ = [
    "ATTEMPT_KINDS",
    "SWEEP_STATUSES",
    "TRIAL_STATUSES",
    "Base",
    "Sweep",
    "SweepSubmission",
    "SweepTrial",
    "Trial",
    "TrialAttempt",
    "UTCDateTime",
    "utcnow",
]

SWEEP_STATUSES: Final = ("running", "finished", "failed", "interrupted")
"""Allowed values of ``sweeps.status``."""

TRIAL_STATUSES: Final = ("pending", "running", "finished", "failed")
"""Allowed values of ``trials.status``."""

ATTEMPT_KINDS: Final = (
    "error",  # the trial's own code raised: deterministic, not retried
    "out_of_memory",  # the trial ran out of (GPU) memory on a healthy worker: not retried
    "worker_died",  # the worker's process or node died (Ray reported it): retried
    "timeout",  # past workers.trial_timeout_s, its worker killed and replaced: retried
    "interrupted",  # the orchestrator stopped (Ctrl-C, SIGTERM, killed): run again on resume
    "recording",  # its result could not be recorded (artifacts, MLflow): run again on resume
)
"""Allowed values of ``trial_attempts.kind``: why an attempt ended without a result."""

NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always returned timezone-aware (also on SQLite)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert an aware datetime to UTC; naive datetimes are rejected."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use a timezone-aware datetime (UTC)")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Attach UTC to naive values read back (SQLite stores no offset)."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _status_check(values: tuple[str, ...], column: str = "status") -> CheckConstraint:
    allowed = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({allowed})", name=column)


class Base(DeclarativeBase):
    """Declarative base with a constraint naming convention (stable names for Alembic)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        dict[str, Any]: JSON,
        datetime: UTCDateTime,
    }


class Sweep(Base):
    """A sweep: the trials of every submission of a spec under its name (`SweepSubmission`);
    ``spec`` / ``spec_yaml`` are the latest submission's. Several sweeps may share a name
    (``prunelab sweep --fresh``): the name then means the newest (by ``created``)."""

    __tablename__ = "sweeps"
    __table_args__ = (_status_check(SWEEP_STATUSES),)

    id: Mapped[str] = mapped_column(String(12), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), index=True)
    spec: Mapped[dict[str, Any]]
    spec_yaml: Mapped[str] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default="running")
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    orchestrator: Mapped[str | None] = mapped_column(String(255))

    def __repr__(self) -> str:
        return f"Sweep(id={self.id!r}, name={self.name!r}, status={self.status!r})"


class SweepSubmission(Base):
    """One submission of a spec to a sweep (the first creates it, each later one with the same
    name extends it): the spec as submitted, when and by which orchestrator."""

    __tablename__ = "sweep_submissions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sweep_id: Mapped[str] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    submitted: Mapped[datetime] = mapped_column(default=utcnow)
    spec: Mapped[dict[str, Any]]
    spec_yaml: Mapped[str] = mapped_column(Text)
    orchestrator: Mapped[str | None] = mapped_column(String(255))

    def __repr__(self) -> str:
        return f"SweepSubmission(sweep_id={self.sweep_id!r}, submitted={self.submitted!r})"


class Trial(Base):
    """One trial, unique by ``trial_key`` across all sweeps; ``sweep_id`` is the sweep that
    created it (another sweep it belongs to, once that one is deleted)."""

    __tablename__ = "trials"
    __table_args__ = (_status_check(TRIAL_STATUSES),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sweep_id: Mapped[str] = mapped_column(ForeignKey("sweeps.id"), index=True)
    trial_key: Mapped[str] = mapped_column(String(64), unique=True)
    config: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    node: Mapped[str | None] = mapped_column(String(255))
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    started: Mapped[datetime | None]
    finished: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None]
    # bootstrap replicates of the score (prunelab.intervals); NULL: none (rows before 0002)
    replicates: Mapped[list[float] | None] = mapped_column(JSON)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    is_baseline: Mapped[bool] = mapped_column(Boolean, default=False)

    @property
    def trial(self) -> prunelab.trial.Trial:
        """The typed trial of this row's ``config`` (its stored form)."""
        return prunelab.trial.Trial.from_dict(self.config)

    def __repr__(self) -> str:
        return f"Trial(id={self.id!r}, key={self.trial_key[:10]!r}, status={self.status!r})"


class SweepTrial(Base):
    """Membership of a trial in a sweep; ``position`` is the trial's index in the sweep."""

    __tablename__ = "sweep_trials"

    sweep_id: Mapped[str] = mapped_column(
        ForeignKey("sweeps.id", ondelete="CASCADE"), primary_key=True
    )
    trial_id: Mapped[int] = mapped_column(
        ForeignKey("trials.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    position: Mapped[int] = mapped_column(Integer)


class TrialAttempt(Base):
    """One attempt of a trial that ended without a result: who ran it, when, and why it
    ended (``kind``, one of `ATTEMPT_KINDS`, and the error). ``attempt`` is the trial's
    ``attempts`` count when it was claimed (1 for the first). A successful attempt has no
    row: it is the trial's own ``worker``, ``started`` and ``finished``."""

    __tablename__ = "trial_attempts"
    __table_args__ = (
        _status_check(ATTEMPT_KINDS, "kind"),
        UniqueConstraint("trial_id", "attempt"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(255))
    node: Mapped[str | None] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))
    error: Mapped[str] = mapped_column(Text)
    started: Mapped[datetime | None]
    ended: Mapped[datetime]

    def as_dict(self) -> dict[str, Any]:
        """The attempt as JSON-ready values (times in ISO 8601, seconds)."""
        return {
            "attempt": self.attempt,
            "worker": self.worker,
            "node": self.node,
            "kind": self.kind,
            "error": self.error,
            "started": None if self.started is None else self.started.isoformat("T", "seconds"),
            "ended": self.ended.isoformat("T", "seconds"),
        }
