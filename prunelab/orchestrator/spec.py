"""Sweep specs: compose with Hydra, expand the grid, canonicalise and validate every trial.

A spec is a Hydra config (``defaults: [base, _self_]``) whose ``grid`` maps axes to values in
Hydra's override grammar. :func:`load_sweep` turns a spec plus command-line overrides into a
:class:`SweepPlan`: one :class:`TrialSpec` per distinct trial, each with a stable ``trial_key``.
Every problem found on the way is collected and raised together as a :class:`SpecError`, before
anything runs.

Command-line overrides are split in two. One whose key is a grid axis (``model``, ``benchmark``,
``method``, ``keep_ratio``, ``keep_tokens``, ``prune_layer``, ``seed``, ``method.<hp>``, or any of
these written ``grid.<axis>``) replaces that axis of the spec's grid; ``keep_ratio`` and
``keep_tokens`` are one budget, so a budget given on the command line replaces either budget axis
of the spec. ``~axis`` removes an axis. Every other override (``eval.limit=4``, ``name=x``) goes
to Hydra's compose.

Config groups (``model/``, ``benchmark/``, ``method/``) are looked up in the spec file's directory
first, then in the package's ``prunelab/sweeps``; a method with no preset file is used with its
default hyperparameters when it is registered.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import threading
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override, QuotedString
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import prunelab.methods as M
from prunelab import sweeps
from prunelab.orchestrator.config import (
    EvalConfig,
    SweepConfig,
    WorkersConfig,
    range_problems,
)
from prunelab.orchestrator.vib_stage import STAGE_DEFAULTS, head_spec, stage_problems
from prunelab.sweeps import SWEEPS_DIR
from prunelab.workers.benchmarks import build_benchmark
from prunelab.workers.models import ModelInfo, describe_model

__all__ = [
    "AXES",
    "BASELINE_METHOD",
    "BUDGET_AXES",
    "DEFAULT_SEED",
    "GROUPS",
    "RESULT_EVAL_KEYS",
    "SWEEPS_DIR",
    "SpecError",
    "SweepPlan",
    "TrialSpec",
    "group_names",
    "load_sweep",
    "sweep_names",
]


GROUPS = ("model", "benchmark", "method")
"""Config groups; the grid axes of the same names take their file names as values."""

BUDGET_AXES = ("keep_ratio", "keep_tokens")
AXES = (*GROUPS, *BUDGET_AXES, "prune_layer", "seed")
"""Grid axes besides ``method.<hyperparameter>``."""

HPARAM_PREFIX = "method."
BASELINE_METHOD = "none"
"""The unpruned method: added for every (model, benchmark) of a sweep."""
DEFAULT_SEED = 0
"""Seed of a method that uses one when the grid has no ``seed`` axis."""

RESULT_EVAL_KEYS = ("limit", "sample_seed", "max_new_tokens", "fidelity", "flops_convention")
"""Eval settings that change a trial's results, hence part of its key (not warmup, workers)."""

COMMAND_LINE = "from the command line"
_BASE_SPEC = "base"
_ABSENT = object()
_HYDRA_LOCK = threading.Lock()  # Hydra's global state is process-wide


