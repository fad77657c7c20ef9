"""What MLflow shows of a sweep (issue 18): one child run per trial of the sweep under its
parent run (reused trials as copies of the run that computed them, failed trials as FAILED
runs with their error), the runs table as the experiment's page, the trials' own start and end,
``score_ratio`` in % in MLflow, the database, ``trials.csv`` and the report, and
``prunelab resume --retry-failed``.

The recording code runs on real stores (a SQLite database and MLflow store in ``tmp_path``)
without Ray: trials are claimed and finished through the sweep's :class:`Recorder` as the
worker pool would. One slow test runs two real sweeps on the tiny model.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.entities import Run
from sqlalchemy import update

import prunelab.orchestrator.sweep as sweep_module
from prunelab.db import Trial as TrialRow
from prunelab.db import init_db, repo, session_factory
from prunelab.metrics import lookup
from prunelab.orchestrator.cli import parse
from prunelab.orchestrator.config import WorkersConfig
from prunelab.orchestrator.sweep import (
    Recorder,
    Stores,
    _restore_tracking,
    close_sweep,
    execute,
    resume_sweep,
)
from prunelab.orchestrator.tracking import (
    EXPERIMENT_KIND,
    TAG_EXPERIMENT_KIND,
    TAG_REUSED_FROM,
    Tracker,
)
from prunelab.trial import Trial, TrialResult

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


# --------------------------------------------------------------------------- helpers


def config(key: str, method: str = "fastv", keep_tokens: int | None = 64) -> dict[str, Any]:
    """A trial of model m on gqa (method none: the unpruned baseline)."""
    if method == "none":
        keep_tokens = None
    return Trial("m", "gqa", method, {}, keep_tokens=keep_tokens, key=key).to_dict()


def new_sweep(engine, tracker: Tracker, name: str, configs: list[dict]) -> tuple[str, dict]:
    """A recorded sweep with its parent run, as ``submit_sweep`` makes it: (id, key -> trial id)."""
    sessions = session_factory(engine)
    with sessions.begin() as session:
        sweep = repo.create_sweep(session, name, {}, "", "me")
        rows, _ = repo.add_trials(
            session, sweep.id, [(c["key"], c, c["method"] == "none") for c in configs]
        )
        sweep_id, created, ids = sweep.id, sweep.created, {r.trial_key: r.id for r in rows}
    parent = tracker.start_sweep(name, sweep_id, {}, sweep_module._ms(created))
    with sessions.begin() as session:
        repo.set_sweep_mlflow_run(session, sweep_id, parent)
    return sweep_id, ids


def run_trial(recorder: Recorder, trial_id: int, score: float, **extra: Any) -> None:
    """Claim a trial and finish it with a worker's result (predictions, a heatmap)."""
    dispatch = SimpleNamespace(trial_id=trial_id)
    assert recorder.claim(dispatch, "w0")
    result = TrialResult(
        metrics={"score": score, "tflops": 2.0, "samples": 2.0},
        predictions=[{"id": "1", "prediction": f"p{trial_id}"}],
        artifacts={"importance/0.png": PNG},
        environment={"torch": "9.9", "dtype": "float32"},
        worker="w0",
        **extra,
    )
    recorder.done(dispatch, result)


def fail_trial(recorder: Recorder, trial_id: int, error: str) -> None:
    """Claim a trial and fail it for good, as the pool reports an error of the trial's code."""
    dispatch = SimpleNamespace(trial_id=trial_id)
    assert recorder.claim(dispatch, "w0")
    assert recorder.failed(dispatch, error, retryable=False) is False


