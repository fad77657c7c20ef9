"""Repository functions over prunelab's tables.

Every function takes a `Session` and never commits: the caller owns the transaction
(``with factory.begin() as session: ...``). State changes of a trial are single conditional
``UPDATE`` statements, so they are atomic across processes and orchestrators; the ORM
objects of the session are expired after each one so they never show stale values.

A sweep is its name: `create_sweep` makes one (with its first submission), `extend_sweep`
records each later submission of a spec under that name, `delete_sweep` removes one (its
trials too, unless another sweep has them). `get_sweep` finds a sweep by id, else the newest of
a name.

Trial life cycle: ``pending -> running`` (`claim_trial`) ``-> finished`` (`finish_trial`) or
``-> pending | failed`` (`release_trial`, `fail_trial`, `recover_stale`); ``finished ->
pending`` when its result could not be recorded (`return_unrecorded`). ``claimed_by`` is set
exactly while a trial is ``running``. Each attempt that ends without a result gets a
``trial_attempts`` row, inserted in the same transaction as the trial's state change.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TypeVar

from sqlalchemy import (
    ColumnElement,
    Table,
    case,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from prunelab.db.models import (
    ATTEMPT_KINDS,
    SWEEP_STATUSES,
    Sweep,
    SweepSubmission,
    SweepTrial,
    Trial,
    TrialAttempt,
    UTCDateTime,
    utcnow,
)

__all__ = [
    "DeletedSweep",
    "add_trials",
    "claim_trial",
    "create_sweep",
    "delete_sweep",
    "extend_sweep",
    "fail_trial",
    "finish_trial",
    "finite_metrics",
    "finite_replicates",
    "get_sweep",
    "list_sweeps",
    "lock_sweep_name",
    "named_sweep_ids",
    "new_sweep_id",
    "newest_sweep",
    "recover_stale",
    "release_trial",
    "reset_for_rerun",
    "return_unrecorded",
    "running_claims",
    "set_sweep_mlflow_run",
    "set_sweep_orchestrator",
    "set_sweep_status",
    "set_trial_mlflow_run",
    "shared_trials",
    "sweep_submissions",
    "sweep_trials",
    "trial_attempts",
    "trial_status_counts",
    "trials_by_keys",
]

_CHUNK: Final = 500  # rows per statement: stays far below the bind-parameter limits

_T = TypeVar("_T")


def _chunks(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def new_sweep_id() -> str:
    """A fresh sweep id: 12 hex characters of a random UUID."""
    return uuid.uuid4().hex[:12]


# --------------------------------------------------------------------------- sweeps


def create_sweep(
    session: Session, name: str, spec: dict[str, Any], spec_yaml: str, orchestrator: str
) -> Sweep:
    """Insert a ``running`` sweep driven by ``orchestrator`` (host:pid), with its first
    submission (``spec``), and return it."""
    now = utcnow()
    sweep = Sweep(
        id=new_sweep_id(),
        name=name,
        spec=spec,
        spec_yaml=spec_yaml,
        created=now,
        status="running",
        orchestrator=orchestrator,
    )
    session.add(sweep)
    session.flush()
    _add_submission(session, sweep.id, spec, spec_yaml, orchestrator, now)
    return sweep


def _add_submission(
    session: Session,
    sweep_id: str,
    spec: dict[str, Any],
    spec_yaml: str,
    orchestrator: str,
    submitted: datetime,
) -> None:
    session.execute(
        insert(SweepSubmission).values(
            sweep_id=sweep_id,
            submitted=submitted,
            spec=spec,
            spec_yaml=spec_yaml,
            orchestrator=orchestrator,
        )
    )


def extend_sweep(
    session: Session, sweep_id: str, spec: dict[str, Any], spec_yaml: str, orchestrator: str
) -> int:
    """Record another submission of a spec to an existing sweep (same name): its spec becomes
    the sweep's (``spec``, ``spec_yaml``; the earlier ones stay in `sweep_submissions`), the
    sweep is ``running`` again, driven by ``orchestrator``. Returns the sweep's number of
    submissions, this one included."""
    _update_sweep(
        session,
        sweep_id,
        spec=spec,
        spec_yaml=spec_yaml,
        orchestrator=orchestrator,
        status="running",
    )
    _add_submission(session, sweep_id, spec, spec_yaml, orchestrator, utcnow())
    return len(sweep_submissions(session, sweep_id))


def sweep_submissions(session: Session, sweep_id: str) -> list[SweepSubmission]:
    """The submissions of a sweep, oldest first."""
    query = (
        select(SweepSubmission)
        .where(SweepSubmission.sweep_id == sweep_id)
        .order_by(SweepSubmission.submitted, SweepSubmission.id)
    )
    return list(session.scalars(query))


_NAME_LOCK_CLASS: Final = 0x70726E  # pg_advisory_xact_lock(class, hashtext(name)): "prn"


def lock_sweep_name(session: Session, name: str) -> None:
    """Serialize the transactions that look up a sweep by name and then create or extend it,
    until the session's transaction ends: two submissions of one name at once make one sweep.
    PostgreSQL: an advisory lock of the name; SQLite: the database's write lock, taken now."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(:cls, hashtext(:name))"),
            {"cls": _NAME_LOCK_CLASS, "name": name},
        )
    elif dialect == "sqlite":
        # a write that changes nothing: the transaction holds the write lock from here on,
        # so what it reads next is the latest state, and no other write comes in between
        session.execute(update(Sweep).where(literal(False)).values(name=Sweep.name))


