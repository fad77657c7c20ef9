"""Drive a sweep: database rows, Ray workers, MLflow runs, and the results table.

Order of writes for each trial, so that a crash anywhere leaves a state ``resume`` can finish:
claim in the database (pending -> running, one orchestrator wins) -> run on a worker -> record
metrics in the database (finished) -> log the MLflow child run (idempotent per trial key) ->
record the run id. A finished trial without a run id is logged again on resume.

Every trial of a sweep has a child run under the sweep's parent run (:meth:`Recorder.sync_runs`,
when the sweep starts and when it ends): a trial it reused (finished by an earlier or another
sweep) gets a copy of the run that computed it (tag ``prunelab.reused_from``), a trial that
failed for good a FAILED run with its error and attempts. A trial's run starts and ends when the
trial did (its last attempt: claimed for a worker, result recorded). Baseline-relative metrics
are logged, stored and tabulated in the unit of their :data:`prunelab.metrics.METRICS` entry
(``score_ratio`` in %, see :func:`in_table_units`).

A sweep is its name: submitting a spec whose name has a sweep extends that sweep (its row, its
MLflow parent run; the new trials join the earlier ones, each submission's spec is kept in
``sweep_submissions`` and as ``specs/<n>.yaml`` on the parent run, the latest as ``spec.yaml``);
``--fresh`` starts another sweep of that name, which the name then means. A sweep whose
orchestrator may still be running it is neither extended nor deleted (:class:`SweepBusy`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import yaml
from sqlalchemy import Engine

from prunelab.db import Trial as TrialRow
from prunelab.db import init_db, repo, session_factory
from prunelab.metrics import METRICS, lookup, relative_metrics
from prunelab.orchestrator.config import WorkersConfig
from prunelab.orchestrator.console import Progress
from prunelab.orchestrator.console import write as console_write
from prunelab.orchestrator.results import budget_label, build_report, same_samples
from prunelab.orchestrator.tables import report_artifacts, report_markdown
from prunelab.orchestrator.tracking import (
    TAG_PARENT,
    TAG_RESCORED_FROM,
    TAG_REUSED_FROM,
    TAG_ROLE,
    TAG_SWEEP_ID,
    TAG_TRIAL_KEY,
    RunStatus,
    Tracker,
    environment_tags,
)
from prunelab.trial import TrialResult

if TYPE_CHECKING:  # the scheduler imports Ray: only where workers start
    from prunelab.orchestrator.scheduler import WorkerPool

__all__ = [
    "Recorder",
    "RecordingError",
    "Stores",
    "SweepBusy",
    "busy_reason",
    "close_sweep",
    "delete_sweep",
    "execute",
    "extension_state",
    "in_table_units",
    "resume_sweep",
    "start_workers",
    "submit_sweep",
    "sweep_table",
]

# settings of the loaded model a trial's run logs as ``model.<name>`` params (from the worker)
MODEL_PARAMS = ("dtype", "attn_implementation")


@dataclass(frozen=True)
class Stores:
    db_url: str
    tracking_uri: str
    artifact_root: str | None
    ray_address: str | None


def orchestrator_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class SweepBusy(Exception):
    """The sweep a command would extend or delete is ``running`` under an orchestrator that
    may still be alive (see :func:`busy_reason`); nothing was changed."""


TAG_SUBMISSIONS = "prunelab.submissions"  # a parent run's tag: how many submissions it has


def orchestrator_alive(orchestrator: str | None) -> bool | None:
    """Whether the orchestrator ``host:pid:tag`` (:func:`orchestrator_id`) still runs: its
    process, when it ran on this host; None when it ran elsewhere (nothing to tell by)."""
    if not orchestrator:
        return False
    host, _, rest = orchestrator.partition(":")
    pid = rest.split(":", 1)[0]
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except OSError:
        return None
    return True


def busy_reason(sweep: Any, action: str = "extended") -> str | None:
    """Why ``sweep`` cannot be ``action`` now: it is ``running`` and its orchestrator is alive
    or on another host (None: it can be; a ``running`` sweep whose orchestrator on this host
    is gone was killed)."""
    if sweep.status != "running":
        return None
    alive = orchestrator_alive(sweep.orchestrator)
    if alive is False:
        return None
    how = "is running" if alive else "is marked running"
    line = f"sweep {sweep.name} ({sweep.id}) {how} (orchestrator {sweep.orchestrator}); "
    if alive is None:
        line += f"if that orchestrator has stopped, finish it first: `prunelab resume {sweep.id}`"
    else:
        line += "wait for it to end"
    return line + f", so that it can be {action}"


def extension_state(engine: Engine, name: str) -> tuple[str | None, bool]:
    """Before ``prunelab sweep NAME`` extends a sweep (read only): why the newest sweep named
    ``name`` cannot be extended now (None: it can, or there is none; see :func:`busy_reason`),
    and whether it has trials that are not finished (pending ones run with the new ones)."""
    with session_factory(engine)() as session:
        sweep = repo.newest_sweep(session, name)
        if sweep is None:
            return None, False
        reason = busy_reason(sweep)
        if reason is not None:
            reason += " (or start another sweep of that name with --fresh)"
        counts = repo.trial_status_counts(session, sweep.id)
    return reason, any(counts.get(s) for s in ("pending", "running"))


def submit_sweep(plan: Any, stores: Stores, rerun: bool = False, fresh: bool = False) -> int:
    """Record a validated :class:`SweepPlan` and run what is not finished. Returns exit status.

    A sweep of that name (the newest) is extended: the plan's trials join its own, the plan's
    spec becomes its spec (the earlier ones kept as its submissions), its MLflow parent run is
    the same, and what the sweep has that is not finished runs. ``fresh``, or no sweep of that
    name: a new sweep. :class:`SweepBusy` when that sweep's orchestrator may be running it.
    """
    engine = init_db(stores.db_url)
    sessions = session_factory(engine)
    orchestrator = orchestrator_id()
    trials = [(t.key, t.to_dict(), t.is_baseline) for t in plan.trials]
    with sessions.begin() as session:
        repo.lock_sweep_name(session, plan.name)  # one sweep per name, also at once
        earlier = [s.id for s in repo.list_sweeps(session) if s.name == plan.name]
        sweep = None if fresh else repo.newest_sweep(session, plan.name)
        extending, recovered = sweep is not None, 0
        if sweep is None:
            sweep = repo.create_sweep(session, plan.name, plan.spec, plan.spec_yaml, orchestrator)
            before: set[int] = set()
            submission = 1
        else:
            reason = busy_reason(sweep)
            if reason is not None:
                raise SweepBusy(reason + " (or start another sweep of that name with --fresh)")
            # a sweep whose orchestrator on this host was killed: its claims are stale
            dead = sweep.orchestrator if sweep.status == "running" else None
            before = {t.id for t in repo.sweep_trials(session, sweep.id)}
            submission = repo.extend_sweep(
                session, sweep.id, plan.spec, plan.spec_yaml, orchestrator
            )
            if dead is not None:
                live = repo.running_claims(session, sweep.id) - {dead}
                recovered = repo.recover_stale(session, sweep.id, live)
        sweep_id, created = sweep.id, sweep.created
        rows, _ = repo.add_trials(session, sweep_id, trials)
        ids = [row.id for row in rows]
        if rerun:
            repo.reset_for_rerun(session, ids)
        else:
            # failed trials of earlier sweeps get a fresh set of attempts
            failed = [row.id for row in rows if row.status == "failed"]
            if failed:
                repo.reset_for_rerun(session, failed)
        counts = repo.trial_status_counts(session, sweep_id)
        new = len(set(ids) - before)
    total, finished = sum(counts.values()), counts.get("finished", 0)
    failed_left = counts.get("failed", 0)  # earlier trials of the sweep, not in this plan
    if extending:
        print(
            f"sweep {plan.name} ({sweep_id}): submission {submission}, {new} new trial(s) "
            f"added to its {len(before)}"
        )
    elif fresh and earlier:
        print(
            f"sweep {plan.name} ({sweep_id}): a new sweep of that name (--fresh); the earlier "
            f"one(s) stay, by id: {', '.join(earlier)}"
        )
    if recovered:
        print(f"{recovered} trial(s) of its killed orchestrator back to pending")
    line = (
        f"sweep {plan.name} ({sweep_id}): {total} trials, {finished} already finished, "
        f"{total - finished - failed_left} to run"
    )
    if failed_left:
        line += (
            f", {failed_left} failed (not run again; `prunelab resume {plan.name} "
            "--retry-failed` reruns them)"
        )
    print(line)
    # the workers start (and load their first model) while MLflow's store opens
    pool = start_workers(sessions, sweep_id, plan.workers)
    try:
        tracker = Tracker(stores.tracking_uri, stores.artifact_root)
        if not extending:
            params = {"spec": plan.spec_yaml[:6000], "trials": len(ids)}
            parent = tracker.start_sweep(plan.name, sweep_id, params, _ms(created))
            with sessions.begin() as session:
                repo.set_sweep_mlflow_run(session, sweep_id, parent)
        else:  # the sweep's own parent run (found again, or made again if it was lost)
            lost = _restore_tracking(
                sessions, tracker, sweep_id, plan.name, plan.spec_yaml, created
            )
            if lost:
                print(f"{lost} finished trial(s) whose MLflow run is gone will be logged again")
            with sessions() as session:
                parent = repo.get_sweep(session, sweep_id).mlflow_run_id
        _log_submission(tracker, parent, plan.spec_yaml, submission)
    except BaseException:
        if pool is not None:
            pool.shutdown()
        raise
    return _execute_on(pool, engine, tracker, sweep_id, plan.workers, orchestrator, stores)


def _log_submission(tracker: Tracker, parent: str, spec_yaml: str, submission: int) -> None:
    """The spec of a sweep's ``submission``-th submission on its parent run: ``spec.yaml``
    (the latest) and ``specs/<submission>.yaml``, and the tag ``prunelab.submissions``. A
    store that cannot take them is a warning: the database has every submission's spec."""
    artifacts = {"spec.yaml": spec_yaml, f"specs/{submission}.yaml": spec_yaml}
    try:
        tracker.log_sweep_artifacts(parent, artifacts)
        tracker.client.set_tag(parent, TAG_SUBMISSIONS, str(submission))
    except OSError as exc:
        print(
            f"prunelab: warning: the spec of submission {submission} is not on the sweep's "
            f"MLflow run ({exc.strerror or exc}); the database has it",
            file=sys.stderr,
        )


