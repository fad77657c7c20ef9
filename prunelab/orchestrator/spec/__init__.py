"""Sweep specs: compose with Hydra, expand the grid, canonicalise and validate every trial.

A spec is a Hydra config (``defaults: [base, _self_]``) whose ``grid`` maps axes to values in
Hydra's override grammar. :func:`load_sweep` turns a spec plus command-line overrides into a
:class:`SweepPlan`: one :class:`~prunelab.trial.Trial` per distinct trial, each with a stable
``trial_key``. Every problem found on the way is collected and raised together as a
:class:`SpecError`, before anything runs. The steps, one module each:

1. :mod:`.compose`: find the spec, compose it with the non-axis overrides, check the schema;
2. :mod:`.grid`: the grid's axes with the command-line axes applied, expanded, values checked;
3. :mod:`.groups`: the model / benchmark / method configs the axes name, loaded and checked;
4. :mod:`.planning`: each grid point as a canonical trial (or why it cannot be one);
5. :mod:`.report`: the problem lines and :class:`SpecError`.

Command-line overrides are split in two. One whose key is a grid axis (``model``, ``benchmark``,
``method``, ``keep_ratio``, ``keep_tokens``, ``prune_layer``, ``seed``, ``budget_mode``,
``method.<hp>``, or any of these written ``grid.<axis>``) replaces that axis of the spec's
grid; ``keep_ratio`` and ``keep_tokens`` are one budget, so a budget given on the command line
replaces either budget axis of the spec. ``~axis`` removes an axis. Every other override
(``eval.limit=4``, ``name=x``) goes to Hydra's compose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from prunelab.orchestrator.config import EvalConfig, WorkersConfig
from prunelab.orchestrator.spec.compose import compose_spec, locate_spec, read_yaml, sweep_names
from prunelab.orchestrator.spec.grid import AXES, BUDGET_AXES, GROUPS, collect_axes, grid_points
from prunelab.orchestrator.spec.groups import ConfigGroups, group_names
from prunelab.orchestrator.spec.planning import DEFAULT_SEED, TrialPlanner
from prunelab.orchestrator.spec.report import Problems, SpecError
from prunelab.sweeps import SWEEPS_DIR
from prunelab.trial import BASELINE_METHOD, Trial
from prunelab.workers.models import ModelInfo

__all__ = [
    "AXES",
    "BASELINE_METHOD",
    "BUDGET_AXES",
    "DEFAULT_SEED",
    "GROUPS",
    "SWEEPS_DIR",
    "SpecError",
    "SweepPlan",
    "Trial",
    "group_names",
    "load_sweep",
    "sweep_names",
]


@dataclass
class SweepPlan:
    """A validated sweep: its composed spec and its distinct trials (baselines first)."""

    name: str
    spec: dict[str, Any]  # the composed config, grid as effectively used (overrides applied)
    spec_yaml: str
    trials: list[Trial]
    models: dict[str, dict[str, Any]]  # model name -> model config (group file)
    benchmarks: dict[str, dict[str, Any]]  # benchmark name -> benchmark config (group file)
    eval: EvalConfig
    workers: WorkersConfig
    model_infos: dict[str, ModelInfo] = field(default_factory=dict, repr=False)
    # where each ``workers.<key>`` came from, for problems found once Ray is up
    origins: dict[str, str] = field(default_factory=dict, repr=False)
    # grid points dropped by ``skip_invalid``, one line each saying why
    skipped: list[str] = field(default_factory=list)
    # what a dry run tolerates: benchmark data not downloaded yet (path and where to get it)
    warnings: list[str] = field(default_factory=list)


def load_sweep(
    spec: str,
    overrides: Sequence[str] = (),
    *,
    skip_invalid: bool = False,
    dry_run: bool = False,
) -> SweepPlan:
    """Compose ``spec`` (a YAML path or a shipped spec's name) with ``overrides`` into a plan.

    Raises :class:`SpecError` listing every problem found (one line each, naming the value and
    where it came from) when anything is invalid. ``skip_invalid``: grid points that validation
    rejects one by one (a layer or budget out of a method's reach on a model) are dropped and
    listed in ``SweepPlan.skipped`` instead, unless every point is. ``dry_run``: benchmark
    data that is not there yet is a warning (``SweepPlan.warnings``), not a problem; the keys
    of its trials then hash the data as missing.
    """
    source = locate_spec(spec)
    _, problem = read_yaml(source.path, source.shown)
    if problem is not None:
        raise SpecError([problem])
    problems = Problems()
    composed = compose_spec(source, overrides, problems)
    groups = ConfigGroups(source.group_dirs, problems, missing_data_ok=dry_run)
    axes = collect_axes(composed.grid, composed.axis_overrides, source.in_grid, problems, groups)
    planner = TrialPlanner(source, problems, groups, composed.eval, composed.stages)
    presets = [groups.presets[p] for p in (axes["method"].values if "method" in axes else [])]
    planner.check_axes(axes, presets)
    trials = planner.plan(grid_points(axes, groups.presets), axes)
    skipped = problems.raise_if_any(skip_invalid)
    if skipped and not any(not t.is_baseline for t in trials):
        raise SpecError([*skipped, "--skip-invalid: every grid point was rejected; none to run"])

    plan_spec = composed.as_dict({name: axis.stored for name, axis in axes.items()})
    used_models = dict.fromkeys(t.model for t in trials)
    return SweepPlan(
        name=composed.name,
        spec=plan_spec,
        spec_yaml=yaml.safe_dump(plan_spec, sort_keys=False),
        trials=trials,
        models={n: groups.models[n] for n in used_models},
        benchmarks={n: groups.benchmarks[n] for n in dict.fromkeys(t.benchmark for t in trials)},
        eval=composed.eval,
        workers=composed.workers,
        model_infos={n: groups.model_infos[n] for n in used_models},
        origins=composed.origins,
        skipped=skipped,
        warnings=list(groups.warnings),
    )
