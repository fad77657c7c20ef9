"""The spec file: find it, compose it with Hydra and the command-line overrides, check it
against the schema (:mod:`prunelab.orchestrator.config`).

Command-line overrides are split in two: those whose key is a grid axis go to the grid
(:mod:`.grid`); every other one (``eval.limit=4``, ``name=x``) goes to Hydra's compose.

Every YAML file (the spec, the configs its ``defaults`` name, the group files) is read by
:func:`read_yaml` within limits: at most :data:`MAX_YAML_BYTES` of UTF-8 text, nested at most
:data:`MAX_YAML_DEPTH` deep, at most :data:`MAX_YAML_NODES` nodes with every alias expanded
(measured on the parser's events, so an alias bomb is never built), and no NaN or infinity.
The ``defaults`` lists are followed before Hydra composes them, so that a cycle is reported
instead of recursing without end.
"""

from __future__ import annotations

import dataclasses
import io
import re
import shutil
import tempfile
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

from prunelab.orchestrator.config import (
    EvalConfig,
    SweepConfig,
    WorkersConfig,
    range_problems,
    register_schema,
)
from prunelab.orchestrator.spec.grid import AXES, axis_name, is_axis_key
from prunelab.orchestrator.spec.report import (
    COMMAND_LINE,
    NOT_FINITE,
    Problems,
    SpecError,
    did_you_mean,
    first_line,
    non_finite,
    shorten,
    show,
)
from prunelab.orchestrator.vib_stage import stage_problems
from prunelab.sweeps import SWEEPS_DIR

__all__ = [
    "MAX_DEFAULTS_DEPTH",
    "MAX_NAME_LENGTH",
    "MAX_YAML_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "ComposedSpec",
    "SpecSource",
    "compose_spec",
    "locate_spec",
    "name_problem",
    "read_yaml",
    "sweep_names",
]

_HYDRA_LOCK = threading.Lock()  # Hydra's global state is process-wide

register_schema()  # the schema and ``base`` in Hydra's ConfigStore, before any spec composes

