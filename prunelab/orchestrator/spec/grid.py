"""Grid axes: the spec's ``grid`` with the command-line axes applied, each expanded with
Hydra's override grammar (choice lists, ``range()``, ``glob()`` over config names) and its
values checked on their own (a budget by :class:`~prunelab.methods.Budget`, a config name by
loading it). :func:`grid_points` is their cartesian product."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override, QuotedString, RangeSweep
from hydra.errors import HydraException

from prunelab.methods.base import BUDGET_MODES, Budget
from prunelab.orchestrator.spec.report import (
    COMMAND_LINE,
    NOT_FINITE,
    Problems,
    did_you_mean,
    first_line,
    is_finite,
    show,
)
from prunelab.trial import canonical_json, jsonable

if TYPE_CHECKING:
    from prunelab.orchestrator.spec.groups import ConfigGroups, Preset

__all__ = [
    "AXES",
    "BUDGET_AXES",
    "GROUPS",
    "HPARAM_PREFIX",
    "MAX_AXIS_VALUES",
    "MAX_GRID_POINTS",
    "Axis",
    "Point",
    "axis_name",
    "collect_axes",
    "grid_points",
    "is_axis_key",
]

GROUPS = ("model", "benchmark", "method")
"""Config groups; the grid axes of the same names take their file names as values."""
BUDGET_AXES = ("keep_ratio", "keep_tokens")
AXES = (*GROUPS, *BUDGET_AXES, "prune_layer", "seed", "budget_mode", "vision_positions")
VISION_POSITIONS = ("packed", "original")
"""How the LLM numbers a vision stage's kept tokens (the ``vision_positions`` axis)."""
"""Grid axes besides ``method.<hyperparameter>``."""
HPARAM_PREFIX = "method."
MAX_AXIS_VALUES = 100_000
"""Most values one axis may select (``seed=range(0,100000)``)."""
MAX_GRID_POINTS = 100_000
"""Most grid points (the product of the axes' value counts) a sweep may have."""

_ABSENT = object()


def is_axis_key(key: str) -> bool:
    return key in AXES or key.startswith(HPARAM_PREFIX) or key.startswith("grid.")


def axis_name(key: str) -> str:
    return key[len("grid.") :] if key.startswith("grid.") else key


@dataclass
class Axis:
    """One grid axis as written, where it came from, and its expanded values."""

    name: str
    text: str  # the value in override grammar
    stored: Any  # what the plan's spec records as the value
    where: str
    override: Override | None  # None: a YAML list/mapping taken as one value
    values: list[Any] = field(default_factory=list)

    def label(self, value: Any = _ABSENT) -> str:
        shown = self.text if value is _ABSENT else show(value)
        return f"{self.name}={shown} {self.where}"

    @property
    def hparam(self) -> str | None:
        """The hyperparameter of a ``method.<hp>`` axis (None for the other axes)."""
        return self.name[len(HPARAM_PREFIX) :] if self.name.startswith(HPARAM_PREFIX) else None


@dataclass(frozen=True)
class Point:
    """One combination of axis values (a method preset, not yet a trial)."""

    model: str
    benchmark: str
    preset: Preset
    keep_ratio: float | None
    keep_tokens: int | None
    prune_layer: int | None
    seed: int | None
    budget_mode: str | None
    vision_positions: str | None
    hparams: tuple[tuple[str, Any], ...]  # method.<hp> axis values this method knows


