"""What a benchmark is to a worker: samples, a prompt, and a scorer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["Benchmark", "Sample"]


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
