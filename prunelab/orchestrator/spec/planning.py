"""Trial planning: each grid point becomes a canonical :class:`~prunelab.trial.Trial` with its
key, or a problem line. Axes a method does not use are dropped (so they collapse into one
trial); the rules of what a trial may ask belong to the objects: the budget to
:class:`~prunelab.methods.Budget`, the layer range and what a method can reach on a model to
the method (``layer_range``, ``unsupported``, ``plan_problem``), a hyperparameter to the
method's ``from_hparams``. Every (model, benchmark) gets its unpruned baseline, first."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any

import prunelab.methods as M
from prunelab.orchestrator.config import EvalConfig
from prunelab.orchestrator.spec.compose import SpecSource
from prunelab.orchestrator.spec.grid import BUDGET_AXES, GROUPS, HPARAM_PREFIX, Axis, Point
from prunelab.orchestrator.spec.groups import ConfigGroups, Preset
from prunelab.orchestrator.spec.report import Problems, did_you_mean, first_line, show
from prunelab.orchestrator.vib_stage import STAGE_DEFAULTS, head_spec
from prunelab.trial import BASELINE_METHOD, Trial, canonical_json, jsonable, trial_key
from prunelab.workers.adapters import family_module

__all__ = ["DEFAULT_SEED", "TrialPlanner", "canonical_hparams"]

DEFAULT_SEED = 0
"""Seed of a method that uses one when the grid has no ``seed`` axis."""


def _float_not_int(annotation: Any) -> bool:
    """True when a field annotated ``annotation`` takes floats but not ints (``float | None``)."""
    if annotation is float:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return float in args and int not in args
    return False


def canonical_hparams(method: M.PruningMethod) -> dict[str, Any]:
    """Every hyperparameter of a built method; ints given to float fields become floats."""
    hints = typing.get_type_hints(type(method))
    values: dict[str, Any] = {}
    for f in dataclasses.fields(method):
        value = getattr(method, f.name)
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value) if _float_not_int(hints.get(f.name)) else value
        values[f.name] = jsonable(value)
    return values


def _hp_id(preset: Preset, hp: str, value: Any) -> tuple[str, str, str]:
    return (preset.preset, hp, canonical_json(jsonable(value)))


class TrialPlanner:
    """Turns grid points into trials, recording why a point cannot be one."""

    def __init__(
        self,
        source: SpecSource,
        problems: Problems,
        groups: ConfigGroups,
        eval_config: EvalConfig,
        stages: dict[str, Any],
    ) -> None:
        self.source, self.problems, self.groups = source, problems, groups
        self.eval, self.stages = eval_config, stages
        self.bad_hparams: set[tuple[str, str, str]] = set()  # reported method.<hp> values

    # -- checks over whole axes ------------------------------------------------------------
    def check_axes(self, axes: dict[str, Axis], presets: list[Preset]) -> None:
        self._check_required(axes)
        self._check_hparam_axes(axes, presets)
        self._check_budget(axes, presets)

    def _check_required(self, axes: dict[str, Axis]) -> None:
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

    def _check_hparam_axes(self, axes: dict[str, Axis], presets: list[Preset]) -> None:
        """Each ``method.<hp>`` axis must name a hyperparameter of some method of the sweep,
        and each of its values must be valid for every method that has it."""
        for axis in [a for a in axes.values() if a.hparam is not None]:
            hp = axis.hparam
            assert hp is not None
            owners = [p for p in presets if hp in p.cls.hyperparameters()]
            if presets and not owners:
                methods = sorted({p.cls.name for p in presets})
                known = {h for p in presets for h in p.cls.hyperparameters()}
                self.problems.add(
                    f"{axis.label()}: unknown hyperparameter {hp!r} of method(s) "
                    f"{', '.join(methods)}{did_you_mean(hp, known)}"
                )
                del axes[axis.name]
                continue
            for preset in owners:
                for value in axis.values:
                    try:
                        self.groups.method(preset, {hp: value})
                    except (ValueError, TypeError) as exc:
                        self.problems.add(f"{axis.label(value)}: {first_line(exc)}")
                        self.bad_hparams.add(_hp_id(preset, hp, value))

    def _check_budget(self, axes: dict[str, Axis], presets: list[Preset]) -> None:
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

    # -- one point -------------------------------------------------------------------------
    def _layer(self, point: Point, axes: dict[str, Axis]) -> tuple[int | None, bool]:
        """The trial's prune_layer (None: unused) and whether it is valid."""
        cls = point.preset.cls
        if not cls.uses_layer:
            return None, True
        layer = point.prune_layer if point.prune_layer is not None else cls.default_prune_layer
        if layer is None:
            self.problems.add(
                f"method {cls.name!r} needs prune_layer: add prune_layer=... "
                f"in {self.source.shown} grid or on the command line"
            )
            return None, False
        info = self.groups.model_infos[point.model]
        lowest, highest = cls.layer_range(info.n_layers)
        if lowest <= layer <= highest:
            return layer, True
        origin = (
            axes["prune_layer"].label(layer)
            if point.prune_layer is not None
            else f"prune_layer={layer} (default of method {cls.name!r})"
        )
        self.problems.add(
            f"{origin}: must be in [{lowest}, {highest}] for method {cls.name!r} "
            f"on model {point.model!r} ({info.n_layers} layers)",
            skippable=True,
        )
        return None, False

    def trial(self, point: Point, axes: dict[str, Axis]) -> Trial | None:
        """The canonical trial of a grid point, or None (problems recorded) when invalid."""
        cls = point.preset.cls
        info = self.groups.model_infos[point.model]
        ratio = point.keep_ratio if cls.uses_budget else None
        tokens = point.keep_tokens if cls.uses_budget else None
        budget = None
        if cls.uses_budget:
            if (ratio is None) == (tokens is None):
                return None  # reported by _check_budget
            budget = M.Budget(keep_ratio=ratio, keep_tokens=tokens)
            if (problem := budget.reach_problem(info.n_visual)) is not None:
                self.problems.add(
                    f"{axes['keep_tokens'].label(tokens)}: {problem}, "
                    f"the visual tokens of model {point.model!r}",
                    skippable=True,
                )
                return None
        layer, ok = self._layer(point, axes)
        if not ok:
            return None
        seed = (point.seed if point.seed is not None else DEFAULT_SEED) if cls.uses_seed else None
        if any(_hp_id(point.preset, hp, v) in self.bad_hparams for hp, v in point.hparams):
            return None  # reported by _check_hparam_axes
        try:
            method = self.groups.method(point.preset, dict(point.hparams))
        except (ValueError, TypeError) as exc:
            overrides = ", ".join(f"{HPARAM_PREFIX}{hp}={show(v)}" for hp, v in point.hparams)
            self.problems.add(
                f"method {point.preset.preset!r} ({point.preset.shown}) with {overrides} "
                f"{self.source.in_grid}: {first_line(exc)}",
                skippable=True,
            )
            return None
        reason = method.unsupported(info.family)
        guide_config = None
        if reason is None and cls.needs_guidance:
            guide = self.groups.models[point.model].get("guidance")
            if guide is None:
                reason = (
                    "needs a guidance model: set `guidance: <smaller model of the same family>` "
                    "in the model config"
                )
            else:
                guide_config = self.groups.models[guide]
        vib_head = None
        if reason is None and isinstance(method, M.TrainedHeadMethod):
            assert guide_config is not None, f"{cls.name}: a trained head needs a guide"
            vib_head, reason = self._head(method, guide_config)
        mode = positions = None
        if reason is None:
            context = M.PlanContext(
                info.n_visual, info.n_layers, budget, layer, seed or 0, info.family
            )
            reason = method.plan_problem(context)
            if reason is None and budget is not None:
                mode = self._budget_mode(method, point, context)
                context = dataclasses.replace(context, budget_mode=mode)
                reason = method.plan_problem(context)
            if reason is None:
                positions, reason = self._vision_positions(method, point, context, axes)
        if reason is not None:
            where = f" with {axes['budget_mode'].label(mode)}" if mode is not None else ""
            self.problems.add(
                f"method {point.preset.preset!r} ({point.preset.shown}) on model "
                f"{point.model!r} (family {info.family}){where}: {reason}",
                skippable=True,
            )
            return None
        trial = Trial(
            model=point.model,
            benchmark=point.benchmark,
            method=cls.name,
            hparams=canonical_hparams(method),
            keep_ratio=ratio,
            keep_tokens=tokens,
            prune_layer=layer,
            seed=seed,
            budget_mode=mode,
            vision_positions=positions,
            model_config=self.groups.models[point.model],
            benchmark_config=self.groups.benchmarks[point.benchmark],
            eval=self._eval(point.benchmark),
            guidance_config=guide_config,
            vib_head=vib_head,
            preset=point.preset.preset,
        )
        key = trial_key(
            trial,
            method_version=cls.version,
            model_revision=info.revision,
            benchmark_identity=self.groups.benchmark_ids[point.benchmark],
        )
        return dataclasses.replace(trial, key=key)

    @staticmethod
    def _budget_mode(method: M.PruningMethod, point: Point, context: M.PlanContext) -> str | None:
        """The trial's ``budget_mode``: None when it is the method's own, or when both modes
        give the same plan (a vision stage alone), so equal trials share one key."""
        mode = point.budget_mode
        if mode is None or mode == method.own_budget_mode():
            return None
        plan = method.plan(context)
        if not plan.layers and plan.pre_inference is None:
            return None
        return mode

    @staticmethod
    def _vision_positions(
        method: M.PruningMethod, point: Point, context: M.PlanContext, axes: dict[str, Axis]
    ) -> tuple[str | None, str | None]:
        """The trial's ``vision_positions`` (None: the family's default, or a plan without a
        vision stage, so equal trials share one key) and why it cannot be (None: it can)."""
        value = point.vision_positions
        if value is None or not method.uses_budget:
            return None, None
        if method.plan_trial(context).vision_keep is None:
            return None, None
        supported = family_module(str(context.family)).adapter_class(context.family)
        if value not in supported.vision_positions:
            return None, (
                f"{axes['vision_positions'].label(value)}: not defined for family "
                f"{context.family}, whose kept tokens keep their M-RoPE positions"
            )
        return (None if value == supported.vision_positions[0] else value), None

    def _eval(self, benchmark: str) -> EvalConfig:
        """The eval settings of a trial on ``benchmark``: ``max_new_tokens`` unset means the
        benchmark's own (so the trial, and its key, say how many tokens were generated)."""
        if self.eval.max_new_tokens is not None:
            return self.eval
        return dataclasses.replace(self.eval, max_new_tokens=self.groups.max_new_tokens[benchmark])

    def _head(
        self, method: M.TrainedHeadMethod, guide_config: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, str | None]:
        """The trained head a method's trials need (``Trial.vib_head``), or why there is none:
        its stage's training data must be a known benchmark."""
        stage = method.stage
        settings = self.stages.get(stage) or {}
        bench = str(settings.get("benchmark", STAGE_DEFAULTS["benchmark"]))
        if not self.groups.load("benchmark", bench, f"(stages.{stage} in {self.source.shown})"):
            return None, f"the training data of stage {stage!r} is unusable"
        guide = self.groups.model_infos[guide_config["name"]]
        spec = head_spec(
            stage, settings, guide_config, guide.revision,
            self.groups.benchmarks[bench], method.head_hparams(),
        )  # fmt: skip
        return spec, None

    def baseline(self, model: str, benchmark: str) -> Trial | None:
        """The unpruned trial of (model, benchmark)."""
        if not self.groups.load("method", BASELINE_METHOD, "(the baseline)"):
            return None
        preset = self.groups.presets[BASELINE_METHOD]
        return self.trial(
            Point(model, benchmark, preset, None, None, None, None, None, None, ()), {}
        )

    # -- the sweep -------------------------------------------------------------------------
    def plan(self, points: Iterable[Point], axes: dict[str, Axis]) -> list[Trial]:
        """The distinct trials of ``points``; per (model, benchmark) its baseline first."""
        trials: dict[str, Trial] = {}
        for point in points:
            trial = self.trial(point, axes)
            if trial is not None:
                trials.setdefault(trial.key, trial)
        ordered: list[Trial] = []
        for model, benchmark in dict.fromkeys((t.model, t.benchmark) for t in trials.values()):
            group = [t for t in trials.values() if (t.model, t.benchmark) == (model, benchmark)]
            baselines = [t for t in group if t.is_baseline]
            if not baselines:
                added = self.baseline(model, benchmark)
                baselines = [added] if added is not None else []
            ordered.extend(baselines)
            ordered.extend(t for t in group if not t.is_baseline)
        return ordered