def children(tracker: Tracker, sweep_id: str, engine) -> dict[str, Run]:
    """The active child runs of a sweep's parent run, by trial key (one run per key)."""
    with session_factory(engine)() as session:
        sweep = repo.get_sweep(session, sweep_id)
        assert sweep is not None
        name, parent = sweep.name, sweep.mlflow_run_id
    experiment = tracker.client.get_experiment_by_name(name)
    runs = tracker.client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000
    )
    keys = [run.data.tags["prunelab.trial_key"] for run in runs]
    assert len(keys) == len(set(keys)), keys  # never two runs of one trial
    return {run.data.tags["prunelab.trial_key"]: run for run in runs}


def trial_keys(engine, sweep_id: str) -> set[str]:
    with session_factory(engine)() as session:
        return {t.trial_key for t in repo.sweep_trials(session, sweep_id)}


def rows(engine, sweep_id: str) -> dict[str, TrialRow]:
    with session_factory(engine)() as session:
        trials = repo.sweep_trials(session, sweep_id)
        for trial in trials:
            session.expunge(trial)
        return {t.trial_key: t for t in trials}


def artifact(tracker: Tracker, run_id: str, name: str) -> bytes:
    path = tracker.client.download_artifacts(run_id, name)
    return Path(path).read_bytes()


def artifact_names(tracker: Tracker, run_id: str, path: str | None = None) -> set[str]:
    names = set()
    for entry in tracker.client.list_artifacts(run_id, path):
        names |= artifact_names(tracker, run_id, entry.path) if entry.is_dir else {entry.path}
    return names


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


# --------------------------------------------------------------------------- 1. reused trials


