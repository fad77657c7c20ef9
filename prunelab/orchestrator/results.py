"""Trial parameters, baseline-relative metrics, and the paper-style results table.

The report (``prunelab report``, ``table.md`` / ``table.csv`` / ``table.tex`` on a sweep's parent
run) is shaped like the tables of the seed papers: per model, the unpruned model first ("upper
bound"), then one row per method at each budget (largest budget first); one column per
benchmark holding its headline score, and a last column with the mean over benchmarks of the
score ratio (score / unpruned score, in %). At each (model, budget) the pruned values of a
column not significantly worse than the best are bold (``**x**`` in markdown, ``\\textbf{x}`` in
LaTeX, plain in CSV; see :func:`_best_cells`).

Intervals: a finished trial with a 95% bootstrap interval (``score_ci_low`` /
``score_ci_high``, see :mod:`prunelab.intervals`) prints ``75.0 ± 4.3`` (``75.0 $\\pm$ 4.3`` in
LaTeX), where the half-width is ``max(score - low, high - score)``, rounded to one decimal: the
percentile interval need not be symmetric, and the larger side is the honest one-number
summary. The CSV prints the score alone and the bounds in ``<column>_ci_low`` /
``<column>_ci_high`` columns (present when some row of that column has an interval). The mean
score ratio's interval is the percentile interval of the replicate-wise mean over benchmarks
of the paired ratio replicates (replicate-wise score / unpruned score, see
:func:`prunelab.intervals.mean_interval`); it needs every benchmark's replicates, of the trial
and of its baseline, on the same samples (:func:`same_samples`). Trials without replicates
(rows of older versions) print as before, without ``±``.

The per-trial table with every cost metric (``trials.csv`` on the parent run) is
:func:`prunelab.orchestrator.tables.results_rows` + ``trials_markdown`` / ``trials_csv``; its
metric columns are the
entries of :data:`prunelab.metrics.METRICS` that name a ``column``.

Trials are given as (trial, status, metrics) or (trial, status, metrics, replicates): the trial
a :class:`~prunelab.trial.Trial` or its stored form (the ``trials.config`` mapping), read once
through :meth:`Trial.from_dict`; ``replicates`` the bootstrap replicates of its score
(``trials.replicates``; None or empty: none).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prunelab import intervals
from prunelab.metrics import ratio, relative_metrics
from prunelab.trial import Trial

__all__ = [
    "Report",
    "ReportRow",
    "as_trial",
    "budget_cell",
    "budget_label",
    "budget_order",
    "build_report",
    "read_trials",
    "relative_metrics",
    "same_samples",
    "trial_params",
]

UPPER_BOUND = "upper bound"
MEAN_RATIO_HEADER = "mean score ratio (%)"
MISSING = "-"  # a cell without a value (LaTeX prints "--")

TrialLike = Trial | Mapping[str, Any]  # a Trial, or its stored form (``trials.config``)
Replicates = Sequence[float | None] | None  # a score's bootstrap replicates (``trials.replicates``)
TrialTuple = (
    tuple[TrialLike, str, Mapping[str, Any] | None]  # (trial, status, metrics)
    | tuple[TrialLike, str, Mapping[str, Any] | None, Replicates]  # ... and replicates
)
_Read = tuple[Trial, str, Mapping[str, Any], np.ndarray | None]
_Trials = list[_Read]  # read: metrics {} when there are none, replicates None when none

# metric names the paper-style report reads
SCORE, TFLOPS, AVG_VISUAL = "score", "tflops", "avg_visual_tokens"
FIDELITY = "fidelity_top1"  # what a random-weight model's plot shows instead of its scores
SCORE_CI = ("score_ci_low", "score_ci_high")
CI_SUFFIXES = ("_ci_low", "_ci_high")  # the CSV's interval columns: <column><suffix>


def as_trial(trial: TrialLike) -> Trial:
    """``trial`` itself, or the :class:`Trial` of a stored trial config."""
    return trial if isinstance(trial, Trial) else Trial.from_dict(trial)


def _replicates(values: Replicates) -> np.ndarray | None:
    """Stored replicates as a float array (nulls as NaN); None when there are none."""
    if values is None or len(values) == 0:
        return None
    return np.asarray(values, dtype=np.float64)


def read_trials(trials: Iterable[TrialTuple]) -> _Trials:
    """(trial, status, metrics, replicates) with the trial as a :class:`Trial`."""
    read: _Trials = []
    for trial, status, metrics, *rest in trials:
        replicates = _replicates(rest[0]) if rest and status == "finished" else None
        read.append((as_trial(trial), status, metrics or {}, replicates))
    return read


def same_samples(trial: Trial, other: Trial) -> bool:
    """Whether two trials were evaluated on the same samples (same benchmark, eval ``limit``
    and ``sample_seed``): only then are their bootstrap replicates paired."""
    return (
        trial.benchmark == other.benchmark
        and trial.eval.limit == other.eval.limit
        and trial.eval.sample_seed == other.eval.sample_seed
    )


def _samples_key(trial: Trial) -> tuple:
    """What :func:`same_samples` compares, as a key."""
    return (trial.benchmark, trial.eval.limit, trial.eval.sample_seed)


def trial_params(trial: TrialLike) -> dict[str, Any]:
    """MLflow params of a trial: the axes (None when the method does not use one) and hparams."""
    return as_trial(trial).params()


def budget_label(trial: TrialLike) -> str:
    """Short budget of a trial for run names and listings: ``64``, ``22.2%`` or ``all``."""
    trial = as_trial(trial)
    if trial.keep_tokens is not None:
        return str(trial.keep_tokens)
    if trial.keep_ratio is not None:
        return f"{100 * trial.keep_ratio:.1f}%"
    return "all"


def budget_cell(trial: TrialLike) -> str:
    """Budget as the report prints it: ``64 tokens``, ``22.2%``, or ``upper bound`` (unpruned)."""
    trial = as_trial(trial)
    if trial.keep_tokens is not None:
        return f"{trial.keep_tokens} tokens"
    if trial.keep_ratio is not None:
        return f"{100 * trial.keep_ratio:.1f}%"
    return UPPER_BOUND


def _number(value: Any) -> float | None:
    """A finite float, or None (missing, NaN or infinite)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# -- the paper-style report ---------------------------------------------------------------------
