"""The spec file: find it, compose it with Hydra and the command-line overrides, check it
against the schema (:mod:`prunelab.orchestrator.config`).

Command-line overrides are split in two: those whose key is a grid axis go to the grid
(:mod:`.grid`); every other one (``eval.limit=4``, ``name=x``) goes to Hydra's compose.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prunelab.orchestrator.config import EvalConfig, SweepConfig, WorkersConfig, range_problems
from prunelab.orchestrator.spec.grid import AXES, axis_name, is_axis_key
from prunelab.orchestrator.spec.report import (
    COMMAND_LINE,
    Problems,
    SpecError,
    did_you_mean,
    first_line,
    show,
)
from prunelab.orchestrator.vib_stage import stage_problems
from prunelab.sweeps import SWEEPS_DIR

__all__ = ["ComposedSpec", "SpecSource", "compose_spec", "locate_spec", "read_yaml", "sweep_names"]

_HYDRA_LOCK = threading.Lock()  # Hydra's global state is process-wide


def sweep_names() -> list[str]:
    """Names of the specs shipped in ``prunelab/sweeps``."""
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


@dataclass(frozen=True)
class SpecSource:
    """Where a spec lives and how problem lines name it."""

    path: Path
    shown: str  # e.g. "sweeps/quickstart.yaml" or the path as the user gave it
    group_dirs: tuple[tuple[Path, str], ...]  # (directory, shown prefix), first wins

    @property
    def in_grid(self) -> str:
        return f"in {self.shown} grid"


@dataclass(frozen=True)
class ComposedSpec:
    """A composed, schema-checked spec: its grid as written, typed sections, where keys came
    from. Values that failed their check were reported and replaced by the defaults."""

    name: str
    grid: dict[str, Any]
    eval: EvalConfig
    workers: WorkersConfig
    stages: dict[str, Any]
    axis_overrides: list[tuple[str, Override]]  # command-line overrides of grid axes

    def as_dict(self, grid: dict[str, Any]) -> dict[str, Any]:
        """The spec as recorded for the sweep, with the grid as effectively used."""
        return {
            "name": self.name,
            "grid": grid,
            "eval": dataclasses.asdict(self.eval),
            "workers": dataclasses.asdict(self.workers),
            "stages": self.stages,
        }


def locate_spec(spec: str) -> SpecSource:
    """Resolve a spec argument: a shipped spec's name, or a path to a YAML file."""
    shipped = sweep_names()
    package_groups = ((SWEEPS_DIR, "sweeps"),)
    if spec in shipped and "/" not in spec:
        return SpecSource(SWEEPS_DIR / f"{spec}.yaml", f"sweeps/{spec}.yaml", package_groups)
    path = Path(spec)
    if not path.is_file():
        if path.suffix or "/" in spec:
            raise SpecError([f"spec file {spec} not found"])
        raise SpecError(
            [
                f"unknown sweep spec {spec!r}: not a file, nor a spec shipped in prunelab/sweeps"
                f"{did_you_mean(spec, shipped)} (shipped: {', '.join(shipped) or 'none'})"
            ]
        )
    if path.suffix != ".yaml":
        raise SpecError([f"spec file {spec}: Hydra reads only files ending in .yaml"])
    resolved = path.resolve()
    if resolved.parent == SWEEPS_DIR:
        return SpecSource(resolved, spec, package_groups)
    return SpecSource(resolved, spec, ((resolved.parent, str(path.parent)), *package_groups))


def read_yaml(path: Path, shown: str) -> tuple[dict[str, Any] | None, str | None]:
    """A YAML mapping as plain containers, or a problem line (with the YAML error's line)."""
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        context, problem = getattr(exc, "context", None), getattr(exc, "problem", None)
        what = " ".join(p for p in (context, problem) if p) or first_line(exc)
        return None, f"{shown}: malformed YAML{where}: {what}"
    except (OSError, OmegaConfBaseException) as exc:
        return None, f"{shown}: cannot read: {first_line(exc)}"
    if not isinstance(loaded, DictConfig):
        return None, f"{shown}: must be a YAML mapping (key: value), not a list"
    try:
        data = OmegaConf.to_container(loaded, resolve=True)
    except OmegaConfBaseException as exc:
        return None, f"{shown}: {first_line(exc)}"
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}, None


def _hydra_compose(source: SpecSource, overrides: Sequence[str]) -> DictConfig:
    """Compose the spec with Hydra (``base`` is in the ConfigStore; the package's sweeps dir is
    on the search path of a spec elsewhere, for the shipped configs its defaults may name)."""
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


