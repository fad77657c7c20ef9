"""A pool of Ray actors (workers) and model-affinity dispatch of trials onto them.

Ray places the actors (CPUs/GPUs, nodes) and runs their calls; this module only decides which
idle worker gets which pending trial: a worker keeps the model it holds, so trials for that model
go to it first, and a worker switches models only when no trial for its model is left.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from prunelab.workers.actor import Worker

__all__ = ["Dispatch", "WorkerPool", "start_ray"]

log = logging.getLogger(__name__)


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local Ray."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)


@dataclass
class Dispatch:
    """One trial handed to the pool: its id, model (for affinity) and worker config."""

    trial_id: int
    model: str
    config: dict[str, Any]
    priority: int = 0  # lower runs first (baselines: 0, others: 1)


@dataclass
class _Slot:
    name: str
    actor: Any
    model: str | None = None


class WorkerPool:
    """``count`` actors, each ``cpus`` CPUs and ``gpus`` GPUs (fractions allowed)."""

    def __init__(self, count: int, cpus: float = 1, gpus: float = 0) -> None:
        self.cpus, self.gpus = cpus, gpus
        self._names = (f"worker-{i}" for i in itertools.count())
        self._remote = ray.remote(Worker)
        self.slots = [self._start() for _ in range(count)]
        self.replaced = 0

    def _start(self) -> _Slot:
        name = next(self._names)
        actor = self._remote.options(
            num_cpus=self.cpus, num_gpus=self.gpus, scheduling_strategy="SPREAD"
        ).remote(name, threads=max(1, int(self.cpus)))
        return _Slot(name=name, actor=actor)

    def shutdown(self) -> None:
        for slot in self.slots:
            ray.kill(slot.actor, no_restart=True)
        self.slots.clear()

    def run(
        self,
        trials: list[Dispatch],
        claim: Callable[[Dispatch, str], bool],
        done: Callable[[Dispatch, dict[str, Any]], None],
        failed: Callable[[Dispatch, str, bool], bool],
    ) -> None:
        """Run ``trials`` to completion.

        ``claim(trial, worker)`` is asked before a trial starts (False: skip it, someone else
        has it). ``done(trial, result)`` receives a finished trial's result.
        ``failed(trial, error, worker_died)`` records a failed attempt and says whether to retry.
        """
        pending = sorted(trials, key=lambda t: t.priority)
        running: dict[Any, tuple[_Slot, Dispatch]] = {}
        idle = list(self.slots)
        while pending or running:
            while idle and pending:
                slot = idle.pop(0)
                trial = self._pick(slot, pending, idle)
                pending.remove(trial)
                if not claim(trial, slot.name):
                    idle.insert(0, slot)
                    continue
                slot.model = trial.model
                running[slot.actor.run.remote(trial.config)] = (slot, trial)
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            slot, trial = running.pop(ref)
            try:
                result = ray.get(ref)
            except (RayActorError, ActorDiedError, ActorUnavailableError) as exc:
                log.warning("%s died running trial %s: %s", slot.name, trial.trial_id, exc)
                self._replace(slot)
                if failed(trial, f"worker {slot.name} died: {_first_line(exc)}", True):
                    pending.insert(0, trial)
                idle.append(self.slots[-1])
                continue
            except RayTaskError as exc:
                if failed(trial, _task_error(exc), False):
                    pending.insert(0, trial)
            else:
                done(trial, result)
            idle.append(slot)

    def _pick(self, slot: _Slot, pending: list[Dispatch], idle: list[_Slot]) -> Dispatch:
        """Same model as the worker holds; else the first trial of a model no idle worker holds."""
        for trial in pending:
            if trial.model == slot.model:
                return trial
        held = {s.model for s in idle}
        for trial in pending:
            if trial.model not in held:
                return trial
        return pending[0]

    def _replace(self, slot: _Slot) -> None:
        self.slots.remove(slot)
        ray.kill(slot.actor, no_restart=True)
        self.slots.append(self._start())
        self.replaced += 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _task_error(exc: RayTaskError) -> str:
    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
    return f"{type(cause).__name__}: {cause}"
