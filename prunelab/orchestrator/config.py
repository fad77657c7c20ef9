"""Typed schema of a sweep spec: every default of a sweep and of a trial's eval settings is
defined here, once.

The dataclasses are registered in Hydra's :class:`~hydra.core.config_store.ConfigStore` as
``sweep_schema``, and their defaults as the config ``base`` that every spec starts from
(``defaults: [base, _self_]``; a spec directory may shadow it with its own ``base.yaml``).
:mod:`prunelab.orchestrator.spec` checks each section of a composed spec against its dataclass
(``OmegaConf.structured(EvalConfig)`` merged key by key, so each bad value gets its own line).
Value ranges that a type cannot express are listed in :func:`range_problems`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

__all__ = [
    "BASE_NAME",
    "FLOPS_CONVENTIONS",
    "SCHEMA_NAME",
    "EvalConfig",
    "SweepConfig",
    "WorkersConfig",
    "base_config",
    "range_problems",
    "register_schema",
]

FLOPS_CONVENTIONS = ("fastv", "pdrop", "exact")
"""FLOPs formulas a sweep can report (see DESIGN.md §5)."""

SCHEMA_NAME = "sweep_schema"
"""Name of :class:`SweepConfig` in Hydra's ConfigStore."""
BASE_NAME = "base"
"""Name of the defaults every spec starts from (``defaults: [base, _self_]``)."""


_IN_KEY = {"in_key": True}  # a setting that changes a trial's results: part of its key


@dataclass(frozen=True)
class EvalConfig:
    """How each trial is evaluated; a trial carries its own copy (``Trial.eval``)."""

    # samples per trial (seeded subset of the split); None: all
    limit: int | None = field(default=64, metadata=_IN_KEY)
    sample_seed: int = field(default=0, metadata=_IN_KEY)  # which samples `limit` picks
    max_new_tokens: int = field(default=4, metadata=_IN_KEY)  # greedy decoding budget per sample
    warmup: int = 2  # untimed forwards before timing
    # compare first-token distributions with the unpruned model
    fidelity: bool = field(default=True, metadata=_IN_KEY)
    flops_convention: str = field(default="pdrop", metadata=_IN_KEY)  # one of FLOPS_CONVENTIONS
    heatmaps: int = 2  # samples per trial with an importance heatmap artifact (0: none)

    @classmethod
    def key_fields(cls) -> tuple[str, ...]:
        """The settings that change a trial's results, hence part of its key (not warmup)."""
        return tuple(f.name for f in fields(cls) if f.metadata.get("in_key"))


@dataclass(frozen=True)
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


def base_config() -> dict[str, Any]:
    """The defaults of a sweep spec as plain containers: the ``base`` config."""
    return {
        "name": MISSING,
        "grid": {},
        "eval": dataclasses.asdict(EvalConfig()),
        "workers": dataclasses.asdict(WorkersConfig()),
        "stages": {},
    }


def register_schema() -> None:
    """Store :class:`SweepConfig` in Hydra's ConfigStore as ``sweep_schema``, and its defaults
    as ``base`` (a plain mapping, so that compose merges overrides into it; idempotent)."""
    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=SweepConfig)
    store.store(name=BASE_NAME, node=base_config())


register_schema()
