"""Sweep specs: composition, grid expansion, canonicalisation, trial keys and bad input."""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest

import prunelab.methods as M
from prunelab.methods import registry
from prunelab.orchestrator import spec as spec_module
from prunelab.orchestrator.config import WorkersConfig
from prunelab.orchestrator.spec import SpecError, SweepPlan, load_sweep
from prunelab.orchestrator.spec import groups as groups_module
from prunelab.trial import Trial

TINY_MODEL = (spec_module.SWEEPS_DIR / "model" / "tiny-llava.yaml").read_text()

SpecWriter = Callable[..., Path]


@pytest.fixture
def write_spec(tmp_path: Path) -> SpecWriter:
    """Write ``<tmp>/specs/<name>.yaml`` (and optional group files beside it); return its path."""

    def write(body: str, name: str = "mine", groups: dict[str, str] | None = None) -> Path:
        directory = tmp_path / "specs"
        directory.mkdir(exist_ok=True)
        for relative, text in (groups or {}).items():
            target = directory / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(textwrap.dedent(text))
        path = directory / f"{name}.yaml"
        path.write_text(textwrap.dedent(body))
        return path

    return write


def spec_body(grid: str, extra: str = "") -> str:
    """A spec in a user directory with the package's ``base`` as its default."""
    indented = textwrap.indent(textwrap.dedent(grid).strip(), "  ")
    return f"defaults: [base, _self_]\nname: mine\ngrid:\n{indented}\n{textwrap.dedent(extra)}"


