"""A pool of Ray actors (workers) and model-affinity dispatch of trials onto them.

Ray places the actors (CPUs/GPUs, fractions allowed, spread over nodes) and runs their calls;
this module only decides which idle worker gets which pending trial, and reacts to what Ray
reports:

* affinity: a worker keeps the model it holds, so trials for that model go to it first; a
  worker switches models only when no trial for its model is left, and then to a model no
  other worker holds if there is one.
* concurrency: each actor runs one trial at a time, so at most ``count`` trials run at once.
* a worker whose process or node died (or that Ray's memory monitor killed): its trial is
  reported as retryable (``worker_died``; retried if the caller says so) and a replacement
  actor is started; the replacement takes trials once Ray has placed it, so a replacement
  waiting for resources never holds up the surviving workers.
* a trial past ``trial_timeout_s``: its actor is killed and replaced (the only way to stop a
  call in flight), and the trial is reported as retryable, ``timeout after Ns``.
* a trial that raised inside a healthy worker: reported as not retryable, since the same
  config would fail the same way again: ``error`` (an exception of the trial's own code) or
  ``out_of_memory`` (which the worker reports as
  :class:`~prunelab.workers.actor.TrialFailure` after freeing memory). The worker keeps its
  model and takes the next trial.
* resources: what a worker asks for is checked against the nodes Ray has
  (:func:`cluster_capacity`, :func:`placement_problems`); when no worker runs and none has been
  placed for ``placement_timeout_s`` (a request no node can meet, the only node gone), the
  pool stops with :class:`PlacementTimeout`, leaving the trials it did not run pending.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    NodeDiedError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.exceptions import OutOfMemoryError as RayOutOfMemoryError

from prunelab.orchestrator.config import WorkersConfig
from prunelab.orchestrator.console import log_to_driver, worker_log
from prunelab.trial import Trial, TrialResult
from prunelab.workers.actor import WORKER_LOG_ENV, TrialFailure, Worker

__all__ = [
    "AttemptError",
    "Capacity",
    "Dispatch",
    "PlacementTimeout",
    "PoolError",
    "WorkerPool",
    "WorkersCannotStart",
    "cluster_capacity",
    "held_ray_logs",
    "is_local",
    "placement_problems",
    "replay_logs",
    "runs_own_local_ray",
    "start_ray",
]

log = logging.getLogger(__name__)

# the worker, its process or its node is gone (not the trial's fault): worth another attempt
_DEATH = (
    RayActorError,
    ActorDiedError,
    ActorUnavailableError,
    NodeDiedError,
    WorkerCrashedError,
    RayOutOfMemoryError,  # Ray's memory monitor killed the process (host memory, not the GPU)
)
_START_WARNING_S = 60.0  # warn once when a worker has waited this long for resources
_START_DEATHS_PER_WORKER = 3  # workers dying while starting, in a row, before giving up


_DEFAULT_PLACEMENT_TIMEOUT_S = WorkersConfig().placement_timeout_s


class PoolError(RuntimeError):
    """The pool cannot go on; the trials it did not run are left for ``prunelab resume``."""


class PlacementTimeout(PoolError):
    """No worker could be placed for ``placement_timeout_s`` while none was running."""


class WorkersCannotStart(PoolError):
    """Workers die while starting, again and again (their own error is in the message)."""


def is_local(address: str | None) -> bool:
    """Whether ``address`` means a new local Ray of this process's own (none, or ``local``)."""
    return not address or address == "local"


_own_session: str | None = None  # the node id of the local Ray start_ray started, if any