def newest_sweep(session: Session, name: str) -> Sweep | None:
    """The most recent sweep named ``name`` (by name only, never by id), or None."""
    query = select(Sweep).where(Sweep.name == name).order_by(Sweep.created.desc(), Sweep.id)
    return session.scalars(query.limit(1)).first()


def get_sweep(session: Session, ref: str) -> Sweep | None:
    """The sweep with id ``ref``, else the most recent sweep named ``ref``, else None."""
    sweep = session.get(Sweep, ref)
    if sweep is not None:
        return sweep
    return newest_sweep(session, ref)


def named_sweep_ids(session: Session) -> set[str]:
    """Ids of the sweeps their name refers to (the newest of each name): a sweep not in it is
    reachable by its id only."""
    query = select(Sweep.name, Sweep.id).order_by(Sweep.name, Sweep.created.desc(), Sweep.id)
    found: dict[str, str] = {}
    for name, sweep_id in session.execute(query).tuples():
        found.setdefault(name, sweep_id)
    return set(found.values())


def list_sweeps(session: Session) -> list[Sweep]:
    """All sweeps, newest first."""
    return list(session.scalars(select(Sweep).order_by(Sweep.created.desc(), Sweep.id)))


def _update_sweep(session: Session, sweep_id: str, **values: Any) -> None:
    stmt = update(Sweep).where(Sweep.id == sweep_id).values(**values)
    result = session.execute(stmt.execution_options(synchronize_session=False))
    _expire(session, Sweep)
    if result.rowcount == 0:
        raise LookupError(f"no sweep with id {sweep_id!r}")


def set_sweep_status(session: Session, sweep_id: str, status: str) -> None:
    """Set a sweep's status (one of `SWEEP_STATUSES`)."""
    if status not in SWEEP_STATUSES:
        raise ValueError(f"invalid sweep status {status!r}; expected one of {SWEEP_STATUSES}")
    _update_sweep(session, sweep_id, status=status)


def set_sweep_mlflow_run(session: Session, sweep_id: str, run_id: str) -> None:
    """Record the MLflow parent run of a sweep."""
    _update_sweep(session, sweep_id, mlflow_run_id=run_id)


def set_sweep_orchestrator(session: Session, sweep_id: str, orchestrator: str) -> None:
    """Record the process (host:pid) now driving a sweep, e.g. after ``prunelab resume``."""
    _update_sweep(session, sweep_id, orchestrator=orchestrator)


# --------------------------------------------------------------------------- trials


