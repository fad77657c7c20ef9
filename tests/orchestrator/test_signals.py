"""Ctrl-C and SIGTERM (docker stop, Slurm, systemd) stop a real ``prunelab sweep`` process the
same way: one line on stderr saying how far it got and how to resume, exit status 130, the
running trials back to pending, the Ray workers ended; ``prunelab resume`` then finishes it.

The signal comes from outside (``os.kill`` on the CLI subprocess) once the database shows a
trial running; every trial sleeps a few seconds in its worker (``PRUNELAB_TEST_FAULTS``) so
that the sweep is still running when it arrives.
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

from prunelab.workers.faults import FAULTS_ENV

pytestmark = pytest.mark.slow

# 1 none + 2 random + 2 fastv on the shipped toy model, two samples each
ARGS = ["quickstart", "keep_ratio=0.111,0.333", "eval.limit=2", "eval.warmup=0", "--workers", "1"]
TRIALS = 5
MESSAGE = re.compile(
    r"prunelab: interrupted after (\d+)/(\d+) trials; resume with `prunelab resume quickstart`"
)


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


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_sweep_resumably_and_resume_finishes_it(
    signum: int, tmp_path: Path
) -> None:
    stores = tmp_path / "stores"
    stores.mkdir()
    db = stores / "prunelab.db"
    env = {**os.environ, FAULTS_ENV: json.dumps([{"fault": "sleep", "seconds": 3}])}
    command = [sys.executable, "-m", "prunelab.orchestrator.cli", "sweep", *ARGS]
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        proc = subprocess.Popen(
            [*command, *store_flags(stores)], cwd=tmp_path, env=env, stdout=out, stderr=err
        )
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
    stderr = (tmp_path / "err").read_text()
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
    # the Ray processes the orchestrator started (its workers among them) ended with it
    assert workers, "the sweep's Ray processes were not found"
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in workers if alive(pid)]

    resumed = subprocess.run(
        [sys.executable, "-m", "prunelab.orchestrator.cli", "resume", "quickstart",
         *store_flags(stores)],
        cwd=tmp_path, env={**os.environ}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    rows = query(db, "select status, attempts from trials")
    assert [s for s, _ in rows] == ["finished"] * TRIALS
    assert query(db, "select status from sweeps") == [("finished",)]
    # finished trials did not run again: one attempt each, two for the interrupted one
    assert sum(a for _, a in rows) <= TRIALS + 1


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_the_local_ray_ends_when_the_orchestrator_is_killed(tmp_path: Path) -> None:
    """``kill -9`` leaves the orchestrator no clean-up: its local Ray's processes (the
    dashboard and runtime-env agents outlive Ray's own fate-sharing) end all the same."""
    stores = tmp_path / "stores"
    stores.mkdir()
    db = stores / "prunelab.db"
    env = {**os.environ, FAULTS_ENV: json.dumps([{"fault": "sleep", "seconds": 3}])}
    command = [sys.executable, "-m", "prunelab.orchestrator.cli", "sweep", *ARGS]
    proc = subprocess.Popen(
        [*command, *store_flags(stores)], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        running = "select count(*) from trials where status = 'running'"
        wait_until(lambda: query(db, running) == [(1,)], proc, "a trial running")
        below = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert below, "the sweep's Ray processes were not found"
    deadline = time.monotonic() + 60  # a guard against a hang, not a timing check
    while any(alive(pid) for pid in below) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:60] for pid in below if alive(pid)}
    assert not left