def resume_sweep(ref: str, stores: Stores, retry_failed: bool = False) -> int:
    """Finish a sweep whose orchestrator died: its running trials go back to pending, and
    what is pending runs. Trials that failed for good stay failed (one line says how many)
    unless ``retry_failed``: then they go back to pending too, with a fresh set of attempts.
    """
    engine = init_db(stores.db_url)
    sessions = session_factory(engine)
    orchestrator = orchestrator_id()
    with sessions.begin() as session:
        sweep = repo.get_sweep(session, ref)
        if sweep is None:
            raise LookupError(f"no sweep with id or name {ref!r}")
        sweep_id, workers = sweep.id, _workers_config(sweep.spec)
        name, spec_yaml, created = sweep.name, sweep.spec_yaml, sweep.created
        # only the claims of this sweep's dead orchestrator are stale; a trial shared with a
        # sweep whose orchestrator is alive stays with it
        live = repo.running_claims(session, sweep_id) - {sweep.orchestrator}
        reset = repo.recover_stale(session, sweep_id, live)
        failed = [t.id for t in repo.sweep_trials(session, sweep_id) if t.status == "failed"]
        if retry_failed and failed:
            repo.reset_for_rerun(session, failed)
        repo.set_sweep_orchestrator(session, sweep_id, orchestrator)
        repo.set_sweep_status(session, sweep_id, "running")
    print(f"resuming sweep {ref} ({sweep_id}): {reset} interrupted trial(s) back to pending")
    if failed and retry_failed:
        print(f"{len(failed)} failed trial(s) back to pending (--retry-failed)")
    elif failed:
        print(
            f"{len(failed)} failed trial(s), not run again; rerun them with "
            f"`prunelab resume {ref} --retry-failed`"
        )
    # the workers start (and load their first model) while MLflow's store opens
    pool = start_workers(sessions, sweep_id, workers)
    try:
        tracker = Tracker(stores.tracking_uri, stores.artifact_root)
        lost = _restore_tracking(sessions, tracker, sweep_id, name, spec_yaml, created)
    except BaseException:
        if pool is not None:
            pool.shutdown()
        raise
    if lost:
        print(f"{lost} finished trial(s) whose MLflow run is gone will be logged again")
    return _execute_on(pool, engine, tracker, sweep_id, workers, orchestrator, stores)