@dataclass
class ReportRow:
    """One row of the report: a model's method at one budget (and variant), over benchmarks.

    ``scores`` / ``ratios`` / ``tflops``: benchmark -> value of the finished trial (None when
    the trial is not finished or the value is undefined); ``status``: benchmark -> the trial's
    status (benchmarks without a trial for this row are absent).

    Intervals (95%, :mod:`prunelab.intervals`): ``intervals``: benchmark -> the score's
    (low, high), from the trial's ``score_ci_low`` / ``score_ci_high``; ``replicates``:
    benchmark -> the score's bootstrap replicates; ``ratio_replicates``: benchmark -> the
    paired replicate-wise score / unpruned score (trials on the same samples only);
    ``samples``: benchmark -> what identifies the trial's samples (pairing needs it equal);
    ``mean_replicates`` / ``mean_interval``: the mean ratio's replicates and interval, as
    fractions (None unless every ratio benchmark has ratio replicates; the unpruned row's mean
    ratio is 1 by definition and has none).
    """

    model: str
    method: str
    budget: str
    variant: dict[str, Any]  # variant column (layer, seed) -> value, when the sweep varies it
    is_baseline: bool
    order: tuple  # sort key within the model
    scores: dict[str, float | None] = field(default_factory=dict)
    ratios: dict[str, float | None] = field(default_factory=dict)
    tflops: dict[str, float | None] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    mean_ratio: float | None = None  # mean over the report's ratio benchmarks, as a fraction
    mean_tflops: float | None = None  # mean TFLOPs per sample over the row's benchmarks
    # visual tokens averaged over the LLM's layers, mean over the row's finished benchmarks:
    # the budget achieved (``64 tokens (avg 64.0)``)
    mean_visual: float | None = None
    visual: dict[str, float | None] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    replicates: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    ratio_replicates: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    samples: dict[str, tuple] = field(default_factory=dict, repr=False)
    mean_replicates: np.ndarray | None = field(default=None, repr=False)
    mean_interval: tuple[float, float] | None = None
    # cost columns (``Report.columns``): metric -> benchmark -> the finished trial's value
    extra_values: dict[str, dict[str, float | None]] = field(default_factory=dict)
    # metric -> mean over the row's finished benchmarks (None: none has it)
    extras: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Report:
    """The report of one sweep: rows grouped per model (in order), columns per benchmark.

    ``variant_columns``: extra row labels shown because the sweep varies them (``layer``,
    ``seed``); ``ratio_benchmarks``: the benchmarks whose unpruned score is known and non-zero,
    over which ``mean_ratio`` averages.
    """

    benchmarks: list[str]
    rows: list[ReportRow]
    variant_columns: list[str]
    ratio_benchmarks: list[str]
    # metrics printed after the mean ratio, each the row's mean over its benchmarks
    columns: list[str] = field(default_factory=list)
    # models with random weights (``source: tiny``): their scores say nothing about a method
    random_models: list[str] = field(default_factory=list)

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(row.model for row in self.rows))


