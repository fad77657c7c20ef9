"""A quiet console (issue 18): one progress line for a sweep, prunelab's own lines and a failed
trial's error on the console, and everything else (Ray, MLflow, transformers, the workers'
logs, warnings and output) in a log file next to the stores unless ``-v`` is given.

The progress line and the console's routing are checked here in process; one whole sweep in a
subprocess checks what a user sees, quiet and with ``-v``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from prunelab.orchestrator import console
from prunelab.orchestrator.console import Console, Progress
from prunelab.workers.faults import FAULTS_ENV


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_is_one_line_per_change_off_a_terminal() -> None:
    clock, out = Clock(), Stream(tty=False)
    bar = Progress("s", total=4, done=1, stream=out, clock=clock)
    bar.started(10, "worker-0")
    bar.started(11, "worker-1")
    clock.now = 10.0
    bar.started(12, "worker-0")  # worker-0's trial 10 ended, its result comes after
    bar.finished(10)
    console.write("trial 11 attempt failed (failed): RuntimeError: boom")
    bar.failed(11)
    bar.waiting(0)  # no change: no line
    clock.now = 12.0
    bar.finished(12)
    bar.close()
    assert out.getvalue().splitlines() == [
        "sweep s: 1/4 done, 0 running, ETA ?",
        "sweep s: 1/4 done, 1 running, ETA ?",
        "sweep s: 1/4 done, 2 running, ETA ?",
        # 2 left, 10 s each, 2 at once
        "sweep s: 2/4 done, 2 running, ETA 10 s",
        "trial 11 attempt failed (failed): RuntimeError: boom",
        "sweep s: 2/4 done, 1 running, 1 failed, ETA 5 s",
        "sweep s: 3/4 done, 0 running, 1 failed",
    ]
    console.write("after")  # the bar is closed: a plain line
    assert out.getvalue().endswith("1 failed\n")


def test_progress_is_redrawn_in_place_on_a_terminal() -> None:
    out = Stream(tty=True)
    bar = Progress("s", total=2, stream=out, clock=Clock())
    bar.started(1, "w")
    console.write("a message")
    bar.finished(1)
    bar.close()
    text = out.getvalue()
    assert "\n" not in text.replace("a message\n", "").rstrip("\n")  # one line, redrawn
    assert text.endswith("sweep s: 1/2 done, 0 running, ETA 0 s\n")  # ends cleanly
    # the message is on a line of its own, the bar blanked before it and redrawn after
    before, after = text.split("a message\n")
    assert before.endswith("\r" + " " * len("sweep s: 0/2 done, 1 running, ETA ?") + "\r")
    assert after.startswith("\rsweep s: 0/2 done, 1 running, ETA ?")
    assert out.getvalue().count("\n") == 2


def test_quiet_console_routes_libraries_to_its_log_file(tmp_path: Path) -> None:
    import mlflow  # noqa: F401  (the libraries set up their handlers when imported)
    import ray  # noqa: F401
    from transformers.utils import logging as hf_logging

    stores = SimpleNamespace(db_url=f"sqlite:///{tmp_path / 'runs' / 'prunelab.db'}")
    stores.artifact_root = None
    path = console.log_path(stores, "my sweep")
    assert path.parent == tmp_path / "runs" / "logs" and path.name.startswith("my_sweep-")
    out = Stream(tty=False)
    before = {name: list(logging.getLogger(name).handlers) for name in ("ray", "mlflow")}
    quiet = Console(path, stream=out).start()
    try:
        assert not console.log_to_driver()
        assert not path.exists()  # nothing written yet: no file
        logging.getLogger("ray").warning("a ray warning")
        hf_logging.get_logger("transformers.models").warning("a transformers warning")
        logging.getLogger("mlflow.store").warning("an mlflow warning")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a python warning", FutureWarning, stacklevel=1)
        logging.getLogger("prunelab.x").warning("a prunelab warning")
        assert console.worker_log() == str(path)
    finally:
        quiet.close()
    assert console.log_to_driver() and console.worker_log() is None
    assert {n: logging.getLogger(n).handlers for n in before} == before  # put back
    lines = out.getvalue().splitlines()
    assert lines == [
        f"prunelab: log: {path} (Ray, MLflow, transformers and the workers' output; -v "
        "shows them here)",
        "a prunelab warning",
    ]
    log = path.read_text()
    for text in (
        "WARNING ray: a ray warning",
        "WARNING transformers.models: a transformers warning",
        "WARNING mlflow.store: an mlflow warning",
        "FutureWarning: a python warning",
        "WARNING prunelab.x: a prunelab warning",
    ):
        assert text in log


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "quiet.yaml"
    path.write_text(
        "defaults: [base, _self_]\n"
        "name: quiet\n"
        "grid: {model: tiny-llava, benchmark: shapes, method: 'none,fastv,random', "
        "keep_ratio: 0.5}\n"
        "eval: {limit: 2}\n"
        "workers: {count: 2, gpus_per_worker: 0}\n"
    )
    return path


def sweep(spec: Path, runs: Path, *flags: str) -> subprocess.CompletedProcess:
    """``prunelab sweep SPEC`` on stores in ``runs``; FutureWarnings are errors everywhere (the
    workers of its local Ray inherit the environment) and the random trial fails."""
    env = {
        **os.environ,
        "PYTHONWARNINGS": "error::FutureWarning",
        FAULTS_ENV: json.dumps(
            [{"fault": "error", "message": "injected", "match": {"method": "random"}}]
        ),
    }
    stores = [
        "--db-url", f"sqlite:///{runs / 'prunelab.db'}",
        "--tracking-uri", f"sqlite:///{runs / 'mlflow.db'}",
        "--artifact-root", str(runs / "artifacts"),
    ]  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "prunelab.orchestrator.cli", "sweep", str(spec), *stores, *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


NOISE = ("FutureWarning", "Loading weights", "repeated", "RAY_DEDUP_LOGS", "Traceback")
FAILED = "attempt failed (failed): RuntimeError: injected"


@pytest.fixture(scope="module")
def quiet(spec: Path, tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess:
    """The sweep run quietly (the default), its stores in ``quiet.runs``."""
    runs = tmp_path_factory.mktemp("quiet")
    result = sweep(spec, runs)
    result.runs = runs
    return result


@pytest.mark.slow
def test_a_quiet_sweep(quiet: subprocess.CompletedProcess) -> None:
    """The console: the stores, the log file, the progress lines, the failed trial's error,
    the table; the log file: Ray's warnings and each worker's logs and traceback."""
    result = quiet
    console_text = result.stdout + result.stderr
    assert result.returncode == 1, console_text  # the random trial failed
    for noise in NOISE:
        assert noise not in console_text
    err = result.stderr.splitlines()
    assert err[0].startswith("prunelab: stores: ")
    (log_line,) = [line for line in err if line.startswith("prunelab: log: ")]
    path = Path(log_line.removeprefix("prunelab: log: ").split(" (")[0])
    assert path.parent == quiet.runs / "logs" and path.name.startswith("quiet-")
    others = [line for line in err if not line.startswith("prunelab: ")]
    progress = [line for line in others if line.startswith("sweep quiet: ")]
    assert [line for line in others if line not in progress] == [f"trial 3 {FAILED}"]
    assert progress[0] == "sweep quiet: 0/3 done, 0 running, ETA ?"
    assert progress[-1] == "sweep quiet: 2/3 done, 0 running, 1 failed"
    assert all(int(re.search(r"(\d+) running", line)[1]) <= 2 for line in progress)
    assert "| tiny-llava | fastv |" in result.stdout
    log = path.read_text()
    for worker in ("worker-0", "worker-1"):
        assert f"{worker} pid=" in log
    assert "loaded model tiny-llava" in log
    assert "(random) failed\nTraceback" in log and "RuntimeError: injected" in log
    assert "FutureWarning" not in log


@pytest.mark.slow
def test_a_verbose_sweep(spec: Path, tmp_path: Path, quiet: subprocess.CompletedProcess) -> None:
    """With -v no log file: the workers' logs and the warnings the quiet sweep's log file got
    from Ray (this Ray version's: token authentication) are on the console."""
    result = sweep(spec, tmp_path, "-v")
    console_text = result.stdout + result.stderr
    assert result.returncode == 1, console_text
    assert not (tmp_path / "logs").exists()
    assert "prunelab: log: " not in console_text
    assert "loaded model tiny-llava" in result.stderr  # a worker's log, through Ray
    assert f"trial 3 {FAILED}" in result.stderr
    assert "FutureWarning" not in console_text and "repeated" not in console_text
    (log,) = (quiet.runs / "logs").iterdir()
    ray_warnings = [
        line.split(" -- ", 1)[1]
        for line in log.read_text().splitlines()
        if "\tWARNING " in line and " -- " in line
    ]
    for warning in ray_warnings:
        assert warning in result.stderr and warning not in quiet.stderr
