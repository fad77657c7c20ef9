"""Config groups: the ``model/``, ``benchmark/`` and ``method/`` files a spec names, looked up in
the spec file's directory first, then in the package's ``prunelab/sweeps``. Each is loaded and
checked once by the object it configures: a model by ``describe_model``, a benchmark by its
class (and its data files' ``check``), a method preset by the method's ``from_hparams``. A
method with no preset file is used with its default hyperparameters when it is registered."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import prunelab.methods as M
from prunelab import sweeps
from prunelab.orchestrator.spec.compose import read_yaml
from prunelab.orchestrator.spec.grid import GROUPS
from prunelab.orchestrator.spec.report import Problems, did_you_mean, first_line, one_line, show
from prunelab.trial import canonical_json, jsonable
from prunelab.workers.benchmarks import build_benchmark
from prunelab.workers.benchmarks.lmms import MissingDataError
from prunelab.workers.models import ModelInfo, describe_model

__all__ = ["ConfigGroups", "Preset", "group_names"]


def group_names(group: str) -> list[str]:
    """Names of the configs of ``group`` (model, benchmark or method) shipped in the package."""
    if group not in GROUPS:
        raise ValueError(f"unknown config group {group!r}; expected one of {', '.join(GROUPS)}")
    return sweeps.group_names(group)


@dataclass(frozen=True)
class Preset:
    """A method preset: the registered method and its hyperparameter overrides."""

    preset: str
    cls: type[M.PruningMethod]
    hparams: dict[str, Any]
    shown: str  # the preset file, or a note that the registry supplied it


class ConfigGroups:
    """The group configs of one spec, loaded on first use; problems go to ``problems``."""

    def __init__(
        self,
        group_dirs: tuple[tuple[Path, str], ...],
        problems: Problems,
        missing_data_ok: bool = False,
    ) -> None:
        self.group_dirs, self.problems = group_dirs, problems
        # a dry run plans without the benchmark data: its absence is a warning
        self.missing_data_ok = missing_data_ok
        self.warnings: list[str] = []
        self.models: dict[str, dict[str, Any]] = {}
        self.model_infos: dict[str, ModelInfo] = {}
        self.benchmarks: dict[str, dict[str, Any]] = {}
        self.benchmark_ids: dict[str, dict[str, Any]] = {}  # name -> benchmark.describe()
        # name -> the benchmark's own new-token budget (lmms-eval's generation_kwargs)
        self.max_new_tokens: dict[str, int] = {}
        self.presets: dict[str, Preset] = {}
        self._methods: dict[tuple[str, str], M.PruningMethod | str] = {}  # str: the error

    def candidates(self, group: str) -> list[str]:
        names = set(self.files(group))
        if group == "method":
            names |= set(M.available())
        return sorted(names)

    def files(self, group: str) -> dict[str, tuple[Path, str]]:
        """Config names of ``group`` -> (file, how problems name it); spec dir first."""
        files: dict[str, tuple[Path, str]] = {}
        for directory, shown in self.group_dirs:
            for path in sorted((directory / group).glob("*.yaml")):
                files.setdefault(path.stem, (path, f"{shown}/{group}/{path.name}"))
        return files

    def load(self, group: str, name: str, where: str) -> bool:
        """Load and check one model / benchmark / method config; False when unusable.
        ``where``: how a problem line names the place that asked for it."""
        cache = {"model": self.models, "benchmark": self.benchmarks, "method": self.presets}
        if name in cache[group]:
            return True
        files = self.files(group)
        if name not in files:
            if group == "method" and name in M.available():
                cls = M.get(name)
                self.presets[name] = Preset(name, cls, {}, f"registered method {name!r}")
                return True
            hint = did_you_mean(name, self.candidates(group))
            self.problems.add(f"unknown {group} {name!r} {where}{hint}")
            return False
        path, shown = files[name]
        data, problem = read_yaml(path, shown)
        if problem is not None or data is None:
            self.problems.add(problem or f"{shown}: empty")
            return False
        loader = {"model": self._model, "benchmark": self._benchmark, "method": self._preset}
        return loader[group](name, data, shown)

    def _name_field(self, group: str, name: str, data: dict[str, Any], shown: str) -> bool:
        data.setdefault("name", name)
        if data["name"] != name:
            self.problems.add(
                f"{group} {name!r} ({shown}): name: {show(data['name'])} differs from the file name"
            )
            return False
        return True

    def _model(self, name: str, data: dict[str, Any], shown: str) -> bool:
        if not self._name_field("model", name, data, shown):
            return False
        try:
            info = describe_model(data)
        except Exception as exc:  # config checks of third-party classes raise many kinds
            self.problems.add(f"model {name!r} ({shown}): {one_line(exc)}")
            return False
        self.models[name] = data
        self.model_infos[name] = info
        guide = data.get("guidance")
        if guide is not None:
            if not self.load("model", str(guide), f"(model {name!r}, {shown})"):
                return False
            if self.model_infos[guide].family != info.family:
                self.problems.add(
                    f"model {name!r} ({shown}): guidance model {guide!r} is of family "
                    f"{self.model_infos[guide].family}, not {info.family}"
                )
                return False
        return True

    def _benchmark(self, name: str, data: dict[str, Any], shown: str) -> bool:
        if not self._name_field("benchmark", name, data, shown):
            return False
        try:
            benchmark = build_benchmark(data)
            check = getattr(benchmark, "check", None)
            if callable(check):  # data files: missing or malformed ones fail here, named
                try:
                    check()
                except MissingDataError as exc:
                    hint = getattr(benchmark, "download_hint", lambda: "")()
                    line = f"benchmark {name!r} ({shown}): {one_line(exc)}"
                    line += f"; {hint}" if hint else ""
                    if not self.missing_data_ok:
                        self.problems.add(line)
                        return False
                    self.warnings.append(line)
            identity = benchmark.describe()
        except Exception as exc:  # a benchmark's constructor may reject options in any way
            self.problems.add(f"benchmark {name!r} ({shown}): {one_line(exc)}")
            return False
        self.benchmarks[name] = data
        self.benchmark_ids[name] = jsonable(identity)
        self.max_new_tokens[name] = int(benchmark.max_new_tokens)
        return True

    def _preset(self, name: str, data: dict[str, Any], shown: str) -> bool:
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
            self.problems.add(f"method preset {name!r} ({shown}) hparams: {first_line(exc)}")
            return False
        self.presets[name] = Preset(name, cls, dict(hparams), shown)
        return True

    def method(self, preset: Preset, hparams: dict[str, Any]) -> M.PruningMethod:
        """The method of ``preset`` with ``hparams`` applied on top (cached); raises
        :class:`~prunelab.methods.HyperparameterError` (or ValueError) on bad ones."""
        cache_key = (preset.preset, canonical_json(jsonable(hparams)))
        if cache_key not in self._methods:
            try:
                self._methods[cache_key] = preset.cls.from_hparams({**preset.hparams, **hparams})
            except (ValueError, TypeError) as exc:
                self._methods[cache_key] = first_line(exc)
        method = self._methods[cache_key]
        if isinstance(method, str):
            raise M.HyperparameterError(method)
        return method
