"""Faults injected into real sweeps on a multi-node local Ray cluster (logical GPUs).

One ``ray.cluster_utils.Cluster`` for the module: a head without GPUs (the driver's node) and
two nodes with one logical GPU each, so two workers with ``gpus_per_worker=1`` land on
different nodes. Worker-side faults come from ``PRUNELAB_TEST_FAULTS``
(``prunelab/workers/faults.py``), pointing at a rules file that each test rewrites. Every test
checks that the sweep ends, that the database and MLflow agree, and that no trial ran or was
logged twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from prunelab.db import Trial, init_db, make_engine, repo, session_factory
from prunelab.orchestrator.spec import load_sweep
from prunelab.orchestrator.sweep import Stores, submit_sweep
from prunelab.orchestrator.tracking import Tracker
from prunelab.workers.faults import FAULTS_ENV

pytestmark = pytest.mark.slow

# 1 none + 2 random + 2 fastv on the tiny model, two samples each
ARGS = [
    "model=tiny-llava",
    "benchmark=shapes",
    "method=none,random,fastv",
    "keep_ratio=0.111,0.333",
    "eval.limit=2",
    "eval.warmup=0",
]
TRIALS = 5
GPU_WORKERS = ["workers.count=2", "workers.gpus_per_worker=1"]
FASTV_LOW = {"method": "fastv", "keep_ratio": 0.111}
BASELINE = {"method": "none"}


@dataclass
class Env:
    cluster: Cluster
    rules: Path
    gpu_nodes: list[Any]

    def faults(self, *rules: dict[str, Any]) -> None:
        """Replace the fault rules the workers read at each trial."""
        self.rules.write_text(json.dumps(list(rules)))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    rules = tmp_path_factory.mktemp("faults") / "rules.json"
    rules.write_text("[]")
    previous = os.environ.get(FAULTS_ENV)
    os.environ[FAULTS_ENV] = f"@{rules}"  # inherited by every node's processes
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
    gpu_nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield Env(cluster, rules, gpu_nodes)
    finally:
        ray.shutdown()
        cluster.shutdown()
        if previous is None:
            os.environ.pop(FAULTS_ENV, None)
        else:
            os.environ[FAULTS_ENV] = previous


def stores_in(directory: Path, ray_address: str | None = None) -> Stores:
    runs = directory / "prunelab-runs"
    return Stores(
        db_url=f"sqlite:///{runs / 'prunelab.db'}",
        tracking_uri=f"sqlite:///{runs / 'mlflow.db'}",
        artifact_root=str(runs / "artifacts"),
        ray_address=ray_address,
    )


def sweep(stores: Stores, *overrides: str) -> int:
    """Run the quickstart sweep in this process, on the module's cluster."""
    return submit_sweep(load_sweep("quickstart", [*ARGS, *overrides]), stores)


def trials_of(db_url: str) -> list[Trial]:
    """All trials of the (already migrated) database, every sweep's, by id."""
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as session:
            return sorted(session.query(Trial).all(), key=lambda t: t.id)
    finally:
        engine.dispose()


def matching(trials: list[Trial], match: dict[str, Any]) -> Trial:
    (found,) = [t for t in trials if all(t.config.get(k) == v for k, v in match.items())]
    return found


def parent_metrics(tracking_uri: str) -> dict[str, float]:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is not None
    (parent,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`prunelab.role` = 'sweep'"
    )
    return parent.data.metrics


def check_agree(db_url: str, tracking_uri: str) -> list[Trial]:
    """The database and MLflow agree: under each sweep's parent run every trial has exactly one
    child run, FINISHED for a finished trial (the one the database names, or a copy of it in
    another sweep, tagged ``prunelab.reused_from``) and FAILED with its error for a failed one;
    nothing is left RUNNING."""
    trials = trials_of(db_url)
    assert len({t.trial_key for t in trials}) == len(trials) == TRIALS
    assert all(t.status in ("finished", "failed") for t in trials), [t.status for t in trials]
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("prunelab.role") == "sweep"]
    assert parents and all(r.info.status != "RUNNING" for r in parents)  # parents ended
    by_key = {t.trial_key: t for t in trials}
    named = {t.mlflow_run_id for t in trials if t.status == "finished"}
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        keys = [r.data.tags["prunelab.trial_key"] for r in children]
        assert len(keys) == len(set(keys)), "a trial was logged twice under one sweep"
        assert set(keys) == set(by_key), "a sweep's runs and its trials disagree"
        for run in children:
            trial = by_key[run.data.tags["prunelab.trial_key"]]
            if trial.status == "finished":
                assert run.info.status == "FINISHED"
                assert run.info.run_id in named or "prunelab.reused_from" in run.data.tags
            else:
                assert run.info.status == "FAILED" and run.data.tags.get("prunelab.error")
    assert named <= {r.info.run_id for r in runs}  # the runs the database names exist
    return trials