SPEC_SUFFIXES = (".yaml", ".yml")
"""What a spec file may end in (Hydra reads ``.yaml``; a ``.yml`` one is composed from a copy)."""
MAX_YAML_BYTES = 1 << 20
"""Largest spec or config file read (1 MiB; the shipped ones are under 4 KiB)."""
MAX_YAML_DEPTH = 64
"""Deepest nesting of mappings and lists in a YAML file."""
MAX_YAML_NODES = 100_000
"""Most nodes (scalars, lists, mappings) of a YAML file once every alias is expanded."""
MAX_DEFAULTS_DEPTH = 32
"""Most levels of configs including configs through their ``defaults`` lists."""
MAX_NAME_LENGTH = 100
"""Longest sweep name (it names the MLflow experiment and its artifact directory)."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_OPEN = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSE = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


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
    # where each ``workers.<key>`` came from ("in sweeps/x.yaml", "from the command line")
    origins: dict[str, str] = dataclasses.field(default_factory=dict)

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
    if path.suffix not in SPEC_SUFFIXES:
        raise SpecError([f"spec file {spec}: a spec is a YAML file ending in .yaml or .yml"])
    resolved = path.resolve()
    if resolved.parent == SWEEPS_DIR:
        return SpecSource(resolved, spec, package_groups)
    return SpecSource(resolved, spec, ((resolved.parent, str(path.parent)), *package_groups))


def _expanded_size_problem(text: str) -> str | None:
    """Whether a YAML text nests too deeply or holds too many nodes with its aliases expanded;
    counted on the parser's events with each anchor's size remembered, so in time linear in
    the text whatever the aliases multiply to (raises :class:`yaml.YAMLError` if malformed)."""
    anchored: dict[str, int] = {}  # anchor -> nodes of its value, aliases expanded
    open_nodes: list[tuple[str | None, list[int]]] = []  # (anchor, [nodes so far])
    total = [0]
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, _OPEN):
            open_nodes.append((event.anchor, [1]))
            if len(open_nodes) > MAX_YAML_DEPTH:
                return f"nested more than {MAX_YAML_DEPTH} levels deep"
            continue
        if isinstance(event, _CLOSE):
            anchor, (size,) = open_nodes.pop()
        elif isinstance(event, yaml.ScalarEvent):
            anchor, size = event.anchor, 1
        elif isinstance(event, yaml.AliasEvent):
            anchor, size = None, anchored.get(event.anchor, 1)
        else:
            continue
        if anchor is not None:
            anchored[anchor] = size
        counter = open_nodes[-1][1] if open_nodes else total
        counter[0] += size
        if counter[0] > MAX_YAML_NODES:
            return f"more than {MAX_YAML_NODES:,} values once its aliases are expanded"
    return None


def _read_text(path: Path, shown: str) -> tuple[str | None, str | None]:
    """The file's text, or why it is not a spec-sized UTF-8 text."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        return None, f"{shown}: cannot read: {exc.strerror or first_line(exc)}"
    if len(data) > MAX_YAML_BYTES:
        return None, f"{shown}: larger than {MAX_YAML_BYTES >> 20} MiB, not a spec"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, (
            f"{shown}: not a UTF-8 text file (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        )


def _malformed(exc: yaml.YAMLError, shown: str) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    context, problem = getattr(exc, "context", None), getattr(exc, "problem", None)
    what = " ".join(p for p in (context, problem) if p) or first_line(exc)
    return f"{shown}: malformed YAML{where}: {what}"


def read_yaml(path: Path, shown: str) -> tuple[dict[str, Any] | None, str | None]:
    """A YAML mapping as plain containers, or a problem line (with the YAML error's line):
    read within the limits of this module, every number finite."""
    text, problem = _read_text(path, shown)
    if text is None:
        return None, problem
    try:
        too_big = _expanded_size_problem(text)
        if too_big is not None:
            return None, f"{shown}: {too_big}"
        loaded = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as exc:
        return None, _malformed(exc, shown)
    except (OSError, OmegaConfBaseException) as exc:
        return None, f"{shown}: cannot read: {first_line(exc)}"
    if not isinstance(loaded, DictConfig):
        return None, f"{shown}: must be a YAML mapping (key: value), not a list"
    try:
        data = OmegaConf.to_container(loaded, resolve=True)
    except OmegaConfBaseException as exc:
        return None, f"{shown}: {first_line(exc)}"
    assert isinstance(data, dict)
    for dotted, value in non_finite(data):
        return None, f"{dotted}={show(value)} in {shown}: {NOT_FINITE}"
    return {str(k): v for k, v in data.items()}, None


def name_problem(name: Any) -> str | None:
    """Why ``name`` cannot name a sweep (None: it can). It is the MLflow experiment's name and
    its artifact directory's, so a path (``../x``, ``/x``) or a long name is refused."""
    if not isinstance(name, (str, int, float)) or isinstance(name, bool) or not str(name):
        return "must be a non-empty string"
    text = str(name)
    if len(text) > MAX_NAME_LENGTH or not _NAME.fullmatch(text):
        return (
            f"must be 1 to {MAX_NAME_LENGTH} letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (it names the MLflow experiment and its artifact directory)"
        )
    return None


# -- defaults lists ---------------------------------------------------------------------------
def _default_targets(entry: Any, group: str) -> list[str]:
    """The config paths (``model/tiny-llava``, ``base``) one ``defaults`` entry of a config in
    ``group`` names; [] for ``_self_``, interpolations and optional-less placeholders."""

    def join(name: str) -> str:
        name = name.split("@", 1)[0].strip()
        if name.startswith("/"):
            return name.lstrip("/")
        return f"{group}/{name}" if group else name

    if isinstance(entry, str):
        return [] if entry in ("_self_", "") or "${" in entry else [join(entry)]
    if not isinstance(entry, dict) or len(entry) != 1:
        return []
    ((key, options),) = entry.items()
    key = str(key).split()[-1] if str(key).split() else ""
    options = options if isinstance(options, list) else [options]
    return [
        f"{join(key)}/{option}"
        for option in options
        if isinstance(option, str) and option not in ("???", "_self_") and "${" not in option
    ]


def _find_config(target: str, source: SpecSource) -> tuple[Path, str] | None:
    """The file of a config path on the spec's search path (spec dir, then the package's)."""
    for directory, shown in source.group_dirs:
        path = directory / f"{target}.yaml"
        if path.is_file():
            return path.resolve(), f"{shown}/{target}.yaml"
    return None  # in the ConfigStore (base), or missing: Hydra says so


def defaults_problem(source: SpecSource) -> str | None:
    """Follow the spec's ``defaults`` lists through the files they name: each read within the
    YAML limits, no config including itself, directly or through others."""

    def walk(path: Path, shown: str, group: str, chain: list[tuple[Path, str]]) -> str | None:
        data, problem = read_yaml(path, shown)
        if problem is not None or data is None:
            return problem
        defaults = data.get("defaults")
        for entry in defaults if isinstance(defaults, list) else []:
            for target in _default_targets(entry, group):
                found = _find_config(target, source)
                if found is None:
                    continue
                if any(found[0] == seen for seen, _ in chain):
                    cycle = " -> ".join(s for _, s in [*chain, found])
                    return f"{source.shown}: the defaults lists form a cycle: {cycle}"
                if len(chain) >= MAX_DEFAULTS_DEPTH:
                    return f"{source.shown}: defaults nest more than {MAX_DEFAULTS_DEPTH} deep"
                inner = target.rsplit("/", 1)[0] if "/" in target else ""
                problem = walk(*found, inner, [*chain, found])
                if problem is not None:
                    return problem
        return None

    return walk(source.path, source.shown, "", [(source.path, source.shown)])


def _search_path(*directories: Path) -> str:
    """A ``hydra.searchpath`` override naming ``directories``."""
    quoted = [f"file://{d}".replace("\\", "\\\\").replace("'", "\\'") for d in directories]
    return "hydra.searchpath=[" + ",".join(f"'{q}'" for q in quoted) + "]"


def _hydra_compose(source: SpecSource, overrides: Sequence[str]) -> DictConfig:
    """Compose the spec with Hydra (``base`` is in the ConfigStore; the package's sweeps dir is
    on the search path of a spec elsewhere, for the shipped configs its defaults may name).
    Hydra reads only ``.yaml`` files: a ``.yml`` spec is composed from a ``.yaml`` copy, with
    its own directory on the search path (for the sibling configs its defaults may name)."""
    search: list[Path] = []
    if source.path.parent != SWEEPS_DIR:
        search.append(SWEEPS_DIR)
    with _HYDRA_LOCK, tempfile.TemporaryDirectory(prefix="prunelab-spec-") as scratch:
        config_dir = source.path.parent
        if source.path.suffix != ".yaml":
            config_dir = Path(scratch)
            shutil.copyfile(source.path, config_dir / f"{source.path.stem}.yaml")
            search.insert(0, source.path.parent)
        extra = [_search_path(*search)] if search else []
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(config_dir), version_base=None):
                return compose(config_name=source.path.stem, overrides=[*extra, *overrides])
        finally:
            GlobalHydra.instance().clear()


