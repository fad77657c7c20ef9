"""A sweep is its name (issue 18): submitting a spec again with the same name extends that
sweep (one row, one MLflow parent run, the union of its trials, the report over all of them,
each submission's spec kept); ``--fresh`` starts another sweep of that name; ``prunelab
delete`` removes a sweep (its rows; with ``--runs`` its MLflow runs), never another sweep's.

The recording code runs on real stores (SQLite and MLflow in ``tmp_path``) without Ray: the
sweep's ``execute`` is replaced by one that finishes the pending trials through the sweep's
:class:`Recorder`, as the worker pool would. One slow test runs the CLI end to end.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import prunelab.orchestrator.sweep as sweep_module
from prunelab.db import Sweep, SweepTrial, init_db, repo, session_factory
from prunelab.db import Trial as TrialRow
from prunelab.db.models import SweepSubmission, TrialAttempt
from prunelab.orchestrator.cli import main
from prunelab.orchestrator.config import WorkersConfig
from prunelab.orchestrator.sweep import (
    Recorder,
    Stores,
    SweepBusy,
    busy_reason,
    close_sweep,
    delete_sweep,
    submit_sweep,
    sweep_table,
)
from prunelab.orchestrator.tracking import TAG_REUSED_FROM, Tracker
from prunelab.trial import Trial, TrialResult

# --------------------------------------------------------------------------- helpers

SCORES = {"base": 80.0, "p1": 60.0, "p2": 40.0, "p3": 20.0}
BUDGETS = {"p1": 64, "p2": 32, "p3": 16}


def trial(key: str) -> Trial:
    """Trial ``key`` of model m on gqa: ``base`` the unpruned baseline, ``pN`` fastv."""
    if key == "base":
        return Trial("m", "gqa", "none", {}, key=key)
    return Trial("m", "gqa", "fastv", {}, keep_tokens=BUDGETS[key], key=key)


def plan(name: str, *keys: str, note: str = "") -> Any:
    """A validated plan of ``keys``, as ``load_sweep`` gives it (what submit_sweep reads)."""
    spec = {"name": name, "trials": list(keys), "note": note}
    return SimpleNamespace(
        name=name,
        spec=spec,
        spec_yaml=yaml.safe_dump(spec, sort_keys=False),
        trials=[trial(k) for k in keys],
        workers=WorkersConfig(),
    )


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """``execute`` without Ray: the sweep's pending trials finish (score by key) through its
    Recorder; yields the keys each call ran."""
    calls: list[list[str]] = []

    def execute_here(engine, tracker, sweep_id, workers, orchestrator, ray_address=None):
        recorder = Recorder(engine, tracker, sweep_id, orchestrator)
        recorder.sync_runs()
        with session_factory(engine)() as session:
            pending = [
                (t.id, t.trial_key)
                for t in repo.sweep_trials(session, sweep_id)
                if t.status == "pending"
            ]
        calls.append([key for _, key in pending])
        for trial_id, key in pending:
            dispatch = SimpleNamespace(trial_id=trial_id)
            assert recorder.claim(dispatch, "w0")
            result = TrialResult(
                metrics={"score": SCORES[key], "tflops": 1.0},
                predictions=[{"id": "1", "prediction": key}],
                worker="w0",
            )
            recorder.done(dispatch, result)
        return close_sweep(recorder)

    monkeypatch.setattr(sweep_module, "execute", execute_here)
    return calls


def sweeps(engine, name: str) -> list[Sweep]:
    with session_factory(engine)() as session:
        found = [s for s in repo.list_sweeps(session) if s.name == name]
        for sweep in found:
            session.expunge(sweep)
        return found


def members(engine, sweep_id: str) -> dict[str, TrialRow]:
    with session_factory(engine)() as session:
        trials = repo.sweep_trials(session, sweep_id)
        for row in trials:
            session.expunge(row)
        return {t.trial_key: t for t in trials}


def runs_of(tracker: Tracker, name: str, sweep_id: str, deleted: bool = False) -> dict[str, Any]:
    """Runs of a sweep (parent and children: tagged with its id), by run id; ``deleted``:
    the deleted ones instead of the active ones."""
    from mlflow.entities import ViewType

    experiment = tracker.client.get_experiment_by_name(name)
    view = ViewType.DELETED_ONLY if deleted else ViewType.ACTIVE_ONLY
    found = tracker.client.search_runs(
        [experiment.experiment_id],
        f"tags.`prunelab.sweep_id` = '{sweep_id}'",
        run_view_type=view,
        max_results=1000,
    )
    return {run.info.run_id: run for run in found}


def children(tracker: Tracker, name: str, parent: str) -> dict[str, Any]:
    """The active child runs of a parent run, by trial key (never two per key)."""
    experiment = tracker.client.get_experiment_by_name(name)
    found = tracker.client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000
    )
    keys = [run.data.tags["prunelab.trial_key"] for run in found]
    assert len(keys) == len(set(keys)), keys
    return {run.data.tags["prunelab.trial_key"]: run for run in found}


def artifact(tracker: Tracker, run_id: str, name: str) -> str:
    return Path(tracker.client.download_artifacts(run_id, name)).read_text()


def table_rows(tracker: Tracker, parent: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(artifact(tracker, parent, "trials.csv"))))


# --------------------------------------------------------------------------- extending


def test_submitting_a_name_again_extends_its_sweep(
    engine, tracker: Tracker, stores: Stores, ran: list[list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    first = plan("s", "base", "p1", note="first")
    assert submit_sweep(first, stores) == 0
    (sweep,) = sweeps(engine, "s")
    parent = sweep.mlflow_run_id
    capsys.readouterr()

    second = plan("s", "base", "p2", note="second")  # p1 left out, p2 new
    assert submit_sweep(second, stores) == 0
    out = capsys.readouterr().out
    assert ran == [["base", "p1"], ["p2"]]  # finished trials are not run again
    assert f"sweep s ({sweep.id}): submission 2, 1 new trial(s) added to its 2" in out
    assert f"sweep s ({sweep.id}): 3 trials, 2 already finished, 1 to run" in out

    (again,) = sweeps(engine, "s")  # one sweep row, one parent run
    assert (again.id, again.mlflow_run_id, again.status) == (sweep.id, parent, "finished")
    assert again.spec == second.spec and again.spec_yaml == second.spec_yaml  # the latest
    trials = members(engine, sweep.id)
    assert list(trials) == ["base", "p1", "p2"]  # the union, earlier trials first
    assert all(t.status == "finished" and t.attempts == 1 for t in trials.values())
    with session_factory(engine)() as session:  # every submission's spec is kept
        submissions = repo.sweep_submissions(session, sweep.id)
        assert [s.spec["note"] for s in submissions] == ["first", "second"]
        assert [s.spec_yaml for s in submissions] == [first.spec_yaml, second.spec_yaml]

    # MLflow: the one parent has each trial of the sweep once, and the report over all
    (only,) = [r for r in runs_of(tracker, "s", sweep.id).values()
               if r.data.tags["prunelab.role"] == "sweep"]  # fmt: skip
    assert only.info.run_id == parent and only.info.status == "FINISHED"
    assert set(children(tracker, "s", parent)) == {"base", "p1", "p2"}
    rows = table_rows(tracker, parent)
    assert sorted(r["budget"] for r in rows) == sorted(["all", "64", "32"])
    table = artifact(tracker, parent, "table.md")
    assert len([line for line in table.splitlines() if "| fastv |" in line]) == 2
    assert artifact(tracker, parent, "spec.yaml") == second.spec_yaml
    assert artifact(tracker, parent, "specs/1.yaml") == first.spec_yaml
    assert artifact(tracker, parent, "specs/2.yaml") == second.spec_yaml
    assert tracker.client.get_run(parent).data.tags["prunelab.submissions"] == "2"
    report = sweep_table(engine, "s")  # `prunelab report s`
    assert report == sweep_table(engine, sweep.id)
    assert len([line for line in report.splitlines() if "| fastv |" in line]) == 2
    assert main(["report", "s", "--format", "csv", "--db-url", stores.db_url]) == 0
    csv_report = capsys.readouterr().out
    assert len([line for line in csv_report.splitlines() if ",fastv," in line]) == 2


def test_the_same_plan_again_runs_nothing_and_adds_nothing(
    engine, stores: Stores, ran: list[list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert submit_sweep(plan("s", "base", "p1"), stores) == 0
    capsys.readouterr()
    assert submit_sweep(plan("s", "base", "p1"), stores) == 0
    out = capsys.readouterr().out
    assert "submission 2, 0 new trial(s) added to its 2" in out
    assert "2 trials, 2 already finished, 0 to run" in out
    assert ran == [["base", "p1"], []]
    assert len(sweeps(engine, "s")) == 1


def test_fresh_starts_a_second_sweep_of_the_name(
    engine, tracker: Tracker, stores: Stores, ran: list[list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    assert submit_sweep(plan("s", "base", "p1"), stores) == 0
    (old,) = sweeps(engine, "s")
    capsys.readouterr()
    assert submit_sweep(plan("s", "base", "p3"), stores, fresh=True) == 0
    out = capsys.readouterr().out
    new, older = sweeps(engine, "s")  # newest first
    assert older.id == old.id and new.id != old.id
    assert f"a new sweep of that name (--fresh); the earlier one(s) stay, by id: {old.id}" in out
    assert ran == [["base", "p1"], ["p3"]]  # base reused
    assert set(members(engine, old.id)) == {"base", "p1"}  # the old one as it was
    assert set(members(engine, new.id)) == {"base", "p3"}
    assert new.mlflow_run_id != old.mlflow_run_id
    fresh_runs = children(tracker, "s", new.mlflow_run_id)
    assert set(fresh_runs) == {"base", "p3"}
    assert TAG_REUSED_FROM in fresh_runs["base"].data.tags  # a copy in the new sweep
    with session_factory(engine)() as session:
        assert repo.get_sweep(session, "s").id == new.id  # by name: the newest
        assert repo.get_sweep(session, old.id).id == old.id  # the old one by id
        assert repo.named_sweep_ids(session) == {new.id}
    # the name now extends the newest
    assert submit_sweep(plan("s", "p2"), stores) == 0
    assert set(members(engine, new.id)) == {"base", "p3", "p2"}
    assert set(members(engine, old.id)) == {"base", "p1"}
    # parsed from the command line
    from prunelab.orchestrator.cli import parse

    assert parse(["sweep", "quickstart", "--fresh"]).fresh is True
    assert parse(["sweep", "quickstart"]).fresh is False
    # status: a header; the older sweep of the name marked as reachable by id only
    capsys.readouterr()
    assert main(["status", "--db-url", stores.db_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "name", "created", "status", "trials"]
    (current,) = [line for line in lines if line.startswith(new.id)]
    (earlier,) = [line for line in lines if line.startswith(old.id)]
    assert current.split()[1] == "s" and earlier.split()[1] == "(s)"
    assert lines[-1] == "(name): an earlier sweep of that name, reachable by its id"


def test_a_sweep_its_orchestrator_may_be_running_is_not_extended(
    engine, stores: Stores, ran: list[list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert submit_sweep(plan("s", "base"), stores) == 0
    (sweep,) = sweeps(engine, "s")
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(dead.stdout)
    sessions = session_factory(engine)

    def marked_running(orchestrator: str) -> None:
        with sessions.begin() as session:
            repo.set_sweep_status(session, sweep.id, "running")
            repo.set_sweep_orchestrator(session, sweep.id, orchestrator)

    marked_running(f"{host}:{os.getpid()}:abc")  # alive: this process
    with pytest.raises(SweepBusy, match=r"is running .* --fresh"):
        submit_sweep(plan("s", "p1"), stores)
    with session_factory(engine)() as session:
        assert busy_reason(repo.get_sweep(session, "s"), "deleted") is not None
    marked_running("elsewhere.example:12:abc")  # another host: cannot tell
    with pytest.raises(SweepBusy, match="prunelab resume"):
        submit_sweep(plan("s", "p1"), stores)
    assert set(members(engine, sweep.id)) == {"base"}  # nothing changed
    with session_factory(engine)() as session:
        assert len(repo.sweep_submissions(session, sweep.id)) == 1

    # its orchestrator on this host is gone (killed): extended, its claims back to pending
    marked_running(f"{host}:{dead_pid}:abc")
    with sessions.begin() as session:
        rows, _ = repo.add_trials(session, sweep.id, [("p2", trial("p2").to_dict(), False)])
        assert repo.claim_trial(session, rows[0].id, f"{host}:{dead_pid}:abc", "w0", None)
    capsys.readouterr()
    assert submit_sweep(plan("s", "p1"), stores) == 0
    assert "1 trial(s) of its killed orchestrator back to pending" in capsys.readouterr().out
    assert {k: t.status for k, t in members(engine, sweep.id).items()} == dict.fromkeys(
        ("base", "p2", "p1"), "finished"
    )


# --------------------------------------------------------------------------- deleting


def test_delete_removes_a_sweep_and_its_runs_and_leaves_another_sharing_a_trial(
    engine, tracker: Tracker, stores: Stores, ran: list[list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    assert submit_sweep(plan("a", "base", "p1"), stores) == 0  # computes base
    assert submit_sweep(plan("b", "base", "p2"), stores) == 0  # reuses base
    (a,), (b,) = sweeps(engine, "a"), sweeps(engine, "b")
    computed = members(engine, a.id)["base"].mlflow_run_id  # base's run is a's
    b_runs_before = runs_of(tracker, "b", b.id)
    b_children = children(tracker, "b", b.mlflow_run_id)
    assert b_children["base"].data.tags[TAG_REUSED_FROM] == computed
    a_runs = runs_of(tracker, "a", a.id)
    assert len(a_runs) == 3  # parent, base, p1
    capsys.readouterr()

    flags = ["--db-url", stores.db_url, "--tracking-uri", stores.tracking_uri,
             "--artifact-root", str(stores.artifact_root)]  # fmt: skip
    assert main(["delete", "a", "--runs", *flags]) == 0
    out = capsys.readouterr().out
    assert f"deleted sweep a ({a.id}): 1 submission(s), 2 trial(s): 1 deleted, 1 kept" in out
    assert "deleted its 3 MLflow run(s) in experiment a: 1 parent, 2 trial run(s)" in out

    with session_factory(engine)() as session:
        assert session.get(Sweep, a.id) is None
        assert session.scalars(select(SweepTrial).where(SweepTrial.sweep_id == a.id)).all() == []
        assert (
            session.scalars(select(SweepSubmission).where(SweepSubmission.sweep_id == a.id)).all()
            == []
        )
        keys = {t.trial_key: t for t in session.scalars(select(TrialRow))}
        assert set(keys) == {"base", "p2"}  # p1 was a's alone
        assert keys["base"].sweep_id == b.id  # created by a: b's from now on
        # its run was a's (deleted): now b's copy of it, which stays
        assert keys["base"].mlflow_run_id == b_children["base"].info.run_id
    assert runs_of(tracker, "a", a.id) == {}
    assert set(runs_of(tracker, "a", a.id, deleted=True)) == set(a_runs)
    # b untouched: its rows, its runs (the copy of a's base run included), its report
    assert set(members(engine, b.id)) == {"base", "p2"}
    assert all(t.status == "finished" for t in members(engine, b.id).values())
    after = runs_of(tracker, "b", b.id)
    assert set(after) == set(b_runs_before)
    assert all(run.info.lifecycle_stage == "active" for run in after.values())
    assert "fastv" in sweep_table(engine, "b")
    # b goes on as a sweep: extending it logs nothing twice
    assert submit_sweep(plan("b", "base", "p2"), stores) == 0
    assert set(children(tracker, "b", b.mlflow_run_id)) == {"base", "p2"}


def test_delete_runs_gives_a_sweep_sharing_a_trial_its_own_copy_first(
    engine, tracker: Tracker, stores: Stores, ran: list[list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Sweep b has base (computed by a) but no run of it yet (it never ran): deleting a's
    runs copies base's run under b's parent first, and base points to that copy."""
    assert submit_sweep(plan("a", "base", "p1"), stores) == 0
    (a,) = sweeps(engine, "a")
    computed = members(engine, a.id)["base"].mlflow_run_id
    sessions = session_factory(engine)
    with sessions.begin() as session:  # recorded as submit_sweep does, before it runs
        b = repo.create_sweep(session, "b", {}, "", "elsewhere.example:1:x").id
        repo.add_trials(session, b, [("base", trial("base").to_dict(), True)])
        repo.set_sweep_status(session, b, "interrupted")
    parent = tracker.start_sweep("b", b, {})
    with sessions.begin() as session:
        repo.set_sweep_mlflow_run(session, b, parent)
    assert children(tracker, "b", parent) == {}
    capsys.readouterr()
    assert delete_sweep(a.id, stores, runs=True) == 0
    out = capsys.readouterr().out
    assert "1 kept trial(s) computed in it now point to their run in another sweep" in out
    copy = children(tracker, "b", parent)["base"]
    assert copy.data.tags[TAG_REUSED_FROM] == computed
    assert copy.data.metrics["score"] == 80.0
    assert "predictions.jsonl" in {a.path for a in tracker.client.list_artifacts(copy.info.run_id)}
    assert members(engine, b)["base"].mlflow_run_id == copy.info.run_id
    assert runs_of(tracker, "a", a.id) == {}


