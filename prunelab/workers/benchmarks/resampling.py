"""Bootstrap replicates of a benchmark's headline ``score`` over its scored samples.

The replicates (:mod:`prunelab.intervals`) resample whole units (``Sample.unit``: an MME image
pair, an MMBench circular group; a sample without one is its own unit). Each replicate is the
benchmark's own statistic on the resampled samples: 100 x the mean per-sample score, or its
``aggregate(...)["score"]`` where it has one (MME's sums of acc and acc+, POPE's F1, ...).

A unit drawn k > 1 times is given to ``aggregate`` as k distinct copies (``id#1``, ``unit#1``,
...): an aggregate that groups samples by unit or id then counts each draw once, as the
bootstrap requires, instead of merging the copies into one group.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np

from prunelab import intervals
from prunelab.workers.benchmarks.base import Sample

__all__ = ["Scored", "score_replicates", "score_summary"]

Scored = tuple[Sample, str, float]  # (sample, prediction, per-sample score)


def _copies(scored: Sequence[Scored], indices: np.ndarray) -> list[Scored]:
    """The resampled samples, the k-th draw of a sample renamed ``<id>#k`` (k >= 1)."""
    draws: Counter[str] = Counter()
    out: list[Scored] = []
    for index in indices:
        sample, prediction, score = scored[int(index)]
        k = draws[sample.id]
        draws[sample.id] += 1
        if k:
            sample = dataclasses.replace(
                sample, id=f"{sample.id}#{k}", unit=f"{sample.unit}#{k}" if sample.unit else ""
            )
        out.append((sample, prediction, score))
    return out


def score_replicates(benchmark: object, scored: Sequence[Scored]) -> np.ndarray:
    """The :data:`prunelab.intervals.N_REPLICATES` bootstrap replicates of ``score`` (in its
    unit, a percentage), with the default seed so that trials on the same samples pair."""
    units = [sample.unit for sample, _, _ in scored]
    ids = [sample.id for sample, _, _ in scored]
    aggregate = getattr(benchmark, "aggregate", None)
    if not callable(aggregate):
        values = [score for _, _, score in scored]
        return intervals.mean_replicates(values, units, scale=100.0, ids=ids)

    def statistic(indices: np.ndarray) -> float:
        return float(aggregate(_copies(scored, indices))["score"])

    return intervals.score_replicates(units, statistic, ids=ids)


def score_summary(
    benchmark: object, scored: Sequence[Scored]
) -> tuple[dict[str, float], np.ndarray]:
    """The metrics of ``scored`` that depend on scoring (``score``, ``score.<category>``, the
    benchmark's extras, ``score_ci_low`` / ``score_ci_high``), named and scaled as a trial
    logs them, and the score's replicates: what a rescore of saved predictions reports."""
    from prunelab.metrics import TrialContext, trial_metrics

    if not scored:
        raise ValueError("no scored samples")
    aggregate = getattr(benchmark, "aggregate", None)
    official = aggregate(list(scored)) if callable(aggregate) else None
    replicates = score_replicates(benchmark, scored)
    per_sample = [SimpleNamespace(score=score, category=s.category) for s, _, score in scored]
    context = TrialContext(score_interval=intervals.percentile_interval(replicates))
    return trial_metrics(per_sample, context, official, scoring_only=True), replicates
