"""Workers that Ray can never place: checked against what the cluster has, waited for at most
``placement_timeout_s``, then one clear line and a sweep that ``prunelab resume`` finishes.

A ``ray.cluster_utils.Cluster`` whose head (the driver's node) has CPUs and no GPU; a test that
needs a GPU node adds one (a logical GPU) and may remove it mid-trial, as a node dies.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from test_faults import ARGS, TRIALS  # the same 5-trial sweep of the tiny model

import prunelab.orchestrator.scheduler as scheduler
from prunelab.db import Trial as TrialRow
from prunelab.db import make_engine, repo, session_factory
from prunelab.orchestrator.cli import NOT_PLACED, main
from prunelab.orchestrator.scheduler import (
    Capacity,
    Dispatch,
    PlacementTimeout,
    WorkerPool,
    placement_problems,
)
from prunelab.orchestrator.spec import load_sweep
from prunelab.orchestrator.sweep import Stores, resume_sweep, submit_sweep
from prunelab.trial import Trial, TrialResult

# --------------------------------------------------------------------------- the check itself


def test_placement_problems_name_the_setting_and_what_the_cluster_has() -> None:
    one = Capacity(((2.0, 0.0),))
    origins = {"workers.gpus_per_worker": "from the command line"}
    (line,) = placement_problems(1, 1, one, origins, "the local Ray")
    assert line == (
        "workers.gpus_per_worker=1 from the command line: no node of the local Ray has 1 GPU "
        "for a worker (1 node: 2 CPU, 0 GPU)"
    )
    (line,) = placement_problems(1e9, 0, one, {}, "the local Ray")
    assert line.startswith("workers.cpus_per_worker=1e+09: no node of the local Ray has 1e+09")
    assert placement_problems(2, 0, one, {}, "x") == []
    assert placement_problems(1, 0.5, Capacity(((2.0, 0.0), (1.0, 1.0))), {}, "x") == []
    # enough CPUs on one node and a GPU on another: no node has both
    two = Capacity(((8.0, 0.0), (1.0, 1.0)))
    (line,) = placement_problems(4, 1, two, {}, "the cluster")
    assert "has both" in line and "2 nodes: 9 CPU, 1 GPU in all" in line


# --------------------------------------------------------------------------- on a cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "num_gpus": 0,
            "include_dashboard": False,
            # a removed node is declared dead within about a second
            "_system_config": {"health_check_period_ms": 300, "health_check_failure_threshold": 3},
        },
    )
    try:
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def connected(cluster: Cluster) -> Iterator[Cluster]:
    """The driver connected to the module's cluster (a CLI run may have disconnected it),
    and no GPU node left over from a test."""
    if not ray.is_initialized():
        ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield cluster
    finally:
        for node in list(cluster.worker_nodes):
            cluster.remove_node(node)


def sleeper() -> type:
    """A worker class whose trials sleep ``seed`` seconds (the pool's waiting is under test,
    not a model); made in a function so that Ray ships it to the workers by value."""

    class Sleeper:
        def __init__(self, name: str, threads: int = 1) -> None:
            self.name = name

        def identity(self) -> dict[str, Any]:
            return {"pid": os.getpid()}

        def run(self, trial: Trial) -> TrialResult:
            time.sleep(float(trial.seed or 0))
            return TrialResult(metrics={}, worker=self.name)

    return Sleeper


class Log:
    def __init__(self) -> None:
        self.claims: list[int] = []
        self.failures: list[tuple[int, str]] = []
        self.claimed = threading.Event()

    def claim(self, dispatch: Dispatch, worker: str) -> bool:
        self.claims.append(dispatch.trial_id)
        self.claimed.set()
        return True

    def done(self, dispatch: Dispatch, result: TrialResult) -> None:
        raise AssertionError("no trial can finish here")

    def failed(self, dispatch: Dispatch, error: str, retryable: bool) -> bool:
        self.failures.append((dispatch.trial_id, error))
        return retryable


def dispatch(seconds: int) -> Dispatch:
    return Dispatch(0, Trial(model="m", benchmark="b", method="random", hparams={}, seed=seconds))


@pytest.mark.slow
def test_a_gpu_worker_on_a_cluster_without_gpus_gives_up(connected: Cluster) -> None:
    pool = WorkerPool(2, cpus=1, gpus=1, worker_cls=sleeper(), placement_timeout_s=3)
    log = Log()
    try:
        with pytest.raises(PlacementTimeout) as raised:
            pool.run([dispatch(0)], log.claim, log.done, log.failed)
    finally:
        pool.shutdown()
    assert log.claims == []  # nothing was claimed: every trial is still pending
    assert str(raised.value) == (
        "no worker could be placed in 3 s (workers.placement_timeout_s): 2 worker(s) wait for "
        "1 CPU and 1 GPU each (workers.cpus_per_worker, workers.gpus_per_worker); the Ray "
        "cluster has 1 node: 2 CPU, 0 GPU"
    )


@pytest.mark.slow
def test_the_only_gpu_node_dying_mid_trial_ends_the_wait(connected: Cluster) -> None:
    gpu_node = connected.add_node(num_cpus=1, num_gpus=1)
    connected.wait_for_nodes()
    log = Log()

    def remove_when_claimed() -> None:
        if log.claimed.wait(timeout=120):
            connected.remove_node(gpu_node, allow_graceful=False)

    killer = threading.Thread(target=remove_when_claimed, daemon=True)
    killer.start()
    pool = WorkerPool(1, cpus=1, gpus=1, worker_cls=sleeper(), placement_timeout_s=5)
    try:
        with pytest.raises(PlacementTimeout, match="0 GPU"):
            pool.run([dispatch(600)], log.claim, log.done, log.failed)
    finally:
        pool.shutdown()
        killer.join(timeout=60)
    # the trial was running when its node died: reported (and retryable), never finished
    assert log.claims == [0]
    ((trial_id, error),) = log.failures
    assert trial_id == 0 and "died" in error
    assert pool.replaced >= 1  # its replacement(s): the worker(s) that could not be placed


def stores_in(directory: Path, address: str) -> Stores:
    runs = directory / "prunelab-runs"
    return Stores(
        db_url=f"sqlite:///{runs / 'prunelab.db'}",
        tracking_uri=f"sqlite:///{runs / 'mlflow.db'}",
        artifact_root=str(runs / "artifacts"),
        ray_address=address,
    )


def statuses(db_url: str) -> list[str]:
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as session:
            return [t.status for t in session.query(TrialRow).order_by(TrialRow.id)]
    finally:
        engine.dispose()


@pytest.fixture
def short_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sweeps build their pool with the default ``placement_timeout_s``; make it 5 s."""
    monkeypatch.setattr(
        scheduler, "WorkerPool", functools.partial(WorkerPool, placement_timeout_s=5)
    )


