"""Planning without the hub or the data (shipped checkpoint configs, missing data as a dry-run
warning), the ``budget_mode`` axis in plans and reports, ``--skip-invalid``, and options mixed
with overrides on the command line."""

from __future__ import annotations

import json
import socket
import textwrap
from pathlib import Path

import pytest
import yaml
from checkpoint_configs import CHECKPOINTS, SHAPES

from prunelab.orchestrator.cli import main, parse
from prunelab.orchestrator.results import build_report
from prunelab.orchestrator.spec import SWEEPS_DIR, SpecError, load_sweep, sweep_names
from prunelab.orchestrator.tables import report_markdown
from prunelab.workers.models import HUB_CONFIGS_DIR, describe_model, shipped_config


def load_plain(relative: str) -> dict:
    return yaml.safe_load((SWEEPS_DIR / relative).read_text())


SHIPPED_SPECS = [n for n in sweep_names() if n.startswith(("paper_", "baselines"))]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test (the hub included)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access while planning offline: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def empty_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "no-data"
    monkeypatch.setenv("PRUNELAB_DATA", str(data))
    return data


# -- shipped configs --------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_shipped_config_is_the_checkpoints_and_plans_offline(name: str, no_network) -> None:
    """Each pretrained model config's hub checkpoint has its config.json in the package (a few
    KB, no weights), made by the transformers config class with the checkpoint's shapes; the
    model is described from it without the hub."""
    model = load_plain(f"model/{name}.yaml")
    directory = shipped_config(model["path"])
    assert directory is not None and directory.parent.parent == HUB_CONFIGS_DIR
    from transformers import AutoConfig

    shipped = AutoConfig.from_pretrained(directory).to_dict()
    made = CHECKPOINTS[name]().to_dict()
    for volatile in ("transformers_version", "_name_or_path"):
        shipped.pop(volatile, None)
        made.pop(volatile, None)
    assert json.loads(json.dumps(shipped)) == json.loads(json.dumps(made))
    assert (directory / "config.json").stat().st_size < 4096
    info = describe_model(model)
    assert (info.n_layers, info.n_visual) == SHAPES[name]


def test_every_pretrained_model_config_has_a_shipped_config() -> None:
    pretrained = [
        load_plain(f"model/{p.stem}.yaml")
        for p in sorted((SWEEPS_DIR / "model").glob("*.yaml"))
        if load_plain(f"model/{p.stem}.yaml")["source"] == "pretrained"
        and not load_plain(f"model/{p.stem}.yaml")["path"].startswith("builtin:")
    ]
    assert pretrained and all(shipped_config(m["path"]) is not None for m in pretrained)


