"""Fixtures of the orchestrator tests."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from sqlalchemy import Engine

from prunelab.db import init_db
from prunelab.orchestrator.sweep import Stores
from prunelab.orchestrator.tracking import Tracker
from prunelab.workers.faults import FAULTS_ENV


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A local Ray of the test module's own, its workers reading their fault rules from the
    file this yields (``[]``: none; a test writes rules into it and puts ``[]`` back)."""
    rules = tmp_path_factory.mktemp("faults") / "rules.json"
    rules.write_text("[]")
    previous = os.environ.get(FAULTS_ENV)
    os.environ[FAULTS_ENV] = f"@{rules}"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield rules
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop(FAULTS_ENV, None)
        else:
            os.environ[FAULTS_ENV] = previous


FINISHED_SWEEP = [
    "quickstart",
    "method=none,random,fastv",
    "keep_ratio=0.111,0.333",
    "eval.limit=4",
    "eval.warmup=0",
]
"""The finished sweep's spec and overrides (``test_cli_sweep.ARGS``): 1 none + 2 random +
2 fastv trials on the shipped toy model, four samples each, on the spec's two workers."""


@dataclass(frozen=True)
class FinishedSweep:
    """A ``prunelab sweep`` (:data:`FINISHED_SWEEP`) run once through the CLI to its end, with the
    default stores (``prunelab-runs/`` of the directory it ran in). Tests take a copy."""

    directory: Path
    args: list[str]
    stdout: str

    def copy_to(self, directory: Path) -> Path:
        """The stores copied into ``directory/prunelab-runs`` (returned), the MLflow store's
        artifact locations pointed at the copied artifacts: a test may change the copy, run
        commands on it and write artifacts there without touching the original."""
        source, runs = self.directory / "prunelab-runs", directory / "prunelab-runs"
        shutil.copytree(source, runs)
        connection = sqlite3.connect(runs / "mlflow.db")
        try:
            with connection:
                old, new = str(source), str(runs)
                connection.execute(
                    "UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)",
                    (old, new),
                )
                connection.execute(
                    "UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new)
                )
        finally:
            connection.close()
        return runs


@pytest.fixture(scope="session")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory) -> FinishedSweep:
    """One finished quickstart sweep for the session, shared by the tests that only need a
    finished sweep's stores (each works on a copy: :meth:`FinishedSweep.copy_to`)."""
    directory = tmp_path_factory.mktemp("finished-sweep")
    result = subprocess.run(
        [sys.executable, "-m", "prunelab.orchestrator.cli", "sweep", *FINISHED_SWEEP],
        cwd=directory,
        env={**os.environ},  # the session's: a local Ray of its own, no fault rules
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return FinishedSweep(directory, list(FINISHED_SWEEP), result.stdout)


# ------------------------------------------------------- real stores in tmp_path, without Ray


@pytest.fixture
def stores(tmp_path: Path) -> Stores:
    """A sweep's stores in ``tmp_path``: SQLite database and MLflow store, local artifacts."""
    return Stores(
        db_url=f"sqlite:///{tmp_path / 'prunelab.db'}",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_root=str(tmp_path / "artifacts"),
        ray_address=None,
    )


@pytest.fixture
def engine(stores: Stores) -> Iterator[Engine]:
    """prunelab's database of ``stores``, migrated."""
    engine = init_db(stores.db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def tracker(stores: Stores) -> Tracker:
    """MLflow on ``stores``."""
    return Tracker(stores.tracking_uri, stores.artifact_root)