def _hydra_error(exc: BaseException) -> str:
    """Hydra's or OmegaConf's message on one line, without its ``full_key:`` detail lines."""
    detail = ("full_key:", "object_type=", "reference_type=")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(detail)]
    return " ".join(kept[:2]) or type(exc).__name__


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
        problem = defaults_problem(self.source) or self._section_problem()
        if problem is not None:
            self.problems.fatal(problem)
        try:
            alone = _hydra_compose(self.source, [])
            base_tree = OmegaConf.to_container(alone, resolve=False, throw_on_missing=False)
        except (HydraException, OmegaConfBaseException) as exc:
            self.problems.fatal(f"{self.source.shown}: {_hydra_error(exc)}")
        except RecursionError:  # a cycle the defaults walk could not see (e.g. via a package)
            self.problems.fatal(f"{self.source.shown}: its defaults lists nest without end")
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
            self.problems.fatal(f"{_hydra_error(exc)} ({COMMAND_LINE})")
        except RecursionError:
            self.problems.fatal(f"the defaults lists nest without end ({COMMAND_LINE})")
        assert isinstance(tree, dict)
        if OmegaConf.is_missing(composed, "name"):
            tree.pop("name", None)
        return {str(k): v for k, v in tree.items()}

    def _section_problem(self) -> str | None:
        """A section of the spec file that is not a mapping, named before Hydra's merge into
        the schema fails on it with a message that does not say which."""
        data, problem = read_yaml(self.source.path, self.source.shown)
        if problem is not None or data is None:
            return problem
        for section in ("grid", "eval", "workers", "stages"):
            value = data.get(section)
            if value is not None and not isinstance(value, dict):
                return f"{section}={show(value)} in {self.source.shown}: must be a mapping"
        return None

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
        elif (problem := name_problem(name)) is not None:
            shown = shorten(show(name))
            self.problems.add(f"name={shown} {self.where('name')}: {problem}")
        grid = tree.get("grid") or {}
        if not isinstance(grid, dict):  # no axis can be planned: stop here
            self.problems.fatal(
                f"grid={show(grid)} {self.where('grid')}: must be a mapping of axis -> value"
            )
        stages = tree.get("stages") or {}
        self.check_stages(stages)
        return ComposedSpec(
            name=str(name or ""),
            grid=grid,
            eval=self.check_section("eval", EvalConfig, tree.get("eval")),
            workers=self.check_section("workers", WorkersConfig, tree.get("workers")),
            stages=stages if isinstance(stages, dict) else {},
            axis_overrides=axis_overrides,
            origins={
                f"workers.{f.name}": self.where(f"workers.{f.name}")
                for f in dataclasses.fields(WorkersConfig)
            },
        )

    def check_stages(self, stages: Any) -> None:
        """The training stages' settings (:func:`~prunelab.orchestrator.vib_stage.
        stage_problems`), each setting named with where it came from; numbers finite."""
        if not isinstance(stages, dict):
            for line in stage_problems(stages, self.where("stages")):
                self.problems.add(line)
            return
        for name, settings in stages.items():
            if not isinstance(settings, dict):
                for line in stage_problems({name: settings}, self.where(f"stages.{name}")):
                    self.problems.add(line)
                continue
            for key, value in settings.items():
                path = f"stages.{name}.{key}"
                bad = next(non_finite(value, path), None)
                if bad is not None:
                    self.problems.add(f"{bad[0]}={show(bad[1])} {self.where(path)}: {NOT_FINITE}")
                    continue
                for line in stage_problems({name: {key: value}}, self.where(path)):
                    self.problems.add(line)

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
                problem = NOT_FINITE if next(non_finite(value), None) else first_line(exc)
                self.problems.add(f"{path}={show(value)} {self.where(path)}: {problem}")
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
