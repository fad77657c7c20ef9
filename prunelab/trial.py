"""The typed trial: what the planner produces, the database stores, Ray carries to a worker, and
the worker and the reports read; and the typed result a worker sends back.

A :class:`Trial` is plain data (no torch, no Ray, no database). Its stored form is the JSON
mapping of :meth:`Trial.to_dict` (the ``trials.config`` column, ``trial.yaml`` on MLflow); that
mapping is the only place a trial is read by string key (:meth:`Trial.from_dict`). Settings a
stored trial lacks take the defaults of the Hydra schema (:class:`EvalConfig`), defined once.

``trial_key`` is the identity of a trial: a hash of its canonical axes, the method's version,
the model's revision and config, the benchmark's identity, the guidance model, the trained head
and the eval settings that change results. Keys are stable across versions of prunelab
(``tests/orchestrator/test_trial_keys.py`` plans the trials of a database an older version
wrote); a change that must alter them bumps :data:`KEY_VERSION` (see the README).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prunelab.orchestrator.config import EvalConfig

__all__ = [
    "BASELINE_METHOD",
    "KEY_VERSION",
    "Trial",
    "TrialResult",
    "canonical_json",
    "jsonable",
    "trial_key",
]

BASELINE_METHOD = "none"
"""The unpruned method: every (model, benchmark) of a sweep has its trial."""

KEY_VERSION = 2
"""Version of the ``trial_key`` recipe, hashed into every key after version 1.

1. The trial's axes, method version, model revision and config, benchmark identity, guidance
   model, trained head, and the eval settings marked ``in_key``.
