"""The paper-style report (md, csv, LaTeX), the Pareto plot, dry-run estimates and status.

Tables are checked against exact strings built by hand from the trials below: scores are
chosen so that every ratio is exact in binary and no rounding is ambiguous.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from prunelab.db import init_db, repo, session_factory
from prunelab.orchestrator.cli import main
from prunelab.orchestrator.estimate import (
    Throughput,
    earlier_throughput,
    estimate_tflops,
    measured_seconds,
    measured_throughput,
)
from prunelab.orchestrator.plots import pareto_png, pareto_points
from prunelab.orchestrator.results import (
    DEFAULT_COLUMNS,
    budget_label,
    build_report,
    trial_params,
)
from prunelab.orchestrator.spec import load_sweep
from prunelab.orchestrator.tables import (
    latex_escape,
    report_artifacts,
    report_csv,
    report_latex,
    report_markdown,
    results_rows,
    trials_csv,
    trials_markdown,
)
from prunelab.trial import Trial


def trial(model, benchmark, method, score, status="finished", tflops=1.0, hparams=None, **axes):
    """(config, status, metrics) as the database holds them."""
    config = {
        "model": model,
        "benchmark": benchmark,
        "method": method,
        "hparams": hparams or {},
        "keep_ratio": None,
        "keep_tokens": None,
        "prune_layer": None,
        "seed": None,
        **axes,
    }
    metrics = {"score": score, "tflops": tflops} if status == "finished" else None
    return config, status, metrics


# model m: two benchmarks, two methods at 128 and 64 tokens (random's pope at 128 failed);
# model n_2: one benchmark, one method (nothing to compare, so nothing bold)
TRIALS = [
    trial("m", "textvqa", "none", 60.0, tflops=4.0),
    trial("m", "pope", "none", 80.0, tflops=4.0),
    trial("m", "textvqa", "fastv", 54.0, keep_tokens=64, prune_layer=2, tflops=1.0),
    trial("m", "pope", "fastv", 72.0, keep_tokens=64, prune_layer=2, tflops=1.5),
    trial("m", "textvqa", "random", 48.0, keep_tokens=64, prune_layer=2),
    trial("m", "pope", "random", 76.0, keep_tokens=64, prune_layer=2),
    trial("m", "textvqa", "fastv", 57.0, keep_tokens=128, prune_layer=2, tflops=2.0),
    trial("m", "pope", "fastv", 77.0, keep_tokens=128, prune_layer=2, tflops=2.0),
    trial("m", "textvqa", "random", 51.0, keep_tokens=128, prune_layer=2),
    trial("m", "pope", "random", None, status="failed", keep_tokens=128, prune_layer=2),
    trial("n_2", "textvqa", "none", 50.0),
    trial("n_2", "textvqa", "fastv", 45.0, keep_ratio=0.25, prune_layer=2),
]

MARKDOWN = """\
| model | method | budget | textvqa | pope | mean score ratio (%) |
|---|---|---|---:|---:|---:|
| m | none | upper bound | 60.0 | 80.0 | 100.0 |
| m | fastv | 128 tokens | **57.0** | **77.0** | **95.6** |
| m | random | 128 tokens | 51.0 | failed | - |
| m | fastv | 64 tokens | **54.0** | 72.0 | **90.0** |
| m | random | 64 tokens | 48.0 | **76.0** | 87.5 |
| n_2 | none | upper bound | 50.0 | - | 100.0 |
| n_2 | fastv | 25.0% | 45.0 | - | 90.0 |
"""

CSV = """\
model,method,budget,textvqa,pope,mean score ratio (%)
m,none,upper bound,60.0,80.0,100.0
m,fastv,128 tokens,57.0,77.0,95.6
m,random,128 tokens,51.0,failed,-
m,fastv,64 tokens,54.0,72.0,90.0
m,random,64 tokens,48.0,76.0,87.5
n_2,none,upper bound,50.0,-,100.0
n_2,fastv,25.0%,45.0,-,90.0
"""

LATEX = r"""\begin{tabular}{llrrr}
\toprule
Method & Budget & textvqa & pope & mean score ratio (\%) \\
\midrule
\multicolumn{5}{l}{\textit{m}} \\
none & upper bound & 60.0 & 80.0 & 100.0 \\
\midrule
fastv & 128 tokens & \textbf{57.0} & \textbf{77.0} & \textbf{95.6} \\
random & 128 tokens & 51.0 & failed & -- \\
\midrule
fastv & 64 tokens & \textbf{54.0} & 72.0 & \textbf{90.0} \\
random & 64 tokens & 48.0 & \textbf{76.0} & 87.5 \\
\midrule
\multicolumn{5}{l}{\textit{n\_2}} \\
none & upper bound & 50.0 & -- & 100.0 \\
\midrule
fastv & 25.0\% & 45.0 & -- & 90.0 \\
\bottomrule
\end{tabular}
"""


def test_markdown_csv_latex_exact():
    report = build_report(TRIALS)
    assert report_markdown(report) == MARKDOWN
    assert report_csv(report) == CSV
    assert report_latex(report) == LATEX


def test_rows_follow_the_papers_order_whatever_the_input_order():
    report = build_report(list(reversed(TRIALS)))
    # models in order of first appearance, unpruned first, then budgets largest first
    assert [(r.model, r.method, r.budget) for r in report.rows] == [
        ("n_2", "none", "upper bound"),
        ("n_2", "fastv", "25.0%"),
        ("m", "none", "upper bound"),
        ("m", "fastv", "128 tokens"),
        ("m", "random", "128 tokens"),
        ("m", "fastv", "64 tokens"),
        ("m", "random", "64 tokens"),
    ]
    assert report.benchmarks == ["textvqa", "pope"]


def test_score_ratios_are_recomputed_from_the_baseline():
    """Stored score ratios may be stale (logged before the baseline finished): ignored."""
    stale = [(c, s, {**(m or {}), "score_ratio": 0.123}) for c, s, m in TRIALS]
    row = build_report(stale).rows[3]  # fastv at 64 tokens on m
    assert (row.method, row.budget) == ("fastv", "64 tokens")
    assert row.ratios == {"textvqa": pytest.approx(0.9), "pope": pytest.approx(0.9)}
    assert row.mean_ratio == pytest.approx(0.9)
    assert row.mean_tflops == pytest.approx(1.25)


def test_no_baseline_score_means_no_ratio():
    trials = [
        trial("m", "textvqa", "none", 0.0),
        trial("m", "textvqa", "fastv", 10.0, keep_ratio=0.5, prune_layer=2),
        trial("m", "textvqa", "random", 20.0, keep_ratio=0.5, prune_layer=2),
    ]
    report = build_report(trials)
    assert all(row.mean_ratio is None for row in report.rows)
    assert report_markdown(report).splitlines()[2:] == [
        "| m | none | upper bound | 0.0 | - |",
        "| m | fastv | 50.0% | 10.0 | - |",
        "| m | random | 50.0% | **20.0** | - |",
    ]


def test_layer_and_hyperparameter_variants_get_their_own_rows():
    trials = [
        trial("m", "gqa", "none", 60.0),
        trial(
            "m", "gqa", "fastv", 48.0, keep_ratio=0.5, prune_layer=2, hparams={"queries": "last"}
        ),
        trial(
            "m", "gqa", "fastv", 51.0, keep_ratio=0.5, prune_layer=3, hparams={"queries": "last"}
        ),
        trial(
            "m", "gqa", "fastv", 51.0, keep_ratio=0.5, prune_layer=2, hparams={"queries": "text"}
        ),
        trial("m", "gqa", "visionzip", 45.0, keep_ratio=0.5),
    ]
    report = build_report(trials)
    assert report.variant_columns == ["layer"]
    assert report_markdown(report) == (
        "| model | method | budget | layer | gqa | mean score ratio (%) |\n"
        "|---|---|---|---|---:|---:|\n"
        "| m | none | upper bound |  | 60.0 | 100.0 |\n"
        "| m | fastv (queries=last) | 50.0% | 2 | 48.0 | 80.0 |\n"
        "| m | fastv (queries=last) | 50.0% | 3 | **51.0** | **85.0** |\n"
        "| m | fastv (queries=text) | 50.0% | 2 | **51.0** | **85.0** |\n"
        "| m | visionzip | 50.0% |  | 45.0 | 75.0 |\n"
    )
    latex = report_latex(report)
    assert latex.startswith("\\begin{tabular}{lllrr}\n")
    assert "Method & Budget & Layer & gqa & mean score ratio (\\%) \\\\" in latex
    assert "fastv (queries=text) & 50.0\\% & 2 & \\textbf{51.0} & \\textbf{85.0} \\\\" in latex


def test_unfinished_trials_show_their_status():
    trials = [
        trial("m", "gqa", "none", 60.0),
        trial("m", "gqa", "fastv", None, status="running", keep_tokens=64, prune_layer=2),
        trial("m", "gqa", "random", None, status="pending", keep_tokens=64, prune_layer=2),
    ]
    assert report_csv(build_report(trials)).splitlines()[1:] == [
        "m,none,upper bound,60.0,100.0",
        "m,fastv,64 tokens,running,-",
        "m,random,64 tokens,pending,-",
    ]


def test_latex_escapes_special_characters():
    assert latex_escape("a_b 50% & #1 {x} $y ~^\\") == (
        r"a\_b 50\% \& \#1 \{x\} \$y \textasciitilde{}\textasciicircum{}\textbackslash{}"
    )
    trials = [trial("llava_1.5&co", "text_vqa", "none", 10.0)]
    latex = report_latex(build_report(trials))
    assert r"\multicolumn{4}{l}{\textit{llava\_1.5\&co}} \\" in latex
    assert r"Method & Budget & text\_vqa & mean score ratio (\%) \\" in latex


def test_markdown_escapes_pipes():
    trials = [trial("m", "gqa", "none", 10.0), trial("m", "gqa", "fastv", 5.0, keep_tokens=8,
                                                          hparams={"q": "a|b"})]  # fmt: skip
    trials.append(trial("m", "gqa", "fastv", 6.0, keep_tokens=8, hparams={"q": "c"}))
    assert "| m | fastv (q=a\\|b) | 8 tokens | 5.0 | 50.0 |" in report_markdown(
        build_report(trials)
    )


def test_pareto_points_and_png():
    report = build_report(TRIALS)
    baseline, lines = pareto_points(report, "m")
    assert baseline == (4.0, 100.0)
    assert lines["fastv"] == [(1.25, pytest.approx(90.0)), (2.0, pytest.approx(95.625))]
    assert lines["random"] == [(1.0, pytest.approx(87.5))]  # 128 tokens: pope failed
    png = pareto_png(report)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    assert image.width > image.height  # two models side by side
    image.load()


def test_report_artifacts_bundle():
    files = report_artifacts(TRIALS)
    assert set(files) == {"table.md", "table.csv", "table.tex", "pareto.png", "trials.csv"}
    # the sweep's tables have the default cost column (TFLOPs) after the mean ratio
    with_cost = build_report(TRIALS, DEFAULT_COLUMNS)
    assert files["table.md"] == report_markdown(with_cost)
    assert files["table.tex"] == report_latex(with_cost)
    assert files["table.md"].splitlines()[0].endswith("| mean score ratio (%) | TFLOPs |")
    assert (
        isinstance(files["pareto.png"], bytes) and files["pareto.png"][:8] == b"\x89PNG\r\n\x1a\n"
    )
    assert str(files["trials.csv"]).splitlines()[0].startswith("model,benchmark,method,budget")


def test_trials_may_be_given_as_trial_objects():
    typed = [(Trial.from_dict(config), status, metrics) for config, status, metrics in TRIALS]
    assert report_markdown(build_report(typed)) == MARKDOWN
    mixed = report_artifacts([typed[0], *TRIALS[1:]])
    assert mixed["table.tex"] == report_artifacts(TRIALS)["table.tex"]
    assert mixed["trials.csv"] == report_artifacts(TRIALS)["trials.csv"]
    config = TRIALS[2][0]
    assert trial_params(config) == trial_params(Trial.from_dict(config)) == {
        "model": "m", "benchmark": "textvqa", "method": "fastv", "keep_ratio": None,
        "keep_tokens": 64, "prune_layer": 2, "seed": None,
    }  # fmt: skip
    assert budget_label(config) == budget_label(Trial.from_dict(config)) == "64"
    assert budget_label(TRIALS[-1][0]) == "25.0%" and budget_label(TRIALS[0][0]) == "all"


PER_TRIAL = [
    trial("m", "gqa", "fastv", None, status="failed", keep_ratio=0.25, prune_layer=2),
    (
        trial("m", "gqa", "fastv", 45.0, keep_tokens=64, prune_layer=3)[0],
        "finished",
        {"score": 45.0, "score_ratio": 75.0, "avg_visual_tokens": 40.5, "tflops": 1.2345,
         "flops_ratio": 0.25, "prefill_ms": 12.34, "fidelity_top1": 0.875, "samples": 8.0},
    ),
    trial("m", "gqa", "none", 60.0, tflops=3.95),
]  # fmt: skip


def test_per_trial_table_exact():
    rows = results_rows(PER_TRIAL)
    assert trials_markdown(rows) == (
        "| model | benchmark | method | budget | layer | score | score ratio (%) | avg tokens "
        "| TFLOPs | FLOPs ratio | prefill ms | top-1 agree |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        "| m | gqa | none | all |  | 60.0 | - | - | 3.95 | - | - | - |\n"
        "| m | gqa | fastv | 64 | 3 | 45.0 | 75.0 | 40.5 | 1.23 | 25.0% | 12.3 | 87.5% |\n"
        "| m | gqa | fastv | 25.0% | 2 | failed |  |  |  |  |  |  |\n"
    )
    assert trials_csv(rows) == (
        "model,benchmark,method,budget,layer,status,error,score,score_ratio,avg_visual_tokens,"
        "tflops,flops_ratio,prefill_ms,fidelity_top1\n"
        "m,gqa,none,all,,finished,,60.0,,,3.95,,,\n"
        "m,gqa,fastv,64,3,finished,,45.0,75.0,40.5,1.2345,0.25,12.34,0.875\n"
        "m,gqa,fastv,25.0%,2,failed,,,,,,,,\n"
    )


# -- estimates ----------------------------------------------------------------------------------
def _quickstart_trials() -> list[Trial]:
    plan = load_sweep(
        "quickstart", ["method=none,random,fastv", "keep_ratio=0.111,0.333", "eval.limit=4"]
    )
    return list(plan.trials)


def test_measured_throughput_from_earlier_trials():
    trials = _quickstart_trials()
    analytic = [estimate_tflops(t) for t in trials[:2]]
    gone = dataclasses.replace(trials[2], model="other", method="no-such-method")
    finished = [
        (trials[0], {"latency_ms": 250.0, "samples": 4.0}),  # 1 s
        (trials[1], {"latency_ms": 750.0, "samples": 4.0}),  # 3 s
        (trials[2], {"samples": 4.0}),  # no timing: skipped
        (gone, {"latency_ms": 1.0, "samples": 1.0}),
    ]
    measured = measured_throughput(finished)
    assert set(measured) == {"toy-llava"}
    assert measured["toy-llava"].trials == 2
    assert measured["toy-llava"].tflops_per_s == pytest.approx(sum(analytic) / 4.0)
    assert Throughput(2.0, 1).seconds(5.0) == 2.5
    assert measured_seconds({"latency_ms": 100.0, "samples": 3}) == pytest.approx(0.3)
    assert measured_seconds({"latency_ms": 0.0, "samples": 3}) is None


def _fake_db(tmp_path, statuses: list[str], metrics: dict | None = None):
    """A database with a quickstart sweep whose trials are in ``statuses``."""
    url = f"sqlite:///{tmp_path}/prunelab.db"
    plan = load_sweep(
        "quickstart", ["method=none,random,fastv", "keep_ratio=0.111,0.333", "eval.limit=4"]
    )
    sessions = session_factory(init_db(url))
    with sessions.begin() as session:
        sweep = repo.create_sweep(session, "quickstart", plan.spec, plan.spec_yaml, "host:1:x")
        rows, _ = repo.add_trials(
            session, sweep.id, [(t.key, t.to_dict(), t.is_baseline) for t in plan.trials]
        )
        for row, status in zip(rows, statuses, strict=True):
            if status in ("running", "finished"):
                assert repo.claim_trial(session, row.id, "host:1:x", "w0", None)
            if status == "finished":
                repo.finish_trial(session, row.id, metrics or {"score": 50.0}, "w0", None)
            if status == "failed":
                repo.fail_trial(session, row.id, "boom")
    return url, plan


def test_dry_run_estimates_time_from_earlier_trials(tmp_path, capsys):
    url, plan = _fake_db(
        tmp_path, ["finished"] * 2 + ["pending"] * 3, {"latency_ms": 500.0, "samples": 4.0}
    )
    args = ["sweep", "quickstart", "method=none,random,fastv", "keep_ratio=0.111,0.333",
            "eval.limit=4", "--dry-run",
            "--db-url", url, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "5 trials, 2 already finished" in out
    rate = sum(estimate_tflops(t) for t in plan.trials[:2]) / 4.0  # 2 trials x 2 s
    todo = sum(estimate_tflops(t) for t in plan.trials[2:])
    seconds = todo / rate
    assert f"about {seconds:.0f} s of model time" in out
    assert "throughput of 2 earlier trial(s)" in out
    assert f"~{seconds / 2:.0f} s on 2 worker(s)" in out
    with session_factory(init_db(url))() as session:
        assert earlier_throughput(session, ["toy-llava"])["toy-llava"].trials == 2
        assert earlier_throughput(session, ["tiny-qwen2-vl"]) == {}


def test_dry_run_estimate_adds_the_fixed_costs_of_earlier_sweeps(tmp_path, capsys):
    """Start-up (submission to the first trial) and per-trial overhead (a trial's wall time
    beyond its model time: loads, warm-up, references) measured on earlier sweeps."""
    from datetime import datetime, timedelta, timezone

    from prunelab.db import Sweep
    from prunelab.db import Trial as TrialRow
    from prunelab.orchestrator.estimate import earlier_fixed_costs

    url, plan = _fake_db(
        tmp_path, ["finished"] * 2 + ["pending"] * 3, {"latency_ms": 500.0, "samples": 4.0}
    )
    t0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    with session_factory(init_db(url)).begin() as session:
        session.query(Sweep).update({"created": t0})
        finished = session.query(TrialRow).filter(TrialRow.status == "finished").all()
        for row, (start, end) in zip(finished, [(30, 40), (40, 52)], strict=True):
            row.started, row.finished = t0 + timedelta(seconds=start), t0 + timedelta(seconds=end)
    with session_factory(init_db(url))() as session:
        fixed = earlier_fixed_costs(session)
    # model time 0.5 s x 4 samples = 2 s: overheads 8 s and 10 s; the first trial at 30 s
    assert (fixed.startup_s, fixed.per_trial_s, fixed.sweeps, fixed.trials) == (30.0, 9.0, 1, 2)
    assert fixed.seconds(trials=3, workers=2) == 30.0 + 9.0 * 3 / 2
    args = ["sweep", "quickstart", "method=none,random,fastv", "keep_ratio=0.111,0.333",
            "eval.limit=4", "--dry-run",
            "--db-url", url, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fixed costs measured on 1 earlier sweep(s) and 2 trial(s): start-up ~30 s" in out
    assert "~9 s per trial beyond model time" in out
    rate = sum(estimate_tflops(t) for t in plan.trials[:2]) / 4.0
    model = sum(estimate_tflops(t) for t in plan.trials[2:]) / rate
    total = 30.0 + 9.0 * 3 / 2 + model / 2
    assert f"estimate: ~{total:.0f} s on 2 worker(s)" in out


def test_dry_run_without_earlier_trials_says_so(tmp_path, capsys):
    args = ["sweep", "quickstart", "eval.limit=4", "--dry-run",
            "--db-url", f"sqlite:///{tmp_path}/none.db",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "toy-llava: no finished trials of this model yet" in out
    assert not (tmp_path / "none.db").exists()  # a dry run writes nothing


def test_status_shows_progress_of_a_running_sweep(tmp_path, capsys):
    url, _ = _fake_db(tmp_path, ["finished", "finished", "running", "pending", "failed"])
    assert main(["status", "quickstart", "--db-url", url]) == 0
    out = capsys.readouterr().out
    assert "sweep quickstart (" in out and "): running" in out
    assert "progress: 2/5 finished, 1 running, 1 pending, 1 failed" in out
    assert main(["status", "quickstart", "--json", "--db-url", url]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["progress"] == {
        "finished": 2, "running": 1, "pending": 1, "failed": 1, "total": 5
    }  # fmt: skip
    assert [t["status"] for t in status["trials"]] == [
        "finished", "finished", "running", "pending", "failed"
    ]  # fmt: skip
    assert main(["status", "--db-url", url]) == 0
    assert "1 failed, 2 finished, 1 pending, 1 running" in capsys.readouterr().out


def test_report_command_on_a_partial_sweep(tmp_path, capsys):
    url, _ = _fake_db(tmp_path, ["finished", "finished", "running", "pending", "failed"])
    pareto = tmp_path / "pareto.png"
    args = ["report", "quickstart", "--db-url", url, "--pareto", str(pareto), "--columns", ""]
    assert main(args) == 0
    # the quickstart's trials in sweep order: none, random 11.1%, random 33.3%, fastv 11.1%,
    # fastv 33.3%; unfinished ones show their status, and nothing competes with them for bold
    assert capsys.readouterr().out.splitlines() == [
        "| model | method | budget | scenes | mean score ratio (%) |",
        "|---|---|---|---:|---:|",
        "| toy-llava | none | upper bound | 50.0 | 100.0 |",
        "| toy-llava | fastv | 33.3% | failed | - |",
        "| toy-llava | random | 33.3% | running | - |",
        "| toy-llava | fastv | 11.1% | pending | - |",
        "| toy-llava | random | 11.1% | **50.0** | **100.0** |",
    ]
    Image.open(pareto).verify()
    assert main(["report", "quickstart", "--db-url", url]) == 0  # the default cost column
    assert capsys.readouterr().out.splitlines()[0].endswith("| mean score ratio (%) | TFLOPs |")
    assert main(["report", "quickstart", "--db-url", url, "--columns", "latency_ms,nope"]) == 2
    assert "--columns unknown report column 'nope'" in capsys.readouterr().err
    out = tmp_path / "t.tex"
    assert main(["report", "quickstart", "--db-url", url, "--format", "latex",
                 "--out", str(out)]) == 0  # fmt: skip
    assert out.read_text().startswith("\\begin{tabular}{llrrr}")


def test_report_of_unknown_sweep_is_bad_input(tmp_path):
    url, _ = _fake_db(tmp_path, ["pending"] * 5)
    result = subprocess.run(
        [sys.executable, "-m", "prunelab.orchestrator.cli", "report", "nope", "--db-url", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "no sweep with id or name 'nope'" in result.stderr


def test_nothing_is_bold_when_every_row_ties():
    trials = [
        trial("m", "gqa", "none", 10.0),
        trial("m", "gqa", "fastv", 5.0, keep_tokens=8),
        trial("m", "gqa", "random", 5.0, keep_tokens=8),
    ]
    assert "**" not in report_markdown(build_report(trials))