# --------------------------------------------------------------------------- worker faults


def test_worker_killed_mid_trial_is_retried_on_a_replacement(env: Env, tmp_path: Path) -> None:
    env.faults({"fault": "kill", "match": FASTV_LOW, "once": str(tmp_path / "killed")})
    stores = stores_in(tmp_path)
    # fractional logical GPUs: both workers may share one node's GPU
    assert sweep(stores, "workers.count=2", "workers.gpus_per_worker=0.5") == 0
    assert (tmp_path / "killed").exists()  # the fault fired
    trials = check_agree(stores.db_url, stores.tracking_uri)
    victim = matching(trials, FASTV_LOW)
    assert victim.status == "finished" and victim.attempts == 2
    assert victim.error is not None and "died" in victim.error  # the lost attempt's reason
    assert all(t.attempts == 1 and t.error is None for t in trials if t is not victim)
    assert parent_metrics(stores.tracking_uri)["workers_replaced"] == 1


def test_out_of_memory_fails_the_trial_and_the_worker_continues(env: Env, tmp_path: Path) -> None:
    # the unpruned baseline runs first, on the only worker: every attempt runs out of memory
    # (no retry expected), and the same worker must then run all the other trials
    env.faults({"fault": "oom", "match": BASELINE})
    stores = stores_in(tmp_path)
    one_worker = ["workers.count=1", "workers.gpus_per_worker=1", "workers.max_attempts=3"]
    assert sweep(stores, *one_worker) == 1  # one trial failed
    trials = check_agree(stores.db_url, stores.tracking_uri)
    victim = matching(trials, BASELINE)
    assert (victim.status, victim.attempts) == ("failed", 1)
    assert victim.error is not None and victim.error.startswith("out of memory")
    others = [t for t in trials if t is not victim]
    assert all(t.status == "finished" and t.attempts == 1 for t in others)
    # the worker that ran out of memory took the other trials afterwards, with its model kept
    assert all(t.worker == victim.worker and t.started >= victim.finished for t in others)
    metrics = parent_metrics(stores.tracking_uri)
    assert metrics["workers_replaced"] == 0
    # one model: each worker that ran trials loaded it exactly once (none reloaded after the OOM)
    assert metrics["model_loads"] == len({t.worker for t in trials if t.worker})


def test_trial_timeout_kills_and_replaces_the_worker(env: Env, tmp_path: Path) -> None:
    env.faults({"fault": "sleep", "seconds": 600, "match": FASTV_LOW, "once": str(tmp_path / "s")})
    stores = stores_in(tmp_path)
    start = time.monotonic()
    assert sweep(stores, *GPU_WORKERS, "workers.trial_timeout_s=15") == 0
    assert time.monotonic() - start < 300  # the hung trial did not hold the sweep for 600 s
    trials = check_agree(stores.db_url, stores.tracking_uri)
    victim = matching(trials, FASTV_LOW)
    assert (victim.status, victim.attempts, victim.error) == ("finished", 2, "timeout after 15s")
    assert all(t.attempts == 1 for t in trials if t is not victim)
    assert parent_metrics(stores.tracking_uri)["workers_replaced"] == 1


# --------------------------------------------------------------------------- orchestrators