def _insert_ignoring_conflicts(
    session: Session, table: Table, rows: Sequence[dict[str, Any]], conflict: list[str]
) -> None:
    """``INSERT .. ON CONFLICT (conflict) DO NOTHING`` on SQLite and PostgreSQL."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        insert = postgresql.insert
    elif dialect == "sqlite":
        insert = sqlite.insert
    else:
        raise NotImplementedError(f"prunelab supports SQLite and PostgreSQL, not {dialect}")
    for chunk in _chunks(rows):
        stmt = insert(table).values(list(chunk)).on_conflict_do_nothing(index_elements=conflict)
        session.execute(stmt)


def add_trials(
    session: Session, sweep_id: str, trials: Sequence[tuple[str, dict[str, Any], bool]]
) -> tuple[list[Trial], int]:
    """Add ``(trial_key, config, is_baseline)`` trials to a sweep.

    Keys not yet in the database become ``pending`` trials created by this sweep; every
    trial, new or existing, is linked to the sweep. Safe when several processes add the
    same keys at once (``ON CONFLICT DO NOTHING``). A key repeated in ``trials`` counts
    once. Trials the sweep already has keep their place; new ones come after them (a
    sweep extended by another submission), in input order. Returns the given trials' rows
    in input order and how many are already finished.
    """
    unique: dict[str, tuple[dict[str, Any], bool]] = {}
    for key, config, is_baseline in trials:
        unique.setdefault(key, (config, is_baseline))
    new_rows = [
        {
            "sweep_id": sweep_id,
            "trial_key": key,
            "config": config,
            "status": "pending",
            "attempts": 0,
            "is_baseline": is_baseline,
        }
        for key, (config, is_baseline) in unique.items()
    ]
    _insert_ignoring_conflicts(session, Trial.__table__, new_rows, ["trial_key"])
    by_key = trials_by_keys(session, unique)
    ordered = [by_key[key] for key in unique]
    last = session.scalar(
        select(func.max(SweepTrial.position)).where(SweepTrial.sweep_id == sweep_id)
    )
    start = 0 if last is None else last + 1
    links = [
        {"sweep_id": sweep_id, "trial_id": trial.id, "position": start + position}
        for position, trial in enumerate(ordered)
    ]
    _insert_ignoring_conflicts(session, SweepTrial.__table__, links, ["sweep_id", "trial_id"])
    return ordered, sum(trial.status == "finished" for trial in ordered)


def trials_by_keys(session: Session, keys: Iterable[str]) -> dict[str, Trial]:
    """The trials with the given keys, by key (keys not in the database are absent)."""
    found: dict[str, Trial] = {}
    for chunk in _chunks(list(keys)):
        query = select(Trial).where(Trial.trial_key.in_(chunk))
        for trial in session.scalars(query.execution_options(populate_existing=True)):
            found[trial.trial_key] = trial
    return found


def sweep_trials(session: Session, sweep_id: str) -> list[Trial]:
    """All trials of a sweep (created or reused by it), in the sweep's order."""
    query = (
        select(Trial)
        .join(SweepTrial, SweepTrial.trial_id == Trial.id)
        .where(SweepTrial.sweep_id == sweep_id)
        .order_by(SweepTrial.position, Trial.id)
        .execution_options(populate_existing=True)
    )
    return list(session.scalars(query))


def trial_status_counts(session: Session, sweep_id: str) -> dict[str, int]:
    """Number of the sweep's trials in each status (statuses with no trial are absent)."""
    query = (
        select(Trial.status, func.count())
        .join(SweepTrial, SweepTrial.trial_id == Trial.id)
        .where(SweepTrial.sweep_id == sweep_id)
        .group_by(Trial.status)
    )
    return {status: count for status, count in session.execute(query).tuples()}


def _expire(session: Session, model: type[Any]) -> None:
    """Expire the session's objects of ``model`` after an UPDATE that bypassed them."""
    for obj in list(session.identity_map.values()):
        if isinstance(obj, model):
            session.expire(obj)


def _update_trials(session: Session, where: Sequence[ColumnElement[bool]], **values: Any) -> int:
    """Run one ``UPDATE trials SET .. WHERE ..``; return the number of rows changed."""
    stmt = update(Trial).where(*where).values(**values)
    result = session.execute(stmt.execution_options(synchronize_session=False))
    _expire(session, Trial)
    return result.rowcount


def _require_trial(session: Session, trial_id: int) -> str:
    """The status of a trial; LookupError if it does not exist."""
    status = session.scalar(select(Trial.status).where(Trial.id == trial_id))
    if status is None:
        raise LookupError(f"no trial with id {trial_id}")
    return status