@pytest.mark.slow
def test_a_sweep_that_cannot_place_a_worker_is_resumable(
    connected: Cluster, tmp_path: Path, short_wait: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    stores = stores_in(tmp_path, connected.address)
    plan = load_sweep("quickstart", [*ARGS, "workers.count=2", "workers.gpus_per_worker=1"])
    with pytest.raises(PlacementTimeout):
        submit_sweep(plan, stores)
    assert statuses(stores.db_url) == ["pending"] * TRIALS  # nothing claimed, nothing lost
    connected.add_node(num_cpus=2, num_gpus=1)  # the GPU arrives
    connected.wait_for_nodes()
    # the placed worker's process must start (import torch) within the limit: on a loaded
    # machine that takes longer than the 5 s that made the first submit give up quickly
    monkeypatch.setattr(
        scheduler, "WorkerPool", functools.partial(WorkerPool, placement_timeout_s=120)
    )
    assert resume_sweep("quickstart", stores) == 0
    assert statuses(stores.db_url) == ["finished"] * TRIALS
    engine = make_engine(stores.db_url)
    with session_factory(engine)() as session:
        (sweep,) = repo.list_sweeps(session)
        assert sweep.status == "finished"
    engine.dispose()


@pytest.mark.slow
def test_the_cli_says_one_line_and_exits_75(
    connected: Cluster,
    tmp_path: Path,
    short_wait: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["sweep", "quickstart", *ARGS, "workers.gpus_per_worker=1"]
    assert main([*args, "--ray-address", connected.address]) == NOT_PLACED
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("prunelab:")]
    # the sweep started (where its stores and its log are), then stopped with one error line
    assert lines[0].startswith("prunelab: stores: database sqlite:///")
    assert lines[1].startswith("prunelab: log: ")
    assert lines[2:] == [
        "prunelab: error: no worker could be placed in 5 s (workers.placement_timeout_s): "
        "2 worker(s) wait for 1 CPU and 1 GPU each (workers.cpus_per_worker, "
        "workers.gpus_per_worker); the Ray cluster has 1 node: 2 CPU, 0 GPU; stopped after "
        "0/5 trials; resume with `prunelab resume quickstart`"
    ]


# --------------------------------------------------------------------------- local Ray: exit 2

LOCAL_CASES = {
    "cpus_per_worker=1e9": ("workers.cpus_per_worker=1e9", "workers.cpus_per_worker=1e+09"),
    "gpus_per_worker=1 without GPUs": ("workers.gpus_per_worker=1", "workers.gpus_per_worker=1"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LOCAL_CASES))
def test_a_local_ray_that_cannot_hold_a_worker_is_bad_input(case: str, tmp_path: Path) -> None:
    """The local Ray prunelab starts has what this machine has: exit 2 before any write."""
    override, value = LOCAL_CASES[case]
    if "gpus" in case and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    stores = tmp_path / "stores"
    stores.mkdir()
    flags = [
        "--db-url", f"sqlite:///{stores / 'prunelab.db'}",
        "--tracking-uri", f"sqlite:///{stores / 'mlflow.db'}",
        "--artifact-root", str(stores / "artifacts"),
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "prunelab.orchestrator.cli", "sweep", "quickstart", *ARGS,
         override, *flags],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"prunelab: error: {value} from the command line: no node of ")
    assert "the local Ray started by prunelab" in lines[0]
    assert list(stores.iterdir()) == []