def problems_of(spec: str | Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_sweep(str(spec), overrides or [])
    assert caught.value.problems, "SpecError without problems"
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def summary(plan: SweepPlan) -> list[tuple]:
    return [
        (t.method, t.keep_ratio, t.keep_tokens, t.prune_layer, t.seed, t.is_baseline)
        for t in plan.trials
    ]


# -- expansion ------------------------------------------------------------------------------
def test_quickstart_expands_canonical_trials() -> None:
    plan = load_sweep("quickstart", [])
    assert plan.name == "quickstart"
    # each method at its default layer: random before the LLM (layer 0), fastv after layer 2
    assert summary(plan) == [
        ("none", None, None, None, None, True),
        *[("random", r, None, 0, 0, False) for r in (0.111, 0.222, 0.333)],
        *[("fastv", r, None, 2, None, False) for r in (0.111, 0.222, 0.333)],
        *[
            (method, r, None, None, None, False)
            for method in ("visionzip", "divprune", "infoprune")
            for r in (0.111, 0.222, 0.333)
        ],
    ]
    assert len({t.key for t in plan.trials}) == 16
    assert plan.eval.limit == 200 and plan.eval.batch_size == "auto"
    assert plan.workers == WorkersConfig(
        count=2, gpus_per_worker=0.0, cpus_per_worker=1.0, max_attempts=3, trial_timeout_s=None
    )
    assert set(plan.models) == {"toy-llava"} and set(plan.benchmarks) == {"scenes"}
    assert plan.spec["grid"]["method"] == "none,random,fastv,visionzip,divprune,infoprune"
    assert "name: quickstart" in plan.spec_yaml


def test_choice_and_range_from_the_command_line_replace_spec_axes() -> None:
    plan = load_sweep("quickstart", ["method=choice(fastv)", "prune_layer=range(1,4)"])
    assert [(t.method, t.keep_ratio, t.prune_layer) for t in plan.trials if not t.is_baseline] == [
        ("fastv", r, layer) for r in (0.111, 0.222, 0.333) for layer in (1, 2, 3)
    ]
    assert plan.trials[0].method == "none"
    assert plan.spec["grid"]["prune_layer"] == "range(1,4)"


def test_glob_selects_method_presets() -> None:
    from prunelab.sweeps import group_names

    # polymorphic_3_7_16 pins the paper's layers of a 32/40-layer LLaVA: not for the 4-layer toy
    plan = load_sweep(
        "quickstart", ["method=glob(*,exclude=[random,f*,polymorphic_3_7_16])", "keep_ratio=0.5"]
    )
    expected = {
        n
        for n in group_names("method")
        if n not in ("random", "polymorphic_3_7_16") and not n.startswith("f")
    }
    assert {t.method for t in plan.trials} == expected
    assert {"none", "visionzip"} <= expected and "fastv" not in expected


def test_float_range_values_are_rounded() -> None:
    plan = load_sweep("quickstart", ["method=fastv", "keep_ratio=range(0.1,0.5,0.1)"])
    assert [t.keep_ratio for t in plan.trials if not t.is_baseline] == [0.1, 0.2, 0.3, 0.4]


def test_keep_tokens_on_the_command_line_replaces_the_spec_budget() -> None:
    plan = load_sweep("quickstart", ["method=fastv", "keep_tokens=16,32"])
    assert [(t.keep_ratio, t.keep_tokens) for t in plan.trials if not t.is_baseline] == [
        (None, 16),
        (None, 32),
    ]
    assert "keep_ratio" not in plan.spec["grid"]


def test_compose_overrides_are_applied() -> None:
    plan = load_sweep("quickstart", ["eval.limit=4", "workers.count=3", "name=other"])
    assert plan.eval.limit == 4
    assert plan.workers.count == 3
    assert plan.name == "other" and plan.spec["name"] == "other"
    assert all(t.eval.limit == 4 for t in plan.trials)


def test_grid_prefixed_axis_overrides_work() -> None:
    plan = load_sweep("quickstart", ["grid.method=fastv", "grid.keep_ratio=0.5,0.25"])
    assert [t.method for t in plan.trials] == ["none", "fastv", "fastv"]


def test_removing_an_axis_from_the_command_line() -> None:
    plan = load_sweep("quickstart", ["method=fastv", "~prune_layer", "keep_ratio=0.5"])
    assert [t.prune_layer for t in plan.trials] == [None, 2]


def test_spec_file_outside_the_package(write_spec: SpecWriter) -> None:
    path = write_spec(
        spec_body(
            """
            model: tiny-llava
            benchmark: shapes
            method: fastv
            keep_ratio: 0.25
            """,
            "eval: {limit: 5}\n",
        )
    )
    plan = load_sweep(str(path), ["workers.count=1"])
    assert plan.name == "mine"
    assert plan.eval.limit == 5 and plan.eval.max_new_tokens is None  # from the schema's base
    assert {t.eval.max_new_tokens for t in plan.trials} == {4}  # unset: the benchmark's
    assert plan.workers.count == 1
    assert [t.method for t in plan.trials] == ["none", "fastv"]


def test_group_files_beside_a_user_spec(write_spec: SpecWriter) -> None:
    path = write_spec(
        spec_body("model: my-tiny\nbenchmark: shapes\nmethod: fastv_all\nkeep_ratio: 0.5"),
        groups={
            "model/my-tiny.yaml": TINY_MODEL.replace("name: tiny-llava", "name: my-tiny"),
            "method/fastv_all.yaml": "name: fastv\nhparams: {queries: all}\n",
        },
    )
    plan = load_sweep(str(path), [])
    pruned = plan.trials[1]
    assert (pruned.model, pruned.method, pruned.preset) == ("my-tiny", "fastv", "fastv_all")
    assert pruned.hparams == {"queries": "all"}
    assert pruned.params()["method.queries"] == "all"


def test_load_sweep_can_be_called_repeatedly() -> None:
    first = load_sweep("quickstart", [])
    second = load_sweep("quickstart", [])
    assert [t.key for t in first.trials] == [t.key for t in second.trials]


# -- canonicalisation ------------------------------------------------------------------------
def test_none_ignores_budget_layer_and_seed() -> None:
    plan = load_sweep(
        "quickstart", ["method=none", "keep_ratio=0.1,0.2,0.3", "prune_layer=1,2", "seed=0,1"]
    )
    assert len(plan.trials) == 1
    only = plan.trials[0]
    assert (only.keep_ratio, only.keep_tokens, only.prune_layer, only.seed) == (None,) * 4
    assert only.is_baseline


def test_random_keeps_seed_and_fastv_drops_it() -> None:
    plan = load_sweep("quickstart", ["method=random,fastv", "keep_ratio=0.5", "seed=0,1"])
    assert summary(plan) == [
        ("none", None, None, None, None, True),
        ("random", 0.5, None, 0, 0, False),
        ("random", 0.5, None, 0, 1, False),
        ("fastv", 0.5, None, 2, None, False),
    ]


def test_default_seed_equals_explicit_seed_zero() -> None:
    implicit = load_sweep("quickstart", ["method=random", "keep_ratio=0.5"])
    explicit = load_sweep("quickstart", ["method=random", "keep_ratio=0.5", "seed=0"])
    assert [t.key for t in implicit.trials] == [t.key for t in explicit.trials]


def test_fastv_gets_its_default_prune_layer() -> None:
    plan = load_sweep("quickstart", ["method=fastv", "keep_ratio=0.5", "~prune_layer"])
    assert plan.trials[1].prune_layer == 2
    explicit = load_sweep("quickstart", ["method=fastv", "keep_ratio=0.5", "prune_layer=2"])
    assert plan.trials[1].key == explicit.trials[1].key


def test_hyperparameters_resolve_to_defaults() -> None:
    default = load_sweep("quickstart", ["method=fastv", "keep_ratio=0.5"])
    explicit = load_sweep("quickstart", ["method=fastv", "keep_ratio=0.5", "method.queries=last"])
    assert default.trials[1].hparams == {"queries": "last"}
    assert default.trials[1].key == explicit.trials[1].key
    swept = load_sweep(
        "quickstart", ["method=fastv,none", "keep_ratio=0.5", "method.queries=last,all"]
    )
    assert [(t.method, t.hparams) for t in swept.trials] == [
        ("none", {}),
        ("fastv", {"queries": "last"}),
        ("fastv", {"queries": "all"}),
    ]


@dataclasses.dataclass(frozen=True)
class VisionOnly(M.PruningMethod):
    """A pre-LLM method for the test: uses the budget, not the layer."""

    strength: float = 1.0

    name: ClassVar[str] = "test-vision-only"
    stages: ClassVar[str] = "vision"

    def plan(self, ctx: M.PlanContext) -> M.Plan:
        assert ctx.budget is not None
        return M.Plan(vision_keep=ctx.budget.tokens(ctx.n_visual))


def test_vision_only_method_drops_the_layer_axis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._REGISTRY, VisionOnly.name, VisionOnly)
    plan = load_sweep(
        "quickstart",
        [
            "method=test-vision-only,fastv",
            "keep_ratio=0.25",
            "prune_layer=1,2",
            "method.strength=2",
        ],
    )
    assert summary(plan) == [
        ("none", None, None, None, None, True),
        ("test-vision-only", 0.25, None, None, None, False),
        ("fastv", 0.25, None, 1, None, False),
        ("fastv", 0.25, None, 2, None, False),
    ]
    vision = plan.trials[1]
    assert vision.hparams == {"strength": 2.0}  # int given to a float field is canonical float
    assert vision.params() == {
        "model": "toy-llava",
        "benchmark": "scenes",
        "method": "test-vision-only",
        "keep_ratio": 0.25,
        "keep_tokens": None,
        "prune_layer": None,
        "seed": None,
        "method.strength": 2.0,
    }
    assert vision.run_params() == {
        **vision.params(),
        "eval.limit": 200,
        "eval.sample_seed": 0,
        "eval.max_new_tokens": 4,  # unset: the benchmark's (scenes: 4)
        "eval.fidelity": True,
        "eval.flops_convention": "pdrop",
        "eval.scoring": "lmms_eval",
    }
    same = load_sweep(
        "quickstart", ["method=test-vision-only", "keep_ratio=0.25", "method.strength=2.0"]
    )
    assert same.trials[1].key == vision.key


