"""What a benchmark is to a worker: samples, a prompt, and a scorer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["AggregatingBenchmark", "Benchmark", "Sample"]


@dataclass
class Sample:
    id: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    question: str
    answers: list[str]  # accepted answers (scorer-specific meaning)
    category: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Benchmark(Protocol):
    name: str
    metric: str  # name of the headline metric, logged as `score`

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