def prunelab(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "prunelab.orchestrator.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def counts(db_url: str) -> dict[str, int]:
    try:
        trials = trials_of(db_url)
    except Exception:  # not created yet
        return {}
    result: dict[str, int] = {}
    for t in trials:
        key = "logged" if t.mlflow_run_id else t.status
        result[key] = result.get(key, 0) + 1
    return result


@pytest.mark.postgres
def test_two_orchestrators_on_one_postgres_never_run_a_trial_twice(
    env: Env, tmp_path: Path, pg_databases: Any
) -> None:
    ours, mlflow_db = pg_databases.create(), pg_databases.create()
    MlflowClient(mlflow_db).search_experiments()  # MLflow's schema, as its server creates it
    env.faults({"fault": "sleep", "seconds": 3})
    stores = {"PRUNELAB_DB_URL": ours, "PRUNELAB_TRACKING_URI": mlflow_db}
    # two sweeps of one spec (--fresh: without it the second extends the first, or is refused
    # while the first runs) racing for the same trials
    args = ["sweep", "quickstart", *ARGS, "workers.count=2", "--fresh",
            "--ray-address", env.cluster.address]  # fmt: skip
    procs = [prunelab(*args, cwd=tmp_path, env=stores) for _ in range(2)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out
    for out in outputs:  # both started before any trial finished: they raced for claims
        assert f"{TRIALS} trials, 0 already finished, {TRIALS} to run" in out, out
    trials = check_agree(ours, mlflow_db)
    assert all(t.status == "finished" and t.attempts == 1 for t in trials)  # one claim each
    client = MlflowClient(mlflow_db)
    runs = client.search_runs(
        [client.get_experiment_by_name("quickstart").experiment_id],
        filter_string="tags.`prunelab.role` = 'trial'",
    )
    split = sorted(Counter(r.data.tags["prunelab.sweep_id"] for r in runs).values())
    print("trials logged by each orchestrator:", split)
    engine = init_db(ours)
    with session_factory(engine)() as session:
        sweeps = repo.list_sweeps(session)
        assert len(sweeps) == 2 and all(s.status == "finished" for s in sweeps)
        for s in sweeps:  # both sweeps list every trial
            assert len(repo.sweep_trials(session, s.id)) == TRIALS
    engine.dispose()


# --------------------------------------------------------------------------- nodes (last:
# it changes the cluster)


def test_node_removed_mid_sweep_its_trial_is_retried_elsewhere(env: Env, tmp_path: Path) -> None:
    env.faults({"fault": "sleep", "seconds": 3})  # every trial: both nodes busy for a while
    stores = stores_in(tmp_path)
    doomed = env.gpu_nodes[1]
    removed = threading.Event()

    def remove_when_both_busy() -> None:
        try:
            wait_until(
                lambda: counts(stores.db_url).get("running", 0) == 2,
                timeout=240,
                what="two trials running",
            )
        except AssertionError:
            return
        env.cluster.remove_node(doomed, allow_graceful=False)
        removed.set()
        # no GPU is left for the replacement: it waits for resources while the surviving
        # worker runs the rest (Cluster.add_node only works from the main thread)

    watcher = threading.Thread(target=remove_when_both_busy, daemon=True)
    watcher.start()
    assert sweep(stores, *GPU_WORKERS) == 0
    watcher.join(timeout=60)
    assert removed.is_set()
    trials = check_agree(stores.db_url, stores.tracking_uri)
    assert all(t.status == "finished" for t in trials)
    retried = [t for t in trials if t.attempts > 1]
    assert len(retried) == 1 and retried[0].attempts == 2  # the trial on the removed node
    assert retried[0].error is not None and "died" in retried[0].error
    assert parent_metrics(stores.tracking_uri)["workers_replaced"] == 1


@pytest.mark.postgres
def test_both_stores_use_bounded_pools_on_postgres(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"):
        monkeypatch.setenv(name, "0")  # so that the teardown restores the variable's state
        monkeypatch.delenv(name)
    engine = make_engine(pg_url)
    assert (engine.pool.size(), engine.pool._max_overflow) == (5, 5)  # prunelab's tables
    engine.dispose()
    tracker = Tracker(pg_url)
    tracker.experiment_id("pools")  # creates MLflow's store (and schema)
    store = tracker.client._tracking_client.store
    assert (store.engine.pool.size(), store.engine.pool._max_overflow) == (5, 5)  # MLflow's
    store.engine.dispose()
