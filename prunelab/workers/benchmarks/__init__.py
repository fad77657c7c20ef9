"""Benchmarks a worker can evaluate, built from a benchmark config (``sweeps/benchmark/*.yaml``)."""

from __future__ import annotations

from typing import Any

from prunelab.workers.benchmarks.base import Benchmark, Sample
from prunelab.workers.benchmarks.lmms import KINDS as LMMS_KINDS
from prunelab.workers.benchmarks.shapes import ShapesBenchmark

__all__ = ["KINDS", "Benchmark", "Sample", "build_benchmark"]

KINDS: dict[str, type] = {"shapes": ShapesBenchmark, **LMMS_KINDS}
"""Benchmark classes by config ``kind``: the synthetic ``shapes`` and the lmms-eval parquet ones."""


def build_benchmark(cfg: dict[str, Any]) -> Benchmark:
    """Build from a config ``{name, kind, ...kind options}``; raises ValueError on bad input."""
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    if kind not in KINDS:
        raise ValueError(f"benchmark kind={kind!r}: expected one of {', '.join(sorted(KINDS))}")
    try:
        return KINDS[kind](**cfg)
    except TypeError as exc:
        raise ValueError(f"benchmark {cfg.get('name')!r}: {exc}") from None