# -- baselines -------------------------------------------------------------------------------
def test_baseline_added_for_each_model_and_benchmark(write_spec: SpecWriter) -> None:
    path = write_spec(
        spec_body("model: tiny-llava,tiny-b\nbenchmark: shapes\nmethod: fastv\nkeep_ratio: 0.5"),
        groups={
            "model/tiny-b.yaml": TINY_MODEL.replace("name: tiny-llava", "name: tiny-b").replace(
                "seed: 0", "seed: 1"
            )
        },
    )
    plan = load_sweep(str(path), [])
    assert [(t.model, t.method, t.is_baseline) for t in plan.trials] == [
        ("tiny-llava", "none", True),
        ("tiny-llava", "fastv", False),
        ("tiny-b", "none", True),
        ("tiny-b", "fastv", False),
    ]
    baseline_keys = {t.key for t in plan.trials if t.is_baseline}
    assert len(baseline_keys) == 2


def test_baseline_in_the_grid_is_not_duplicated() -> None:
    plan = load_sweep("quickstart", [])
    assert [t.method for t in plan.trials].count("none") == 1


# -- trial config and identity ---------------------------------------------------------------
def test_trial_config_holds_everything_a_worker_needs() -> None:
    plan = load_sweep("quickstart", ["method=none,random,fastv"])
    trial = plan.trials[-1]
    config = trial.to_dict()
    assert config["key"] == trial.key
    assert (config["model"], config["benchmark"], config["method"]) == (
        "toy-llava",
        "scenes",
        "fastv",
    )
    assert config["model_config"]["family"] == "llava"
    assert config["benchmark_config"]["kind"] == "scenes"
    assert config["eval"]["limit"] == 200
    assert (config["keep_ratio"], config["prune_layer"], config["seed"]) == (0.333, 2, None)
    config["model_config"]["family"] = "changed"
    assert trial.to_dict()["model_config"]["family"] == "llava"  # a fresh copy each time
    assert isinstance(trial, Trial) and hash(trial) == hash(trial.key)
    assert Trial.from_dict(config | {"model_config": trial.model_config}) == trial


