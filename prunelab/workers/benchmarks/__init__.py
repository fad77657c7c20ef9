"""Benchmarks a worker can evaluate, built from a benchmark config (``sweeps/benchmark/*.yaml``).

Each benchmark class joins :data:`BENCHMARKS` under its ``kind`` with ``@register_benchmark``
in its own module; importing this package imports every module in it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, TypeVar

from prunelab.registry import Registry, did_you_mean
from prunelab.workers.benchmarks.base import SCORING_RULES, Benchmark, Sample, check_scoring

__all__ = [
    "BENCHMARKS",
    "SCORING_RULES",
    "Benchmark",
    "Sample",
    "build_benchmark",
    "register_benchmark",
]

BENCHMARKS: Registry[type] = Registry("benchmark kind")
"""Benchmark classes by config ``kind``: the synthetic ``shapes`` and the lmms-eval parquet ones."""

B = TypeVar("B", bound=type)


def register_benchmark(cls: B) -> B:
    """Class decorator: register a benchmark class under its ``kind`` class attribute."""
    return BENCHMARKS.add(cls.kind, cls)


def build_benchmark(cfg: dict[str, Any]) -> Benchmark:
    """Build from a config ``{name, kind, ...kind options}``; raises ValueError on bad input.

    ``scoring`` (one of :data:`SCORING_RULES`, default ``lmms_eval``) is a key every benchmark
    takes: the runner adds the trial's ``eval.scoring`` to the benchmark's config.
    """
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    if kind not in BENCHMARKS:
        known = BENCHMARKS.names()
        hint = did_you_mean(kind, known) if isinstance(kind, str) else ""
        raise ValueError(f"benchmark kind={kind!r}: expected one of {', '.join(known)}{hint}")
    if "scoring" in cfg:
        try:
            check_scoring(cfg["scoring"])
        except ValueError as exc:
            raise ValueError(f"benchmark {cfg.get('name')!r}: {exc}") from None
    try:
        return BENCHMARKS.get(kind)(**cfg)
    except TypeError as exc:
        raise ValueError(f"benchmark {cfg.get('name')!r}: {exc}") from None


for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "scoring"):
        importlib.import_module(f"{__name__}.{_module.name}")