def _scalar_text(value: Any) -> str:
    """A YAML scalar as override-grammar text (``null``, ``true``, ``0.5``, ``a,b``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _plain(value: Any) -> Any:
    """A parsed override element with quoted strings unwrapped (recursively)."""
    if isinstance(value, QuotedString):
        return value.text
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Grid:
    def __init__(self, in_grid: str, problems: Problems, groups: ConfigGroups) -> None:
        self.in_grid, self.problems, self.groups = in_grid, problems, groups
        self.parser = OverridesParser.create()

    def collect(
        self, grid: dict[str, Any], axis_overrides: list[tuple[str, Override]]
    ) -> dict[str, Axis]:
        """The spec's grid with the command-line axes applied (later overrides win)."""
        axes: dict[str, Axis] = {}
        for key, value in grid.items():
            axis = self.yaml_axis(str(key), value)
            if axis is not None:
                axes[axis.name] = axis
        for name, override in axis_overrides:
            if override.is_delete():
                axes.pop(name, None)
                continue
            if name in BUDGET_AXES:  # one budget: a command-line budget replaces the spec's
                for other in BUDGET_AXES:
                    if other in axes and axes[other].where != COMMAND_LINE:
                        del axes[other]
            text = override.get_value_string()
            value = override.value()
            stored = value if isinstance(value, (int, float, bool)) else text
            axes[name] = Axis(name, text, stored, COMMAND_LINE, override)
        for name in list(axes):
            if name not in AXES and not (
                name.startswith(HPARAM_PREFIX) and len(name) > len(HPARAM_PREFIX)
            ):
                axis = axes.pop(name)
                self.problems.add(
                    f"unknown grid axis {name!r} {axis.where}"
                    f"{did_you_mean(name, [*AXES, 'method.<hyperparameter>'])}"
                )
        return {n: axes[n] for n in [*AXES, *sorted(axes)] if n in axes}  # groups first

    def yaml_axis(self, name: str, value: Any) -> Axis | None:
        """One axis of the spec's grid: a scalar in override grammar (``fastv,pdrop``,
        ``range(1,4)``); a YAML list of a core axis is its choices (``[fastv, pdrop]``); any
        other list or mapping is one value (a list-valued hyperparameter)."""
        if isinstance(value, list) and name in AXES:
            if not value:
                self.problems.add(f"{name}=[] {self.in_grid}: selects no value")
                return None
            axis = Axis(name, ",".join(show(v) for v in value), value, self.in_grid, None)
            unique: dict[str, Any] = {}
            for v in value:
                unique.setdefault(canonical_json(jsonable(v)), v)
            axis.values = list(unique.values())
            return axis
        if isinstance(value, (list, dict)):
            return Axis(name, show(value), value, self.in_grid, None, [value])
        text = _scalar_text(value)
        try:
            (override,) = self.parser.parse_overrides([f"{name}={text}"])
        except HydraException as exc:
            self.problems.add(f"{name}={text} {self.in_grid}: {first_line(exc)}")
            return None
        return Axis(name, text, value, self.in_grid, override)

    def expand(self, axis: Axis) -> None:
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
            values: list[Any] = value.filter(self.groups.candidates(axis.name))
        elif isinstance(value, RangeSweep) and (problem := _range_problem(value)) is not None:
            self.problems.add(f"{axis.label()}: {problem}")
            return
        elif override.is_sweep_override():
            values = [_plain(v) for v in override.sweep_iterator()]
        else:
            values = [_plain(value)]
        if len(values) > MAX_AXIS_VALUES:
            self.problems.add(
                f"{axis.label()}: {len(values):,} values; an axis takes at most {MAX_AXIS_VALUES:,}"
            )
            return
        unique: dict[str, Any] = {}
        for v in values:
            if not is_finite(v):
                self.problems.add(f"{axis.label(v)}: {NOT_FINITE}")
                continue
            unique.setdefault(canonical_json(jsonable(v)), v)
        if not values:
            self.problems.add(f"{axis.label()}: selects no value")
        axis.values = list(unique.values())

    def check_values(self, axis: Axis) -> None:
        """Keep the values of ``axis`` that are valid on their own; report the others."""
        valid: list[Any] = []
        for value in axis.values:
            checked, problem = self.check_value(axis, value)
            if problem is None:
                valid.append(checked)
            elif problem:  # "": reported where the config was loaded
                self.problems.add(f"{axis.label(value)}: {problem}")
        axis.values = valid

    def check_value(self, axis: Axis, value: Any) -> tuple[Any, str | None]:
        """The value as a trial takes it, or why it is invalid."""
        name = axis.name
        if isinstance(value, list) and name in AXES:
            choice = ",".join(show(v) for v in value)
            return None, (
                "a list is one value in override grammar; "
                f"to sweep, write a choice list: {name}={choice}"
            )
        if name in GROUPS:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool) or value == "":
                return None, f"must be a {name} name"
            loaded = self.groups.load(name, str(value), axis.where)
            return str(value), (None if loaded else "")
        if name == "keep_ratio":
            problem = Budget.ratio_problem(value)
            # range() of floats accumulates rounding error
            return (None, problem) if problem else (float(f"{float(value):.12g}"), None)
        if name == "keep_tokens":
            return value, Budget.tokens_problem(value)
        if name == "prune_layer" and not (_is_int(value) and value >= 0):
            return None, "must be an integer >= 0 (a decoder layer)"
        if name == "seed" and not _is_int(value):
            return None, "must be an integer"
        if name == "budget_mode" and value not in BUDGET_MODES:
            return None, f"must be one of {', '.join(BUDGET_MODES)}"
        if name == "vision_positions" and value not in VISION_POSITIONS:
            return None, f"must be one of {', '.join(VISION_POSITIONS)}"
        return value, None  # method.<hp>: checked against the methods that have it


