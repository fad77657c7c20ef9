"""A sweep whose artifacts cannot be written stops cleanly and resumably.

Real OS errors that root cannot bypass (the tests run as root, which ignores directory
permissions): ``ENOTDIR`` (the artifact root's parent replaced by a regular file mid-sweep)
and ``ENAMETOOLONG`` (an artifact root with a 300-character component). The CLI says one line
naming the path and the OS error, exits 74, leaves no trial running, the sweep
``interrupted`` and its parent run FAILED; once the fault is removed ``prunelab resume``
finishes the sweep with each trial logged exactly once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_signals import ARGS, TRIALS, query, wait_until

from prunelab.workers.faults import FAULTS_ENV

pytestmark = pytest.mark.slow

WORKERS = ["--workers", "2"]


def flags(stores: Path, artifacts: Path) -> list[str]:
    return [
        "--db-url", f"sqlite:///{stores / 'prunelab.db'}",
        "--tracking-uri", f"sqlite:///{stores / 'mlflow.db'}",
        "--artifact-root", str(artifacts),
    ]  # fmt: skip


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "prunelab.orchestrator.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def count(db: Path, where: str) -> int:
    """How many trials match ``where`` (0 while the database has no tables yet)."""
    rows = query(db, f"select count(*) from trials where {where}")
    return rows[0][0] if rows else 0


def error_line(stderr: str) -> str:
    """The one ``prunelab: error:`` line (the progress bar shares stderr)."""
    assert "Traceback" not in stderr, stderr
    lines = [line.strip() for line in re.split(r"[\r\n]", stderr) if "prunelab: error:" in line]
    assert len(lines) == 1, stderr
    return lines[0]


def runs(stores: Path) -> tuple[list, list]:
    """The quickstart experiment's active (parent runs, child runs)."""
    client = MlflowClient(f"sqlite:///{stores / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is not None
    found = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in found if r.data.tags.get("prunelab.role") == "sweep"]
    children = [r for r in found if r.data.tags.get("prunelab.role") == "trial"]
    return parents, children


def check_stopped(db: Path, stores: Path) -> None:
    """The stop was clean: the sweep interrupted, nothing running, its parent run FAILED,
    every child run FINISHED and named by its (finished) trial."""
    assert query(db, "select status from sweeps") == [("interrupted",)]
    statuses = [s for (s,) in query(db, "select status from trials")]
    assert set(statuses) <= {"finished", "pending"}, statuses
    (parent,), children = runs(stores)
    assert parent.info.status == "FAILED"
    logged = dict(query(db, "select mlflow_run_id, status from trials where mlflow_run_id != ''"))
    assert {r.info.run_id for r in children} == set(logged)
    assert all(r.info.status == "FINISHED" for r in children)
    assert set(logged.values()) <= {"finished"}


def check_finished(db: Path, stores: Path) -> None:
    """Every trial finished and logged exactly once, in agreement with the database."""
    assert query(db, "select status from sweeps") == [("finished",)]
    rows = query(db, "select trial_key, status, mlflow_run_id from trials")
    assert len(rows) == TRIALS and all(status == "finished" for _, status, _ in rows)
    (parent,), children = runs(stores)
    assert parent.info.status == "FINISHED"
    keys = [r.data.tags["prunelab.trial_key"] for r in children]
    assert sorted(keys) == sorted(key for key, _, _ in rows), "a trial logged twice or never"
    by_key = {key: run_id for key, _, run_id in rows}
    for run in children:
        assert run.info.status == "FINISHED"
        assert by_key[run.data.tags["prunelab.trial_key"]] == run.info.run_id
        assert run.data.tags["prunelab.attempts"]


def test_artifact_root_lost_mid_sweep_stops_cleanly_and_resume_finishes(tmp_path: Path) -> None:
    stores, home = tmp_path / "stores", tmp_path / "home"
    stores.mkdir()
    home.mkdir()
    artifacts = home / "artifacts"
    db = stores / "prunelab.db"
    env = {FAULTS_ENV: json.dumps([{"fault": "sleep", "seconds": 2}])}
    proc = cli("sweep", *ARGS[:-2], *WORKERS, *flags(stores, artifacts), cwd=tmp_path, env=env)
    try:
        wait_until(
            lambda: count(db, "mlflow_run_id != ''") >= 1 and count(db, "status = 'pending'") >= 1,
            proc,
            "a trial logged and one pending",
        )
        home.rename(tmp_path / "home.away")  # the artifact root's parent becomes a file
        home.write_text("not a directory")
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 74, stderr
    line = error_line(stderr)
    match = re.fullmatch(
        rf"prunelab: error: cannot write artifacts under {re.escape(str(artifacts))}\S*: "
        r"Not a directory; stopped after (\d+)/(\d+) trials; "
        r"resume with `prunelab resume quickstart`",
        line,
    )
    assert match is not None, line
    assert 1 <= int(match[1]) < TRIALS and int(match[2]) == TRIALS
    check_stopped(db, stores)
    kinds = [k for (k,) in query(db, "select kind from trial_attempts")]
    assert "recording" in kinds and set(kinds) <= {"recording", "interrupted"}, kinds
    before = dict(
        query(db, "select trial_key, mlflow_run_id from trials where status = 'finished'")
    )
    assert len(before) == int(match[1])

    home.unlink()  # the fault removed: the same artifact root is writable again
    (tmp_path / "home.away").rename(home)
    resumed = cli("resume", "quickstart", *flags(stores, artifacts), cwd=tmp_path)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out + err
    check_finished(db, stores)
    after = dict(query(db, "select trial_key, mlflow_run_id from trials"))
    assert all(after[key] == run_id for key, run_id in before.items())  # not run again
    # the trial whose result was lost ran again: its run lists both attempts
    key = query(
        db,
        "select t.trial_key from trials t join trial_attempts a on a.trial_id = t.id "
        "where a.kind = 'recording'",
    )[0][0]
    client = MlflowClient(f"sqlite:///{stores / 'mlflow.db'}")
    path = client.download_artifacts(after[key], "attempts.json", str(tmp_path))
    attempts = json.loads(Path(path).read_text())
    assert attempts[0]["kind"] == "recording" and "Not a directory" in attempts[0]["error"]
    assert attempts[-1]["kind"] == "finished"


def test_artifact_name_too_long_stops_the_sweep_with_one_line(tmp_path: Path) -> None:
    stores = tmp_path / "stores"
    stores.mkdir()
    artifacts = tmp_path / ("x" * 300)  # longer than any file name may be (NAME_MAX 255)
    db = stores / "prunelab.db"
    proc = cli("sweep", *ARGS, *flags(stores, artifacts), cwd=tmp_path)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 74, stderr
    line = error_line(stderr)
    assert line.startswith(f"prunelab: error: cannot write artifacts under {artifacts}"), line
    assert line.endswith(
        ": File name too long; stopped after 0/5 trials; resume with `prunelab resume quickstart`"
    ), line
    check_stopped(db, stores)
    assert count(db, "status = 'finished'") == 0
    assert [k for (k,) in query(db, "select kind from trial_attempts")].count("recording") == 1