class SpecError(ValueError):
    """A sweep spec or its overrides are invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class TrialSpec:
    """One canonical trial: the axes its method does not use are None."""

    key: str
    model: str
    benchmark: str
    method: str  # registered method name
    hparams: dict[str, Any]  # every hyperparameter of the method, defaults resolved
    keep_ratio: float | None
    keep_tokens: int | None
    prune_layer: int | None
    seed: int | None
    is_baseline: bool  # the unpruned reference (method ``none``) of its model and benchmark
    preset: str = ""  # the method preset (``method/<preset>.yaml``) it was first reached by
    model_config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    benchmark_config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    eval: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # the guidance model's config, for methods that need one (sgp)
    guidance_config: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    # the trained head of methods that need one (pgp): key, stage and training config
    vib_head: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def __hash__(self) -> int:
        return hash(self.key)

    def config(self) -> dict[str, Any]:
        """Everything a worker needs to run the trial (plain containers, a fresh copy)."""
        return copy.deepcopy(
            {
                "key": self.key,
                "model": self.model,
                "benchmark": self.benchmark,
                "method": self.method,
                "hparams": self.hparams,
                "keep_ratio": self.keep_ratio,
                "keep_tokens": self.keep_tokens,
                "prune_layer": self.prune_layer,
                "seed": self.seed,
                "model_config": self.model_config,
                "benchmark_config": self.benchmark_config,
                "eval": self.eval,
                **({"guidance_config": self.guidance_config} if self.guidance_config else {}),
                **({"vib_head": self.vib_head} if self.vib_head else {}),
            }
        )

    def params(self) -> dict[str, Any]:
        """MLflow params: the axes (unused ones None) and ``method.<hp>`` per hyperparameter."""
        params: dict[str, Any] = {
            "model": self.model,
            "benchmark": self.benchmark,
            "method": self.method,
            "keep_ratio": self.keep_ratio,
            "keep_tokens": self.keep_tokens,
            "prune_layer": self.prune_layer,
            "seed": self.seed,
        }
        for name, value in self.hparams.items():
            params[HPARAM_PREFIX + name] = value
        return params


@dataclass
class SweepPlan:
    """A validated sweep: its composed spec and its distinct trials (baselines first)."""

    name: str
    spec: dict[str, Any]  # the composed config, grid as effectively used (overrides applied)
    spec_yaml: str
    trials: list[TrialSpec]
    models: dict[str, dict[str, Any]]  # model name -> model config (group file)
    benchmarks: dict[str, dict[str, Any]]  # benchmark name -> benchmark config (group file)
    eval: dict[str, Any]
    workers: dict[str, Any]
    model_infos: dict[str, ModelInfo] = field(default_factory=dict, repr=False)


# -- shipped configs -------------------------------------------------------------------------
def sweep_names() -> list[str]:
    """Names of the specs shipped in ``prunelab/sweeps`` (``base`` is not a spec)."""
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml") if p.stem != _BASE_SPEC)


def group_names(group: str) -> list[str]:
    """Names of the configs of ``group`` (model, benchmark or method) shipped in the package."""
    if group not in GROUPS:
        raise ValueError(f"unknown config group {group!r}; expected one of {', '.join(GROUPS)}")
    return sweeps.group_names(group)


# -- small helpers ---------------------------------------------------------------------------
class _Problems:
    """Problem lines in the order found, each once."""

    def __init__(self) -> None:
        self._lines: dict[str, None] = {}

    def add(self, line: str) -> None:
        self._lines[line] = None

    def __bool__(self) -> bool:
        return bool(self._lines)

    def lines(self) -> list[str]:
        return list(self._lines)


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(set(candidates)), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _show(value: Any) -> str:
    """A value as a user would write it in an override."""
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """All of an exception's message on one line (shortened past ``limit`` characters)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scalar_text(value: Any) -> str:
    """A YAML scalar as override-grammar text (``null``, ``true``, ``0.5``, ``a,b``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    """A parsed override element with quoted strings unwrapped (recursively)."""
    if isinstance(value, QuotedString):
        return value.text
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def _jsonable(value: Any) -> Any:
    """Tuples as lists, recursively: the form a value takes in JSON and in a trial config."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _float_not_int(annotation: Any) -> bool:
    """True when a field annotated ``annotation`` takes floats but not ints (``float | None``)."""
    if annotation is float:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return float in args and int not in args
    return False


def _plan_problem(
    method: M.PruningMethod,
    info: ModelInfo,
    ratio: float | None,
    tokens: int | None,
    layer: int | None,
    seed: int | None,
) -> str | None:
    """Why ``method`` cannot plan a trial on a model shaped like ``info`` (None: it can)."""
    budget = M.Budget(keep_ratio=ratio, keep_tokens=tokens) if method.uses_budget else None
    context = M.PlanContext(info.n_visual, info.n_layers, budget, layer, seed or 0, info.family)
    try:
        method.plan(context)
    except ValueError as exc:
        return _first_line(exc)
    return None


def _canonical_hparams(method: M.PruningMethod) -> dict[str, Any]:
    """Every hyperparameter of a built method; ints given to float fields become floats."""
    hints = typing.get_type_hints(type(method))
    values: dict[str, Any] = {}
    for f in dataclasses.fields(method):
        value = getattr(method, f.name)
        if _is_int(value) and _float_not_int(hints.get(f.name)):
            value = float(value)
        values[f.name] = _jsonable(value)
    return values


# -- the spec file ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _SpecSource:
    """Where a spec lives and how problem lines name it."""

    path: Path
    shown: str  # e.g. "sweeps/quickstart.yaml" or the path as the user gave it
    group_dirs: tuple[tuple[Path, str], ...]  # (directory, shown prefix), first wins

    @property
    def in_grid(self) -> str:
        return f"in {self.shown} grid"


def _locate_spec(spec: str) -> _SpecSource:
    """Resolve a spec argument: a shipped spec's name, or a path to a YAML file."""
    shipped = sweep_names()
    package_groups = ((SWEEPS_DIR, "sweeps"),)
    if spec in shipped and "/" not in spec:
        return _SpecSource(SWEEPS_DIR / f"{spec}.yaml", f"sweeps/{spec}.yaml", package_groups)
    path = Path(spec)
    if not path.is_file():
        if path.suffix or "/" in spec:
            raise SpecError([f"spec file {spec} not found"])
        raise SpecError(
            [
                f"unknown sweep spec {spec!r}: not a file, nor a spec shipped in prunelab/sweeps"
                f"{_did_you_mean(spec, shipped)} (shipped: {', '.join(shipped) or 'none'})"
            ]
        )
    if path.suffix != ".yaml":
        raise SpecError([f"spec file {spec}: Hydra reads only files ending in .yaml"])
    resolved = path.resolve()
    if resolved.parent == SWEEPS_DIR:
        return _SpecSource(resolved, spec, package_groups)
    return _SpecSource(resolved, spec, ((resolved.parent, str(path.parent)), *package_groups))