def reset_for_rerun(session: Session, trial_ids: Collection[int]) -> int:
    """Make trials ``pending`` again with a clean slate (``--rerun``); return how many.

    Clears attempts (their ``trial_attempts`` rows too), metrics, replicates, error, MLflow
    run, worker and times. A trial that is ``running`` (claimed by a live orchestrator) is
    left alone.
    """
    count = 0
    for chunk in _chunks(list(trial_ids)):
        idle = select(Trial.id).where(Trial.id.in_(chunk), Trial.status != "running")
        session.execute(delete(TrialAttempt).where(TrialAttempt.trial_id.in_(idle)))
        count += _update_trials(
            session,
            [Trial.id.in_(chunk), Trial.status != "running"],
            status="pending",
            attempts=0,
            metrics=None,
            replicates=None,
            error=None,
            mlflow_run_id=None,
            claimed_by=None,
            worker=None,
            node=None,
            started=None,
            finished=None,
        )
    return count


def claim_trial(
    session: Session, trial_id: int, claimed_by: str, worker: str, node: str | None
) -> bool:
    """Atomically move a ``pending`` trial to ``running``; False if it was not pending.

    This is the guarantee that a trial never runs twice at once, across orchestrators:
    only one of several concurrent claims updates the row. Counts an attempt.
    """
    return (
        _update_trials(
            session,
            [Trial.id == trial_id, Trial.status == "pending"],
            status="running",
            attempts=Trial.attempts + 1,
            claimed_by=claimed_by,
            worker=worker,
            node=node,
            started=utcnow(),
            finished=None,
        )
        == 1
    )


def _record_attempts(
    session: Session, where: Sequence[ColumnElement[bool]], kind: str, error: str
) -> None:
    """Insert a ``trial_attempts`` row for each trial matching ``where``: its current attempt
    (``trials.attempts``), worker, node and start, ended now with ``kind`` and ``error``."""
    if kind not in ATTEMPT_KINDS:
        raise ValueError(f"invalid attempt kind {kind!r}; expected one of {ATTEMPT_KINDS}")
    rows = select(
        Trial.id,
        Trial.attempts,
        Trial.worker,
        Trial.node,
        literal(kind),
        literal(error),
        Trial.started,
        literal(utcnow(), UTCDateTime()),
    ).where(*where)
    columns = ["trial_id", "attempt", "worker", "node", "kind", "error", "started", "ended"]
    session.execute(insert(TrialAttempt).from_select(columns, rows))


def release_trial(
    session: Session, trial_id: int, error: str, max_attempts: int, kind: str = "worker_died"
) -> str:
    """After a failed attempt of a ``running`` trial: record it (``kind``, ``error``) and
    return the trial's status.

    The trial goes back to ``pending`` while ``attempts < max_attempts``, else it is
    ``failed``. A trial that is not ``running`` is unchanged; its status is returned.
    """
    _record_attempts(session, [Trial.id == trial_id, Trial.status == "running"], kind, error)
    retry = Trial.attempts < max_attempts
    _update_trials(
        session,
        [Trial.id == trial_id, Trial.status == "running"],
        status=case((retry, "pending"), else_="failed"),
        finished=case((retry, None), else_=literal(utcnow(), UTCDateTime())),
        error=error,
        claimed_by=None,
    )
    return _require_trial(session, trial_id)


def finite_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities become None: PostgreSQL's JSON type rejects them."""
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in metrics.items()
    }


def finite_replicates(replicates: Iterable[float] | None) -> list[float | None] | None:
    """Replicates as a JSON list of floats, non-finite ones null (read back as NaN by
    ``prunelab.intervals``); None (SQL NULL) when there are none."""
    if replicates is None:
        return None
    values = [float(value) for value in replicates]
    return [v if math.isfinite(v) else None for v in values] or None


