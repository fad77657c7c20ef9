"""What a benchmark is to a worker: samples, a prompt, a scorer and its generation settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "SCORING_RULES",
    "AggregatingBenchmark",
    "Benchmark",
    "Sample",
    "check_scoring",
    "cut_at_stops",
]

SCORING_RULES = ("lmms_eval", "official")
"""How a benchmark scores predictions: ``lmms_eval`` reproduces lmms-eval 0.7.3 (prompt,
response handling, per-sample rule and aggregation); ``official`` uses the benchmark authors'
rule where lmms-eval departs from it (and lmms-eval's elsewhere)."""


def check_scoring(scoring: object) -> str:
    """``scoring`` when it is one of :data:`SCORING_RULES`, else ValueError naming it."""
    if scoring not in SCORING_RULES:
        raise ValueError(f"scoring={scoring!r}: expected one of {', '.join(SCORING_RULES)}")
    return str(scoring)


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of each stop string (lmms-eval's rule for a task's
    ``generation_kwargs.until``: ``text.split(term)[0]`` for each non-empty term)."""
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


@dataclass
class Sample:
    id: str
    # (H, W, 3) uint8 RGB, or an object that decodes to it (``np.asarray(sample.image)``; the
    # lmms-eval benchmarks keep each image encoded until it is prepared: EncodedImage)
    image: Any
    question: str
    answers: list[str]  # accepted answers (scorer-specific meaning)
    category: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    unit: str = ""
    """The resampling unit for bootstrap intervals: samples sharing a unit are scored together
    (the MME image whose two questions make acc+, the MMBench question whose circular variants
    must all be right) and are resampled together; "" means the sample is its own unit."""


class Benchmark(Protocol):
    name: str
    metric: str  # name of the headline metric, logged as `score`
    scoring: str  # one of SCORING_RULES
    max_new_tokens: int  # generation budget per sample unless eval.max_new_tokens overrides it
    until: tuple[str, ...]  # stop strings: the prediction is cut at the first (cut_at_stops)

    def samples(self, limit: int | None, seed: int) -> list[Sample]: ...

    def score(self, prediction: str, sample: Sample) -> float: ...

    def describe(self) -> dict[str, Any]:
        """What identifies the data (split, version): part of the trial key."""
        ...


class AggregatingBenchmark(Benchmark, Protocol):
    """A benchmark whose official metrics are not per-sample means (MME acc+, POPE F1, ...).

    Optional on top of :class:`Benchmark`: the runner calls ``aggregate`` when a benchmark has
    it (else ``score`` = 100 x mean per-sample score, ``score.<category>`` likewise), and
    ``check`` in sweep validation, before anything runs.
    """

    def aggregate(self, results: Sequence[tuple[Sample, str, float]]) -> dict[str, float]:
        """From (sample, prediction, per-sample score) of every sample: the headline ``score``,
        ``score.<category>`` per category and any extra metrics (e.g. ``pope_f1``)."""
        ...

    def check(self) -> None:
        """Raise ValueError naming the path when the data is missing or malformed."""
        ...