def keys(overrides: list[str]) -> list[str]:
    return [t.key for t in load_sweep("quickstart", overrides).trials]


def test_trial_keys_are_stable_and_hex_sha256() -> None:
    first = keys([])
    assert first == keys([])
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in first)


def test_keys_change_with_result_settings_not_with_workers() -> None:
    base = keys(["method=fastv", "keep_ratio=0.5"])
    assert keys(["method=fastv", "keep_ratio=0.5", "workers.count=5"]) == base
    assert keys(["method=fastv", "keep_ratio=0.5", "eval.warmup=7"]) == base
    for changed in (["eval.limit=4"], ["eval.sample_seed=1"], ["eval.flops_convention=fastv"]):
        assert set(keys(["method=fastv", "keep_ratio=0.5", *changed])).isdisjoint(base)
    with_hparam = keys(["method=fastv", "keep_ratio=0.5", "method.queries=all"])
    assert with_hparam[0] == base[0] and with_hparam[1] != base[1]


def test_keys_change_with_model_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    base = keys(["method=fastv", "keep_ratio=0.5"])
    real = groups_module.describe_model

    def other_revision(cfg):  # type: ignore[no-untyped-def]
        return dataclasses.replace(real(cfg), revision="another-revision")

    monkeypatch.setattr(groups_module, "describe_model", other_revision)
    assert set(keys(["method=fastv", "keep_ratio=0.5"])).isdisjoint(base)


def test_keys_change_with_method_version(monkeypatch: pytest.MonkeyPatch) -> None:
    base = keys(["method=fastv", "keep_ratio=0.5"])
    monkeypatch.setattr(M.get("fastv"), "version", "999")
    changed = keys(["method=fastv", "keep_ratio=0.5"])
    assert changed[0] == base[0] and changed[1] != base[1]


# -- bad input: one test per kind ------------------------------------------------------------
def test_spec_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert problems_of(missing) == [f"spec file {missing} not found"]


def test_spec_name_unknown() -> None:
    (line,) = problems_of("quickstrat")
    assert line.startswith("unknown sweep spec 'quickstrat'")
    assert "did you mean 'quickstart'?" in line


