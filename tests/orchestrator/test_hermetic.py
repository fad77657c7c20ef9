"""The suite is hermetic: stores, a Ray cluster or fault rules that the user's shell points at
(``PRUNELAB_TRACKING_URI``, ``PRUNELAB_DB_URL``, ``PRUNELAB_ARTIFACT_ROOT``, ``RAY_ADDRESS``,
``PRUNELAB_TEST_FAULTS``) are neither read nor written; each test's default stores are
temporary (``tests/conftest.py``)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunelab.db import init_db
from prunelab.orchestrator.cli.common import stores_from_args
from prunelab.orchestrator.scheduler import is_local
from prunelab.orchestrator.tracking import Tracker

ROOT = Path(__file__).resolve().parents[2]
STORE_ENV = ("PRUNELAB_TRACKING_URI", "PRUNELAB_DB_URL", "PRUNELAB_ARTIFACT_ROOT")


def test_default_stores_are_temporary_and_written_there(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """What the CLI resolves with no flags: under this test's own temporary directory, never
    what the shell had set, and no Ray but a new local one. Then writes to them, as a sweep
    does (the test below checks that the shell's stores stay untouched)."""
    assert not set(STORE_ENV) & set(os.environ)
    assert "PRUNELAB_TEST_FAULTS" not in os.environ
    none = argparse.Namespace(tracking_uri=None, db_url=None, artifact_root=None, ray_address=None)
    stores = stores_from_args(none)
    cwd = Path.cwd().resolve()
    assert cwd.is_relative_to(tmp_path_factory.getbasetemp().resolve())
    for location in (stores.db_url, stores.tracking_uri, stores.artifact_root):
        assert str(cwd) in str(location), location
    assert is_local(stores.ray_address)

    init_db(stores.db_url).dispose()
    tracker = Tracker(stores.tracking_uri, stores.artifact_root)
    parent = tracker.start_sweep("hermetic", "hermetic0001", {"trials": 0})
    tracker.log_sweep_artifacts(parent, {"table.md": "| nothing |\n"})
    tracker.finish_sweep(parent, "FINISHED")
    assert (cwd / "prunelab-runs" / "prunelab.db").exists()
    assert any((cwd / "prunelab-runs" / "artifacts").rglob("table.md"))


def test_stores_set_in_the_shell_are_untouched(tmp_path: Path) -> None:
    """A pytest of a few real CLI tests, started from a shell whose variables point at a
    SQLite file, a directory, an unreachable Ray and a fault that kills every worker: the
    tests pass, and none of those stores is created."""
    shell = tmp_path / "shell"
    env = {
        **os.environ,
        "PRUNELAB_DB_URL": f"sqlite:///{shell / 'prunelab.db'}",
        "PRUNELAB_TRACKING_URI": f"sqlite:///{shell / 'mlflow.db'}",
        "PRUNELAB_ARTIFACT_ROOT": str(shell / "artifacts"),
        "RAY_ADDRESS": "127.0.0.1:9",  # nothing listens there
        "PRUNELAB_TEST_FAULTS": json.dumps([{"fault": "kill"}]),
    }
    tests = [
        f"{Path(__file__).relative_to(ROOT)}::test_default_stores_are_temporary_and_written_there",
        "tests/orchestrator/test_cli_bad_input.py",
        "tests/orchestrator/test_cli_output.py::test_report_to_a_directory_is_bad_input",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not postgres",
         f"--basetemp={tmp_path / 'inner'}", *tests],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
    assert not shell.exists(), sorted(str(p) for p in shell.rglob("*"))
