"""Every YAML file shipped in ``prunelab/sweeps`` composes and validates."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

import prunelab.methods as M
from prunelab.orchestrator.config import (
    BASE_NAME,
    SCHEMA_NAME,
    EvalConfig,
    SweepConfig,
    WorkersConfig,
    range_problems,
)
from prunelab.orchestrator.spec import SWEEPS_DIR, group_names, load_sweep, sweep_names
from prunelab.workers.benchmarks import build_benchmark
from prunelab.workers.models import ModelSpec, describe_model

ALL_YAML = sorted(p.relative_to(SWEEPS_DIR).as_posix() for p in SWEEPS_DIR.rglob("*.yaml"))


def load_plain(relative: str) -> dict:
    data = OmegaConf.to_container(OmegaConf.load(SWEEPS_DIR / relative), resolve=True)
    assert isinstance(data, dict), f"{relative} is not a mapping"
    return data


def test_every_yaml_file_is_covered() -> None:
    covered = {f"{name}.yaml" for name in sweep_names()}
    for group in ("model", "benchmark", "method"):
        covered |= {f"{group}/{name}.yaml" for name in group_names(group)}
    assert set(ALL_YAML) == covered


def test_base_is_the_schema_defaults() -> None:
    """``base`` (what every spec starts from) is the schema's defaults, defined once."""
    from hydra.core.config_store import ConfigStore

    base = OmegaConf.create(ConfigStore.instance().load(f"{BASE_NAME}.yaml").node)
    assert OmegaConf.is_missing(base, "name")
    assert OmegaConf.to_container(base.eval) == dataclasses.asdict(EvalConfig())
    assert OmegaConf.to_container(base.workers) == dataclasses.asdict(WorkersConfig())
    assert set(base) == {f.name for f in dataclasses.fields(SweepConfig)}
    assert range_problems("eval", OmegaConf.to_container(base.eval)) == {}
    assert range_problems("workers", OmegaConf.to_container(base.workers)) == {}


def test_schema_is_in_the_config_store() -> None:
    from hydra.core.config_store import ConfigStore

    assert ConfigStore.instance().load(f"{SCHEMA_NAME}.yaml").node is not None


@pytest.mark.parametrize("name", sweep_names())
def test_spec_composes_and_expands(name: str, tmp_path, monkeypatch) -> None:
    """Every shipped spec plans offline (pretrained models from their shipped configs, the
    benchmark data absent: a dry run's warnings)."""
    monkeypatch.setenv("PRUNELAB_DATA", str(tmp_path / "no-data"))
    plan = load_sweep(name, [], dry_run=True)
    assert plan.trials, f"{name} expands to no trials"
    assert len({t.key for t in plan.trials}) == len(plan.trials)
    assert all(t.is_baseline for t in plan.trials if t.method == "none")


def test_quickstart_has_sixteen_trials() -> None:
    """The unpruned model once, then five methods at the papers' three budgets, on scenes."""
    plan = load_sweep("quickstart", [])
    methods = [t.method for t in plan.trials]
    assert len(plan.trials) == 16 and {t.benchmark for t in plan.trials} == {"scenes"}
    assert methods.count("none") == 1
    for method in ("random", "fastv", "visionzip", "divprune", "infoprune"):
        assert methods.count(method) == 3, method


@pytest.mark.parametrize("name", group_names("model"))
def test_model_config_is_valid(name: str) -> None:
    data = load_plain(f"model/{name}.yaml")
    assert data["name"] == name
    spec = ModelSpec.from_config(data)
    info = describe_model(spec)  # pretrained ones from their shipped config, offline
    assert info.n_layers > 0 and info.n_visual > 0


@pytest.mark.parametrize("name", group_names("benchmark"))
def test_benchmark_config_is_valid(name: str) -> None:
    data = load_plain(f"benchmark/{name}.yaml")
    assert data["name"] == name
    assert build_benchmark(data).describe()


@pytest.mark.parametrize("name", group_names("method"))
def test_method_preset_is_valid(name: str) -> None:
    data = load_plain(f"method/{name}.yaml")
    assert set(data) <= {"name", "hparams"}
    cls = M.get(data.get("name", name))
    cls.from_hparams(data.get("hparams") or {})