def _execute_on(
    pool: WorkerPool | None,
    engine: Engine,
    tracker: Tracker,
    sweep_id: str,
    workers: WorkersConfig,
    orchestrator: str,
    stores: Stores,
) -> int:
    """:func:`execute`, on the workers started ahead when there are (``execute`` is called as
    before when there are none)."""
    if pool is None:
        return execute(engine, tracker, sweep_id, workers, orchestrator, stores.ray_address)
    return execute(engine, tracker, sweep_id, workers, orchestrator, stores.ray_address, pool=pool)


def _restore_tracking(
    sessions, tracker: Tracker, sweep_id: str, name: str, spec_yaml: str, created: datetime
) -> int:
    """Bring MLflow back in line with the database before a sweep resumes: the sweep's parent
    run (its id never recorded, by an orchestrator killed in its first seconds, or lost with
    the store) is found by its tags (keeping its start) or created again (starting when the
    sweep was ``created``), and recorded; finished trials whose run no longer exists lose
    their run id, so that they are logged again. Returns how many."""
    from sqlalchemy import update

    with sessions() as session:
        trials = repo.sweep_trials(session, sweep_id)
    params = {"spec": spec_yaml[:6000], "trials": len(trials)}
    parent = tracker.start_sweep(name, sweep_id, params, _ms(created))  # RUNNING again
    logged = {t.id: t.mlflow_run_id for t in trials if t.status == "finished" and t.mlflow_run_id}
    missing = tracker.missing_runs(set(logged.values()), name)
    lost = [trial_id for trial_id, run_id in logged.items() if run_id in missing]
    with sessions.begin() as session:
        repo.set_sweep_mlflow_run(session, sweep_id, parent)
        if lost:
            session.execute(
                update(TrialRow).where(TrialRow.id.in_(lost)).values(mlflow_run_id=None)
            )
    return len(lost)


def _workers_config(spec: dict[str, Any]) -> WorkersConfig:
    """The ``workers`` section of a recorded sweep spec (settings it lacks: the defaults)."""
    known = {f.name for f in dataclasses.fields(WorkersConfig)}
    return WorkersConfig(**{k: v for k, v in (spec.get("workers") or {}).items() if k in known})


TAG_ATTEMPTS = "prunelab.attempts"  # a trial run's tag: how many attempts the trial took


def _ms(moment: datetime | None) -> int | None:
    """A database time as MLflow's (ms since the epoch); None stays None (MLflow: now)."""
    return None if moment is None else int(moment.timestamp() * 1000)


def in_table_units(relative: dict[str, float]) -> dict[str, float]:
    """Baseline-relative metrics as :func:`prunelab.metrics.relative_metrics` gives them
    (fractions) in the unit of their :data:`~prunelab.metrics.METRICS` entry, the one
    MLflow, the database and ``trials.csv`` hold: x the entry's ``scale`` / ``divisor``
    (``score_ratio``: x 100, %); a bound of an interval in the unit of the ratio it bounds
    (``score_ratio_ci_low``: %)."""
    out = {}
    for name, value in relative.items():
        entry = lookup(name)
        if entry is not None and entry.bound is not None:
            entry = next(
                (m for m in METRICS if m.relative_to == entry.relative_to and m.bound is None),
                entry,
            )
        out[name] = value if entry is None else value * entry.scale / entry.divisor
    return out


def _run_name(trial: Any) -> str:
    """A trial run's name: ``<method>-<budget>[-L<layer>]``."""
    layer = trial.prune_layer
    return f"{trial.method}-{budget_label(trial)}" + (f"-L{layer}" if layer is not None else "")


@dataclass(frozen=True)
class _Ended:
    """How a trial ended (:meth:`Recorder._ended`): ``count`` attempts, each of them
    (``attempts``), its last attempt's ``start`` and ``end`` (ms since the epoch) and its
    ``error``."""

    count: int
    attempts: list[dict[str, Any]]
    start: int | None
    end: int | None
    error: str | None


