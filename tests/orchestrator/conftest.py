"""Fixtures of the orchestrator tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

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