def test_malformed_yaml_names_the_line(write_spec: SpecWriter) -> None:
    path = write_spec("name: x\ngrid:\n  method: [none\n  model: a\n")
    (line,) = problems_of(path)
    assert line.startswith(f"{path}: malformed YAML (line 4, column 8):")


def test_missing_default_config(write_spec: SpecWriter) -> None:
    path = write_spec("defaults: [basee, _self_]\nname: x\n")
    (line,) = problems_of(path)
    assert line.startswith(f"{path}: ") and "'basee'" in line


def test_override_grammar_error() -> None:
    (line,) = problems_of("quickstart", ["keep_ratio=(("])
    assert line.startswith("keep_ratio=(( from the command line: mismatched input")


def test_unknown_method_suggests_the_closest(write_spec: SpecWriter) -> None:
    path = write_spec(spec_body("model: tiny-llava\nbenchmark: shapes\nmethod: fastvv"))
    assert problems_of(path) == [f"unknown method 'fastvv' in {path} grid; did you mean 'fastv'?"]
    assert problems_of("quickstart", ["method=fastvv"]) == [
        "unknown method 'fastvv' from the command line; did you mean 'fastv'?"
    ]


def test_unknown_model_and_benchmark() -> None:
    assert problems_of("quickstart", ["model=tiny-lava", "benchmark=shape"]) == [
        "unknown model 'tiny-lava' from the command line; did you mean 'tiny-llava'?",
        "unknown benchmark 'shape' from the command line; did you mean 'shapes'?",
    ]


def test_keep_ratio_out_of_range(write_spec: SpecWriter) -> None:
    path = write_spec(
        spec_body("model: tiny-llava\nbenchmark: shapes\nmethod: fastv\nkeep_ratio: 1.5")
    )
    assert problems_of(path) == [f"keep_ratio=1.5 in {path} grid: must be in (0, 1]"]
    assert problems_of("quickstart", ["keep_ratio=0,0.5"]) == [
        "keep_ratio=0 from the command line: must be in (0, 1]"
    ]
    assert problems_of("quickstart", ["keep_ratio=abc"]) == [
        "keep_ratio=abc from the command line: must be a number in (0, 1]"
    ]


def test_keep_tokens_out_of_range() -> None:
    assert problems_of("quickstart", ["keep_tokens=0"]) == [
        "keep_tokens=0 from the command line: must be an integer >= 1"
    ]
    assert problems_of("quickstart", ["keep_tokens=145"]) == [
        "keep_tokens=145 from the command line: must be <= 144, "
        "the visual tokens of model 'toy-llava'"
    ]


def test_prune_layer_out_of_range() -> None:
    assert problems_of("quickstart", ["method=fastv", "prune_layer=0,4"]) == [
        "prune_layer=0 from the command line: must be in [1, 3] for method 'fastv' "
        "on model 'toy-llava' (4 layers)",
        "prune_layer=4 from the command line: must be in [1, 3] for method 'fastv' "
        "on model 'toy-llava' (4 layers)",
    ]


def test_unknown_grid_axis(write_spec: SpecWriter) -> None:
    path = write_spec(
        spec_body("model: tiny-llava\nbenchmark: shapes\nmethod: none\nkeep_ration: 0.5")
    )
    assert problems_of(path) == [
        f"unknown grid axis 'keep_ration' in {path} grid; did you mean 'keep_ratio'?"
    ]
    assert problems_of("quickstart", ["keep_ratoi=0.5"]) == [
        "unknown setting 'keep_ratoi' (keep_ratoi=0.5 from the command line); "
        "did you mean 'keep_ratio'?"
    ]


def test_hyperparameter_of_the_wrong_type() -> None:
    assert problems_of("quickstart", ["method.queries=5"]) == [
        "method.queries=5 from the command line: fastv.queries=5: expected one of 'last', 'all'"
    ]


def test_unknown_hyperparameter() -> None:
    assert problems_of("quickstart", ["method=fastv", "method.querys=all"]) == [
        "method.querys=all from the command line: unknown hyperparameter 'querys' of method(s) "
        "fastv; did you mean 'queries'?"
    ]


