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
import math
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import MISSING

__all__ = [
    "BASE_NAME",
    "FLOPS_CONVENTIONS",
    "RAY_PRECISION",
    "SCHEMA_NAME",
    "SCORING_RULES",
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
# ... added to the key by trial-key version 2 (keys of version 1 do not hash it)
_IN_KEY_V2 = {"in_key": True, "since": 2}

SCORING_RULES = ("lmms_eval", "official")
"""``eval.scoring``: lmms-eval 0.7.3's rule for each benchmark, or the benchmark authors' where
they differ (listed in the README)."""


@dataclass(frozen=True)
class EvalConfig:
    """How each trial is evaluated; a trial carries its own copy (``Trial.eval``)."""

    # samples per trial (seeded subset of the split); None: all
    limit: int | None = field(default=64, metadata=_IN_KEY)
    sample_seed: int = field(default=0, metadata=_IN_KEY)  # which samples `limit` picks
    # greedy decoding budget per sample; None: the benchmark's (lmms-eval's generation_kwargs)
    max_new_tokens: int | None = field(default=None, metadata=_IN_KEY)
    # how predictions are scored: one of SCORING_RULES
    scoring: str = field(default="lmms_eval", metadata=_IN_KEY_V2)
    warmup: int = 2  # untimed forwards before timing
    # latency (prefill_ms, decode_ms_per_token, latency_ms) is measured at batch 1 on the
    # first `timed_samples` samples of a trial (the benchmark's deterministic order), each run
    # whole (vision tower included, never from the worker's cache); not part of the key
    timed_samples: int = 32
    # samples per prefill and greedy decode after the timed subset (each with its own pruning
    # selection; families and methods that cannot batch run at 1): an int >= 1, or "auto"
    # (on a GPU from its free memory, up to 64; on a CPU 8); same outputs, so not in the key
    batch_size: Any = 1
    # compare first-token distributions with the unpruned model
    fidelity: bool = field(default=True, metadata=_IN_KEY)
    flops_convention: str = field(default="pdrop", metadata=_IN_KEY)  # one of FLOPS_CONVENTIONS
    heatmaps: int = 2  # samples per trial with an importance heatmap artifact (0: none)

    @classmethod
    def key_fields(cls, version: int | None = None) -> tuple[str, ...]:
        """The settings that change a trial's results, hence part of its key (not warmup);
        with ``version``, those that trial-key version hashes."""
        hashed = [f for f in fields(cls) if f.metadata.get("in_key")]
        if version is not None:
            hashed = [f for f in hashed if f.metadata.get("since", 1) <= version]
        return tuple(f.name for f in hashed)


@dataclass(frozen=True)
class WorkersConfig:
    """The pool of Ray actors that run the trials."""

    count: int = 2  # actors, each holding one loaded model
    gpus_per_worker: float = 0.0  # fractions allowed on a GPU cluster
    cpus_per_worker: float = 1.0
    max_attempts: int = 3  # tries per trial before it is marked failed
    trial_timeout_s: float | None = None  # a trial running longer: worker killed and replaced
    # no worker placed for this long (none running): the sweep stops, resumable; None: wait on
    placement_timeout_s: float | None = 300.0
    # each worker's cache of prepared inputs and vision-tower outputs shared by the trials of
    # a model and benchmark (prunelab.workers.caches), in MiB of CPU memory; 0: off
    vision_cache_mb: float = 2048.0


@dataclass
class SweepConfig:
    """A whole sweep spec after composition (``defaults`` already applied by Hydra)."""

    name: str = MISSING
    grid: dict[str, Any] = field(default_factory=dict)  # axis -> value in override grammar
    eval: EvalConfig = field(default_factory=EvalConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    # training stages run before the trials that consume them (pgp's VIB heads): name -> settings
    stages: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Range:
    """The numbers a setting accepts: from ``low`` (excluded when ``open_low``) upwards."""

    low: float
    open_low: bool = False

    def problem(self, value: float) -> str | None:
        if self.open_low and not value > self.low:
            return f"must be > {self.low:g}"
        if not self.open_low and not value >= self.low:
            return f"must be >= {self.low:g}"
        return None


_RANGES: dict[str, dict[str, _Range]] = {
    "eval": {
        "limit": _Range(1),
        "sample_seed": _Range(0),  # numpy's generators take no negative seed
        "max_new_tokens": _Range(1),
        "warmup": _Range(0),
        "timed_samples": _Range(1),
        "heatmaps": _Range(0),
    },
    "workers": {
        "count": _Range(1),
        "gpus_per_worker": _Range(0),
        "cpus_per_worker": _Range(0, open_low=True),
        "max_attempts": _Range(1),
        "trial_timeout_s": _Range(0, open_low=True),
        "placement_timeout_s": _Range(0, open_low=True),
        "vision_cache_mb": _Range(0),
    },
}
_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "eval": {"flops_convention": FLOPS_CONVENTIONS, "scoring": SCORING_RULES},
}
RAY_PRECISION = 0.0001
"""The smallest fraction of a CPU or GPU Ray can reserve."""


def _ray_quantity_problem(key: str, value: float) -> str | None:
    """What Ray would refuse in a worker's CPU or GPU request (its own rules)."""
    if 0 < value < RAY_PRECISION:
        zero = "0 or " if key == "gpus_per_worker" else ""
        return f"must be {zero}at least {RAY_PRECISION:g} (the precision of Ray's resources)"
    if key == "gpus_per_worker" and value > 1 and not float(value).is_integer():
        return "more than one GPU must be a whole number (a fraction shares one GPU)"
    return None


def _batch_size_problem(value: Any) -> str | None:
    """What is wrong with ``value`` as ``eval.batch_size`` (None: nothing)."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return None
    return "must be an integer >= 1 or auto"


def range_problems(section: str, values: dict[str, Any]) -> dict[str, str]:
    """Range checks of an already type-checked ``eval`` or ``workers`` section: every number
    finite, each within its range, each choice one of its options.

    Returns ``{key: what is wrong}`` for each value out of range (empty when all are fine).
    """
    problems: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            problems[key] = "must be a finite number"
    for key, allowed in _RANGES.get(section, {}).items():
        value = values.get(key)
        if value is None or key in problems:
            continue
        problem = allowed.problem(value)
        if problem is None and key in ("cpus_per_worker", "gpus_per_worker"):
            problem = _ray_quantity_problem(key, value)
        if problem is not None:
            problems[key] = problem
    if section == "eval" and "batch_size" in values and "batch_size" not in problems:
        problem = _batch_size_problem(values["batch_size"])
        if problem is not None:
            problems["batch_size"] = problem
    for key, options in _CHOICES.get(section, {}).items():
        if key in values and values[key] not in options:
            problems[key] = f"must be one of {', '.join(options)}"
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
    as ``base`` (a plain mapping, so that compose merges overrides into it; idempotent).
    Called by :mod:`prunelab.orchestrator.spec.compose`, the one user of Hydra: the commands
    that read stored trials (``status``, ``report``) do not import Hydra."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=SweepConfig)
    store.store(name=BASE_NAME, node=base_config())
