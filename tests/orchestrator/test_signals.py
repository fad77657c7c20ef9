"""Ctrl-C and SIGTERM (docker stop, Slurm, systemd) stop a real ``prunelab`` process the same
way: one line on stderr saying how far it got and how to resume, exit status 130, the running
trials back to pending, the Ray workers ended. ``kill -9`` leaves it no clean-up: its local
Ray's processes end all the same, and the trial it was running is left for ``prunelab
resume``, which puts it back to pending. After any of them, ``prunelab resume`` finishes the
sweep: the trials finished before are not run or logged again.

The signal comes from outside (``os.kill`` on the CLI subprocess) once the database shows a
trial running; every trial sleeps a few seconds in its worker (``PRUNELAB_TEST_FAULTS``) so
that the sweep is still running when it arrives. One sweep takes all three, each on the
process that took it over: SIGTERM stops ``prunelab sweep``, SIGINT the ``prunelab resume``
after it, SIGKILL the next resume, and a last resume finishes it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_cli_sweep import check_mlflow
from test_faults import check_agree

from prunelab.workers.faults import FAULTS_ENV

pytestmark = pytest.mark.slow

# 1 none + 2 random + 2 fastv on the shipped toy model, two samples each
ARGS = [
    "quickstart",
    "method=none,random,fastv",
    "keep_ratio=0.111,0.333",
    "eval.limit=2",
    "eval.warmup=0",
    "--workers",
    "1",
]
TRIALS = 5
MESSAGE = re.compile(
    r"prunelab: interrupted after (\d+)/(\d+) trials; resume with `prunelab resume quickstart`"
)
SLOW = json.dumps([{"fault": "sleep", "seconds": 3}])  # every trial, in its worker


def store_flags(directory: Path) -> list[str]:
    return [
        "--db-url", f"sqlite:///{directory / 'prunelab.db'}",
        "--tracking-uri", f"sqlite:///{directory / 'mlflow.db'}",
        "--artifact-root", str(directory / "artifacts"),
    ]  # fmt: skip


def query(db: Path, sql: str) -> list[tuple]:
    """Rows of ``sql`` on the sweep's SQLite database ([] while it has no tables yet)."""
    if not db.exists():
        return []
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return connection.execute(sql).fetchall()
    except sqlite3.OperationalError:  # not migrated yet, or locked for a moment
        return []
    finally:
        connection.close()


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    """Poll ``condition`` while ``proc`` runs (a guard against a hang, not a timing check)."""
    deadline = time.monotonic() + 300
    while not condition():
        assert proc.poll() is None, f"the sweep exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (Ray's raylet, GCS and worker processes), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting to be reaped has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def default_sigint() -> None:
    """Run in the child before it starts: SIGINT at its default, as under a terminal. A shell
    starts a background job (``pytest ... &`` in a script) with SIGINT ignored, which the
    child would inherit, and prunelab leaves an inherited ignored signal ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(command: list[str], stores: Path) -> list[str]:
    return [sys.executable, "-m", "prunelab.orchestrator.cli", *command, *store_flags(stores)]


def check_ended(processes: set[int]) -> None:
    """The Ray processes an orchestrator started (its workers among them) ended with it."""
    assert processes, "the sweep's Ray processes were not found"
    deadline = time.monotonic() + 60  # a guard against a hang, not a timing check
    while any(alive(pid) for pid in processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:60] for p in processes if alive(p)}
    assert not left


def stop_with(signum: int, command: list[str], stores: Path, directory: Path) -> int:
    """Run ``prunelab COMMAND`` on ``stores`` (every trial slow), send it ``signum`` once a
    trial runs, and check that it stopped cleanly and resumably; how many trials were
    finished when it stopped."""
    db = stores / "prunelab.db"
    env = {**os.environ, FAULTS_ENV: SLOW}
    directory.mkdir()
    with (directory / "out").open("w") as out, (directory / "err").open("w") as err:
        proc = subprocess.Popen(
            cli(command, stores), cwd=directory, env=env, stdout=out, stderr=err,
            preexec_fn=default_sigint,
        )  # fmt: skip
        try:
            running = "select count(*) from trials where status = 'running'"
            wait_until(lambda: query(db, running) == [(1,)], proc, "a trial running")
            workers = descendants(proc.pid)
            os.kill(proc.pid, signum)
            returncode = proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = (directory / "err").read_text()
    assert returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    lines = [line for line in re.split(r"[\r\n]", stderr) if "interrupted" in line]
    assert len(lines) == 1, stderr
    match = MESSAGE.fullmatch(lines[0].strip())
    assert match is not None, lines[0]
    done, total = int(match[1]), int(match[2])
    assert total == TRIALS and done < TRIALS

    # the sweep's clean-up ran: its running trial went back to pending, nothing left running
    assert query(db, "select status from sweeps") == [("interrupted",)]
    statuses = [s for (s,) in query(db, "select status from trials")]
    assert "running" not in statuses and statuses.count("finished") == done
    check_ended(workers)
    return done


def kill_9(command: list[str], stores: Path, directory: Path) -> None:
    """Run ``prunelab COMMAND`` on ``stores`` (every trial slow) and ``kill -9`` it once it has
    logged a trial and runs the next: its local Ray's processes (the dashboard and runtime-env
    agents outlive Ray's own fate-sharing) end all the same."""
    db = stores / "prunelab.db"
    logged = "select count(*) from trials where mlflow_run_id != ''"
    before = query(db, logged)
    assert before, "the stores of the sweep to resume were not found"
    directory.mkdir()
    proc = subprocess.Popen(
        cli(command, stores), cwd=directory, env={**os.environ, FAULTS_ENV: SLOW},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        running = "select count(*) from trials where status = 'running'"
        wait_until(
            lambda: query(db, logged) > before and query(db, running) == [(1,)],
            proc,
            "a trial logged and the next running",
        )
        below = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    check_ended(below)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_sigterm_sigint_and_kill_9_leave_the_sweep_resumable_and_resume_finishes_it(
    tmp_path: Path,
) -> None:
    stores = tmp_path / "stores"
    stores.mkdir()
    db = stores / "prunelab.db"
    by_sigterm = stop_with(signal.SIGTERM, ["sweep", *ARGS], stores, tmp_path / "sweep")
    by_sigint = stop_with(signal.SIGINT, ["resume", "quickstart"], stores, tmp_path / "resume")
    assert by_sigint >= by_sigterm  # what was finished stayed finished

    kill_9(["resume", "quickstart"], stores, tmp_path / "killed")
    rows = "select trial_key, status, attempts, mlflow_run_id from trials"
    killed = {key: (status, attempts, run) for key, status, attempts, run in query(db, rows)}
    (left_running,) = [key for key, (status, _, _) in killed.items() if status == "running"]
    finished = {key for key, (status, _, _) in killed.items() if status == "finished"}
    assert any(killed[key][2] for key in finished)  # logged before the kill

    resumed = subprocess.run(
        cli(["resume", "quickstart"], stores),
        cwd=tmp_path, env={**os.environ}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "1 interrupted trial(s) back to pending" in resumed.stdout  # the killed one's
    after = {key: (status, attempts, run) for key, status, attempts, run in query(db, rows)}
    assert [status for status, _, _ in after.values()] == ["finished"] * TRIALS
    assert query(db, "select status from sweeps") == [("finished",)]
    for key in finished:  # not run again; a run logged before the kill is the trial's run
        _, attempts, run = killed[key]
        assert after[key][1] == attempts and after[key][2] == (run or after[key][2]), key
    assert after[left_running][1] == killed[left_running][1] + 1  # its attempt killed: again
    # one attempt each, and one more for each trial that a stop interrupted
    assert sum(attempts for _, attempts, _ in after.values()) <= TRIALS + 3
    tracking_uri = f"sqlite:///{stores / 'mlflow.db'}"
    check_agree(f"sqlite:///{db}", tracking_uri)  # each finished trial logged exactly once
    check_mlflow(tracking_uri, trials=TRIALS)  # under the one parent run, as a sweep logs them