def test_every_sweep_shows_each_of_its_trials_reused_ones_as_copies(
    engine, tracker: Tracker, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sweep a computes base, p1, p2; sweep b (same name, as a rerun) reuses base and p1 and
    computes p3; sweep c (another name: another experiment) only reuses, through ``execute``
    (nothing to run: no Ray). Each parent's child runs are exactly its trials."""
    first, ids = new_sweep(engine, tracker, "s", [config("base", "none"), config("p1"),
                                                  config("p2", keep_tokens=32)])  # fmt: skip
    recorder = Recorder(engine, tracker, first, "me")
    run_trial(recorder, ids["base"], 80.0)
    run_trial(recorder, ids["p1"], 60.0)
    run_trial(recorder, ids["p2"], 40.0)
    assert close_sweep(recorder) == 0

    second, ids2 = new_sweep(engine, tracker, "s", [config("base", "none"), config("p1"),
                                                    config("p3", keep_tokens=16)])  # fmt: skip
    recorder = Recorder(engine, tracker, second, "me")
    recorder.sync_runs()  # as execute does first: the reused trials get their runs now
    assert set(children(tracker, second, engine)) == {"base", "p1"}
    run_trial(recorder, ids2["p3"], 20.0)
    assert close_sweep(recorder) == 0

    third, _ = new_sweep(engine, tracker, "other", [config("base", "none"), config("p2",
                                                    keep_tokens=32)])  # fmt: skip
    assert execute(engine, tracker, third, WorkersConfig(), "me") == 0
    capsys.readouterr()

    for sweep_id in (first, second, third):
        runs = children(tracker, sweep_id, engine)
        assert set(runs) == trial_keys(engine, sweep_id), sweep_id
        assert all(run.info.status == "FINISHED" for run in runs.values())

    computed = rows(engine, first)  # the database keeps the run that computed each trial
    assert {k: t.mlflow_run_id for k, t in rows(engine, second).items() if k != "p3"} == {
        k: computed[k].mlflow_run_id for k in ("base", "p1")
    }
    originals = children(tracker, first, engine)
    assert all(TAG_REUSED_FROM not in run.data.tags for run in originals.values())
    for sweep_id, reused in ((second, ("base", "p1")), (third, ("base", "p2"))):
        runs = children(tracker, sweep_id, engine)
        for key in reused:
            copy, original = runs[key], originals[key]
            assert copy.data.tags[TAG_REUSED_FROM] == original.info.run_id
            assert copy.info.run_id != original.info.run_id
            assert copy.data.tags["prunelab.sweep_id"] == sweep_id
            assert copy.data.params == original.data.params
            assert copy.data.metrics == original.data.metrics
            assert copy.info.run_name == original.info.run_name
            assert copy.data.tags["prunelab.env.torch"] == "9.9"
            assert (copy.info.start_time, copy.info.end_time) == (
                original.info.start_time, original.info.end_time,
            )  # fmt: skip
            names = artifact_names(tracker, original.info.run_id)
            assert {"predictions.jsonl", "trial.yaml", "attempts.json", "importance/0.png"} <= names
            assert artifact_names(tracker, copy.info.run_id) == names
            for name in names:
                assert artifact(tracker, copy.info.run_id, name) == artifact(
                    tracker, original.info.run_id, name
                )
    assert TAG_REUSED_FROM not in children(tracker, second, engine)["p3"].data.tags

    # once more: nothing is copied twice
    again = Recorder(engine, tracker, third, "me")
    again.sync_runs()
    assert set(children(tracker, third, engine)) == {"base", "p2"}


def test_a_reused_trial_whose_run_is_gone_is_logged_again_from_the_database(
    engine, tracker: Tracker
) -> None:
    first, ids = new_sweep(engine, tracker, "s", [config("base", "none"), config("p1")])
    recorder = Recorder(engine, tracker, first, "me")
    run_trial(recorder, ids["base"], 80.0)
    run_trial(recorder, ids["p1"], 60.0)
    assert close_sweep(recorder) == 0
    gone = rows(engine, first)["p1"].mlflow_run_id
    tracker.client.delete_run(gone)

    second, _ = new_sweep(engine, tracker, "t", [config("base", "none"), config("p1")])
    recorder = Recorder(engine, tracker, second, "me")
    assert close_sweep(recorder) == 0
    runs = children(tracker, second, engine)
    assert set(runs) == {"base", "p1"}
    copy = runs["p1"]
    assert copy.data.tags[TAG_REUSED_FROM] == gone  # the run that computed it
    assert copy.data.metrics["score"] == 60.0 and copy.data.metrics["score_ratio"] == 75.0
    assert {"trial.yaml", "attempts.json"} <= artifact_names(tracker, copy.info.run_id)
    assert rows(engine, second)["p1"].mlflow_run_id == gone  # the database is not rewritten


# --------------------------------------------------------------------------- 2. experiment kind


def test_experiments_open_on_the_runs_table(tracker: Tracker) -> None:
    client = tracker.client
    created = tracker.experiment_id("new")
    assert client.get_experiment(created).tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND
    assert EXPERIMENT_KIND == "custom_model_development"  # MLflow 3's "machine learning" kind
    # made before prunelab tagged them (or by hand): tagged when prunelab uses them
    old = client.create_experiment("old")
    assert TAG_EXPERIMENT_KIND not in client.get_experiment(old).tags
    assert Tracker(tracker.tracking_uri).experiment_id("old") == old
    assert client.get_experiment(old).tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND
    by_id = client.create_experiment("by-id")
    parent = tracker.start_sweep("s", "0123456789ab", {})
    tracker.log_trial(by_id, parent, "0123456789ab", "k", "r", {}, {}, {})
    assert client.get_experiment(by_id).tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND
    # a kind someone chose is theirs
    chosen = client.create_experiment("chosen", tags={TAG_EXPERIMENT_KIND: "genai_development"})
    Tracker(tracker.tracking_uri).experiment_id("chosen")
    assert client.get_experiment(chosen).tags[TAG_EXPERIMENT_KIND] == "genai_development"


# --------------------------------------------------------------------------- 3. times


def test_a_trial_run_starts_and_ends_with_the_trial(engine, tracker: Tracker) -> None:
    sweep_id, ids = new_sweep(engine, tracker, "s", [config("base", "none"), config("p1")])
    recorder = Recorder(engine, tracker, sweep_id, "me")
    started = datetime.now(timezone.utc) - timedelta(hours=2)
    dispatch = SimpleNamespace(trial_id=ids["p1"])
    assert recorder.claim(dispatch, "w0")
    with session_factory(engine).begin() as session:  # the trial ran for two hours
        session.execute(update(TrialRow).where(TrialRow.id == ids["p1"]).values(started=started))
    recorder.done(dispatch, TrialResult(metrics={"score": 1.0}, worker="w0"))
    run_trial(recorder, ids["base"], 2.0)
    trial = rows(engine, sweep_id)["p1"]
    run = tracker.client.get_run(trial.mlflow_run_id)
    assert run.info.start_time == ms(started)
    assert run.info.end_time == ms(trial.finished)
    assert all(m.timestamp == ms(trial.finished)
               for m in tracker.client.get_metric_history(run.info.run_id, "score"))  # fmt: skip


def test_a_resumed_parent_keeps_its_start(engine, tracker: Tracker, stores: Stores) -> None:
    sweep_id, _ = new_sweep(engine, tracker, "s", [config("base", "none")])
    with session_factory(engine)() as session:
        sweep = repo.get_sweep(session, sweep_id)
        parent, created = sweep.mlflow_run_id, sweep.created
    assert tracker.client.get_run(parent).info.start_time == ms(created)
    tracker.finish_sweep(parent, "KILLED")
    sessions = session_factory(engine)
    _restore_tracking(sessions, tracker, sweep_id, "s", "", created + timedelta(days=1))
    run = tracker.client.get_run(parent)
    assert (run.info.status, run.info.start_time) == ("RUNNING", ms(created))
    # its parent run lost: the one made again starts when the sweep was created
    tracker.client.delete_run(parent)
    _restore_tracking(sessions, tracker, sweep_id, "s", "", created)
    with sessions() as session:
        again = repo.get_sweep(session, sweep_id).mlflow_run_id
    assert again != parent
    assert tracker.client.get_run(again).info.start_time == ms(created)


# --------------------------------------------------------------------------- 4. score_ratio unit


def test_score_ratio_is_in_percent_everywhere(engine, tracker: Tracker) -> None:
    entry = lookup("score_ratio")
    assert entry is not None and entry.unit == "%" and "percent" in entry.description
    sweep_id, ids = new_sweep(engine, tracker, "s", [config("base", "none"), config("p1")])
    recorder = Recorder(engine, tracker, sweep_id, "me")
    replicates = (78.0, 80.0, 82.0) * 100
    run_trial(recorder, ids["base"], 80.0, replicates=replicates)
    run_trial(recorder, ids["p1"], 70.0, replicates=tuple(r - 10 for r in replicates))
    assert close_sweep(recorder) == 0

    run = children(tracker, sweep_id, engine)["p1"]
    assert run.data.metrics["score_ratio"] == 87.5  # MLflow
    low, high = run.data.metrics["score_ratio_ci_low"], run.data.metrics["score_ratio_ci_high"]
    assert 80 < low <= 87.5 <= high < 95  # its interval in the same unit
    assert rows(engine, sweep_id)["p1"].metrics["score_ratio"] == 87.5  # the database
    parent = tracker.client.get_run(recorder.parent).info.run_id
    table = list(csv.DictReader(io.StringIO(artifact(tracker, parent, "trials.csv").decode())))
    assert {r["method"]: r["score_ratio"] for r in table} == {"none": "100.0", "fastv": "87.5"}
    report = artifact(tracker, parent, "table.md").decode()  # the report's mean ratio (%)
    header = report.splitlines()[0].strip(" |").split(" | ")
    line = next(row for row in report.splitlines() if "| fastv |" in row)
    cells = [c.strip() for c in line.strip(" |").split("|")]
    assert cells[header.index("mean score ratio (%)")].split(" ± ")[0] == "87.5"


# --------------------------------------------------------------------------- 5. failed trials


def test_a_failed_trial_gets_a_failed_run_and_an_error_in_trials_csv(
    engine, tracker: Tracker
) -> None:
    sweep_id, ids = new_sweep(engine, tracker, "s", [config("base", "none"), config("p1"),
                                                     config("p2", keep_tokens=32)])  # fmt: skip
    recorder = Recorder(engine, tracker, sweep_id, "me")
    recorder.max_attempts = 2
    run_trial(recorder, ids["base"], 80.0)
    fail_trial(recorder, ids["p1"], "KeyError: 'no such column'")
    for _ in range(2):  # its worker dies twice: failed for good
        dispatch = SimpleNamespace(trial_id=ids["p2"])
        assert recorder.claim(dispatch, "w0")
        recorder.failed(dispatch, "the worker died", retryable=True)
    assert close_sweep(recorder) == 1

    runs = children(tracker, sweep_id, engine)
    assert set(runs) == {"base", "p1", "p2"}
    failed = runs["p1"]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["prunelab.error"] == "KeyError: 'no such column'"
    assert failed.data.tags["prunelab.attempts"] == "1"
    assert failed.data.params["method"] == "fastv"
    row = rows(engine, sweep_id)["p1"]
    assert failed.info.start_time == ms(row.started) and failed.info.end_time == ms(row.finished)
    assert artifact(tracker, failed.info.run_id, "error.txt") == b"KeyError: 'no such column'\n"
    attempts = json.loads(artifact(tracker, failed.info.run_id, "attempts.json"))
    assert [(a["attempt"], a["kind"]) for a in attempts] == [(1, "error")]
    twice = runs["p2"]
    assert twice.info.status == "FAILED" and twice.data.tags["prunelab.attempts"] == "2"
    attempts = json.loads(artifact(tracker, twice.info.run_id, "attempts.json"))
    assert [(a["attempt"], a["kind"]) for a in attempts] == [(1, "worker_died"),
                                                             (2, "worker_died")]  # fmt: skip

    table = artifact(tracker, recorder.parent, "trials.csv").decode()
    header, *lines = list(csv.reader(io.StringIO(table)))
    assert header[5:7] == ["status", "error"]
    errors = {(line[2], line[3]): (line[5], line[6]) for line in lines}
    assert errors == {
        ("none", "all"): ("finished", ""),
        ("fastv", "64"): ("failed", "KeyError: 'no such column'"),
        ("fastv", "32"): ("failed", "the worker died"),
    }


def test_resume_says_it_leaves_failed_trials_and_retry_failed_reruns_them(
    engine, tracker: Tracker, stores: Stores, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    sweep_id, ids = new_sweep(engine, tracker, "s", [config("base", "none"), config("p1")])
    recorder = Recorder(engine, tracker, sweep_id, "me")
    run_trial(recorder, ids["base"], 80.0)
    fail_trial(recorder, ids["p1"], "flaky")
    assert close_sweep(recorder) == 1
    capsys.readouterr()

    # plain resume: nothing to run (no Ray), one line says why the failed trial stays so
    assert resume_sweep("s", stores) == 1
    out = capsys.readouterr().out
    notice = [line for line in out.splitlines() if "failed trial" in line]
    assert notice == ["1 failed trial(s), not run again; rerun them with "
                      "`prunelab resume s --retry-failed`"]  # fmt: skip
    assert rows(engine, sweep_id)["p1"].status == "failed"
    assert parse(["resume", "s", "--retry-failed"]).retry_failed is True
    assert parse(["resume", "s"]).retry_failed is False

    def execute_here(engine, tracker, sweep_id, workers, orchestrator, ray_address=None):
        """execute, the pool being this test: the retried trial finishes this time."""
        recorder = Recorder(engine, tracker, sweep_id, orchestrator)
        recorder.sync_runs()
        pending = [t for t in rows(engine, sweep_id).values() if t.status == "pending"]
        assert [t.trial_key for t in pending] == ["p1"] and pending[0].attempts == 0
        run_trial(recorder, pending[0].id, 60.0)
        return close_sweep(recorder)

    monkeypatch.setattr(sweep_module, "execute", execute_here)
    assert resume_sweep("s", stores, retry_failed=True) == 0
    assert "1 failed trial(s) back to pending" in capsys.readouterr().out
    runs = children(tracker, sweep_id, engine)  # the FAILED run replaced by the FINISHED one
    assert set(runs) == {"base", "p1"} and runs["p1"].info.status == "FINISHED"
    assert runs["p1"].data.metrics["score_ratio"] == 75.0


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_two_real_sweeps_show_all_their_trials(local_ray: Path, tmp_path: Path) -> None:
    """Sweep ``first`` (tiny model: none, fastv 25%; fastv's code raises) and sweep
    ``second`` (none, fastv 25%, fastv 50%; the fault gone): the second reuses the baseline,
    runs fastv 25% again (a failed trial of an earlier sweep) and fastv 50%."""
    from prunelab.orchestrator.spec import load_sweep
    from prunelab.orchestrator.sweep import submit_sweep

    stores = Stores(
        db_url=f"sqlite:///{tmp_path / 'prunelab.db'}",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_root=str(tmp_path / "artifacts"),
        ray_address=None,
    )
    args = ["model=tiny-llava", "benchmark=shapes", "method=none,fastv", "eval.limit=2",
            "eval.warmup=0", "workers.count=1"]  # fmt: skip
    local_ray.write_text(json.dumps([{"fault": "error", "message": "bug in the trial",
                                      "match": {"method": "fastv"}}]))  # fmt: skip
    try:
        plan = load_sweep("quickstart", [*args, "name=first", "keep_ratio=0.25"])
        assert submit_sweep(plan, stores) == 1  # its fastv trial failed
    finally:
        local_ray.write_text("[]")
    plan = load_sweep("quickstart", [*args, "name=second", "keep_ratio=0.25,0.5"])
    assert submit_sweep(plan, stores) == 0

    engine = init_db(stores.db_url)
    tracker = Tracker(stores.tracking_uri, stores.artifact_root)
    try:
        with session_factory(engine)() as session:
            sweeps = {s.name: s.id for s in repo.list_sweeps(session)}
        first = children(tracker, sweeps["first"], engine)
        second = children(tracker, sweeps["second"], engine)
        assert set(first) == trial_keys(engine, sweeps["first"]) and len(first) == 2
        assert set(second) == trial_keys(engine, sweeps["second"]) and len(second) == 3
        by_method = {(r.data.params["method"], r.data.params.get("keep_ratio")): r
                     for r in second.values()}  # fmt: skip
        base = by_method["none", None]
        original = first[base.data.tags["prunelab.trial_key"]]
        assert base.data.tags[TAG_REUSED_FROM] == original.info.run_id
        assert artifact(tracker, base.info.run_id, "predictions.jsonl") == artifact(
            tracker, original.info.run_id, "predictions.jsonl"
        )
        failed = next(r for r in first.values() if r.info.status == "FAILED")
        assert "bug in the trial" in failed.data.tags["prunelab.error"]
        ran = by_method["fastv", "0.25"]
        assert ran.info.status == "FINISHED" and TAG_REUSED_FROM not in ran.data.tags
        trials = rows(engine, sweeps["second"])
        row = trials[ran.data.tags["prunelab.trial_key"]]
        assert ran.info.start_time == ms(row.started) and ran.info.end_time == ms(row.finished)
        if base.data.metrics["score"] > 0:
            expected = 100 * ran.data.metrics["score"] / base.data.metrics["score"]
            assert ran.data.metrics["score_ratio"] == pytest.approx(expected)
    finally:
        engine.dispose()