class _Composer:
    def __init__(self, source: SpecSource, problems: Problems) -> None:
        self.source, self.problems = source, problems
        self.parser = OverridesParser.create()
        self.cli_keys: set[str] = set()

    def split(self, overrides: Sequence[str]) -> tuple[list[tuple[str, Override]], list[Override]]:
        """Parse each override; split into (axis name, override) and compose overrides."""
        axis_overrides: list[tuple[str, Override]] = []
        compose_overrides: list[Override] = []
        for text in overrides:
            try:
                (override,) = self.parser.parse_overrides([text])
            except HydraException as exc:
                self.problems.add(f"{text} {COMMAND_LINE}: {first_line(exc)}")
                continue
            key = override.key_or_group
            if not is_axis_key(key):
                compose_overrides.append(override)
            elif override.package is not None:
                self.problems.add(f"{text} {COMMAND_LINE}: a grid axis takes no @package")
            else:
                axis_overrides.append((axis_name(key), override))
        return axis_overrides, compose_overrides

    def compose(self, compose_overrides: list[Override]) -> dict[str, Any]:
        """The composed spec as plain containers; records the config paths the command line set."""
        try:
            alone = _hydra_compose(self.source, [])
            base_tree = OmegaConf.to_container(alone, resolve=False, throw_on_missing=False)
        except (HydraException, OmegaConfBaseException) as exc:
            self.problems.fatal(f"{self.source.shown}: {first_line(exc)}")
        assert isinstance(base_tree, dict)
        known = [*_dotted_paths(base_tree), *AXES]
        usable: list[str] = []
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
                    f"unknown setting {key!r} ({text} {COMMAND_LINE}){did_you_mean(key, known)}"
                )
                continue
            usable.append(text)
            self.cli_keys.add(key)
        try:
            composed = _hydra_compose(self.source, usable)
            tree = OmegaConf.to_container(composed, resolve=True, throw_on_missing=False)
        except (HydraException, OmegaConfBaseException) as exc:
            self.problems.fatal(f"{first_line(exc)} ({COMMAND_LINE})")
        assert isinstance(tree, dict)
        if OmegaConf.is_missing(composed, "name"):
            tree.pop("name", None)
        return {str(k): v for k, v in tree.items()}

    def where(self, path: str) -> str:
        if any(path == key or path.startswith(key + ".") for key in self.cli_keys):
            return COMMAND_LINE
        return f"in {self.source.shown}"

    def check_schema(
        self, tree: dict[str, Any], axis_overrides: list[tuple[str, Override]]
    ) -> ComposedSpec:
        """Type- and range-check the composed spec (bad values: reported, defaults used)."""
        fields = {f.name for f in dataclasses.fields(SweepConfig)}
        for key in tree:
            if key not in fields:
                self.problems.add(
                    f"unknown key {key!r} {self.where(key)}{did_you_mean(key, fields)}"
                )
        name = tree.get("name")
        if name is None:
            self.problems.add(
                f"the sweep has no name: set `name:` in {self.source.shown} "
                "or name=... on the command line"
            )
        elif not isinstance(name, (str, int, float)) or not str(name).strip():
            self.problems.add(f"name={show(name)} {self.where('name')}: must be a non-empty string")
        grid = tree.get("grid") or {}
        if not isinstance(grid, dict):
            self.problems.add(
                f"grid={show(grid)} {self.where('grid')}: must be a mapping of axis -> value"
            )
            grid = {}
        stages = tree.get("stages") or {}
        for line in stage_problems(stages, self.where("stages")):
            self.problems.add(line)
        return ComposedSpec(
            name=str(name or ""),
            grid=grid,
            eval=self.check_section("eval", EvalConfig, tree.get("eval")),
            workers=self.check_section("workers", WorkersConfig, tree.get("workers")),
            stages=stages if isinstance(stages, dict) else {},
            axis_overrides=axis_overrides,
        )

    def check_section(self, section: str, schema: type, values: Any) -> Any:
        """One typed section (``schema`` instance) of the composed spec."""
        typed: dict[str, Any] = dataclasses.asdict(schema())
        if values is None:
            return schema(**typed)
        if not isinstance(values, dict):
            self.problems.add(f"{section}={show(values)} {self.where(section)}: must be a mapping")
            return schema(**typed)
        for key, value in values.items():
            path = f"{section}.{key}"
            if key not in typed:
                self.problems.add(
                    f"unknown key {path!r} {self.where(path)}{did_you_mean(str(key), typed)}"
                )
                continue
            try:
                merged = OmegaConf.merge(OmegaConf.structured(schema), {key: value})
            except OmegaConfBaseException as exc:
                self.problems.add(f"{path}={show(value)} {self.where(path)}: {first_line(exc)}")
                continue
            typed[key] = merged[key]
        for key, problem in range_problems(section, typed).items():
            path = f"{section}.{key}"
            self.problems.add(f"{path}={show(typed[key])} {self.where(path)}: {problem}")
            typed[key] = getattr(schema(), key)
        return schema(**typed)


def compose_spec(source: SpecSource, overrides: Sequence[str], problems: Problems) -> ComposedSpec:
    """Compose ``source`` with the command-line ``overrides`` and check it against the schema."""
    composer = _Composer(source, problems)
    axis_overrides, compose_overrides = composer.split(overrides)
    tree = composer.compose(compose_overrides)
    return composer.check_schema(tree, axis_overrides)