def runs_own_local_ray() -> bool:
    """Whether this process is connected to a local Ray that :func:`start_ray` started here
    (the one of a ``prunelab`` command, which ends with it), not a cluster it joined or a Ray
    its caller started."""
    return (
        _own_session is not None
        and ray.is_initialized()
        and ray.get_runtime_context().get_node_id() == _own_session
    )


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (the CLI passes ``--ray-address`` or ``RAY_ADDRESS``;
    ``auto`` joins a cluster started on this machine with ``ray start``), else start a new
    local Ray of this process's own: never silently join another driver's local cluster.

    The workers' output comes to this process's console only when no quiet console runs
    (:func:`prunelab.orchestrator.console.log_to_driver`).

    A local Ray starts without what a sweep does not use, each a process competing with the
    sweep's start on a small machine: no dashboard, and no idle workers started ahead (Ray
    starts one per CPU when the driver connects; the pool's actors, started with an
    environment of their own, cannot take them over). ``bench/cli_latency.py --ray`` times it.

    ``ray.init`` replaces the process's SIGTERM handler with an immediate exit; a handler the
    caller installed (the CLI's, which stops the sweep as Ctrl-C does) is put back.
    """
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    # a quiet console: the workers write their output to its log file, not to this console
    kwargs["log_to_driver"] = log_to_driver()
    main_thread = threading.current_thread() is threading.main_thread()
    caller = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        if is_local(address):
            # a cluster's own settings are fixed when it starts: only a new local Ray takes these
            system = {"prestart_worker_first_driver": False}
            ray.init(address="local", num_cpus=num_cpus, _system_config=system, **kwargs)
            global _own_session
            _own_session = ray.get_runtime_context().get_node_id()
        else:
            ray.init(address=address, **kwargs)
    finally:
        if caller is not None and caller is not signal.SIG_DFL:
            signal.signal(signal.SIGTERM, caller)


class _Hold(logging.Filter):
    """Keeps the records it sees instead of letting them through."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(record is held for held in self.records):
            self.records.append(record)
        return False


@contextlib.contextmanager
def held_ray_logs() -> Iterator[list[logging.LogRecord]]:
    """Hold what Ray's driver logs meanwhile (the notices of ``ray.init``) instead of printing
    it: a caller that then finds bad input says one line; one that goes on prints them with
    :func:`replay_logs`."""
    hold = _Hold()
    handlers = list(logging.getLogger("ray").handlers)
    for handler in handlers:
        handler.addFilter(hold)
    try:
        yield hold.records
    finally:
        for handler in handlers:
            handler.removeFilter(hold)


def replay_logs(records: list[logging.LogRecord]) -> None:
    """Print records held by :func:`held_ray_logs` as they would have been."""
    for record in records:
        logging.getLogger(record.name).handle(record)


@dataclass(frozen=True)
class Capacity:
    """The CPUs and GPUs of each live node of the Ray cluster this process is connected to."""

    nodes: tuple[tuple[float, float], ...]  # (CPU, GPU) per node

    def fits(self, cpus: float, gpus: float) -> bool:
        """Whether some node could hold one worker (an actor never spans nodes)."""
        return any(cpu >= cpus and gpu >= gpus for cpu, gpu in self.nodes)

    def most(self, resource: str) -> float:
        index = 0 if resource == "CPU" else 1
        return max((node[index] for node in self.nodes), default=0.0)

    def describe(self) -> str:
        """``1 node: 2 CPU, 0 GPU`` or ``3 nodes: 8 CPU, 2 GPU in all, at most 4 CPU, 1 GPU on
        one``."""
        if len(self.nodes) == 1:
            ((cpu, gpu),) = self.nodes
            return f"1 node: {cpu:g} CPU, {gpu:g} GPU"
        cpus, gpus = sum(n[0] for n in self.nodes), sum(n[1] for n in self.nodes)
        return (
            f"{len(self.nodes)} nodes: {cpus:g} CPU, {gpus:g} GPU in all, at most "
            f"{self.most('CPU'):g} CPU, {self.most('GPU'):g} GPU on one"
        )


def cluster_capacity() -> Capacity:
    """What the live nodes of the connected Ray cluster have (Ray must be initialised)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return Capacity(
        tuple(
            (float(n["Resources"].get("CPU", 0.0)), float(n["Resources"].get("GPU", 0.0)))
            for n in nodes
        )
    )


def placement_problems(
    cpus: float, gpus: float, capacity: Capacity, origins: dict[str, str], cluster: str
) -> list[str]:
    """One line per worker request no node of ``capacity`` can meet, naming the setting
    (``workers.gpus_per_worker=1 from the command line``) and what the cluster has;
    ``cluster`` says which cluster (``the local Ray started by prunelab``)."""
    problems = []
    for key, need, resource in (("cpus_per_worker", cpus, "CPU"), ("gpus_per_worker", gpus, "GPU")):
        if need > capacity.most(resource):
            where = origins.get(f"workers.{key}", "")
            problems.append(
                f"workers.{key}={need:g}{' ' + where if where else ''}: no node of {cluster} "
                f"has {need:g} {resource} for a worker ({capacity.describe()})"
            )
    if not problems and not capacity.fits(cpus, gpus):
        problems.append(
            f"workers.cpus_per_worker={cpus:g} with workers.gpus_per_worker={gpus:g}: no node "
            f"of {cluster} has both for a worker ({capacity.describe()})"
        )
    return problems


@dataclass(frozen=True)
class Dispatch:
    """One trial handed to the pool: its database id and the trial its worker runs."""

    trial_id: int
    trial: Trial

    @property
    def model(self) -> str:
        """The model the trial runs on (workers keep theirs: affinity)."""
        return self.trial.model

    @property
    def priority(self) -> int:
        """Lower runs first: baselines (0), whose metrics the others are measured against."""
        return 0 if self.trial.is_baseline else 1


@dataclass
class _Slot:
    """One actor: its name, handle, the model it holds and whether Ray has started it."""

    name: str
    actor: Any
    ready_ref: Any  # resolves to the actor's identity once it runs
    model: str | None = None
    ready: bool = False
    pid: int | None = None
    node: str | None = None  # the host it runs on, once started
    since: float = field(default_factory=time.monotonic)


@dataclass
class _Running:
    slot: _Slot
    trial: Dispatch
    deadline: float | None


class AttemptError(str):
    """The error of a failed attempt as the pool reports it: the message, with why the attempt
    failed as ``kind`` (``error``, ``out_of_memory``, ``worker_died`` or ``timeout``: values of
    ``prunelab.db.models.ATTEMPT_KINDS``)."""

    kind: str

    def __new__(cls, message: str, kind: str) -> AttemptError:
        error = super().__new__(cls, message)
        error.kind = kind
        return error


# failed(trial, error, retryable) -> whether the trial goes back to the queue
FailedCallback = Callable[[Dispatch, AttemptError, bool], bool]


class WorkerPool:
    """``count`` actors, each ``cpus`` CPUs and ``gpus`` GPUs (fractions allowed).

    ``trial_timeout_s``: wall time a trial may take on its worker (model load included)
    before the worker is killed and replaced; None: no limit. ``placement_timeout_s``: how
    long the pool waits with no worker running for Ray to place one before it raises
    :class:`PlacementTimeout`; None: for ever. ``worker_cls``: the actor class (tests may pass
    another with the same ``identity``/``run`` methods). ``worker_options``: keyword
    arguments of each actor's constructor besides its name and threads (the sweep's
    ``workers.vision_cache_mb``).
    """

    def __init__(
        self,
        count: int,
        cpus: float = 1,
        gpus: float = 0,
        trial_timeout_s: float | None = None,
        worker_cls: type = Worker,
        placement_timeout_s: float | None = _DEFAULT_PLACEMENT_TIMEOUT_S,
        worker_options: dict[str, Any] | None = None,
    ) -> None:
        if count < 1:
            raise ValueError(f"count={count}: a pool needs at least one worker")
        self.cpus, self.gpus = cpus, gpus
        self.trial_timeout_s = trial_timeout_s
        self.placement_timeout_s = placement_timeout_s
        self.worker_options = dict(worker_options or {})
        self._names = (f"worker-{i}" for i in itertools.count())
        self._remote = ray.remote(worker_cls)
        self.replaced = 0
        self._warn_if_unplaceable()
        self.slots: list[_Slot] = [self._start() for _ in range(count)]

    def _warn_if_unplaceable(self) -> None:
        """Say at once when no node of the cluster can hold a worker now (one may still join:
        a cluster can grow), instead of after a minute of waiting."""
        capacity = cluster_capacity()
        if capacity.fits(self.cpus, self.gpus):
            return
        limit = self.placement_timeout_s
        log.warning(
            "no node of the Ray cluster has %g CPU and %g GPU for a worker (%s); waiting %s "
            "for one to join (workers.placement_timeout_s)",
            self.cpus, self.gpus, capacity.describe(),
            "without limit" if limit is None else f"up to {limit:g} s",
        )  # fmt: skip

    def _placement_timeout(self, waiting: int) -> PlacementTimeout:
        return PlacementTimeout(
            f"no worker could be placed in {self.placement_timeout_s:g} s "
            f"(workers.placement_timeout_s): {waiting} worker(s) wait for {self.cpus:g} CPU and "
            f"{self.gpus:g} GPU each (workers.cpus_per_worker, workers.gpus_per_worker); the "
            f"Ray cluster has {cluster_capacity().describe()}"
        )

    def node_of(self, worker: str) -> str | None:
        """The host ``worker`` runs on (None: not started yet, or not one of this pool's)."""
        return next((s.node for s in self.slots if s.name == worker), None)

    def _start(self) -> _Slot:
        name = next(self._names)
        options: dict[str, Any] = {}
        env = _worker_env()
        if env:
            options["runtime_env"] = {"env_vars": env}
        actor = self._remote.options(
            num_cpus=self.cpus,
            num_gpus=self.gpus,
            scheduling_strategy="SPREAD",
            max_restarts=0,
            max_task_retries=0,
            **options,
        ).remote(name, threads=max(1, int(self.cpus)), **self.worker_options)
        return _Slot(name=name, actor=actor, ready_ref=actor.identity.remote())

    def preload(self, trials: Sequence[Dispatch]) -> None:
        """Have each worker that holds no model yet load the one :meth:`run` will give it
        first (the trial :meth:`_pick` chooses among ``trials``: baselines first, a model no
        other worker holds), as soon as it has started.

        A caller that starts the pool before its own set-up (opening its stores) and calls
        :meth:`run` after it then finds the workers with their models loaded: the loads
        overlap that set-up instead of following it. Nothing else changes: the trials run in
        :meth:`run`, whose first trial on a worker waits for the load when it is not done
        (its ``trial_timeout_s`` counting from its dispatch, as before), and a load that fails
        fails that trial there. Workers of a class without ``prepare`` (a test's) load
        nothing ahead."""
        pending = sorted(trials, key=lambda t: t.priority)
        for slot in self.slots:
            if not pending or slot.model is not None or not hasattr(slot.actor, "prepare"):
                continue
            first = self._pick(slot, pending)
            slot.model = first.model  # what the worker holds once the load is done
            # its result is not awaited: the worker's own log has a load that failed
            slot.actor.prepare.remote(first.trial)

    def shutdown(self) -> None:
        for slot in self.slots:
            ray.kill(slot.actor, no_restart=True)
        self.slots.clear()

    def _replace(self, slot: _Slot) -> _Slot:
        """Kill ``slot``'s actor (if still alive) and start a new one in its place."""
        self.slots.remove(slot)
        ray.kill(slot.actor, no_restart=True)
        new = self._start()
        self.slots.append(new)
        self.replaced += 1
        log.warning("%s replaced by %s", slot.name, new.name)
        return new

    def run(
        self,
        trials: list[Dispatch],
        claim: Callable[[Dispatch, str], bool],
        done: Callable[[Dispatch, TrialResult], None],
        failed: FailedCallback,
    ) -> None:
        """Run ``trials`` to completion.

        ``claim(trial, worker)`` is asked before a trial starts (False: skip it, someone else
        has it). ``done(trial, result)`` receives a finished trial's result, once its worker
        has been given its next trial (so a worker never waits on the caller's logging).
        ``failed(trial, error, retryable)`` records a failed attempt (``error.kind`` says
        why) and says whether to run the trial again; ``retryable`` is False when the trial
        itself failed on a healthy worker (an exception of its code, out of memory), True
        when its worker died or it timed out. An exception of a callback ends the run; the
        trials in flight are then left to the caller (claimed, never reported).
        """
        pending = sorted(trials, key=lambda t: t.priority)
        running: dict[Any, _Running] = {}
        starting: dict[Any, _Slot] = {s.ready_ref: s for s in self.slots if not s.ready}
        idle = [s for s in self.slots if s.ready]
        results: list[tuple[Dispatch, TrialResult]] = []  # finished, not yet handed over
        warned = False
        start_deaths = 0  # in a row: a worker that cannot start at all must not loop forever
        stalled_since: float | None = None  # since when no worker runs and some wait for Ray

        def lost(slot: _Slot) -> None:
            """``slot``'s actor is gone or killed: start its replacement."""
            if slot in idle:
                idle.remove(slot)
            starting.pop(slot.ready_ref, None)
            new = self._replace(slot)
            starting[new.ready_ref] = new

        while pending or running or results:
            while idle and pending:
                slot = idle.pop(0)
                trial = self._pick(slot, pending)
                pending.remove(trial)
                if not claim(trial, slot.name):
                    idle.insert(0, slot)
                    continue
                slot.model = trial.model
                deadline = time.monotonic() + self.trial_timeout_s if self.trial_timeout_s else None
                running[slot.actor.run.remote(trial.trial)] = _Running(slot, trial, deadline)
            # the freed workers already run their next trials: record the finished ones now,
            # so database writes and MLflow logging overlap the workers' compute
            for trial, result in results:
                done(trial, result)
            results.clear()
            if not running and not pending:
                break
            deadlines = [r.deadline for r in running.values() if r.deadline is not None]
            if not running and not idle and starting:  # nothing moves until Ray places one
                if stalled_since is None:
                    stalled_since = time.monotonic()
                if not warned:  # wake up to warn once
                    deadlines.append(stalled_since + _START_WARNING_S)
                if self.placement_timeout_s is not None:
                    deadlines.append(stalled_since + self.placement_timeout_s)
            else:
                stalled_since = None
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            ready, _ = ray.wait([*running, *starting], num_returns=1, timeout=wait_s)
            if not ready:
                now = time.monotonic()
                stalled = None if stalled_since is None else now - stalled_since
                limit = self.placement_timeout_s
                if stalled is not None and limit is not None and stalled >= limit:
                    raise self._placement_timeout(len(starting))
                for ref, entry in list(running.items()):
                    if entry.deadline is not None and entry.deadline <= now:
                        del running[ref]
                        log.warning(
                            "trial %s timed out on %s", entry.trial.trial_id, entry.slot.name
                        )
                        lost(entry.slot)
                        error = AttemptError(f"timeout after {self.trial_timeout_s:g}s", "timeout")
                        if failed(entry.trial, error, True):
                            pending.insert(0, entry.trial)
                if stalled is not None and stalled >= _START_WARNING_S and not warned:
                    warned = True
                    log.warning(
                        "%d worker(s) still waiting for resources (%g CPU, %g GPU each)",
                        len(starting),
                        self.cpus,
                        self.gpus,
                    )
                continue
            ref = ready[0]
            if ref in starting:
                slot = starting.pop(ref)
                try:
                    identity = ray.get(ref)
                    slot.pid, slot.node = identity["pid"], identity.get("node")
                except _DEATH as exc:
                    log.warning("%s died while starting: %s", slot.name, _first_line(exc))
                    start_deaths += 1
                    if start_deaths >= _START_DEATHS_PER_WORKER * len(self.slots):
                        raise WorkersCannotStart(
                            f"{start_deaths} workers in a row died while starting; the last: "
                            f"{_first_line(exc)}"
                        ) from exc
                    lost(slot)
                    continue
                start_deaths = 0
                slot.ready = True
                idle.append(slot)
                continue
            entry = running.pop(ref)
            slot, trial = entry.slot, entry.trial
            try:
                result = ray.get(ref)
            except _DEATH as exc:
                log.warning("%s died running trial %s: %s", slot.name, trial.trial_id, exc)
                lost(slot)
                died = AttemptError(f"worker {slot.name} died: {_first_line(exc)}", "worker_died")
                if failed(trial, died, True):
                    pending.insert(0, trial)
                continue
            except RayTaskError as exc:
                # raised by the trial on a healthy worker: final, it would fail again
                failed(trial, _describe(_cause(exc)), False)
            else:
                results.append((trial, result))
            idle.append(slot)

    def _pick(self, slot: _Slot, pending: list[Dispatch]) -> Dispatch:
        """The trial ``slot`` runs next, so that models are loaded as rarely as possible.

        Its own model first; else the first trial (in priority order) of a model that no
        other worker holds; else a trial of the model with the most pending trials per worker
        holding it.
        """
        for trial in pending:
            if trial.model == slot.model:
                return trial
        holders = Counter(s.model for s in self.slots if s is not slot and s.model is not None)
        for trial in pending:
            if holders[trial.model] == 0:
                return trial
        remaining = Counter(t.model for t in pending)
        busiest = max(remaining, key=lambda model: remaining[model] / holders[model])
        return next(t for t in pending if t.model == busiest)


def _worker_env() -> dict[str, str]:
    """Environment variables of a new worker process: where it sends its logs, warnings and
    output (:func:`prunelab.orchestrator.console.worker_log`, read by the worker), and, when
    that is the log file, no download progress bars of the hub (read when it is imported);
    none when no console runs (a test's pool)."""
    target = worker_log()
    if target is None:
        return {}
    env = {WORKER_LOG_ENV: target}
    if target != "-":
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    return env


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _cause(exc: RayTaskError) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if cause is not None else exc


def _describe(cause: BaseException) -> AttemptError:
    """The error of a trial that raised ``cause``: a :class:`TrialFailure` is already a
    reason (``out of memory: ...``), any other exception is named with its type."""
    if isinstance(cause, TrialFailure):
        message = str(cause)
        kind = "out_of_memory" if message.startswith("out of memory") else "error"
        return AttemptError(message, kind)
    return AttemptError(f"{type(cause).__name__}: {cause}", "error")