class RecordingError(Exception):
    """A trial's result could not be recorded: writing its artifacts or MLflow run raised an
    OSError (a read-only or full disk, a name too long). The sweep stops; it is resumable."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot write artifacts under {path}: {reason}")
        self.path, self.reason = path, reason


class Recorder:
    """The callbacks of one sweep's run: database updates and MLflow logging."""

    def __init__(self, engine: Engine, tracker: Tracker, sweep_id: str, orchestrator: str):
        self.sessions = session_factory(engine)
        self.tracker = tracker
        self.sweep_id = sweep_id
        self.orchestrator = orchestrator
        with self.sessions() as session:
            sweep = repo.get_sweep(session, sweep_id)
            assert sweep is not None
            self.name, self.parent = sweep.name, sweep.mlflow_run_id
            rows = repo.sweep_trials(session, sweep_id)
        # key and trial never change: read once, not once per logged trial
        self.identity = {t.id: (t.trial_key, t.trial) for t in rows}
        baselines = {
            (trial.model, trial.benchmark): trial_id
            for trial_id, (_, trial) in self.identity.items()
            if trial.is_baseline
        }
        self.baseline_of = {
            trial_id: baselines.get((trial.model, trial.benchmark))
            for trial_id, (_, trial) in self.identity.items()
        }
        self.waiting: dict[int, TrialResult | None] = {}  # finished, waiting for their baseline
        # metrics of the trials this orchestrator ran to the end (their baselines' included)
        self.metrics: dict[int, dict[str, Any]] = {}
        self.replicates: dict[int, tuple[float, ...]] = {}  # ... and their score replicates
        # keys of trials with a run in this sweep that is not FINISHED (the FAILED run of a
        # trial since put back to pending by --retry-failed): their next run replaces it, so
        # it is looked for (see sync_runs)
        self.stale_keys: set[str] = set()

    def _trial(self, trial_id: int) -> TrialRow:
        with self.sessions() as session:
            trial = session.get(TrialRow, trial_id)
            assert trial is not None
            session.expunge(trial)
            return trial

    def claim(self, dispatch, worker: str, node: str | None = None) -> bool:
        """Mark the trial running on ``worker`` (on host ``node``) unless someone has it."""
        with self.sessions.begin() as session:
            return repo.claim_trial(session, dispatch.trial_id, self.orchestrator, worker, node)

    def failed(self, dispatch, error: str, retryable: bool) -> bool:
        """Record a failed attempt (its kind: ``error.kind`` when the pool gave one); True when
        the trial is to run again."""
        kind = getattr(error, "kind", "worker_died" if retryable else "error")
        with self.sessions.begin() as session:
            if retryable:
                status = repo.release_trial(
                    session, dispatch.trial_id, error, self.max_attempts, kind
                )
            else:  # its own error, out of memory: the same config would fail the same way
                repo.fail_trial(session, dispatch.trial_id, error, kind)
                status = "failed"
        console_write(f"trial {dispatch.trial_id} attempt failed ({status}): {error}")
        if status == "failed":
            self.log_failed(dispatch.trial_id)
        return status == "pending"

    def log_failed(self, trial_id: int) -> None:
        """Log a trial that failed for good as a FAILED child run now; one whose run cannot
        be written now (an OSError) gets it from :meth:`sync_runs` when the sweep ends."""
        try:
            self._log_failed(trial_id)
        except RecordingError as exc:
            console_write(f"trial {trial_id}: its FAILED run is not logged yet: {exc}")

    def done(self, dispatch, result: TrialResult) -> None:
        """A trial this orchestrator claimed (pending -> running) finished on a worker."""
        trial_id, metrics = dispatch.trial_id, dict(result.metrics)
        with self.sessions.begin() as session:
            repo.finish_trial(
                session, trial_id, metrics, result.worker, result.node, result.replicates
            )
        # the trial's MLflow run can only be created after this write, by this process
        self.metrics[trial_id] = repo.finite_metrics(metrics)
        self.replicates[trial_id] = tuple(result.replicates)
        self.settle(trial_id, result)

    def _finished_metrics(self, trial_id: int) -> dict[str, Any] | None:
        """A finished trial's metrics (None if it is not finished), from memory when this
        orchestrator ran it, else from the database (finished by another orchestrator)."""
        if trial_id in self.metrics:
            return self.metrics[trial_id]
        trial = self._trial(trial_id)
        return (trial.metrics or {}) if trial.status == "finished" else None

    def _replicates(self, trial_id: int) -> tuple[float, ...]:
        """A finished trial's score replicates (empty: none), from memory when this
        orchestrator ran it, else from the database (nulls, non-finite ones, as NaN)."""
        if trial_id in self.replicates:
            return self.replicates[trial_id]
        stored = self._trial(trial_id).replicates or ()
        return tuple(math.nan if value is None else float(value) for value in stored)

    def _paired_replicates(self, trial_id: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The score replicates of a trial and of its baseline, for the paired interval of
        ``score_ratio``; both empty unless the two were evaluated on the same samples (same
        benchmark, eval ``limit`` and ``sample_seed``: the replicates' resamples are then the
        same, see ``prunelab.intervals``)."""
        baseline_id = self.baseline_of.get(trial_id)
        if baseline_id is None:
            return (), ()
        trial, baseline = self.identity[trial_id][1], self.identity[baseline_id][1]
        if not same_samples(trial, baseline):
            return (), ()
        return self._replicates(trial_id), self._replicates(baseline_id)

    def settle(self, trial_id: int, result: TrialResult | None) -> None:
        """Log a finished trial once its baseline is known; trials waiting on it follow."""
        baseline_id = self.baseline_of.get(trial_id)
        baseline = self._finished_metrics(baseline_id) if baseline_id is not None else None
        if baseline_id is not None and baseline is None and baseline_id != trial_id:
            self.waiting[trial_id] = result
            return
        self._log(trial_id, result, baseline)
        for waiting_id in [t for t in self.waiting if self.baseline_of.get(t) == trial_id]:
            self._log(waiting_id, self.waiting.pop(waiting_id), self._finished_metrics(trial_id))

    def flush(self) -> None:
        """Log the trials still waiting: with their baseline if another orchestrator finished
        it meanwhile, else without baseline-relative metrics."""
        for trial_id in list(self.waiting):
            baseline_id = self.baseline_of.get(trial_id)
            baseline = self._finished_metrics(baseline_id) if baseline_id is not None else None
            self._log(trial_id, self.waiting.pop(trial_id), baseline)

    def abandon(self) -> None:
        """After a :class:`RecordingError`: the trials still waiting to be logged go back to
        ``pending`` (their results, held only here, are not recorded), so that ``prunelab
        resume`` runs them again."""
        error = "the sweep stopped before this trial's result was recorded"
        with self.sessions.begin() as session:
            for trial_id in list(self.waiting):
                if trial_id in self.metrics:
                    repo.return_unrecorded(session, trial_id, error, "interrupted")
        for trial_id in list(self.waiting):
            self._forget(trial_id)
        self.waiting.clear()

    def _forget(self, trial_id: int) -> None:
        self.metrics.pop(trial_id, None)
        self.replicates.pop(trial_id, None)

    def _ended(self, trial_id: int) -> _Ended:
        """How a trial ended, as its run records it: how many attempts it took and each of
        them for ``attempts.json`` (the failed ones as recorded, then the one that finished),
        its last attempt's start and end, and its error."""
        with self.sessions() as session:
            trial = session.get(TrialRow, trial_id)
            assert trial is not None
            failed = repo.trial_attempts(session, [trial_id]).get(trial_id, [])
            attempts = [a.as_dict() for a in failed]
            if trial.status == "finished" and all(a.attempt != trial.attempts for a in failed):
                attempts.append({
                    "attempt": trial.attempts,
                    "worker": trial.worker,
                    "node": trial.node,
                    "kind": "finished",
                    "error": None,
                    "started": _iso(trial.started),
                    "ended": _iso(trial.finished),
                })  # fmt: skip
            return _Ended(
                trial.attempts, attempts, _ms(trial.started), _ms(trial.finished), trial.error
            )

    def _unrecorded(self, trial_id: int, ran_here: bool, exc: OSError) -> RecordingError:
        """The error of a trial whose logging raised ``exc``. The run it left unfinished is
        deleted (if that fails too, the next ``_log`` replaces it); a trial this process ran
        goes back to ``pending`` (to run again on resume), any other stays finished and
        unlogged (logged on resume)."""
        path = exc.filename or self.tracker.artifact_root or self.tracker.tracking_uri
        error = RecordingError(str(path), exc.strerror or str(exc))
        trial_key = self.identity[trial_id][0]
        with contextlib.suppress(Exception):  # keep the original error
            for run in self.tracker.trial_runs(self.name, self.sweep_id):
                if run.data.tags.get(TAG_TRIAL_KEY) == trial_key and run.info.status != "FINISHED":
                    self.tracker.client.delete_run(run.info.run_id)
        if ran_here:
            with self.sessions.begin() as session:
                repo.return_unrecorded(session, trial_id, str(error))
            self._forget(trial_id)
        return error

    def _log(
        self,
        trial_id: int,
        result: TrialResult | None,
        baseline: dict | None,
        reused_from: str | None = None,
    ) -> None:
        """Log the MLflow child run of a finished trial, then record its id.

        A trial in ``self.metrics`` was finished by this process, which logs each trial once:
        no run can exist for it yet (unless an earlier one failed: ``stale_keys``), so the
        tracker skips its search for one. Any other trial (finished by an orchestrator that
        died before logging) may have a run left by that crash, and the tracker looks for it.

        ``reused_from``: the trial was computed by that run, which is gone: its record here
        is logged again in this sweep, tagged ``prunelab.reused_from``; the trial's run id
        stays that of the run that computed it.
        """
        ran_here = trial_id in self.metrics and reused_from is None
        ended = self._ended(trial_id)
        trial_key, trial = self.identity[trial_id]
        # an attempt whose logging failed may have left a run: replaced, not duplicated
        new = (
            ran_here
            and all(a["kind"] != "recording" for a in ended.attempts)
            and trial_key not in self.stale_keys
        )
        own = self._finished_metrics(trial_id) or {}
        replicates = self._paired_replicates(trial_id) if baseline else ((), ())
        metrics = {**own, **in_table_units(relative_metrics(own, baseline, *replicates))}
        artifacts: dict[str, str | bytes] = {
            "trial.yaml": yaml.safe_dump(trial.to_dict(), sort_keys=False),
            "attempts.json": json.dumps(ended.attempts, indent=1) + "\n",
        }
        if result is not None and result.predictions:
            lines = (json.dumps(p) + "\n" for p in result.predictions)
            artifacts["predictions.jsonl"] = "".join(lines)
        if result is not None:  # files the worker made (heatmaps, method diagnostics)
            artifacts.update(result.artifacts)
        params, tags = trial.run_params(), {TAG_ATTEMPTS: str(ended.count)}
        if result is not None:  # the model settings and software the worker ran it with
            env = result.environment
            params.update({f"model.{k}": env[k] for k in MODEL_PARAMS if k in env})
            tags.update(environment_tags(env))
            if result.rescored_from:
                tags[TAG_RESCORED_FROM] = result.rescored_from
        if reused_from is not None:
            tags[TAG_REUSED_FROM] = reused_from
        try:
            run_id = self.tracker.log_trial(
                self.name,
                self.parent,
                self.sweep_id,
                trial_key,
                _run_name(trial),
                params,
                {k: float(v) for k, v in metrics.items() if v is not None},
                artifacts,
                new=new,
                tags=tags,
                start_time=ended.start,
                end_time=ended.end,
            )
        except OSError as exc:
            raise self._unrecorded(trial_id, ran_here, exc) from exc
        self.stale_keys.discard(trial_key)
        if reused_from is None:
            with self.sessions.begin() as session:
                repo.set_trial_mlflow_run(session, trial_id, run_id, metrics)

    def _log_reused(self, trial_id: int, source: str) -> None:
        """Log a trial this sweep reused (finished by another sweep, run ``source``) as a
        copy of that run; when it is gone, the trial's stored record again."""
        trial_key = self.identity[trial_id][0]
        try:
            copied = self.tracker.log_reused_trial(
                self.name, self.parent, self.sweep_id, trial_key, source
            )
        except OSError as exc:
            raise self._unrecorded(trial_id, False, exc) from exc
        if copied is None:
            baseline_id = self.baseline_of.get(trial_id)
            baseline = self._finished_metrics(baseline_id) if baseline_id is not None else None
            self._log(trial_id, None, baseline, reused_from=source)
        self.stale_keys.discard(trial_key)

    def _log_failed(self, trial_id: int) -> None:
        """Log a trial that failed for good as a FAILED child run: its params, its error (tag
        ``prunelab.error``, ``error.txt``), its attempts (``attempts.json``, the tag
        ``prunelab.attempts``), started and ended as its last attempt did."""
        trial_key, trial = self.identity[trial_id]
        ended = self._ended(trial_id)
        artifacts: dict[str, str | bytes] = {
            "trial.yaml": yaml.safe_dump(trial.to_dict(), sort_keys=False),
            "attempts.json": json.dumps(ended.attempts, indent=1) + "\n",
        }
        try:
            self.tracker.log_trial(
                self.name,
                self.parent,
                self.sweep_id,
                trial_key,
                _run_name(trial),
                trial.run_params(),
                {},
                artifacts,
                tags={TAG_ATTEMPTS: str(ended.count)},
                status="FAILED",
                start_time=ended.start,
                end_time=ended.end,
                error=ended.error or "failed (no error recorded)",
            )
        except OSError as exc:
            raise self._unrecorded(trial_id, False, exc) from exc
        self.stale_keys.add(trial_key)

    def sync_runs(self) -> None:
        """Give each trial of the sweep that has ended its one child run under the sweep's
        parent run, where it has none yet (one search of the sweep's runs):

        - a finished trial never logged (its orchestrator died first, or another one has not
          logged it yet): logged here, with its baseline's metrics (see :meth:`settle`);
        - a finished trial computed by another sweep (reused): a copy of that run;
        - a trial that failed for good: a FAILED run.

        Trials waiting here for their baseline are left to :meth:`flush`."""
        logged: dict[str, str] = {}  # trial key -> status of its run here (FINISHED wins)
        for run in self.tracker.trial_runs(self.name, self.sweep_id):
            key = run.data.tags.get(TAG_TRIAL_KEY)
            if key is not None and logged.get(key) != "FINISHED":
                logged[key] = run.info.status
        self.stale_keys = {key for key, status in logged.items() if status != "FINISHED"}
        with self.sessions() as session:
            trials = [
                (t.id, t.trial_key, t.status, t.mlflow_run_id)
                for t in repo.sweep_trials(session, self.sweep_id)
            ]
        for trial_id, key, status, run_id in trials:
            if trial_id in self.waiting:
                continue
            if status == "finished" and run_id is None:
                self.settle(trial_id, None)
            elif status == "finished" and logged.get(key) != "FINISHED":
                self._log_reused(trial_id, run_id)
            elif status == "failed" and logged.get(key) not in ("FINISHED", "FAILED"):
                self._log_failed(trial_id)

    max_attempts: int = 3


def _new_pool(workers: WorkersConfig, pending: int) -> WorkerPool:
    """The workers of a sweep with ``pending`` trials to run: ``workers.count`` of them, or
    fewer when there are fewer trials."""
    from prunelab.orchestrator.scheduler import WorkerPool

    return WorkerPool(
        max(1, min(workers.count, pending)),
        cpus=workers.cpus_per_worker,
        gpus=workers.gpus_per_worker,
        trial_timeout_s=workers.trial_timeout_s,
        worker_options={"vision_cache_mb": workers.vision_cache_mb},
    )


def start_workers(sessions: Any, sweep_id: str, workers: WorkersConfig) -> WorkerPool | None:
    """The sweep's workers, started now for its pending trials, each loading the model of
    the trial it will run first (:meth:`~prunelab.orchestrator.scheduler.WorkerPool.preload`),
    so that their start (a process, its imports, the model load) overlaps what the
    orchestrator still does before the first trial: opening MLflow's store, the sweep's
    parent run, the runs of trials finished earlier. :func:`execute` runs the trials on them.

    Only on a local Ray this process started for the sweep (the ``prunelab`` command starts
    it to check placement, :func:`~prunelab.orchestrator.scheduler.runs_own_local_ray`);
    elsewhere (a cluster, a caller's Ray) :func:`execute` starts the workers, as it does when
    this returns None: no trial pending, or one that needs a VIB head (heads are trained, or
    found, first, on a worker's resources, which workers started now would hold)."""
    from prunelab.orchestrator import scheduler

    if not scheduler.runs_own_local_ray():
        return None
    with sessions() as session:
        pending = [t for t in repo.sweep_trials(session, sweep_id) if t.status == "pending"]
        dispatches = [scheduler.Dispatch(t.id, t.trial) for t in pending]
    if not dispatches or any(d.trial.vib_head for d in dispatches):
        return None
    pool = _new_pool(workers, len(dispatches))
    pool.preload(dispatches)
    return pool


def execute(
    engine: Engine,
    tracker: Tracker,
    sweep_id: str,
    workers: WorkersConfig,
    orchestrator: str,
    ray_address: str | None = None,
    pool: WorkerPool | None = None,
) -> int:
    """Run the sweep's unfinished trials on Ray workers; log everything; print the table.

    ``pool``: workers started ahead for the sweep (:func:`start_workers`); they run its
    trials (else a pool is started here when there are trials to run), and are shut down
    before this returns or raises, like a pool started here."""
    try:
        return _execute(engine, tracker, sweep_id, workers, orchestrator, ray_address, pool)
    finally:
        if pool is not None:
            pool.shutdown()  # nothing left to do when the trials' end shut it down


def _execute(
    engine: Engine,
    tracker: Tracker,
    sweep_id: str,
    workers: WorkersConfig,
    orchestrator: str,
    ray_address: str | None,
    started: WorkerPool | None,
) -> int:
    from prunelab.orchestrator.scheduler import Dispatch, start_ray
    from prunelab.orchestrator.vib_stage import attach_heads, ensure_heads, fail_untrained

    recorder = Recorder(engine, tracker, sweep_id, orchestrator)
    recorder.max_attempts = workers.max_attempts
    sessions = recorder.sessions

    def dispatches(trials: list[TrialRow]) -> list[Dispatch]:
        return [Dispatch(t.id, recorder.identity[t.id][1]) for t in trials if t.status == "pending"]

    with sessions() as session:
        trials = repo.sweep_trials(session, sweep_id)
        todo = dispatches(trials)
        total, finished = len(trials), sum(t.status == "finished" for t in trials)
        elsewhere = any(t.status == "running" and t.claimed_by != orchestrator for t in trials)
    try:
        # trials finished by an orchestrator that died before logging, reused from other
        # sweeps, failed for good: their runs under this sweep's parent run, first
        recorder.sync_runs()
    except RecordingError:
        recorder.abandon()
        _stopped(recorder, "FAILED")
        raise

    status = "finished"
    if todo or elsewhere:
        start_ray(ray_address)
        bar = Progress(recorder.name, total, finished)  # done / running / failed / ETA
        loads: dict[str, int] = {}  # worker -> models it loaded
        pool = started
        waited = False
        run_status: RunStatus = "KILLED"  # the parent run's, if the sweep stops early

        def claim(dispatch, worker: str) -> bool:
            node = pool.node_of(worker) if pool is not None else None
            claimed = recorder.claim(dispatch, worker, node)
            if claimed:
                bar.started(dispatch.trial_id, worker)
            return claimed

        def done(dispatch, result: TrialResult):
            loads[result.worker] = result.model_loads
            recorder.done(dispatch, result)
            bar.finished(dispatch.trial_id)

        def failed(dispatch, error, retryable):
            retry = recorder.failed(dispatch, error, retryable)
            if retry:
                bar.released(dispatch.trial_id)
            else:
                bar.failed(dispatch.trial_id)
            return retry

        try:
            while True:
                if todo:
                    # training stages first (pgp's VIB heads): reused or trained now; a head
                    # that fails to train fails only the trials that need it
                    untrained: dict[str, str] = {}  # head key -> why it failed to train
                    trials = [d.trial for d in todo]
                    heads = ensure_heads(tracker, trials, workers, console_write, untrained)
                    todo, lost = fail_untrained(sessions, orchestrator, todo, untrained)
                    todo = attach_heads(todo, heads)
                    for dispatch in lost:
                        recorder.log_failed(dispatch.trial_id)
                    if lost:
                        bar.failed(count=len(lost))
                if todo:
                    if pool is None:
                        pool = _new_pool(workers, len(todo))
                    pool.run(todo, claim, done, failed)
                # trials of this sweep claimed by another orchestrator (a shared trial_key):
                # wait for them; run them here if that orchestrator gives them back
                todo, elsewhere = _others_claims(sessions, sweep_id, orchestrator, dispatches)
                if not todo and not elsewhere:
                    break
                if not todo:
                    if not waited:
                        console_write(
                            f"waiting for {elsewhere} trial(s) that another orchestrator is "
                            "running (if it died: stop this one, `prunelab resume` its sweep)"
                        )
                        waited = True
                    bar.waiting(elsewhere)
                    time.sleep(_POLL_S)
        except (KeyboardInterrupt, RecordingError) as exc:
            # stopped (Ctrl-C, SIGTERM) or a result that cannot be recorded: this
            # orchestrator's trials in flight go back to pending, for `prunelab resume`
            status = "interrupted"
            if isinstance(exc, RecordingError):
                run_status = "FAILED"
                recorder.abandon()  # results held here are not recorded either
            with sessions.begin() as session:
                others = repo.running_claims(session, sweep_id) - {orchestrator}
                repo.recover_stale(session, sweep_id, others)
            raise
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown()
            recorder.flush()
            if status == "interrupted":
                _stopped(recorder, run_status)
        if loads:
            tracker.log_sweep_metrics(
                recorder.parent,
                {
                    "model_loads": float(sum(loads.values())),
                    "workers_replaced": float(pool.replaced if pool else 0),
                },
            )

    return close_sweep(recorder)


def _stopped(recorder: Recorder, run_status: RunStatus) -> None:
    """A sweep stopped before its end, resumably: ``interrupted`` in the database, its
    parent run ended ``run_status`` (KILLED: by a signal; FAILED: by an error)."""
    with recorder.sessions.begin() as session:
        repo.set_sweep_status(session, recorder.sweep_id, "interrupted")
    recorder.tracker.finish_sweep(recorder.parent, run_status)


def _iso(moment: Any) -> str | None:
    return None if moment is None else moment.isoformat("T", "seconds")


def close_sweep(recorder: Recorder) -> int:
    """Give every trial of the sweep its child run (:meth:`Recorder.sync_runs`: those
    finished by other sweeps meanwhile, those failed for good), log the sweep's table and plot
    on its parent run, mark it finished (or failed when a trial failed) in both stores, print
    the table; the exit status (0 / 1)."""
    try:
        recorder.sync_runs()
        recorder.flush()
    except RecordingError:
        recorder.abandon()
        _stopped(recorder, "FAILED")
        raise
    with recorder.sessions() as session:
        trials = repo.sweep_trials(session, recorder.sweep_id)
        all_done = all(t.status == "finished" for t in trials)
    # the paper-style table (md, csv, tex), the Pareto plot and the per-trial metrics
    artifacts = report_artifacts(
        (t.trial, t.status, t.metrics, t.replicates, t.error) for t in trials
    )
    table = str(artifacts["table.md"])
    try:
        recorder.tracker.log_sweep_artifacts(recorder.parent, artifacts)
    except OSError as exc:  # every trial is recorded: resume writes the table again
        _stopped(recorder, "FAILED")
        path = exc.filename or recorder.tracker.artifact_root or recorder.tracker.tracking_uri
        raise RecordingError(str(path), exc.strerror or str(exc)) from exc
    status = "finished" if all_done else "failed"
    with recorder.sessions.begin() as session:
        repo.set_sweep_status(session, recorder.sweep_id, status)
    recorder.tracker.finish_sweep(recorder.parent, "FINISHED" if all_done else "FAILED")
    sys.stdout.write("\n" + table)
    return 0 if all_done else 1


_POLL_S = 1.0  # seconds between looks at trials another orchestrator is running


def _others_claims(sessions, sweep_id: str, orchestrator: str, dispatches) -> tuple[list, int]:
    """The sweep's pending trials (given back by another orchestrator) as dispatches, and how
    many of its trials another orchestrator is running."""
    with sessions() as session:
        trials = repo.sweep_trials(session, sweep_id)
    elsewhere = sum(t.status == "running" and t.claimed_by != orchestrator for t in trials)
    return dispatches(trials), elsewhere


def sweep_table(engine: Engine, ref: str) -> str:
    with session_factory(engine)() as session:
        sweep = repo.get_sweep(session, ref)
        if sweep is None:
            raise LookupError(f"no sweep with id or name {ref!r}")
        trials = repo.sweep_trials(session, sweep.id)
        rows = ((t.trial, t.status, t.metrics, t.replicates) for t in trials)
        return report_markdown(build_report(rows))


# --------------------------------------------------------------------------- deleting


def _sweep_runs(tracker: Tracker, name: str, sweep_id: str, parent: str | None) -> dict[str, Any]:
    """The active MLflow runs of a sweep, by id: its parent run(s) and its trial runs (tagged
    with its id, or children of its parent run). A run tagged with another sweep's id is
    never one of them."""
    found: dict[str, Any] = {}
    experiment = tracker.client.get_experiment_by_name(name)
    filters = [f"tags.`{TAG_SWEEP_ID}` = '{sweep_id}'"]
    if parent is not None:
        filters.append(f"tags.`{TAG_PARENT}` = '{parent}'")
    if experiment is not None:
        for filter_string in filters:
            page_token = None
            while True:
                page = tracker.client.search_runs(
                    [experiment.experiment_id],
                    filter_string=filter_string,
                    max_results=1000,
                    page_token=page_token,
                )
                for run in page:
                    if run.data.tags.get(TAG_SWEEP_ID, sweep_id) == sweep_id:
                        found[run.info.run_id] = run
                page_token = page.token
                if not page_token:
                    break
    if parent is not None and parent not in found:
        with contextlib.suppress(Exception):  # gone with its store, or never made
            run = tracker.client.get_run(parent)
            if (
                run.info.lifecycle_stage == "active"
                and run.data.tags.get(TAG_SWEEP_ID, sweep_id) == sweep_id
            ):
                found[parent] = run
    return found


def _rehome(
    tracker: Tracker,
    trial_key: str,
    run_id: str,
    holders: list[tuple[str, str, str | None]],
    finished_runs: dict[str, dict[str, str]],
) -> str | None:
    """A run for a trial whose run (``run_id``, in a sweep being deleted) goes: the trial's run
    in another sweep that has it (``holders``: (id, name, parent run), oldest first), or a copy
    of ``run_id`` made under the first of them that has a parent run; None when none has.
    ``finished_runs``: sweep id -> trial key -> FINISHED run, filled as sweeps are looked at."""
    for sweep_id, name, _ in holders:
        if sweep_id not in finished_runs:
            finished_runs[sweep_id] = {
                run.data.tags[TAG_TRIAL_KEY]: run.info.run_id
                for run in tracker.trial_runs(name, sweep_id)
                if run.info.status == "FINISHED" and TAG_TRIAL_KEY in run.data.tags
            }
        if trial_key in finished_runs[sweep_id]:
            return finished_runs[sweep_id][trial_key]
    for sweep_id, name, parent in holders:
        if parent is not None:
            copy = tracker.log_reused_trial(name, parent, sweep_id, trial_key, run_id)
            if copy is not None:
                finished_runs[sweep_id][trial_key] = copy
                return copy
    return None


def delete_sweep(ref: str, stores: Stores, runs: bool = False, force: bool = False) -> int:
    """Delete sweep ``ref`` (an id, or a name: the newest sweep of that name) from the
    database: its row, its submissions, its memberships and the trials no other sweep has
    (`repo.delete_sweep`); with ``runs`` its MLflow runs too (its parent run and its trial
    runs: those of another sweep are never touched; a trial another sweep has, whose run was
    this sweep's, gets that sweep's copy of it, made now when missing). Prints what it
    removed; 0. LookupError: no such sweep; :class:`SweepBusy`: its orchestrator may be
    running it (unless ``force``)."""
    from sqlalchemy import update

    engine = init_db(stores.db_url)
    sessions = session_factory(engine)
    with sessions() as session:
        sweep = repo.get_sweep(session, ref)
        if sweep is None:
            raise LookupError(f"no sweep with id or name {ref!r}")
        reason = None if force else busy_reason(sweep, "deleted")
        if reason is not None:
            raise SweepBusy(reason + " (or delete it anyway with --force)")
        sweep_id, name, parent = sweep.id, sweep.name, sweep.mlflow_run_id
        shared = repo.shared_trials(session, sweep_id)
        kept = {
            t.id: (t.trial_key, t.mlflow_run_id)
            for t in repo.sweep_trials(session, sweep_id)
            if t.id in shared
        }
        holders = {
            s.id: (s.id, s.name, s.mlflow_run_id)
            for s in repo.list_sweeps(session)
            if any(s.id in others for others in shared.values())
        }
    removed: dict[str, Any] = {}
    moved: dict[int, str | None] = {}  # kept trial -> its run from now on
    if runs:
        tracker = Tracker(stores.tracking_uri, stores.artifact_root)
        removed = _sweep_runs(tracker, name, sweep_id, parent)
        finished_runs: dict[str, dict[str, str]] = {}
        for trial_id, (key, run_id) in kept.items():
            if run_id is not None and run_id in removed:
                others = [holders[other] for other in shared[trial_id]]
                moved[trial_id] = _rehome(tracker, key, run_id, others, finished_runs)
        # the kept trials point to their run in another sweep before this sweep's go (a
        # delete stopped half-way leaves no trial pointing to a deleted run)
        with sessions.begin() as session:
            for trial_id, run_id in moved.items():
                session.execute(
                    update(TrialRow).where(TrialRow.id == trial_id).values(mlflow_run_id=run_id)
                )
        # trial runs first: a parent never goes while its children stay
        ordered = sorted(removed.values(), key=lambda r: r.data.tags.get(TAG_ROLE) == "sweep")
        for run in ordered:
            tracker.client.delete_run(run.info.run_id)
    with sessions.begin() as session:
        deleted = repo.delete_sweep(session, sweep_id)
        remaining = [s.id for s in repo.list_sweeps(session) if s.name == name]
    total = deleted.trials + deleted.kept
    print(
        f"deleted sweep {name} ({sweep_id}): {deleted.submissions} submission(s), "
        f"{total} trial(s): {deleted.trials} deleted, {deleted.kept} kept (other sweeps have them)"
    )
    if runs:
        parents = sum(r.data.tags.get(TAG_ROLE) == "sweep" for r in removed.values())
        print(
            f"deleted its {len(removed)} MLflow run(s) in experiment {name}: {parents} parent, "
            f"{len(removed) - parents} trial run(s) (`mlflow gc` frees their artifacts)"
        )
        if moved:
            unlogged = sum(run_id is None for run_id in moved.values())
            print(
                f"{len(moved)} kept trial(s) computed in it now point to their run in another "
                f"sweep"
                + (f" ({unlogged} have none yet: logged when it resumes)" if unlogged else "")
            )
    elif parent is not None:
        print(
            f"its MLflow runs stay (parent run {parent} and its trial runs in experiment "
            f"{name}; --runs deletes them with the sweep)"
        )
    if remaining:
        print(f"{name} now means sweep {remaining[0]}" + (
            f" (others by id: {', '.join(remaining[1:])})" if remaining[1:] else ""
        ))  # fmt: skip
    return 0