def budget_order(trial: Trial) -> tuple:
    """Unpruned first, then absolute budgets, then ratios, each largest first."""
    if trial.keep_tokens is not None:
        return (1, -float(trial.keep_tokens))
    if trial.keep_ratio is not None:
        return (2, -float(trial.keep_ratio))
    return (0 if trial.is_baseline else 3, 0.0)


def _varying_hparams(trials: _Trials) -> dict[str, list[str]]:
    """Per method, the hyperparameters that take more than one value in the sweep."""
    values: dict[str, dict[str, set[str]]] = {}
    for trial, *_ in trials:
        per_method = values.setdefault(trial.method, {})
        for name, value in trial.hparams.items():
            per_method.setdefault(name, set()).add(repr(value))
    return {
        method: sorted(name for name, seen in hps.items() if len(seen) > 1)
        for method, hps in values.items()
    }


def _varies(trials: _Trials, axis: str) -> bool:
    """Whether some method runs at more than one value of ``axis`` (per model and budget)."""
    seen: dict[tuple, set] = {}
    for trial, *_ in trials:
        if trial.is_baseline:
            continue
        group = (trial.model, trial.method, budget_cell(trial))
        seen.setdefault(group, set()).add(getattr(trial, axis))
    return any(len(values) > 1 for values in seen.values())


def _sort_value(value: Any) -> tuple:
    """A variant value as a sort key: unset first, then numbers in order, then text."""
    if value is None:
        return (0, 0, "")
    if isinstance(value, (int, float)):
        return (1, value, "")
    return (2, 0, str(value))


def _models(trials: _Trials) -> list[str]:
    """The sweep's models, in order of first appearance."""
    return list(dict.fromkeys(trial.model for trial, *_ in trials))


def _interval(metrics: Mapping[str, Any]) -> tuple[float, float] | None:
    """The score's (low, high) of a trial's metrics; None unless both bounds are finite."""
    low, high = (_number(metrics.get(name)) for name in SCORE_CI)
    return None if low is None or high is None else (low, high)


def _ratio_replicates(
    trial: Trial, replicates: np.ndarray | None, baseline: _Read | None
) -> np.ndarray | None:
    """Paired replicate-wise score / unpruned score; None unless both trials have replicates
    of equal length and were evaluated on the same samples."""
    if replicates is None or baseline is None or not same_samples(trial, baseline[0]):
        return None
    return intervals.ratio_replicates(replicates, baseline[3])


