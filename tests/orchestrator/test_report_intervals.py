"""95% intervals in the report (``75.0 ± 4.3``, CSV bounds, bold by the paired test, the mean
ratio's interval, the Pareto error bars) and in the sweep's records (database, MLflow metrics).

Replicates are built by hand from ``Z`` (101 evenly spaced values in [-1, 1]), so that every
percentile is exact: the 2.5% and 97.5% quantiles of ``a + b * Z`` are ``a -/+ 0.95 b``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from prunelab import intervals
from prunelab.db import Trial as TrialRow
from prunelab.db import init_db, repo, session_factory
from prunelab.orchestrator.plots import pareto_intervals, pareto_png, pareto_points
from prunelab.orchestrator.results import build_report
from prunelab.orchestrator.sweep import Recorder
from prunelab.orchestrator.tables import report_csv, report_latex, report_markdown
from prunelab.trial import Trial, TrialResult

Z = np.linspace(-1.0, 1.0, 101)
BASE = np.full(101, 80.0)  # an unpruned score without sampling noise: ratios linear in Z
A = 60.0 + 6.0 * Z  # ci 54.3 .. 65.7
B = A - (2.0 + 4.0 * Z)  # 58 + 2 Z; A - B spans -2 .. 6: not significantly worse than A
C = A - (6.0 + 2.5 * Z)  # 54 + 3.5 Z; A - C spans 3.5 .. 8.5: significantly worse


def entry(method, score, replicates=None, ci=None, benchmark="gqa", limit=64, **axes):
    """(config, status, metrics, replicates) as the database holds them."""
    config = {"model": "m", "benchmark": benchmark, "method": method, "hparams": {},
              "eval": {"limit": limit}, **axes}  # fmt: skip
    metrics: dict[str, Any] = {"score": score, "tflops": 1.0 if method != "none" else 4.0}
    if ci is not None:
        metrics["score_ci_low"], metrics["score_ci_high"] = ci
    return config, "finished", metrics, None if replicates is None else list(replicates)


TRIALS = [
    entry("none", 80.0, BASE),
    entry("a", 60.0, A, (54.3, 65.7), keep_tokens=64),
    entry("b", 58.0, B, (56.1, 59.9), keep_tokens=64),
    entry("c", 54.0, C, (50.675, 57.325), keep_tokens=64),
]

MARKDOWN = """\
| model | method | budget | gqa | mean score ratio (%) |
|---|---|---|---:|---:|
| m | none | upper bound | 80.0 | 100.0 |
| m | a | 64 tokens | **60.0 ± 5.7** | **75.0 ± 7.1** |
| m | b | 64 tokens | **58.0 ± 1.9** | **72.5 ± 2.4** |
| m | c | 64 tokens | 54.0 ± 3.3 | 67.5 ± 4.2 |
"""


def test_cells_print_the_larger_half_width_and_bold_is_the_paired_test():
    report = build_report(TRIALS)
    assert report_markdown(report) == MARKDOWN
    latex = report_latex(report)
    assert "a & 64 tokens & \\textbf{60.0 $\\pm$ 5.7} & \\textbf{75.0 $\\pm$ 7.1} \\\\" in latex
    assert "c & 64 tokens & 54.0 $\\pm$ 3.3 & 67.5 $\\pm$ 4.2 \\\\" in latex
    row = report.rows[1]
    assert row.mean_interval == pytest.approx(((60 - 5.7) / 80, (60 + 5.7) / 80))


def test_csv_has_separate_interval_columns():
    assert report_csv(build_report(TRIALS)).splitlines() == [
        "model,method,budget,gqa,gqa_ci_low,gqa_ci_high,mean score ratio (%),"
        "mean score ratio (%)_ci_low,mean score ratio (%)_ci_high",
        "m,none,upper bound,80.0,,,100.0,,",
        "m,a,64 tokens,60.0,54.3,65.7,75.0,67.9,82.1",
        "m,b,64 tokens,58.0,56.1,59.9,72.5,70.1,74.9",
        "m,c,64 tokens,54.0,50.7,57.3,67.5,63.3,71.7",
    ]


def test_rows_without_replicates_print_as_before():
    """Old rows (no replicates, no score_ci_*; or given as 3-tuples): no ±, no CSV bounds,
    bold only at the best value."""
    old = [(config, status, {"score": m["score"], "tflops": 1.0}) for config, status, m, _ in
           TRIALS]  # fmt: skip
    report = build_report(old)
    assert "±" not in report_markdown(report)
    assert report_csv(report).splitlines()[0] == "model,method,budget,gqa,mean score ratio (%)"
    assert report_markdown(report).splitlines()[3:] == [
        "| m | a | 64 tokens | **60.0** | **75.0** |",
        "| m | b | 64 tokens | 58.0 | 72.5 |",
        "| m | c | 64 tokens | 54.0 | 67.5 |",
    ]
    # intervals in the metrics but no replicates: ± on scores, bold by value only
    no_replicates = [(config, status, metrics) for config, status, metrics, _ in TRIALS]
    lines = report_markdown(build_report(no_replicates)).splitlines()
    assert lines[3] == "| m | a | 64 tokens | **60.0 ± 5.7** | **75.0** |"
    assert lines[4] == "| m | b | 64 tokens | 58.0 ± 1.9 | 72.5 |"


def test_only_trials_on_the_same_samples_are_paired():
    """b evaluated on other samples (another eval limit): its replicates are neither compared
    with a's nor divided by the baseline's."""
    trials = [*TRIALS[:2], entry("b", 58.0, B, (56.1, 59.9), limit=32, keep_tokens=64),
              TRIALS[3]]  # fmt: skip
    lines = report_markdown(build_report(trials)).splitlines()
    assert lines[4] == "| m | b | 64 tokens | 58.0 ± 1.9 | 72.5 |"
    assert build_report(trials).rows[2].mean_interval is None


def test_when_no_method_is_significantly_worse_none_is_bold():
    trials = [TRIALS[0], TRIALS[1], TRIALS[2]]  # a and b: b is not significantly worse
    assert "**" not in report_markdown(build_report(trials))


def test_mean_ratio_interval_over_benchmarks():
    pope_base = np.full(101, 50.0)
    pope_a = 40.0 + 2.0 * Z
    trials = [
        TRIALS[0],
        TRIALS[1],
        entry("none", 50.0, pope_base, benchmark="pope"),
        entry("a", 40.0, pope_a, (38.1, 41.9), benchmark="pope", keep_tokens=64),
    ]
    row = build_report(trials).rows[1]
    expected = intervals.percentile_interval(((A / 80.0) + (pope_a / 50.0)) / 2.0)
    assert row.mean_ratio == pytest.approx((0.75 + 0.8) / 2)
    assert row.mean_interval == pytest.approx(expected)
    assert np.allclose(row.mean_replicates, (A / 80.0 + pope_a / 50.0) / 2.0)
    # one benchmark without replicates: no interval of the mean
    trials[3] = entry("a", 40.0, None, (38.1, 41.9), benchmark="pope", keep_tokens=64)
    assert build_report(trials).rows[1].mean_interval is None


def test_pareto_draws_the_intervals():
    report = build_report(TRIALS)
    bars = pareto_intervals(report, "m")
    assert bars["a"] == [pytest.approx((1.0, 75.0, 100 * 54.3 / 80, 100 * 65.7 / 80))]
    _, lines = pareto_points(report, "m")
    assert set(bars) == set(lines)
    assert pareto_png(report)[:8] == b"\x89PNG\r\n\x1a\n"


# -- the sweep's records ------------------------------------------------------------------------
@dataclass
class _Tracker:
    """Records what the recorder would log to MLflow."""

    logged: dict[str, dict[str, float]] = field(default_factory=dict)

    def log_trial(self, name, parent, sweep_id, key, run_name, params, metrics, artifacts,
                  new=False, tags=None, **times):  # fmt: skip
        self.logged[key] = metrics
        return f"run-{key}"


@pytest.fixture
def engine(tmp_path):
    engine = init_db(f"sqlite:///{tmp_path}/prunelab.db")
    yield engine
    engine.dispose()


def _sweep(engine, limits=(64, 64)):
    """A sweep of two running trials of model m on gqa: the baseline and a pruned one."""
    sessions = session_factory(engine)
    trials = [
        Trial("m", "gqa", "none", {}, key="base").to_dict(),
        Trial("m", "gqa", "fastv", {}, keep_tokens=64, key="pruned").to_dict(),
    ]
    for config, limit in zip(trials, limits, strict=True):
        config["eval"]["limit"] = limit
    with sessions.begin() as session:
        sweep = repo.create_sweep(session, "s", {}, "", "me")
        rows, _ = repo.add_trials(session, sweep.id, [(c["key"], c, c["method"] == "none")
                                                      for c in trials])  # fmt: skip
        ids = [row.id for row in rows]
        for trial_id in ids:
            assert repo.claim_trial(session, trial_id, "me", "w", None)
    return sweep.id, ids


def _finish(recorder, trial_id, score, replicates):
    result = TrialResult(metrics={"score": score}, replicates=tuple(replicates), worker="w")
    recorder.done(SimpleNamespace(trial_id=trial_id), result)


def test_sweep_stores_replicates_and_logs_the_ratio_interval(engine):
    sweep_id, (base_id, pruned_id) = _sweep(engine)
    tracker = _Tracker()
    recorder = Recorder(engine, tracker, sweep_id, "me")
    _finish(recorder, pruned_id, 60.0, A)  # waits for its baseline
    assert tracker.logged == {}
    _finish(recorder, base_id, 80.0, BASE)
    logged = tracker.logged["pruned"]
    assert logged["score_ratio"] == 75.0  # in %
    assert (logged["score_ratio_ci_low"], logged["score_ratio_ci_high"]) == pytest.approx(
        (100 * (60 - 5.7) / 80, 100 * (60 + 5.7) / 80)
    )
    with session_factory(engine)() as session:
        row = session.get(TrialRow, pruned_id)
        assert row.replicates == pytest.approx(list(A))
        assert row.metrics["score_ratio_ci_low"] == logged["score_ratio_ci_low"]


def test_sweep_reads_the_baselines_replicates_from_the_database(engine):
    """The baseline finished by an earlier orchestrator: its replicates come from its row."""
    sweep_id, (base_id, pruned_id) = _sweep(engine)
    first = Recorder(engine, _Tracker(), sweep_id, "me")
    _finish(first, base_id, 80.0, BASE)
    tracker = _Tracker()
    later = Recorder(engine, tracker, sweep_id, "me")
    _finish(later, pruned_id, 60.0, A)
    assert tracker.logged["pruned"]["score_ratio_ci_high"] == pytest.approx(100 * 65.7 / 80)


def test_sweep_pairs_only_trials_on_the_same_samples(engine):
    sweep_id, (base_id, pruned_id) = _sweep(engine, limits=(64, 32))
    tracker = _Tracker()
    recorder = Recorder(engine, tracker, sweep_id, "me")
    _finish(recorder, base_id, 80.0, BASE)
    _finish(recorder, pruned_id, 60.0, A)
    assert tracker.logged["pruned"]["score_ratio"] == 75.0
    assert "score_ratio_ci_low" not in tracker.logged["pruned"]
