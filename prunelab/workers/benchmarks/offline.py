"""Scoring saved model outputs without a model: the engine of ``prunelab score BENCHMARK ROWS``.

Each row is one sample as a JSON object: the benchmark's dataset columns as in its parquet
files (the image may be left out: neither the prompt nor the score reads it), plus ``id`` and
``prediction`` (the model's raw output). :func:`score_rows` cuts each prediction at the
benchmark's ``until`` strings, builds the sample exactly as from the parquet files
(:meth:`~prunelab.workers.benchmarks.lmms.ParquetBenchmark.sample_from_row`, so the prompt is
the one a trial shows), scores it and aggregates, with the metric names a trial logs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prunelab.workers.benchmarks import BENCHMARKS, build_benchmark
from prunelab.workers.benchmarks.base import Sample, cut_at_stops
from prunelab.workers.benchmarks.lmms import ColumnError, ParquetBenchmark
from prunelab.workers.benchmarks.resampling import score_summary

__all__ = ["ROW_COLUMNS", "RowError", "ScoredRows", "score_rows"]

ROW_COLUMNS = ("id", "prediction")
"""Columns every row has besides the benchmark's own."""


class RowError(ValueError):
    """A row that cannot be scored; the message is one line naming the line and the column,
    e.g. ``line 3: missing column 'answer' (textvqa rows need ...)``."""


@dataclass(frozen=True)
class ScoredRows:
    """Per row ``{"id", "score", "prompt", "prediction", "category"}`` (``score`` 0 to 1, as a
    trial's predictions carry it; ``prediction`` cut at ``until``), and the metrics a trial
    logs for these samples (``score``, ``score.<category>``, the benchmark's extras,
    ``score_ci_low`` / ``score_ci_high``)."""

    samples: list[dict[str, Any]]
    metrics: dict[str, float]


def _benchmark(config: Mapping[str, Any], scoring: str) -> ParquetBenchmark:
    """The benchmark of ``config`` under ``scoring``; its files are never read."""
    kind = config.get("kind")
    cls = BENCHMARKS.get(kind) if isinstance(kind, str) and kind in BENCHMARKS else None
    if cls is not None and not issubclass(cls, ParquetBenchmark):
        raise ValueError(f"benchmark kind {kind!r} has no dataset rows to score offline")
    cfg = {"path": "<rows>", **config, "scoring": scoring}  # a path is required, not used
    benchmark = build_benchmark(cfg)  # an unknown kind: its ValueError
    assert isinstance(benchmark, ParquetBenchmark)
    return benchmark


def _columns_hint(benchmark: ParquetBenchmark) -> str:
    return f"({benchmark.kind} rows need {', '.join((*ROW_COLUMNS, *benchmark.required))})"


def _row_sample(
    benchmark: ParquetBenchmark, line: int, row: Any, seen: dict[str, int]
) -> tuple[Sample, str]:
    """The sample and the cut prediction of one row; RowError when it cannot be read."""
    if not isinstance(row, Mapping):
        raise RowError(f"line {line}: expected a JSON object, got {type(row).__name__}")
    for column in (*ROW_COLUMNS, *benchmark.required):
        if column not in row:
            raise RowError(f"line {line}: missing column {column!r} {_columns_hint(benchmark)}")
    prediction, sample_id = row["prediction"], row["id"]
    if not isinstance(prediction, str):
        kind = "null" if prediction is None else type(prediction).__name__
        raise RowError(f"line {line}: column 'prediction': expected text, got {kind}")
    if not isinstance(sample_id, (str, int)) or isinstance(sample_id, bool):
        raise RowError(f"line {line}: column 'id': expected text or an integer, got {sample_id!r}")
    sample_id = str(sample_id)
    if sample_id in seen:
        raise RowError(f"line {line}: column 'id': {sample_id!r} is also on line {seen[sample_id]}")
    seen[sample_id] = line
    try:
        sample = benchmark.sample_from_row(row, sample_id)
    except ColumnError as exc:
        raise RowError(f"line {line}: {exc}") from None
    return sample, cut_at_stops(prediction, benchmark.until)


def score_rows(
    config: Mapping[str, Any], rows: Iterable[tuple[int, Any]], scoring: str
) -> ScoredRows:
    """Score ``rows`` — ``(line number, parsed JSON object)`` pairs — of the benchmark whose
    yaml config is ``config`` under ``scoring`` (``lmms_eval`` or ``official``).

    Raises :class:`RowError` (one line: ``line N: ...`` naming the column) for a row that is
    not an object, lacks a column, repeats an id or holds a value the benchmark cannot read;
    ValueError for a bad config or scoring, or when there are no rows.
    """
    benchmark = _benchmark(config, scoring)
    seen: dict[str, int] = {}
    results = []
    for line, row in rows:
        sample, prediction = _row_sample(benchmark, line, row, seen)
        results.append((sample, prediction, benchmark.score(prediction, sample)))
    if not results:
        raise ValueError("no rows to score")
    samples = [
        {
            "id": s.id,
            "score": score,
            "prompt": s.question,
            "prediction": prediction,
            "category": s.category,
        }
        for s, prediction, score in results
    ]
    metrics, _ = score_summary(benchmark, results)  # as a trial logs them, intervals included
    return ScoredRows(samples=samples, metrics=metrics)
