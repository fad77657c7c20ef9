"""A pool of Ray actors (workers) and model-affinity dispatch of trials onto them.

Ray places the actors (CPUs/GPUs, fractions allowed, spread over nodes) and runs their calls;
this module only decides which idle worker gets which pending trial, and reacts to what Ray
reports:

* affinity: a worker keeps the model it holds, so trials for that model go to it first; a
  worker switches models only when no trial for its model is left, and then to a model no
  other worker holds if there is one.
* concurrency: each actor runs one trial at a time, so at most ``count`` trials run at once.
* a worker whose process or node died: its trial is reported (and retried if the caller says
  so) and a replacement actor is started; the replacement takes trials once Ray has placed
  it, so a replacement waiting for resources never holds up the surviving workers.
* a trial past ``trial_timeout_s``: its actor is killed and replaced (the only way to stop a
  call in flight), and the trial is reported as ``timeout after Ns``.
* a trial that failed inside a healthy worker (e.g. out of memory, which the worker
  reports as :class:`~prunelab.workers.actor.TrialFailure` after freeing memory): reported as
  not retryable; the worker keeps its model and takes the next trial.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    RayActorError,
    RayTaskError,
)

from prunelab.trial import Trial, TrialResult
from prunelab.workers.actor import TrialFailure, Worker

__all__ = ["Dispatch", "WorkerPool", "start_ray"]

log = logging.getLogger(__name__)

_DEATH = (RayActorError, ActorDiedError, ActorUnavailableError)
_START_WARNING_S = 60.0  # warn once when a worker has waited this long for resources
_START_DEATHS_PER_WORKER = 3  # workers dying while starting, in a row, before giving up


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (the CLI passes ``--ray-address`` or ``RAY_ADDRESS``;
    ``auto`` joins a cluster started on this machine with ``ray start``), else start a new
    local Ray of this process's own: never silently join another driver's local cluster."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus, **kwargs)


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
    since: float = field(default_factory=time.monotonic)


@dataclass
class _Running:
    slot: _Slot
    trial: Dispatch
    deadline: float | None


# failed(trial, error, retryable) -> whether the trial goes back to the queue
FailedCallback = Callable[[Dispatch, str, bool], bool]


class WorkerPool:
    """``count`` actors, each ``cpus`` CPUs and ``gpus`` GPUs (fractions allowed).

    ``trial_timeout_s``: wall time a trial may take on its worker (model load included)
    before the worker is killed and replaced; None: no limit. ``worker_cls``: the actor class
    (tests may pass another with the same ``identity``/``run`` methods).
    """

    def __init__(
        self,
        count: int,
        cpus: float = 1,
        gpus: float = 0,
        trial_timeout_s: float | None = None,
        worker_cls: type = Worker,
    ) -> None:
        if count < 1:
            raise ValueError(f"count={count}: a pool needs at least one worker")
        self.cpus, self.gpus = cpus, gpus
        self.trial_timeout_s = trial_timeout_s
        self._names = (f"worker-{i}" for i in itertools.count())
        self._remote = ray.remote(worker_cls)
        self.replaced = 0
        self.slots: list[_Slot] = [self._start() for _ in range(count)]

    def _start(self) -> _Slot:
        name = next(self._names)
        actor = self._remote.options(
            num_cpus=self.cpus,
            num_gpus=self.gpus,
            scheduling_strategy="SPREAD",
            max_restarts=0,
            max_task_retries=0,
        ).remote(name, threads=max(1, int(self.cpus)))
        return _Slot(name=name, actor=actor, ready_ref=actor.identity.remote())

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
        ``failed(trial, error, retryable)`` records a failed attempt and says whether to run
        the trial again; ``retryable`` is False when the trial itself failed on a healthy
        worker (out of memory), True when its worker died or it timed out.
        """
        pending = sorted(trials, key=lambda t: t.priority)
        running: dict[Any, _Running] = {}
        starting: dict[Any, _Slot] = {s.ready_ref: s for s in self.slots if not s.ready}
        idle = [s for s in self.slots if s.ready]
        results: list[tuple[Dispatch, TrialResult]] = []  # finished, not yet handed over
        warned = False
        start_deaths = 0  # in a row: a worker that cannot start at all must not loop forever

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
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            if not running:  # only workers still waiting to start: wake up to warn once
                wait_s = None if warned else _START_WARNING_S
            ready, _ = ray.wait([*running, *starting], num_returns=1, timeout=wait_s)
            if not ready:
                now = time.monotonic()
                for ref, entry in list(running.items()):
                    if entry.deadline is not None and entry.deadline <= now:
                        del running[ref]
                        log.warning(
                            "trial %s timed out on %s", entry.trial.trial_id, entry.slot.name
                        )
                        lost(entry.slot)
                        error = f"timeout after {self.trial_timeout_s:g}s"
                        if failed(entry.trial, error, True):
                            pending.insert(0, entry.trial)
                if not running and starting and not warned:
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
                    slot.pid = ray.get(ref)["pid"]
                except _DEATH as exc:
                    log.warning("%s died while starting: %s", slot.name, _first_line(exc))
                    start_deaths += 1
                    if start_deaths >= _START_DEATHS_PER_WORKER * len(self.slots):
                        raise RuntimeError(
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
                if failed(trial, f"worker {slot.name} died: {_first_line(exc)}", True):
                    pending.insert(0, trial)
                continue
            except RayTaskError as exc:
                cause = _cause(exc)
                # a TrialFailure (out of memory) is final; other errors get another attempt
                if failed(trial, _describe(cause), not isinstance(cause, TrialFailure)):
                    pending.insert(0, trial)
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _cause(exc: RayTaskError) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if cause is not None else exc


def _describe(cause: BaseException) -> str:
    if isinstance(cause, TrialFailure):
        return str(cause)  # already a reason, e.g. "out of memory: ..."
    return f"{type(cause).__name__}: {cause}"
