"""Typed schema of a sweep spec (``prunelab/sweeps/base.yaml`` is its YAML counterpart).

The dataclasses are registered in Hydra's :class:`~hydra.core.config_store.ConfigStore` as
``sweep_schema`` and used by :mod:`prunelab.orchestrator.spec` to check the types of a composed
spec (``OmegaConf.structured(SweepConfig)`` merged with the composed config). Value ranges that
a type cannot express are listed in :func:`range_problems`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

__all__ = [
    "FLOPS_CONVENTIONS",
    "SCHEMA_NAME",
    "EvalConfig",
    "SweepConfig",
    "WorkersConfig",
    "range_problems",
    "register_schema",
]

FLOPS_CONVENTIONS = ("fastv", "pdrop", "exact")
"""FLOPs formulas a sweep can report (see DESIGN.md §5)."""

SCHEMA_NAME = "sweep_schema"
"""Name of :class:`SweepConfig` in Hydra's ConfigStore."""


@dataclass
class EvalConfig:
    """How each trial is evaluated."""

    limit: int | None = 64  # samples per trial (seeded subset of the split); None: all
    sample_seed: int = 0  # which samples `limit` picks
    max_new_tokens: int = 4  # greedy decoding budget per sample
    warmup: int = 2  # untimed forwards before timing
    fidelity: bool = True  # compare first-token distributions with the unpruned model
    flops_convention: str = "pdrop"  # one of FLOPS_CONVENTIONS
    heatmaps: int = 2  # samples per trial with an importance heatmap artifact (0: none)


@dataclass
class WorkersConfig:
    """The pool of Ray actors that run the trials."""

    count: int = 2  # actors, each holding one loaded model
    gpus_per_worker: float = 0.0  # fractions allowed on a GPU cluster
    cpus_per_worker: float = 1.0
    max_attempts: int = 3  # tries per trial before it is marked failed
    trial_timeout_s: float | None = None  # a trial running longer: worker killed and replaced


@dataclass
class SweepConfig:
    """A whole sweep spec after composition (``defaults`` already applied by Hydra)."""

    name: str = MISSING
    grid: dict[str, Any] = field(default_factory=dict)  # axis -> value in override grammar
    eval: EvalConfig = field(default_factory=EvalConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    # training stages run before the trials that consume them (pgp's VIB heads): name -> settings
    stages: dict[str, Any] = field(default_factory=dict)


def range_problems(section: str, values: dict[str, Any]) -> dict[str, str]:
    """Range checks of an already type-checked ``eval`` or ``workers`` section.

    Returns ``{key: what is wrong}`` for each value out of range (empty when all are fine).
    """
    minimum: dict[str, dict[str, float]] = {
        "eval": {"limit": 1, "max_new_tokens": 1, "warmup": 0},
        "workers": {
            "count": 1,
            "gpus_per_worker": 0,
            "cpus_per_worker": 0,
            "max_attempts": 1,
            "trial_timeout_s": 0,
        },
    }
    problems: dict[str, str] = {}
    for key, lowest in minimum.get(section, {}).items():
        value = values.get(key)
        if value is None:
            continue
        if key in ("cpus_per_worker", "trial_timeout_s") and value <= lowest:
            problems[key] = "must be > 0"
        elif value < lowest:
            problems[key] = f"must be >= {lowest}"
    if section == "eval" and values.get("flops_convention") not in FLOPS_CONVENTIONS:
        problems["flops_convention"] = f"must be one of {', '.join(FLOPS_CONVENTIONS)}"
    return problems


def register_schema() -> None:
    """Store :class:`SweepConfig` in Hydra's ConfigStore as ``sweep_schema`` (idempotent)."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=SweepConfig)


register_schema()