def _mean_of(vectors: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """Replicate-wise mean of equally long vectors (NaN where one is NaN); None otherwise."""
    arrays = [v for v in vectors if v is not None]
    if not arrays or len(arrays) != len(vectors) or len({len(a) for a in arrays}) != 1:
        return None
    return np.stack(arrays).mean(axis=0)


DEFAULT_COLUMNS = ("tflops",)
"""Cost columns of the report by default (``prunelab report --columns`` picks others)."""


def column_problem(name: str) -> str | None:
    """Why ``name`` cannot be a report column (None: it can): a per-trial metric of
    :data:`prunelab.metrics.METRICS` that is not a family, a score or an interval bound."""
    from prunelab.metrics import METRICS

    allowed = [
        m.name for m in METRICS
        if "{" not in m.name and m.bound is None and m.name not in ("score", "score_ratio")
    ]  # fmt: skip
    if name in allowed:
        return None
    return f"unknown report column {name!r} (one of {', '.join(allowed)})"


def build_report(trials: Iterable[TrialTuple], columns: Sequence[str] = ()) -> Report:
    """The paper-style report of a sweep's trials, each given as (trial, status, metrics) or
    (trial, status, metrics, replicates). ``columns``: per-trial metrics printed after the
    mean ratio, each the row's mean over its finished benchmarks (the ``report`` command and
    the sweep's table artifacts use :data:`DEFAULT_COLUMNS`).

    Score ratios are recomputed here from each trial's score and its (model, benchmark)
    unpruned score, so they are right even for trials logged before their baseline finished.
    A row's mean ratio needs every ratio benchmark finished; otherwise it is None. Its
    interval (:func:`prunelab.intervals.mean_interval` of the per-benchmark ratio replicates)
    needs every one of them paired with its baseline.
    """
    trials = read_trials(trials)
    collected = list(dict.fromkeys([*columns, FIDELITY]))  # fidelity: random-weight plots
    benchmarks = list(dict.fromkeys(trial.benchmark for trial, *_ in trials))
    axis_of = {
        "layer": "prune_layer",
        "seed": "seed",
        "budget mode": "budget_mode",
        "vision positions": "vision_positions",
    }
    variant_columns = [label for label, axis in axis_of.items() if _varies(trials, axis)]
    hparams = _varying_hparams(trials)
    baseline_scores: dict[tuple[str, str], float | None] = {}
    baselines: dict[tuple[str, str], _Read] = {}
    for entry in trials:
        trial, status, metrics, _ = entry
        if trial.is_baseline and status == "finished":
            baseline_scores[(trial.model, trial.benchmark)] = _number(metrics.get(SCORE))
            baselines[(trial.model, trial.benchmark)] = entry

    rows: dict[tuple, ReportRow] = {}
    for trial, status, metrics, replicates in trials:
        method = trial.method
        varying = hparams.get(method, [])
        if varying:
            shown = ", ".join(f"{name}={trial.hparams[name]}" for name in varying)
            method = f"{method} ({shown})"
        variant = {label: getattr(trial, axis_of[label]) for label in variant_columns}
        budget = budget_cell(trial)
        key = (trial.model, method, budget, tuple(variant.items()))
        row = rows.get(key)
        if row is None:
            row = rows[key] = ReportRow(
                model=trial.model,
                method=method,
                budget=budget,
                variant=variant,
                is_baseline=trial.is_baseline,
                order=(
                    budget_order(trial),
                    method,
                    tuple(_sort_value(v) for v in variant.values()),
                ),
            )
        benchmark = trial.benchmark
        row.status[benchmark] = status
        finished = status == "finished"
        score = _number(metrics.get(SCORE)) if finished else None
        row.scores[benchmark] = score
        row.ratios[benchmark] = ratio(score, baseline_scores.get((trial.model, benchmark)))
        row.tflops[benchmark] = _number(metrics.get(TFLOPS)) if finished else None
        row.visual[benchmark] = _number(metrics.get(AVG_VISUAL)) if finished else None
        for column in collected:
            value = _number(metrics.get(column)) if finished else None
            row.extra_values.setdefault(column, {})[benchmark] = value
        _add_intervals(row, trial, metrics if finished else {}, replicates, baselines)

    ratio_benchmarks = [
        b for b in benchmarks if any(baseline_scores.get((m, b)) for m in _models(trials))
    ]
    for row in rows.values():
        wanted = [b for b in ratio_benchmarks if baseline_scores.get((row.model, b))]
        ratios = [row.ratios.get(b) for b in wanted]
        if wanted and all(r is not None for r in ratios):
            row.mean_ratio = statistics.fmean(r for r in ratios if r is not None)
            if not row.is_baseline:
                vectors = [row.ratio_replicates.get(b) for b in wanted]
                row.mean_replicates = _mean_of(vectors)
                row.mean_interval = intervals.mean_interval(vectors)
        costs = [t for t in row.tflops.values() if t is not None]
        row.mean_tflops = statistics.fmean(costs) if costs else None
        visual = [v for v in row.visual.values() if v is not None]
        row.mean_visual = statistics.fmean(visual) if visual else None
        for column in collected:
            known = [v for v in row.extra_values.get(column, {}).values() if v is not None]
            row.extras[column] = statistics.fmean(known) if known else None

    models = _models(trials)
    ordered = sorted(rows.values(), key=lambda r: (models.index(r.model), r.order))
    random = [m for m in models if _random_weights(trials, m)]
    return Report(benchmarks, ordered, variant_columns, ratio_benchmarks, list(columns), random)


def _random_weights(trials: _Trials, model: str) -> bool:
    """Whether ``model`` is built with random weights (a ``source: tiny`` config)."""
    return any(
        trial.model == model and trial.model_config.get("source") == "tiny" for trial, *_ in trials
    )


def _add_intervals(
    row: ReportRow,
    trial: Trial,
    metrics: Mapping[str, Any],
    replicates: np.ndarray | None,
    baselines: Mapping[tuple[str, str], _Read],
) -> None:
    """A finished trial's interval, replicates and paired ratio replicates, into its row."""
    benchmark = trial.benchmark
    row.samples[benchmark] = _samples_key(trial)
    interval = _interval(metrics) if row.scores.get(benchmark) is not None else None
    if interval is not None:
        row.intervals[benchmark] = interval
    if replicates is None or row.scores.get(benchmark) is None:
        return
    row.replicates[benchmark] = replicates
    ratios = _ratio_replicates(trial, replicates, baselines.get((trial.model, benchmark)))
    if ratios is not None:
        row.ratio_replicates[benchmark] = ratios