def test_delete_without_runs_keeps_them_and_by_name_deletes_the_newest(
    engine, tracker: Tracker, stores: Stores, ran: list[list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    assert submit_sweep(plan("s", "base", "p1"), stores) == 0
    assert submit_sweep(plan("s", "base", "p2"), stores, fresh=True) == 0
    new, old = sweeps(engine, "s")
    new_runs = runs_of(tracker, "s", new.id)
    capsys.readouterr()
    assert delete_sweep("s", stores) == 0  # the name: the newest
    out = capsys.readouterr().out
    assert f"deleted sweep s ({new.id})" in out and "1 deleted, 1 kept" in out
    assert f"its MLflow runs stay (parent run {new.mlflow_run_id}" in out
    assert f"s now means sweep {old.id}" in out
    assert [s.id for s in sweeps(engine, "s")] == [old.id]
    assert set(runs_of(tracker, "s", new.id)) == set(new_runs)  # not deleted
    assert set(members(engine, old.id)) == {"base", "p1"}


def test_delete_an_unknown_sweep_is_bad_input(
    engine, stores: Stores, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["delete", "nope", "--db-url", stores.db_url]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["prunelab: error: no sweep with id or name 'nope'"]
    missing = f"sqlite:///{tmp_path / 'none' / 'prunelab.db'}"
    assert main(["delete", "nope", "--db-url", missing]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert not (tmp_path / "none" / "prunelab.db").exists()  # not created


def test_delete_refuses_a_sweep_being_run_unless_forced(
    engine, stores: Stores, capsys: pytest.CaptureFixture[str]
) -> None:
    with session_factory(engine).begin() as session:
        sweep = repo.create_sweep(session, "s", {}, "", f"{socket.gethostname()}:{os.getpid()}:x")
        sweep_id = sweep.id
    assert main(["delete", "s", "--db-url", stores.db_url]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "is running" in line and "--force" in line
    assert len(sweeps(engine, "s")) == 1
    assert main(["delete", sweep_id, "--force", "--db-url", stores.db_url]) == 0
    assert sweeps(engine, "s") == []


# --------------------------------------------------------------------------- repository


Factory = sessionmaker[Session]


def test_repo_extend_and_delete(factory: Factory) -> None:
    """On SQLite and PostgreSQL: an extension appends its trials after the sweep's own and
    keeps each submission; deleting the sweep that created a shared trial hands the trial
    to the other sweep and deletes the rest (with its attempts)."""
    with factory.begin() as session:
        repo.lock_sweep_name(session, "x")
        a = repo.create_sweep(session, "x", {"v": 1}, "v: 1\n", "o:1").id
        repo.add_trials(session, a, [("k1", {}, False), ("k2", {}, False)])
    with factory.begin() as session:
        repo.lock_sweep_name(session, "x")
        assert repo.newest_sweep(session, "x").id == a
        assert repo.extend_sweep(session, a, {"v": 2}, "v: 2\n", "o:2") == 2
        repo.add_trials(session, a, [("k3", {}, False), ("k1", {}, False)])
        b = repo.create_sweep(session, "y", {}, "", "o:3").id
        repo.add_trials(session, b, [("k2", {}, False), ("k4", {}, False)])
    with factory.begin() as session:
        assert [t.trial_key for t in repo.sweep_trials(session, a)] == ["k1", "k2", "k3"]
        sweep = repo.get_sweep(session, a)
        assert (sweep.spec, sweep.orchestrator, sweep.status) == ({"v": 2}, "o:2", "running")
        assert [s.spec for s in repo.sweep_submissions(session, a)] == [{"v": 1}, {"v": 2}]
        assert repo.shared_trials(session, a) == {
            repo.trials_by_keys(session, ["k2"])["k2"].id: [b]
        }
        k1 = repo.trials_by_keys(session, ["k1"])["k1"].id
        assert repo.claim_trial(session, k1, "o:2", "w", None)
        repo.release_trial(session, k1, "died", 3)
    with factory.begin() as session:
        deleted = repo.delete_sweep(session, a)
        assert deleted == repo.DeletedSweep(
            memberships=3, trials=2, attempts=1, submissions=2, kept=1
        )
    with factory() as session:
        trials = {t.trial_key: t.sweep_id for t in session.scalars(select(TrialRow))}
        assert trials == {"k2": b, "k4": b}
        assert session.scalars(select(TrialAttempt)).all() == []
        assert [s.id for s in repo.list_sweeps(session)] == [b]
        assert [t.trial_key for t in repo.sweep_trials(session, b)] == ["k2", "k4"]
    with factory.begin() as session, pytest.raises(LookupError):
        repo.delete_sweep(session, a)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cli_resubmission_extends_and_delete_removes(
    local_ray: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """``prunelab sweep`` twice with one name (tiny model, shapes, two samples), the second
    with one more budget: one sweep of three trials, one parent run, the report over all;
    then ``prunelab delete NAME --runs``."""
    monkeypatch.chdir(tmp_path)  # the default stores: ./prunelab-runs
    args = ["sweep", "quickstart", "model=tiny-llava", "benchmark=shapes", "method=none,fastv",
            "eval.limit=2", "eval.warmup=0", "workers.count=1", "name=grow"]  # fmt: skip
    assert main([*args, "keep_ratio=0.25"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main([*args, "keep_ratio=0.25,0.5"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "submission 2, 1 new trial(s) added to its 2" in out
    assert "3 trials, 2 already finished, 1 to run" in out
    assert main(["status", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in listed] == ["grow"] and listed[0]["trials"] == {"finished": 3}
    assert main(["report", "grow", "--format", "csv"]) == 0
    assert len([row for row in capsys.readouterr().out.splitlines() if ",fastv," in row]) == 2
    stores = Stores(
        db_url=f"sqlite:///{tmp_path / 'prunelab-runs' / 'prunelab.db'}",
        tracking_uri=f"sqlite:///{tmp_path / 'prunelab-runs' / 'mlflow.db'}",
        artifact_root=str(tmp_path / "prunelab-runs" / "artifacts"),
        ray_address=None,
    )
    engine = init_db(stores.db_url)
    tracker = Tracker(stores.tracking_uri, stores.artifact_root)
    try:
        (sweep,) = sweeps(engine, "grow")
        runs = runs_of(tracker, "grow", sweep.id)
        parents = [r for r in runs.values() if r.data.tags["prunelab.role"] == "sweep"]
        assert [p.info.run_id for p in parents] == [sweep.mlflow_run_id]
        assert len(children(tracker, "grow", sweep.mlflow_run_id)) == 3
        assert len(table_rows(tracker, sweep.mlflow_run_id)) == 3

        assert main(["delete", "grow", "--runs"]) == 0
        out = capsys.readouterr().out
        assert "deleted its 4 MLflow run(s) in experiment grow: 1 parent, 3 trial run(s)" in out
        assert sweeps(engine, "grow") == [] and runs_of(tracker, "grow", sweep.id) == {}
        with session_factory(engine)() as session:
            assert session.scalars(select(TrialRow)).all() == []
        assert main(["delete", "grow"]) == 2
        assert capsys.readouterr().err.strip() == "prunelab: error: no sweep with id or name 'grow'"
    finally:
        engine.dispose()