def test_a_local_directory_or_a_revision_is_not_replaced(tmp_path: Path, monkeypatch) -> None:
    """A path that exists locally is that model, not the shipped config of the same name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llava-hf" / "llava-1.5-7b-hf").mkdir(parents=True)
    assert shipped_config("llava-hf/llava-1.5-7b-hf") is None
    assert shipped_config("someone/else") is None


# -- dry runs of the shipped specs -------------------------------------------------------------
@pytest.mark.parametrize("name", SHIPPED_SPECS)
def test_shipped_spec_dry_runs_offline(name: str, empty_data: Path, no_network, capsys) -> None:
    """``prunelab sweep <paper or baselines spec> --dry-run`` without the hub and the data:
    trials, TFLOPs and the estimate, the missing data as warnings naming the path and source."""
    assert main(["sweep", name, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    plan = load_sweep(name, [], dry_run=True)
    assert f"sweep {plan.name}: {len(plan.trials)} trials" in out
    assert "TFLOPs of LLM prefill" in out
    lmms = [b for b, cfg in plan.benchmarks.items() if cfg.get("kind") != "shapes"]
    for benchmark in lmms:
        line = next(x for x in err.splitlines() if f"benchmark {benchmark!r}" in x)
        assert line.startswith("prunelab: warning: ") and str(empty_data) in line
        assert "huggingface-cli download" in line
    if lmms:
        assert "at most" in out and "the data is not here to count" in out
    else:
        assert "warning" not in err


def test_missing_data_is_an_error_without_dry_run(empty_data: Path, capsys, tmp_path) -> None:
    assert main(["sweep", "paper_prep", "benchmark=pope", "keep_tokens=64"]) == 2
    err = capsys.readouterr().err
    assert f"{empty_data}/POPE: no such file or directory" in err
    assert "lmms-lab/POPE" in err
    assert not (Path.cwd() / "prunelab-runs").exists()


def test_dry_run_counts_the_samples_of_present_data(capsys) -> None:
    assert main(["sweep", "quickstart", "--dry-run", "eval.limit=5000"]) == 0
    out = capsys.readouterr().out
    # scenes' test split has 1000 samples: 16 trials evaluate 1000 each, not eval.limit
    assert "to run: 16 trials, 16,000 samples," in out


# -- budget_mode in plans -----------------------------------------------------------------------
def _spec(tmp_path: Path, grid: str) -> Path:
    path = tmp_path / "spec.yaml"
    body = textwrap.indent(textwrap.dedent(grid).strip(), "  ")
    path.write_text(f"defaults: [base, _self_]\nname: mine\ngrid:\n{body}\n")
    return path


def test_budget_mode_is_an_axis_in_the_key_only_where_it_changes_the_plan(tmp_path) -> None:
    spec = _spec(
        tmp_path,
        """
        model: tiny-llava
        benchmark: shapes
        method: fastv,visionzip
        keep_tokens: 96
        """,
    )
    own = {(t.method, t.budget_mode): t.key for t in load_sweep(str(spec)).trials}
    both = load_sweep(str(spec), ["budget_mode=kept,average"]).trials
    keys = {(t.method, t.budget_mode): t.key for t in both}
    # fastv counts kept tokens: `kept` is its own way (the key without the axis), `average`
    # is a new trial; visionzip's vision stage is the same either way: one trial
    assert keys == {
        ("none", None): own[("none", None)],
        ("fastv", None): own[("fastv", None)],
        ("fastv", "average"): keys[("fastv", "average")],
        ("visionzip", None): own[("visionzip", None)],
    }
    assert keys[("fastv", "average")] != own[("fastv", None)]


def test_unreachable_cells_refuse_the_grid_or_are_skipped(tmp_path, capsys) -> None:
    """pdrop cannot average 5% of 144 tokens on tiny-llava's 4 layers; fastv counts kept
    tokens. Without --skip-invalid the grid is refused; with it the rest runs, each dropped
    point listed with why."""
    spec = _spec(
        tmp_path,
        """
        model: tiny-llava
        benchmark: shapes
        method: fastv,pdrop
        keep_ratio: 0.5,0.05
        """,
    )
    with pytest.raises(SpecError) as caught:
        load_sweep(str(spec))
    (line,) = caught.value.problems
    assert "pdrop" in line and "out of reach" in line
    plan = load_sweep(str(spec), skip_invalid=True)
    assert plan.skipped == [line]
    assert sorted((t.method, t.keep_ratio) for t in plan.trials) == [
        ("fastv", 0.05), ("fastv", 0.5), ("none", None), ("pdrop", 0.5)
    ]  # fmt: skip
    assert main(["sweep", str(spec), "--dry-run"]) == 2
    assert main(["sweep", str(spec), "--dry-run", "--skip-invalid"]) == 0
    out, err = capsys.readouterr()
    assert "sweep mine: 4 trials" in out
    assert "--skip-invalid" in err and line in err


def test_skip_invalid_does_not_skip_bad_values(tmp_path) -> None:
    spec = _spec(tmp_path, "model: tiny-llava\nbenchmark: shapes\nmethod: fastv\nkeep_ratio: 2")
    with pytest.raises(SpecError):
        load_sweep(str(spec), skip_invalid=True)
    bad_mode = _spec(
        tmp_path, "model: tiny-llava\nbenchmark: shapes\nmethod: fastv\nkeep_ratio: 0.5"
    )
    with pytest.raises(SpecError) as caught:
        load_sweep(str(bad_mode), ["budget_mode=mean"], skip_invalid=True)
    assert caught.value.problems == [
        "budget_mode=mean from the command line: must be one of kept, average"
    ]


def test_kept_mode_of_a_multi_stage_method_is_refused(tmp_path) -> None:
    spec = _spec(tmp_path, "model: tiny-llava\nbenchmark: shapes\nmethod: pdrop\nkeep_ratio: 0.5")
    with pytest.raises(SpecError) as caught:
        load_sweep(str(spec), ["budget_mode=kept"])
    (line,) = caught.value.problems
    assert "with budget_mode=kept from the command line" in line
    assert "budget_mode=kept is not defined for its multi-stage schedule" in line


def test_report_shows_the_average_achieved_and_the_mode() -> None:
    def entry(method: str, mode: str | None, average: float, score: float):
        config = {"model": "m", "benchmark": "b", "method": method, "hparams": {},
                  "keep_tokens": None if method == "none" else 64, "budget_mode": mode}  # fmt: skip
        return config, "finished", {"score": score, "avg_visual_tokens": average}

    report = build_report(
        [
            entry("none", None, 576.0, 80.0),
            entry("fastv", None, 96.0, 75.0),
            entry("fastv", "average", 64.125, 70.0),
        ]
    )
    lines = report_markdown(report).splitlines()
    assert lines[0] == "| model | method | budget | budget mode | b | mean score ratio (%) |"
    # fastv counts its own way (kept from layer 2): 64 kept average 96 over the layers
    assert lines[3].startswith("| m | fastv | 64 tokens (avg 96.0) |  | ")
    assert lines[4].startswith("| m | fastv | 64 tokens (avg 64.1) | average | ")


# -- the command line -------------------------------------------------------------------------
def test_options_and_overrides_mix_in_any_order() -> None:
    args = parse(
        ["sweep", "quickstart", "name=x", "--ray-address", "A", "eval.limit=16", "--dry-run"]
    )
    assert args.overrides == ["name=x", "eval.limit=16"]
    assert args.ray_address == "A" and args.dry_run


def test_unknown_options_are_still_refused(capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        parse(["sweep", "quickstart", "--bogus"])
    assert caught.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