def _range_problem(sweep: RangeSweep) -> str | None:
    """Why a ``range()`` cannot be enumerated (a zero step, an infinite or too long range),
    found from its bounds before a value is made."""
    bounds = (sweep.start, sweep.stop, sweep.step)
    if any(not isinstance(b, (int, float)) or not math.isfinite(b) for b in bounds):
        return f"range() takes finite numbers; {NOT_FINITE}"
    start, stop, step = bounds
    if step == 0:
        return "range() step must not be zero"
    count = max(0, math.ceil((stop - start) / step))
    if count > MAX_AXIS_VALUES:
        return f"{count:,} values; an axis takes at most {MAX_AXIS_VALUES:,}"
    return None


def _grid_size_problem(axes: dict[str, Axis]) -> str | None:
    """Whether the product of the axes' value counts exceeds :data:`MAX_GRID_POINTS`."""
    points = math.prod(len(axis.values) for axis in axes.values())
    if points <= MAX_GRID_POINTS:
        return None
    counts = " x ".join(
        f"{axis.name} {len(axis.values):,} {axis.where}"
        for axis in axes.values()
        if len(axis.values) > 1
    )
    return (
        f"the grid has {points:,} points ({counts}); a sweep takes at most "
        f"{MAX_GRID_POINTS:,}: split it into several sweeps"
    )


def collect_axes(
    grid: dict[str, Any],
    axis_overrides: list[tuple[str, Override]],
    in_grid: str,
    problems: Problems,
    groups: ConfigGroups,
) -> dict[str, Axis]:
    """The grid's axes, expanded, each value checked on its own (config names loaded)."""
    builder = _Grid(in_grid, problems, groups)
    axes = builder.collect(grid, axis_overrides)
    for axis in axes.values():
        builder.expand(axis)
    problem = _grid_size_problem(axes)
    if problem is not None:  # checking or planning that many points would not end soon
        problems.fatal(problem)
    for axis in axes.values():
        builder.check_values(axis)
    return axes


def grid_points(axes: dict[str, Axis], presets: dict[str, Preset]) -> Iterator[Point]:
    """The cartesian product of the axes; ``method.<hp>`` values go to the methods that have
    that hyperparameter."""

    def values(name: str) -> Iterable[Any]:
        return axes[name].values if name in axes else [None]

    hp_axes = sorted(n for n in axes if n.startswith(HPARAM_PREFIX))
    for combo in itertools.product(*(values(n) for n in AXES), *(axes[n].values for n in hp_axes)):
        model, benchmark, preset_name, ratio, tokens, layer, seed, mode, positions, *hp_values = (
            combo
        )
        if model is None or benchmark is None or preset_name is None:
            continue
        preset = presets[preset_name]
        known = preset.cls.hyperparameters()
        hparams = tuple(
            (axes[n].hparam, v)
            for n, v in zip(hp_axes, hp_values, strict=True)
            if axes[n].hparam in known
        )
        yield Point(model, benchmark, preset, ratio, tokens, layer, seed, mode, positions, hparams)  # type: ignore[arg-type]