def _read_yaml(path: Path, shown: str) -> tuple[dict[str, Any] | None, str | None]:
    """A YAML mapping as plain containers, or a problem line (with the YAML error's line)."""
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        context, problem = getattr(exc, "context", None), getattr(exc, "problem", None)
        what = " ".join(p for p in (context, problem) if p) or _first_line(exc)
        return None, f"{shown}: malformed YAML{where}: {what}"
    except (OSError, OmegaConfBaseException) as exc:
        return None, f"{shown}: cannot read: {_first_line(exc)}"
    if not isinstance(loaded, DictConfig):
        return None, f"{shown}: must be a YAML mapping (key: value), not a list"
    try:
        data = OmegaConf.to_container(loaded, resolve=True)
    except OmegaConfBaseException as exc:
        return None, f"{shown}: {_first_line(exc)}"
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}, None


def _compose(source: _SpecSource, overrides: Sequence[str]) -> DictConfig:
    """Compose the spec with Hydra; the package's sweeps dir is on the search path for ``base``."""
    extra: list[str] = []
    if source.path.parent != SWEEPS_DIR:
        quoted = f"file://{SWEEPS_DIR}".replace("\\", "\\\\").replace("'", "\\'")
        extra.append(f"hydra.searchpath=['{quoted}']")
    with _HYDRA_LOCK:
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(source.path.parent), version_base=None):
                return compose(config_name=source.path.stem, overrides=[*extra, *overrides])
        finally:
            GlobalHydra.instance().clear()