def test_bad_hyperparameter_in_a_preset(write_spec: SpecWriter) -> None:
    path = write_spec(
        spec_body("model: tiny-llava\nbenchmark: shapes\nmethod: fastv_x\nkeep_ratio: 0.5"),
        groups={"method/fastv_x.yaml": "name: fastv\nhparams: {querys: all}\n"},
    )
    (line,) = problems_of(path)
    assert line.startswith(
        f"method preset 'fastv_x' ({path.parent}/method/fastv_x.yaml) hparams: "
        "unknown hyperparameter(s) querys"
    )


def test_pruning_method_without_budget() -> None:
    assert problems_of("quickstart", ["~keep_ratio"]) == [
        "method(s) divprune, fastv, infoprune, random, visionzip prune but the grid has neither "
        "keep_ratio nor keep_tokens: "
        "add one in sweeps/quickstart.yaml grid or on the command line (e.g. keep_ratio=0.25)"
    ]


def test_both_budget_axes(write_spec: SpecWriter) -> None:
    path = write_spec(
        spec_body(
            "model: tiny-llava\nbenchmark: shapes\nmethod: fastv\nkeep_ratio: 0.5\nkeep_tokens: 8"
        )
    )
    assert problems_of(path) == [
        f"keep_ratio (in {path} grid) and keep_tokens (in {path} grid) are both given: "
        "a trial of fastv takes one budget; keep one of the two axes"
    ]


def test_wrong_types_in_eval_and_workers(write_spec: SpecWriter) -> None:
    assert problems_of("quickstart", ["eval.limit=abc", "workers.count=0"]) == [
        "eval.limit=abc from the command line: "
        "Value 'abc' of type 'str' could not be converted to Integer",
        "workers.count=0 from the command line: must be >= 1",
    ]
    path = write_spec(
        spec_body(
            "model: tiny-llava\nbenchmark: shapes\nmethod: none",
            "eval: {flops_convention: wrong, fidelty: true}\n",
        )
    )
    assert problems_of(path) == [
        f"unknown key 'eval.fidelty' in {path}; did you mean 'fidelity'?",
        f"eval.flops_convention=wrong in {path}: must be one of fastv, pdrop, exact",
    ]


def test_unknown_compose_key_suggests_the_closest() -> None:
    assert problems_of("quickstart", ["eval.limt=4"]) == [
        "unknown setting 'eval.limt' (eval.limt=4 from the command line); "
        "did you mean 'eval.limit'?"
    ]


def test_model_config_rejected(write_spec: SpecWriter) -> None:
    path = write_spec(
        spec_body("model: broken\nbenchmark: shapes\nmethod: none"),
        groups={"model/broken.yaml": "name: broken\nfamily: nope\nsource: tiny\n"},
    )
    assert problems_of(path) == [
        f"model 'broken' ({path.parent}/model/broken.yaml): family='nope': expected one of "
        "internvl, llava, llava_next, qwen2_5_vl, qwen2_vl"
    ]


def test_benchmark_config_rejected(write_spec: SpecWriter) -> None:
    path = write_spec(
        spec_body("model: tiny-llava\nbenchmark: odd\nmethod: none"),
        groups={"benchmark/odd.yaml": "name: odd\nkind: unknown\n"},
    )
    from prunelab.workers.benchmarks import BENCHMARKS

    assert problems_of(path) == [
        f"benchmark 'odd' ({path.parent}/benchmark/odd.yaml): "
        f"benchmark kind='unknown': expected one of {', '.join(BENCHMARKS.names())}"
    ]


def test_empty_grid(write_spec: SpecWriter) -> None:
    path = write_spec("defaults: [base, _self_]\nname: empty\n")
    (line,) = problems_of(path)
    assert line.startswith(f"the grid is empty ({path} and the command line)")


def test_missing_group_axis(write_spec: SpecWriter) -> None:
    path = write_spec(spec_body("model: tiny-llava\nmethod: none"))
    assert problems_of(path) == [
        f"the grid has no benchmark axis: set grid.benchmark in {path} "
        "or benchmark=... on the command line"
    ]