def finish_trial(
    session: Session,
    trial_id: int,
    metrics: dict[str, Any],
    worker: str,
    node: str | None,
    replicates: Iterable[float] | None = None,
) -> None:
    """Mark a trial ``finished`` with its metrics (non-finite floats stored as null) and the
    bootstrap replicates of its score (``trials.replicates``; none given or empty: NULL).

    ``error`` is kept: after a retry it says why the earlier attempt failed (worker died,
    timeout); ``attempts`` says how many there were.
    """
    changed = _update_trials(
        session,
        [Trial.id == trial_id],
        status="finished",
        metrics=finite_metrics(metrics),
        replicates=finite_replicates(replicates),
        worker=worker,
        node=node,
        finished=utcnow(),
        claimed_by=None,
    )
    if changed == 0:
        raise LookupError(f"no trial with id {trial_id}")


def fail_trial(session: Session, trial_id: int, error: str, kind: str = "error") -> None:
    """Mark a trial ``failed`` for good (no retry), recording ``error``; the attempt of a
    ``running`` trial is recorded with ``kind``."""
    _record_attempts(session, [Trial.id == trial_id, Trial.status == "running"], kind, error)
    changed = _update_trials(
        session,
        [Trial.id == trial_id],
        status="failed",
        error=error,
        finished=utcnow(),
        claimed_by=None,
    )
    if changed == 0:
        raise LookupError(f"no trial with id {trial_id}")


def set_trial_mlflow_run(
    session: Session, trial_id: int, run_id: str, metrics: dict[str, Any] | None = None
) -> None:
    """Record the MLflow child run of a trial, and with ``metrics`` its metrics as logged
    there (the baseline-relative ones added), in the same statement."""
    values: dict[str, Any] = {"mlflow_run_id": run_id}
    if metrics is not None:
        values["metrics"] = finite_metrics(metrics)
    if _update_trials(session, [Trial.id == trial_id], **values) == 0:
        raise LookupError(f"no trial with id {trial_id}")


def running_claims(session: Session, sweep_id: str) -> set[str]:
    """Claim holders (orchestrator ids) of the sweep's ``running`` trials."""
    query = (
        select(Trial.claimed_by)
        .join(SweepTrial, SweepTrial.trial_id == Trial.id)
        .where(SweepTrial.sweep_id == sweep_id, Trial.status == "running")
        .distinct()
    )
    return {claim for claim in session.scalars(query) if claim is not None}


def recover_stale(session: Session, sweep_id: str, live_claims: Collection[str] = ()) -> int:
    """Put the sweep's ``running`` trials whose claim holder is gone back to ``pending``.

    A claim holder is gone unless its id is in ``live_claims`` (default: none is live, so
    every running trial of the sweep is reset). A trial shared with another sweep whose
    orchestrator is alive must have that orchestrator's id in ``live_claims``; see
    `running_claims`. Attempts are kept, each recorded as ``interrupted``. Returns the number
    of trials reset.
    """
    members = select(SweepTrial.trial_id).where(SweepTrial.sweep_id == sweep_id)
    stale = [
        Trial.id.in_(members),
        Trial.status == "running",
        or_(Trial.claimed_by.is_(None), Trial.claimed_by.not_in(list(live_claims))),
    ]
    _record_attempts(session, stale, "interrupted", "the orchestrator stopped during the trial")
    return _update_trials(session, stale, status="pending", claimed_by=None)


def return_unrecorded(session: Session, trial_id: int, error: str, kind: str = "recording") -> bool:
    """A ``finished`` trial whose result could not be recorded (artifacts, MLflow run) goes
    back to ``pending``, to run again: the attempt is recorded with ``kind`` (``recording``:
    writing it failed; ``interrupted``: the sweep stopped first) and ``error``, and its
    metrics, replicates and MLflow run id are cleared. False (nothing changed) when the
    trial is not ``finished``."""
    where = [Trial.id == trial_id, Trial.status == "finished"]
    _record_attempts(session, where, kind, error)
    changed = _update_trials(
        session,
        where,
        status="pending",
        metrics=None,
        replicates=None,
        mlflow_run_id=None,
        error=error,
        finished=None,
        claimed_by=None,
    )
    return changed == 1