def _dotted_paths(tree: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(value, dict) and key != "grid":
            paths.extend(_dotted_paths(value, path + "."))
    return paths


def _has_path(tree: dict[str, Any], dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


# -- grid axes -------------------------------------------------------------------------------
@dataclass
class _Axis:
    """One grid axis as written, where it came from, and its expanded values."""

    name: str
    text: str  # the value in override grammar
    stored: Any  # what the plan's spec records as the value
    where: str
    override: Override | None  # None: a YAML list/mapping taken as one value
    values: list[Any] = field(default_factory=list)

    def label(self, value: Any = _ABSENT) -> str:
        shown = self.text if value is _ABSENT else _show(value)
        return f"{self.name}={shown} {self.where}"


def _is_axis_key(key: str) -> bool:
    return key in AXES or key.startswith(HPARAM_PREFIX) or key.startswith("grid.")


def _axis_name(key: str) -> str:
    return key[len("grid.") :] if key.startswith("grid.") else key


@dataclass(frozen=True)
class _Preset:
    """A method preset: the registered method and its hyperparameter overrides."""

    preset: str
    cls: type[M.PruningMethod]
    hparams: dict[str, Any]
    shown: str  # the preset file, or a note that the registry supplied it


@dataclass(frozen=True)
class _Point:
    model: str
    benchmark: str
    preset: _Preset
    keep_ratio: float | None
    keep_tokens: int | None
    prune_layer: int | None
    seed: int | None
    hparams: tuple[tuple[str, Any], ...]  # method.<hp> axis values this method knows


class _Planner:
    """Builds a :class:`SweepPlan`, collecting every problem on the way."""

    def __init__(self, source: _SpecSource) -> None:
        self.source = source
        self.problems = _Problems()
        self.parser = OverridesParser.create()
        self.model_configs: dict[str, dict[str, Any]] = {}
        self.model_infos: dict[str, ModelInfo] = {}
        self.benchmark_configs: dict[str, dict[str, Any]] = {}
        self.benchmark_ids: dict[str, dict[str, Any]] = {}
        self.presets: dict[str, _Preset] = {}
        self.bad_hparams: set[tuple[str, str, str]] = set()  # (preset, hp, value json)
        self.methods: dict[tuple[str, str], M.PruningMethod | str] = {}  # str: the error
        self.stages: dict[str, Any] = {}  # the spec's training stages (pgp heads)

    def fail_if_problems(self) -> None:
        if self.problems:
            raise SpecError(self.problems.lines())

    def fatal(self, line: str) -> NoReturn:
        """Record a problem that stops planning and raise everything found so far."""
        self.problems.add(line)
        raise SpecError(self.problems.lines())

    # -- overrides and composition ---------------------------------------------------------
    def parse_overrides(
        self, overrides: Sequence[str]
    ) -> tuple[list[tuple[str, Override]], list[Override]]:
        """Parse each override; split into (axis name, override) and compose overrides."""
        axis_overrides: list[tuple[str, Override]] = []
        compose_overrides: list[Override] = []
        for text in overrides:
            try:
                (override,) = self.parser.parse_overrides([text])
            except HydraException as exc:
                self.problems.add(f"{text} {COMMAND_LINE}: {_first_line(exc)}")
                continue
            key = override.key_or_group
            if not _is_axis_key(key):
                compose_overrides.append(override)
            elif override.package is not None:
                self.problems.add(f"{text} {COMMAND_LINE}: a grid axis takes no @package")
            else:
                axis_overrides.append((_axis_name(key), override))
        return axis_overrides, compose_overrides

    def compose(self, compose_overrides: list[Override]) -> tuple[dict[str, Any], set[str]]:
        """The composed spec as plain containers and the config paths the command line set."""
        shown = self.source.shown
        try:
            alone = _compose(self.source, [])
            base_tree = OmegaConf.to_container(alone, resolve=False, throw_on_missing=False)
        except (HydraException, OmegaConfBaseException) as exc:
            self.fatal(f"{shown}: {_first_line(exc)}")
        assert isinstance(base_tree, dict)
        known = [*_dotted_paths(base_tree), *AXES]
        usable: list[str] = []
        cli_keys: set[str] = set()
        for override in compose_overrides:
            key = override.key_or_group
            text = override.input_line or key
            plain_change = not (override.is_add() or override.is_force_add())
            if (
                plain_change
                and not override.is_hydra_override()
                and override.package is None
                and not _has_path(base_tree, key)
            ):
                self.problems.add(
                    f"unknown setting {key!r} ({text} {COMMAND_LINE}){_did_you_mean(key, known)}"
                )
                continue
            usable.append(text)
            cli_keys.add(key)
        try:
            composed = _compose(self.source, usable)
            tree = OmegaConf.to_container(composed, resolve=True, throw_on_missing=False)
        except (HydraException, OmegaConfBaseException) as exc:
            self.fatal(f"{_first_line(exc)} ({COMMAND_LINE})")
        assert isinstance(tree, dict)
        if OmegaConf.is_missing(composed, "name"):
            tree.pop("name", None)
        return {str(k): v for k, v in tree.items()}, cli_keys

    # -- schema ----------------------------------------------------------------------------
    def where(self, path: str, cli_keys: set[str]) -> str:
        if any(path == key or path.startswith(key + ".") for key in cli_keys):
            return COMMAND_LINE
        return f"in {self.source.shown}"

    def check_schema(self, tree: dict[str, Any], cli_keys: set[str]) -> dict[str, Any]:
        """Type- and range-check the composed spec; return it typed (bad values: defaults)."""
        fields = {f.name for f in dataclasses.fields(SweepConfig)}
        for key in tree:
            if key not in fields:
                self.problems.add(
                    f"unknown key {key!r} {self.where(key, cli_keys)}{_did_you_mean(key, fields)}"
                )
        name = tree.get("name")
        if name is None:
            self.problems.add(
                f"the sweep has no name: set `name:` in {self.source.shown} "
                "or name=... on the command line"
            )
        elif not isinstance(name, (str, int, float)) or not str(name).strip():
            self.problems.add(
                f"name={_show(name)} {self.where('name', cli_keys)}: must be a non-empty string"
            )
        grid = tree.get("grid") or {}
        if not isinstance(grid, dict):
            self.problems.add(
                f"grid={_show(grid)} {self.where('grid', cli_keys)}: "
                "must be a mapping of axis -> value"
            )
            grid = {}
        sections = {
            section: self.check_section(section, schema, tree.get(section), cli_keys)
            for section, schema in (("eval", EvalConfig), ("workers", WorkersConfig))
        }
        stages = tree.get("stages") or {}
        for line in stage_problems(stages, self.where("stages", cli_keys)):
            self.problems.add(line)
        stages = stages if isinstance(stages, dict) else {}
        return {"name": str(name or ""), "grid": grid, **sections, "stages": stages}

    def check_section(
        self, section: str, schema: type, values: Any, cli_keys: set[str]
    ) -> dict[str, Any]:
        typed: dict[str, Any] = dataclasses.asdict(schema())
        if values is None:
            return typed
        if not isinstance(values, dict):
            self.problems.add(
                f"{section}={_show(values)} {self.where(section, cli_keys)}: must be a mapping"
            )
            return typed
        for key, value in values.items():
            path = f"{section}.{key}"
            if key not in typed:
                self.problems.add(
                    f"unknown key {path!r} {self.where(path, cli_keys)}"
                    f"{_did_you_mean(str(key), typed)}"
                )
                continue
            try:
                merged = OmegaConf.merge(OmegaConf.structured(schema), {key: value})
            except OmegaConfBaseException as exc:
                self.problems.add(
                    f"{path}={_show(value)} {self.where(path, cli_keys)}: {_first_line(exc)}"
                )
                continue
            typed[key] = merged[key]
        for key, problem in range_problems(section, typed).items():
            path = f"{section}.{key}"
            self.problems.add(f"{path}={_show(typed[key])} {self.where(path, cli_keys)}: {problem}")
            typed[key] = getattr(schema(), key)
        return typed

    # -- grid ------------------------------------------------------------------------------
    def collect_axes(
        self, grid: dict[str, Any], axis_overrides: list[tuple[str, Override]]
    ) -> dict[str, _Axis]:
        """The spec's grid with the command-line axes applied (later overrides win)."""
        axes: dict[str, _Axis] = {}
        for key, value in grid.items():
            axis = self.yaml_axis(str(key), value)
            if axis is not None:
                axes[axis.name] = axis
        for name, override in axis_overrides:
            if override.is_delete():
                axes.pop(name, None)
                continue
            if name in BUDGET_AXES:
                for other in BUDGET_AXES:
                    if other in axes and axes[other].where != COMMAND_LINE:
                        del axes[other]
            text = override.get_value_string()
            value = override.value()
            stored = value if isinstance(value, (int, float, bool)) else text
            axes[name] = _Axis(name, text, stored, COMMAND_LINE, override)
        for name in list(axes):
            if name not in AXES and not (
                name.startswith(HPARAM_PREFIX) and len(name) > len(HPARAM_PREFIX)
            ):
                axis = axes.pop(name)
                self.problems.add(
                    f"unknown grid axis {name!r} {axis.where}"
                    f"{_did_you_mean(name, [*AXES, 'method.<hyperparameter>'])}"
                )
        return axes

    def yaml_axis(self, name: str, value: Any) -> _Axis | None:
        where = self.source.in_grid
        if isinstance(value, (list, dict)):
            return _Axis(name, _show(value), value, where, None, [value])
        text = _scalar_text(value)
        try:
            (override,) = self.parser.parse_overrides([f"{name}={text}"])
        except HydraException as exc:
            self.problems.add(f"{name}={text} {where}: {_first_line(exc)}")
            return None
        return _Axis(name, text, value, where, override)

    def expand(self, axis: _Axis) -> None:
        """Fill ``axis.values`` from its override: sweeps enumerated, globs over config names."""
        override = axis.override
        if override is None:
            return
        value = override.value()
        if override.is_interval_sweep():
            self.problems.add(
                f"{axis.label()}: interval() is continuous; use a choice list or range()"
            )
            return
        if isinstance(value, Glob):
            if axis.name not in GROUPS:
                self.problems.add(
                    f"{axis.label()}: glob() selects config names; only {', '.join(GROUPS)} take it"
                )
                return
            values: list[Any] = value.filter(self.candidates(axis.name))
        elif override.is_sweep_override():
            values = [_plain(v) for v in override.sweep_iterator()]
        else:
            values = [_plain(value)]
        unique: list[Any] = []
        for v in values:
            if not any(
                _canonical_json(_jsonable(v)) == _canonical_json(_jsonable(u)) for u in unique
            ):
                unique.append(v)
        if not unique:
            self.problems.add(f"{axis.label()}: selects no value")
        axis.values = unique

    def candidates(self, group: str) -> list[str]:
        names = set(self.group_files(group))
        if group == "method":
            names |= set(M.available())
        return sorted(names)

    def group_files(self, group: str) -> dict[str, tuple[Path, str]]:
        """Config names of ``group`` -> (file, how problems name it); spec dir first."""
        files: dict[str, tuple[Path, str]] = {}
        for directory, shown in self.source.group_dirs:
            for path in sorted((directory / group).glob("*.yaml")):
                files.setdefault(path.stem, (path, f"{shown}/{group}/{path.name}"))
        return files

    def check_values(self, axis: _Axis) -> None:
        """Keep the values of ``axis`` that are valid on their own; report the others."""
        valid: list[Any] = []
        for value in axis.values:
            checked = self.check_value(axis, value)
            if checked is not _ABSENT:
                valid.append(checked)
        axis.values = valid

    def check_value(self, axis: _Axis, value: Any) -> Any:
        name = axis.name
        if isinstance(value, list) and name in AXES:
            choice = ",".join(_show(v) for v in value)
            self.problems.add(
                f"{axis.label(value)}: a list is one value in override grammar; "
                f"to sweep, write a choice list: {name}={choice}"
            )
            return _ABSENT
        if name in GROUPS:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool) or value == "":
                self.problems.add(f"{axis.label(value)}: must be a {name} name")
                return _ABSENT
            value = str(value)
            if not self.load_group_config(name, value, axis):
                return _ABSENT
            return value
        if name == "keep_ratio":
            if not _is_number(value):
                self.problems.add(f"{axis.label(value)}: must be a number in (0, 1]")
                return _ABSENT
            if not 0.0 < value <= 1.0:
                self.problems.add(f"{axis.label(value)}: must be in (0, 1]")
                return _ABSENT
            return float(f"{float(value):.12g}")  # range() of floats accumulates rounding error
        if name == "keep_tokens":
            if not _is_int(value) or value < 1:
                self.problems.add(f"{axis.label(value)}: must be an integer >= 1")
                return _ABSENT
            return value
        if name == "prune_layer":
            if not _is_int(value) or value < 0:
                self.problems.add(f"{axis.label(value)}: must be an integer >= 0 (a decoder layer)")
                return _ABSENT
            return value
        if name == "seed":
            if not _is_int(value):
                self.problems.add(f"{axis.label(value)}: must be an integer")
                return _ABSENT
            return value
        return value  # method.<hp>: checked against the methods that have it

    # -- config groups ---------------------------------------------------------------------
    def load_group_config(self, group: str, name: str, axis: _Axis) -> bool:
        """Load and validate one model / benchmark / method config; False when unusable."""
        cache = {
            "model": self.model_configs,
            "benchmark": self.benchmark_configs,
            "method": self.presets,
        }[group]
        if name in cache:
            return True
        files = self.group_files(group)
        if name not in files:
            if group == "method" and name in M.available():
                cls = M.get(name)
                self.presets[name] = _Preset(name, cls, {}, f"registered method {name!r}")
                return True
            hint = _did_you_mean(name, self.candidates(group))
            self.problems.add(f"unknown {group} {name!r} {axis.where}{hint}")
            return False
        path, shown = files[name]
        data, problem = _read_yaml(path, shown)
        if problem is not None or data is None:
            self.problems.add(problem or f"{shown}: empty")
            return False
        loader = {
            "model": self.load_model,
            "benchmark": self.load_benchmark,
            "method": self.load_preset,
        }[group]
        return loader(name, data, shown)

    def check_name_field(self, group: str, name: str, data: dict[str, Any], shown: str) -> bool:
        data.setdefault("name", name)
        if data["name"] != name:
            self.problems.add(
                f"{group} {name!r} ({shown}): name: {_show(data['name'])} "
                "differs from the file name"
            )
            return False
        return True

    def load_model(self, name: str, data: dict[str, Any], shown: str) -> bool:
        if not self.check_name_field("model", name, data, shown):
            return False
        try:
            info = describe_model(data)
        except Exception as exc:  # config checks of third-party classes raise many kinds
            self.problems.add(f"model {name!r} ({shown}): {_one_line(exc)}")
            return False
        self.model_configs[name] = data
        self.model_infos[name] = info
        guide = data.get("guidance")
        if guide is not None:
            where = _Axis("guidance", str(guide), guide, f"(model {name!r}, {shown})", None)
            if not self.load_group_config("model", str(guide), where):
                return False
            if self.model_infos[guide].family != info.family:
                self.problems.add(
                    f"model {name!r} ({shown}): guidance model {guide!r} is of family "
                    f"{self.model_infos[guide].family}, not {info.family}"
                )
                return False
        return True

    def load_benchmark(self, name: str, data: dict[str, Any], shown: str) -> bool:
        if not self.check_name_field("benchmark", name, data, shown):
            return False
        try:
            benchmark = build_benchmark(data)
            check = getattr(benchmark, "check", None)
            if callable(check):  # data files: missing or malformed ones fail here, named
                check()
            identity = benchmark.describe()
        except Exception as exc:  # a benchmark's constructor may reject options in any way
            self.problems.add(f"benchmark {name!r} ({shown}): {_one_line(exc)}")
            return False
        self.benchmark_configs[name] = data
        self.benchmark_ids[name] = _jsonable(identity)
        return True

    def load_preset(self, name: str, data: dict[str, Any], shown: str) -> bool:
        unknown = sorted(set(data) - {"name", "hparams"})
        if unknown:
            self.problems.add(
                f"method preset {name!r} ({shown}): unknown key(s) {', '.join(unknown)} "
                "(a preset has `name` and `hparams`)"
            )
            return False
        method_name = str(data.get("name") or name)
        try:
            cls = M.get(method_name)
        except M.UnknownMethodError as exc:
            self.problems.add(f"method preset {name!r} ({shown}): {exc}")
            return False
        hparams = data.get("hparams") or {}
        if not isinstance(hparams, dict):
            self.problems.add(f"method preset {name!r} ({shown}): hparams must be a mapping")
            return False
        try:
            cls.from_hparams(hparams)
        except (ValueError, TypeError) as exc:
            self.problems.add(f"method preset {name!r} ({shown}) hparams: {_first_line(exc)}")
            return False
        self.presets[name] = _Preset(name, cls, dict(hparams), shown)
        return True

    def build_method(self, preset: _Preset, hparams: dict[str, Any]) -> M.PruningMethod:
        """The method of ``preset`` with ``hparams`` applied on top (cached); raises on bad ones."""
        cache_key = (preset.preset, _canonical_json(_jsonable(hparams)))
        if cache_key not in self.methods:
            try:
                self.methods[cache_key] = preset.cls.from_hparams({**preset.hparams, **hparams})
            except (ValueError, TypeError) as exc:
                self.methods[cache_key] = _first_line(exc)
        method = self.methods[cache_key]
        if isinstance(method, str):
            raise M.HyperparameterError(method)
        return method

    def check_hparam_axes(self, axes: dict[str, _Axis], presets: list[_Preset]) -> None:
        """Each ``method.<hp>`` axis must name a hyperparameter of some method of the sweep."""
        for axis in [a for n, a in axes.items() if n.startswith(HPARAM_PREFIX)]:
            hp = axis.name[len(HPARAM_PREFIX) :]
            owners = [p for p in presets if hp in p.cls.hyperparameters()]
            if presets and not owners:
                methods = sorted({p.cls.name for p in presets})
                known = {h for p in presets for h in p.cls.hyperparameters()}
                self.problems.add(
                    f"{axis.label()}: unknown hyperparameter {hp!r} of method(s) "
                    f"{', '.join(methods)}{_did_you_mean(hp, known)}"
                )
                del axes[axis.name]
                continue
            for preset in owners:
                for value in axis.values:
                    try:
                        self.build_method(preset, {hp: value})
                    except (ValueError, TypeError) as exc:
                        self.problems.add(f"{axis.label(value)}: {_first_line(exc)}")
                        self.bad_hparams.add((preset.preset, hp, _canonical_json(_jsonable(value))))

    # -- trials ----------------------------------------------------------------------------
    def check_required(self, axes: dict[str, _Axis]) -> None:
        if not axes:
            self.problems.add(
                f"the grid is empty ({self.source.shown} and the command line): give at least "
                "model, benchmark and method, e.g. model=tiny-llava benchmark=shapes "
                "method=none,fastv keep_ratio=0.25"
            )
            return
        for name in GROUPS:
            if name not in axes:
                self.problems.add(
                    f"the grid has no {name} axis: set grid.{name} in {self.source.shown} "
                    f"or {name}=... on the command line"
                )

    def check_budget(self, axes: dict[str, _Axis], presets: list[_Preset]) -> None:
        pruning = sorted({p.cls.name for p in presets if p.cls.uses_budget})
        if not pruning:
            return
        if all(b in axes for b in BUDGET_AXES):
            ratio, tokens = axes["keep_ratio"], axes["keep_tokens"]
            self.problems.add(
                f"keep_ratio ({ratio.where}) and keep_tokens ({tokens.where}) are both given: "
                f"a trial of {', '.join(pruning)} takes one budget; keep one of the two axes"
            )
        elif not any(b in axes for b in BUDGET_AXES):
            self.problems.add(
                f"method(s) {', '.join(pruning)} prune but the grid has neither keep_ratio nor "
                f"keep_tokens: add one in {self.source.shown} grid or on the command line "
                "(e.g. keep_ratio=0.25)"
            )

    def points(self, axes: dict[str, _Axis]) -> Iterable[_Point]:
        def values(name: str) -> list[Any]:
            return axes[name].values if name in axes else [None]

        hp_axes = sorted(n for n in axes if n.startswith(HPARAM_PREFIX))
        for combo in itertools.product(
            values("model"),
            values("benchmark"),
            values("method"),
            values("keep_ratio"),
            values("keep_tokens"),
            values("prune_layer"),
            values("seed"),
            *(axes[n].values for n in hp_axes),
        ):
            model, benchmark, preset_name, ratio, tokens, layer, seed, *hp_values = combo
            if model is None or benchmark is None or preset_name is None:
                continue
            preset = self.presets[preset_name]
            known = preset.cls.hyperparameters()
            hparams = tuple(
                (n[len(HPARAM_PREFIX) :], v)
                for n, v in zip(hp_axes, hp_values, strict=True)
                if n[len(HPARAM_PREFIX) :] in known
            )
            yield _Point(model, benchmark, preset, ratio, tokens, layer, seed, hparams)

    def trial(
        self, point: _Point, axes: dict[str, _Axis], eval_cfg: dict[str, Any]
    ) -> TrialSpec | None:
        """The canonical trial of a grid point, or None (problems recorded) when invalid."""
        cls = point.preset.cls
        info = self.model_infos[point.model]
        ratio = point.keep_ratio if cls.uses_budget else None
        tokens = point.keep_tokens if cls.uses_budget else None
        if cls.uses_budget and (ratio is None) == (tokens is None):
            return None  # reported by check_budget
        if tokens is not None and tokens > info.n_visual:
            self.problems.add(
                f"{axes['keep_tokens'].label(tokens)}: must be <= {info.n_visual}, "
                f"the visual tokens of model {point.model!r}"
            )
            return None
        layer: int | None = None
        if cls.uses_layer:
            layer = point.prune_layer if point.prune_layer is not None else cls.default_prune_layer
            if layer is None:
                self.problems.add(
                    f"method {cls.name!r} needs prune_layer: add prune_layer=... "
                    f"in {self.source.shown} grid or on the command line"
                )
                return None
            lowest, highest = cls.min_prune_layer, info.n_layers - 1
            if not lowest <= layer <= highest:
                origin = (
                    axes["prune_layer"].label(layer)
                    if point.prune_layer is not None
                    else f"prune_layer={layer} (default of method {cls.name!r})"
                )
                self.problems.add(
                    f"{origin}: must be in [{lowest}, {highest}] for method {cls.name!r} "
                    f"on model {point.model!r} ({info.n_layers} layers)"
                )
                return None
        seed = (point.seed if point.seed is not None else DEFAULT_SEED) if cls.uses_seed else None
        if any(
            (point.preset.preset, hp, _canonical_json(_jsonable(v))) in self.bad_hparams
            for hp, v in point.hparams
        ):
            return None  # reported by check_hparam_axes
        try:
            method = self.build_method(point.preset, dict(point.hparams))
        except (ValueError, TypeError) as exc:
            overrides = ", ".join(f"{HPARAM_PREFIX}{hp}={_show(v)}" for hp, v in point.hparams)
            self.problems.add(
                f"method {point.preset.preset!r} ({point.preset.shown}) with {overrides} "
                f"{self.source.in_grid}: {_first_line(exc)}"
            )
            return None
        reason = method.unsupported(info.family)
        guide_config = None
        if reason is None and cls.needs_guidance:
            guide = self.model_configs[point.model].get("guidance")
            if guide is None:
                reason = (
                    "needs a guidance model: set `guidance: <smaller model of the same family>` "
                    "in the model config"
                )
            else:
                guide_config = self.model_configs[guide]
        vib_head = None
        if reason is None and cls.needs_training and guide_config is not None:
            vib_head, reason = self.head_spec(method, guide_config)
        if reason is None:
            reason = _plan_problem(method, info, ratio, tokens, layer, seed)
        if reason is not None:
            self.problems.add(
                f"method {point.preset.preset!r} ({point.preset.shown}) on model "
                f"{point.model!r} (family {info.family}): {reason}"
            )
            return None
        hparams = _canonical_hparams(method)
        canonical = {
            "model": point.model,
            "benchmark": point.benchmark,
            "method": cls.name,
            "hparams": hparams,
            "keep_ratio": ratio,
            "keep_tokens": tokens,
            "prune_layer": layer,
            "seed": seed,
        }
        identity = {
            "trial": canonical,
            "method_version": str(cls.version),
            "model": {"revision": info.revision, "config": self.model_configs[point.model]},
            "benchmark": self.benchmark_ids[point.benchmark],
            **({"guidance": guide_config} if guide_config is not None else {}),
            **({"vib_head": vib_head["key"]} if vib_head is not None else {}),
            "eval": {k: eval_cfg[k] for k in RESULT_EVAL_KEYS},
        }
        key = hashlib.sha256(_canonical_json(identity).encode()).hexdigest()
        return TrialSpec(
            key=key,
            model=point.model,
            benchmark=point.benchmark,
            method=cls.name,
            hparams=hparams,
            keep_ratio=ratio,
            keep_tokens=tokens,
            prune_layer=layer,
            seed=seed,
            is_baseline=cls.name == BASELINE_METHOD,
            preset=point.preset.preset,
            model_config=self.model_configs[point.model],
            benchmark_config=self.benchmark_configs[point.benchmark],
            eval=eval_cfg,
            guidance_config=guide_config,
            vib_head=vib_head,
        )

    def head_spec(
        self, method: M.PruningMethod, guide_config: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, str | None]:
        """The trained head a method's trials need (``vib_head`` of the trial config), or why
        there is none: its stage's training data must be a known benchmark."""
        stage = str(getattr(method, "stage", "vib"))
        settings = self.stages.get(stage) or {}
        bench = str(settings.get("benchmark", STAGE_DEFAULTS["benchmark"]))
        where = _Axis("benchmark", bench, bench, f"(stages.{stage} in {self.source.shown})", None)
        if not self.load_group_config("benchmark", bench, where):
            return None, f"the training data of stage {stage!r} is unusable"
        guide = self.model_infos[guide_config["name"]]
        spec = head_spec(
            stage, settings, guide_config, guide.revision,
            self.benchmark_configs[bench], method.head_hparams(),  # type: ignore[attr-defined]
        )  # fmt: skip
        return spec, None

    def baseline(self, model: str, benchmark: str, eval_cfg: dict[str, Any]) -> TrialSpec | None:
        """The unpruned trial of (model, benchmark)."""
        where = _Axis("method", BASELINE_METHOD, BASELINE_METHOD, "(the baseline)", None)
        if not self.load_group_config("method", BASELINE_METHOD, where):
            return None
        preset = self.presets[BASELINE_METHOD]
        point = _Point(model, benchmark, preset, None, None, None, None, ())
        return self.trial(point, {}, eval_cfg)


def load_sweep(spec: str, overrides: Sequence[str] = ()) -> SweepPlan:
    """Compose ``spec`` (a YAML path or a shipped spec's name) with ``overrides`` into a plan.

    Raises :class:`SpecError` listing every problem found (one line each, naming the value and
    where it came from) when anything is invalid.
    """
    source = _locate_spec(spec)
    _, problem = _read_yaml(source.path, source.shown)
    if problem is not None:
        raise SpecError([problem])
    planner = _Planner(source)
    axis_overrides, compose_overrides = planner.parse_overrides(overrides)
    tree, cli_keys = planner.compose(compose_overrides)
    config = planner.check_schema(tree, cli_keys)
    planner.stages = config["stages"]

    axes = planner.collect_axes(config["grid"], axis_overrides)
    planner.check_required(axes)
    axes = {n: axes[n] for n in [*AXES, *sorted(axes)] if n in axes}  # groups first
    for axis in axes.values():
        planner.expand(axis)
        planner.check_values(axis)
    presets = [planner.presets[p] for p in (axes["method"].values if "method" in axes else [])]
    planner.check_hparam_axes(axes, presets)
    planner.check_budget(axes, presets)

    trials: dict[str, TrialSpec] = {}
    for point in planner.points(axes):
        trial = planner.trial(point, axes, config["eval"])
        if trial is not None:
            trials.setdefault(trial.key, trial)
    ordered: list[TrialSpec] = []
    pairs = dict.fromkeys((t.model, t.benchmark) for t in trials.values())
    for model, benchmark in pairs:
        group = [t for t in trials.values() if (t.model, t.benchmark) == (model, benchmark)]
        baselines = [t for t in group if t.is_baseline]
        if not baselines:
            added = planner.baseline(model, benchmark, config["eval"])
            baselines = [added] if added is not None else []
        ordered.extend(baselines)
        ordered.extend(t for t in group if not t.is_baseline)
    planner.fail_if_problems()

    composed = {**config, "grid": {name: axis.stored for name, axis in axes.items()}}
    try:
        typed = OmegaConf.merge(OmegaConf.structured(SweepConfig), composed)
        plain = OmegaConf.to_container(typed, resolve=True)
    except OmegaConfBaseException as exc:
        raise SpecError([f"{source.shown}: {_first_line(exc)}"]) from None
    assert isinstance(plain, dict)
    plan_spec = {str(k): v for k, v in plain.items()}
    return SweepPlan(
        name=str(plan_spec["name"]),
        spec=plan_spec,
        spec_yaml=yaml.safe_dump(plan_spec, sort_keys=False),
        trials=ordered,
        models={n: planner.model_configs[n] for n in dict.fromkeys(t.model for t in ordered)},
        benchmarks={
            n: planner.benchmark_configs[n] for n in dict.fromkeys(t.benchmark for t in ordered)
        },
        eval=dict(config["eval"]),
        workers=dict(config["workers"]),
        model_infos={n: planner.model_infos[n] for n in dict.fromkeys(t.model for t in ordered)},
    )
