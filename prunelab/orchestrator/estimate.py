"""Compute estimate of a trial before it runs (for ``prunelab sweep --dry-run``).

Analytic: the LLM prefill FLOPs the trial's plan implies (:func:`estimate_tflops`). Measured:
when the database holds finished trials of the same model, their measured model time gives a
throughput (analytic TFLOPs per second, :func:`earlier_throughput`) that turns the analytic
estimate into seconds.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

import prunelab.methods as methods
from prunelab.db import Trial as TrialRow
from prunelab.methods.base import PlanContext
from prunelab.trial import Trial
from prunelab.workers.cost import trial_flops
from prunelab.workers.models import ModelInfo, describe_model

__all__ = [
    "ASSUMED_TEXT_TOKENS",
    "FixedCosts",
    "Throughput",
    "earlier_fixed_costs",
    "earlier_throughput",
    "estimate_tflops",
    "measured_seconds",
    "measured_throughput",
    "planned_visual_per_layer",
]

ASSUMED_TEXT_TOKENS = 40  # prompt text around the image; the real count is measured per sample


@functools.lru_cache(maxsize=64)
def _info(model_config_json: str) -> ModelInfo:
    return describe_model(json.loads(model_config_json))


def planned_visual_per_layer(trial: Trial, info: ModelInfo) -> list[int]:
    """Visual tokens each LLM layer will see under the trial's plan: (n_layers,).

    The method is built as the worker builds it (:func:`prunelab.methods.build`) but without
    the trial's trained assets, which a plan does not read: nothing of the worker (model code,
    trained heads) is imported or loaded for an estimate."""
    method, budget = methods.build(trial.method, trial.hparams, trial.keep_ratio, trial.keep_tokens)
    plan = method.plan_trial(
        PlanContext(
            n_visual=info.n_visual,
            n_layers=info.n_layers,
            budget=budget,
            prune_layer=trial.prune_layer,
            seed=trial.seed or 0,
            family=info.family,
            budget_mode=trial.budget_mode,
        )
    )
    return plan.visual_per_layer(info.n_visual, info.n_layers)


def estimate_tflops(trial: Trial, samples: int | None = None) -> float:
    """Prefill TFLOPs over ``samples`` of the trial's samples (default: ``eval.limit``; text
    length assumed; the ``exact`` convention adds the vision tower)."""
    info = _info(json.dumps(trial.model_config, sort_keys=True))
    tokens = [v + ASSUMED_TEXT_TOKENS for v in planned_visual_per_layer(trial, info)]
    per_sample = trial_flops(tokens, 1, info, trial.eval.flops_convention)
    count = int(trial.eval.limit) if samples is None else samples  # type: ignore[arg-type]
    return per_sample * count / 1e12


@dataclass(frozen=True)
class Throughput:
    """How fast a model ran earlier trials: analytic TFLOPs (:func:`estimate_tflops`) per
    second of measured model time (median per-sample latency, prefill + decode, x samples)."""

    tflops_per_s: float
    trials: int  # earlier finished trials it was measured on

    def seconds(self, tflops: float) -> float:
        """Model time a trial of ``tflops`` estimated TFLOPs should take."""
        return tflops / self.tflops_per_s


def measured_seconds(metrics: dict[str, Any] | None) -> float | None:
    """Model time of a finished trial from its metrics: ``latency_ms`` x ``samples`` (s).

    Excludes model loading, warm-up and the unpruned reference passes of fidelity metrics.
    """
    metrics = metrics or {}
    latency, samples = metrics.get("latency_ms"), metrics.get("samples")
    if latency is None or samples is None or latency <= 0 or samples <= 0:
        return None
    return float(latency) / 1000.0 * float(samples)


def measured_throughput(
    finished: Iterable[tuple[Trial, dict[str, Any] | None]],
) -> dict[str, Throughput]:
    """Per model name, the throughput of its earlier finished trials, given as (trial,
    metrics). Trials without timings, or whose config no longer plans (a method since
    removed or changed), are skipped."""
    work: dict[str, float] = {}
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    for trial, metrics in finished:
        elapsed = measured_seconds(metrics)
        if elapsed is None:
            continue
        try:
            tflops = estimate_tflops(trial)
        except (KeyError, ValueError, TypeError):
            continue
        model = trial.model
        work[model] = work.get(model, 0.0) + tflops
        seconds[model] = seconds.get(model, 0.0) + elapsed
        counts[model] = counts.get(model, 0) + 1
    return {
        model: Throughput(work[model] / seconds[model], counts[model])
        for model in work
        if work[model] > 0 and seconds[model] > 0
    }


def earlier_throughput(session: Session, models: Iterable[str]) -> dict[str, Throughput]:
    """:func:`measured_throughput` of every finished trial in the database of ``models``."""
    wanted = set(models)
    query = select(TrialRow.config, TrialRow.metrics).where(TrialRow.status == "finished")
    rows = []
    for config, metrics in session.execute(query).tuples():
        try:
            trial = Trial.from_dict(config)
        except (KeyError, TypeError):  # a row written by a version with another layout
            continue
        if trial.model in wanted:
            rows.append((trial, metrics))
    return measured_throughput(rows)


@dataclass(frozen=True)
class FixedCosts:
    """What a sweep costs besides model time, measured on earlier sweeps of this database:
    ``startup_s`` from submitting a sweep to its first trial starting (Ray, workers, the first
    model load), the median over ``sweeps``; ``per_trial_s`` a trial's wall time on its worker
    beyond its measured model time (model loads, warm-up, the unpruned reference passes,
    recording), the median over ``trials``."""

    startup_s: float | None
    per_trial_s: float | None
    sweeps: int
    trials: int

    def seconds(self, trials: int, workers: int) -> float:
        """Fixed cost of a sweep of ``trials`` on ``workers`` workers."""
        startup = self.startup_s or 0.0
        return startup + (self.per_trial_s or 0.0) * trials / max(1, workers)


def earlier_fixed_costs(session: Session) -> FixedCosts:
    """:class:`FixedCosts` of the finished trials and the sweeps in the database."""
    import statistics

    from prunelab.db import Sweep, SweepTrial

    overheads = []
    query = select(TrialRow.metrics, TrialRow.started, TrialRow.finished).where(
        TrialRow.status == "finished"
    )
    for metrics, started, finished in session.execute(query).tuples():
        model = measured_seconds(metrics)
        if started is None or finished is None or model is None:
            continue
        overheads.append(max(0.0, (finished - started).total_seconds() - model))
    first = (
        select(Sweep.created, TrialRow.started)
        .join(SweepTrial, SweepTrial.sweep_id == Sweep.id)
        .join(TrialRow, TrialRow.id == SweepTrial.trial_id)
        .where(TrialRow.started.is_not(None))
    )
    starts: dict[Any, Any] = {}
    for created, started in session.execute(first).tuples():
        if started >= created and (created not in starts or started < starts[created]):
            starts[created] = started  # the sweep's first trial it ran itself
    startups = [(started - created).total_seconds() for created, started in starts.items()]
    return FixedCosts(
        statistics.median(startups) if startups else None,
        statistics.median(overheads) if overheads else None,
        len(startups),
        len(overheads),
    )
