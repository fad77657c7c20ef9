"""Where the CLI's output goes: a report file that cannot be written is bad input (one line,
exit 2), and a reader that closes the pipe early (``prunelab status | head -1``) ends the
command quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import trial_config

from prunelab.db import init_db, repo, session_factory
from prunelab.orchestrator.cli import BROKEN_PIPE, main

SWEEPS = 1500  # `status` prints one line each, 100 KiB: more than a pipe buffer holds


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """A database with sweeps named ``s0``, ``s1``, ... each holding one trial."""
    url = f"sqlite:///{tmp_path / 'prunelab.db'}"
    engine = init_db(url)
    with session_factory(engine).begin() as session:
        for i in range(SWEEPS):
            sweep = repo.create_sweep(session, f"s{i}", {}, "", "test:0")
            config = trial_config("tiny-llava", "random", keep_ratio=0.5, seed=i, prune_layer=1)
            repo.add_trials(session, sweep.id, [(f"key{i:060d}", config, False)])
    engine.dispose()
    return url


@pytest.mark.parametrize("flag", ["--out", "--pareto"])
def test_report_to_a_missing_directory_is_bad_input(
    flag: str, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "no" / "such" / "dir" / ("x.md" if flag == "--out" else "x.pdf")
    assert main(["report", "s1", flag, str(target), "--db-url", db_url]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"prunelab: error: {flag} {target}: cannot write: No such file or directory"
    ]
    assert not target.parent.exists()


def test_report_to_a_directory_is_bad_input(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", "s1", "--out", str(tmp_path), "--db-url", db_url]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"prunelab: error: --out {tmp_path}: cannot write: ")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "prunelab.orchestrator.cli", *args]


def test_status_into_a_closed_pipe_ends_quietly(db_url: str, tmp_path: Path) -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line: every write fails
    try:
        result = subprocess.run(
            cli("status", "--db-url", db_url), stdout=write, stderr=subprocess.PIPE,
            cwd=tmp_path, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write)
    assert result.stderr.decode() == ""
    assert result.returncode == BROKEN_PIPE


def test_status_piped_into_head(db_url: str, tmp_path: Path) -> None:
    command = " ".join(cli("status", "--db-url", db_url)) + " | head -1"
    result = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0 and result.stderr == ""
    assert len(result.stdout.splitlines()) == 1 and " s" in result.stdout