def trial_attempts(session: Session, trial_ids: Iterable[int]) -> dict[int, list[TrialAttempt]]:
    """The recorded attempts of the given trials, by trial id, in attempt order (trials with
    none are absent)."""
    found: dict[int, list[TrialAttempt]] = {}
    for chunk in _chunks(list(trial_ids)):
        query = (
            select(TrialAttempt)
            .where(TrialAttempt.trial_id.in_(chunk))
            .order_by(TrialAttempt.trial_id, TrialAttempt.attempt)
        )
        for attempt in session.scalars(query):
            found.setdefault(attempt.trial_id, []).append(attempt)
    return found


# --------------------------------------------------------------------------- deleting


@dataclass(frozen=True)
class DeletedSweep:
    """What `delete_sweep` removed: the sweep's ``memberships`` (its trials), the
    ``trials`` that belonged to it alone (with their ``attempts`` rows), its ``submissions``;
    ``kept``: its trials that other sweeps have too, left in place."""

    memberships: int
    trials: int
    attempts: int
    submissions: int
    kept: int


def shared_trials(session: Session, sweep_id: str) -> dict[int, list[str]]:
    """The sweep's trials that other sweeps have too: trial id -> those sweeps' ids, oldest
    sweep first."""
    members = select(SweepTrial.trial_id).where(SweepTrial.sweep_id == sweep_id)
    query = (
        select(SweepTrial.trial_id, SweepTrial.sweep_id)
        .join(Sweep, Sweep.id == SweepTrial.sweep_id)
        .where(SweepTrial.trial_id.in_(members), SweepTrial.sweep_id != sweep_id)
        .order_by(SweepTrial.trial_id, Sweep.created, Sweep.id)
    )
    found: dict[int, list[str]] = {}
    for trial_id, other in session.execute(query).tuples():
        found.setdefault(trial_id, []).append(other)
    return found


def delete_sweep(session: Session, sweep_id: str) -> DeletedSweep:
    """Delete a sweep: its row, its submissions, its memberships, and the trials that no
    other sweep has (their attempts too). A trial another sweep has stays, as it is; one this
    sweep created is from now on the creation of the oldest other sweep that has it.
    LookupError when there is no such sweep."""
    if session.get(Sweep, sweep_id) is None:
        raise LookupError(f"no sweep with id {sweep_id!r}")
    members = set(
        session.scalars(select(SweepTrial.trial_id).where(SweepTrial.sweep_id == sweep_id))
    )
    created = set(session.scalars(select(Trial.id).where(Trial.sweep_id == sweep_id)))
    candidates = sorted(members | created)
    elsewhere: set[int] = set()
    for chunk in _chunks(candidates):
        query = select(SweepTrial.trial_id).where(
            SweepTrial.trial_id.in_(chunk), SweepTrial.sweep_id != sweep_id
        )
        elsewhere.update(session.scalars(query))
    doomed = [trial_id for trial_id in candidates if trial_id not in elsewhere]
    # the trials it created that stay: created by the oldest other sweep that has them
    heir = (
        select(SweepTrial.sweep_id)
        .join(Sweep, Sweep.id == SweepTrial.sweep_id)
        .where(SweepTrial.trial_id == Trial.id, SweepTrial.sweep_id != sweep_id)
        .order_by(Sweep.created, Sweep.id)
        .limit(1)
        .scalar_subquery()
    )
    for chunk in _chunks(sorted(created & elsewhere)):
        _update_trials(session, [Trial.id.in_(chunk)], sweep_id=heir)
    attempts = 0
    for chunk in _chunks(doomed):
        gone = session.execute(delete(TrialAttempt).where(TrialAttempt.trial_id.in_(chunk)))
        attempts += gone.rowcount
    memberships = session.execute(delete(SweepTrial).where(SweepTrial.sweep_id == sweep_id))
    for chunk in _chunks(doomed):
        session.execute(delete(Trial).where(Trial.id.in_(chunk)))
    submissions = session.execute(
        delete(SweepSubmission).where(SweepSubmission.sweep_id == sweep_id)
    )
    session.execute(delete(Sweep).where(Sweep.id == sweep_id))
    for model in (Sweep, Trial, SweepTrial, SweepSubmission, TrialAttempt):
        _expire(session, model)
    return DeletedSweep(
        memberships=memberships.rowcount,
        trials=len(doomed),
        attempts=attempts,
        submissions=submissions.rowcount,
        kept=len(members & elsewhere),
    )