2. Adds ``eval.scoring`` (lmms-eval's or the authors' rule) and the version itself: from this
   version predictions are scored, prompted and generated as lmms-eval 0.7.3 does (up to the
   benchmark's own number of new tokens), so a version-1 result is not a version-2 result
   and is not reused for one. ``trial_key(..., version=1)`` still gives the old keys.
"""


def jsonable(value: Any) -> Any:
    """Tuples as lists, recursively: the form a value takes in JSON and in a stored trial."""
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value


def canonical_json(obj: Any) -> str:
    """The one JSON text of ``obj`` that keys are hashed from (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class Trial:
    """One canonical trial; the axes its method does not use are None.

    ``key`` is :func:`trial_key` of the trial (empty only while the planner builds it).
    ``model_config`` / ``benchmark_config`` are the group files a worker builds the model and
    benchmark from; ``guidance_config`` the smaller model of guided methods (sgp, pgp);
    ``vib_head`` the trained head of methods that need one (pgp): key, stage, training config
    and, once trained, where its weights are (``uri``).
    """

    model: str
    benchmark: str
    method: str  # registered method name
    hparams: Mapping[str, Any]  # every hyperparameter of the method, defaults resolved
    keep_ratio: float | None = None
    keep_tokens: int | None = None
    prune_layer: int | None = None
    seed: int | None = None
    # how the budget counts visual tokens (prunelab.methods.BUDGET_MODES); None: the method's
    # own way, and the only value of a trial whose modes are the same (a vision stage)
    budget_mode: str | None = None
    # how the LLM numbers a vision stage's kept tokens: "packed" (consecutive, as official
    # VisionZip) or "original" (their positions in the unpruned sequence); None: the model
    # family's default, and the only value of a trial without a vision stage
    vision_positions: str | None = None
    model_config: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    benchmark_config: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    eval: EvalConfig = field(default_factory=EvalConfig, repr=False, compare=False)
    guidance_config: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    vib_head: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    key: str = ""
    preset: str = field(default="", compare=False)  # the method preset it was first reached by

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def is_baseline(self) -> bool:
        """The unpruned reference (method ``none``) of its model and benchmark."""
        return self.method == BASELINE_METHOD

    # -- stored form ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The stored form (plain JSON containers, a fresh copy): ``trials.config``."""
        data: dict[str, Any] = {
            "key": self.key,
            **self.axes(),
            "model_config": jsonable(self.model_config),
            "benchmark_config": jsonable(self.benchmark_config),
            "eval": dataclasses.asdict(self.eval),
        }
        if self.guidance_config:
            data["guidance_config"] = jsonable(self.guidance_config)
        if self.vib_head:
            data["vib_head"] = jsonable(self.vib_head)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Trial:
        """A trial from its stored form; eval settings it lacks take the schema's defaults."""
        known = {f.name for f in dataclasses.fields(EvalConfig)}
        settings = {k: v for k, v in (data.get("eval") or {}).items() if k in known}
        return cls(
            model=data["model"],
            benchmark=data["benchmark"],
            method=data["method"],
            hparams=dict(data.get("hparams") or {}),
            keep_ratio=data.get("keep_ratio"),
            keep_tokens=data.get("keep_tokens"),
            prune_layer=data.get("prune_layer"),
            seed=data.get("seed"),
            budget_mode=data.get("budget_mode"),
            vision_positions=data.get("vision_positions"),
            model_config=dict(data.get("model_config") or {}),
            benchmark_config=dict(data.get("benchmark_config") or {}),
            eval=EvalConfig(**settings),
            guidance_config=data.get("guidance_config") or None,
            vib_head=data.get("vib_head") or None,
            key=str(data.get("key") or ""),
        )

    # -- views ------------------------------------------------------------------------------
    def axes(self) -> dict[str, Any]:
        """The canonical axes (unused ones None): what ``trial_key`` hashes as ``trial``.
        ``budget_mode`` and ``vision_positions`` are there only when set (not the method's or
        the family's own way), so the keys of trials planned before those axes stay the same."""
        axes = {
            "model": self.model,
            "benchmark": self.benchmark,
            "method": self.method,
            "hparams": jsonable(self.hparams),
            "keep_ratio": self.keep_ratio,
            "keep_tokens": self.keep_tokens,
            "prune_layer": self.prune_layer,
            "seed": self.seed,
        }
        if self.budget_mode is not None:
            axes["budget_mode"] = self.budget_mode
        if self.vision_positions is not None:
            axes["vision_positions"] = self.vision_positions
        return axes

    def params(self) -> dict[str, Any]:
        """The trial's axes (unused ones None; ``budget_mode`` only when set) and
        ``method.<hp>`` per hyperparameter: the columns that tell trials apart in tables."""
        params = {k: v for k, v in self.axes().items() if k != "hparams"}
        for name, value in sorted(self.hparams.items()):
            params[f"method.{name}"] = value
        return params

    def run_params(self) -> dict[str, Any]:
        """MLflow params of its run: :meth:`params` and ``eval.<setting>`` for each eval setting
        that changes results (limit, sample seed, new tokens, scoring, FLOPs convention, ...)."""
        params = self.params()
        for name in EvalConfig.key_fields():
            params[f"eval.{name}"] = getattr(self.eval, name)
        return params

    def with_head(self, vib_head: Mapping[str, Any]) -> Trial:
        """The trial with its trained head's spec (``uri`` filled in once trained)."""
        return dataclasses.replace(self, vib_head=dict(vib_head))


def trial_key(
    trial: Trial,
    *,
    method_version: str,
    model_revision: str,
    benchmark_identity: Mapping[str, Any],
    version: int = KEY_VERSION,
) -> str:
    """The trial's identity hash (hex SHA-256), by the recipe of ``version`` (see
    :data:`KEY_VERSION`).

    Besides the trial itself it hashes what a trial config does not hold: the method's
    ``version``, the model's ``revision`` (a checkpoint's commit, or a hash of a tiny model's
    config) and the benchmark's ``describe()`` (its data files, split and scoring). The head of
    a trained method counts by its key only, not by where its weights are stored.
    """
    identity: dict[str, Any] = {
        "trial": trial.axes(),
        "method_version": str(method_version),
        "model": {"revision": model_revision, "config": jsonable(trial.model_config)},
        "benchmark": jsonable(benchmark_identity),
        "eval": {k: getattr(trial.eval, k) for k in EvalConfig.key_fields(version)},
    }
    if trial.guidance_config is not None:
        identity["guidance"] = jsonable(trial.guidance_config)
    if trial.vib_head is not None:
        identity["vib_head"] = trial.vib_head["key"]
    if version != 1:
        identity["key_version"] = version
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


@dataclass(frozen=True)
class TrialResult:
    """What a worker sends back for a finished trial.

    ``metrics``: the trial's own measurements (names in :mod:`prunelab.metrics`; metrics
    relative to the unpruned baseline are derived by the orchestrator). ``predictions``: one
    mapping per sample. ``artifacts``: files for the trial's MLflow run, relative name -> text
    or bytes (``importance/*.png``, method diagnostics). The rest says where and how it ran.
    """

    metrics: Mapping[str, float]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    artifacts: Mapping[str, str | bytes] = field(default_factory=dict)
    # bootstrap replicates of ``score`` over the trial's samples (prunelab.intervals): paired
    # with those of any trial evaluated on the same samples
    replicates: tuple[float, ...] = ()
    run_s: float = 0.0  # the trial's wall time on its worker, model load excluded
    load_s: float = 0.0  # model (and guide) loading time this trial paid
    model_loads: int = 0  # models its worker has loaded so far
    worker: str = ""
    node: str = ""
    pid: int = 0
    # what it ran on (a cluster's workers may differ): software versions ("prunelab", "torch",
    # "transformers") and the loaded model's "device", "dtype", "attn_implementation"
    environment: Mapping[str, str] = field(default_factory=dict)
    # a rescore of saved predictions (``prunelab rescore``): the MLflow run that generated them
    rescored_from: str = ""