def test_continuous_sweep_and_glob_on_a_number_axis() -> None:
    assert problems_of("quickstart", ["seed=interval(0,1)", "keep_ratio=glob(*)"]) == [
        "keep_ratio=glob(*) from the command line: glob() selects config names; "
        "only model, benchmark, method take it",
        "seed=interval(0,1) from the command line: interval() is continuous; "
        "use a choice list or range()",
    ]


def test_all_problems_are_reported_together() -> None:
    problems = problems_of(
        "quickstart",
        ["keep_ratio=1.5,0.5", "method=fastvv,fastv", "prune_layer=9", "eval.limit=abc"],
    )
    assert problems == [
        "eval.limit=abc from the command line: "
        "Value 'abc' of type 'str' could not be converted to Integer",
        "unknown method 'fastvv' from the command line; did you mean 'fastv'?",
        "keep_ratio=1.5 from the command line: must be in (0, 1]",
        "prune_layer=9 from the command line: must be in [1, 3] for method 'fastv' "
        "on model 'toy-llava' (4 layers)",
    ]


def test_yaml_list_is_a_choice_list(write_spec: SpecWriter) -> None:
    """In a spec's grid, a YAML list of a core axis is its choices (the natural YAML form)."""
    as_list = write_spec(
        spec_body("model: tiny-llava\nbenchmark: shapes\nmethod: [none, fastv, fastv]\n"
                  "keep_ratio: [0.5, 0.25]"),
        name="listed",
    )  # fmt: skip
    as_text = write_spec(
        spec_body("model: tiny-llava\nbenchmark: shapes\nmethod: none,fastv\n"
                  "keep_ratio: 0.5,0.25"),
        name="texted",
    )  # fmt: skip
    listed, texted = load_sweep(str(as_list)), load_sweep(str(as_text))
    assert [t.key for t in listed.trials] == [t.key for t in texted.trials]
    assert len(listed.trials) == 3


def test_a_list_inside_a_list_or_on_the_command_line_is_one_value(
    write_spec: SpecWriter,
) -> None:
    path = write_spec(spec_body("model: tiny-llava\nbenchmark: shapes\nmethod: [[none, fastv]]"))
    assert problems_of(path) == [
        f'method=["none", "fastv"] in {path} grid: a list is one value in override grammar; '
        "to sweep, write a choice list: method=none,fastv"
    ]
    assert problems_of(path, ["method=[none,fastv]"]) == [
        'method=["none", "fastv"] from the command line: a list is one value in override '
        "grammar; to sweep, write a choice list: method=none,fastv"
    ]


def test_a_yml_spec_is_read_like_a_yaml_one(write_spec: SpecWriter) -> None:
    path = write_spec(spec_body("model: tiny-llava\nbenchmark: shapes\nmethod: none"))
    yml = path.with_suffix(".yml")
    path.rename(yml)
    plan = load_sweep(str(yml), ["eval.limit=3"])
    assert plan.name == "mine" and plan.eval.limit == 3 and len(plan.trials) == 1
    assert problems_of(str(yml.with_suffix(".json"))) == [
        f"spec file {yml.with_suffix('.json')} not found"
    ]


def test_a_guidance_method_needs_a_guidance_model(write_spec: SpecWriter) -> None:
    grid = "model: tiny-internvl\nbenchmark: shapes\nmethod: sgp\nkeep_ratio: 0.5"
    path = write_spec(spec_body(grid))
    (problem,) = problems_of(path)
    assert "method 'sgp'" in problem and "tiny-internvl" in problem
    assert "needs a guidance model" in problem


def test_guidance_model_config_travels_with_the_trial() -> None:
    plan = load_sweep("quickstart", ["method=sgp", "keep_ratio=0.25"])
    (trial,) = [t for t in plan.trials if t.method == "sgp"]
    assert trial.to_dict()["guidance_config"]["name"] == "toy-llava-small"
    baseline = next(t for t in plan.trials if t.is_baseline)
    assert "guidance_config" not in baseline.to_dict()
