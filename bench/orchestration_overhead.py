"""Per-trial orchestration overhead: prunelab vs Ray Tune, against the floor of one actor call
plus one MLflow child run; and MLflow logging throughput on SQLite and PostgreSQL.

The same grid of n trivial trials (tiny model, one sample, one new token, no fidelity) runs
through prunelab (one worker, SQLite stores, MLflow logging included) and through Ray Tune
(``Tuner`` + ``grid_search``, one trial at a time, each trial a new trainable that loads the
model, as a Tune function trainable does). Everything runs in this one process on one local
Ray. Trials run one at a time in both, so the steady-state cost of a trial is the interval
between consecutive trial completions, ``(end[n-1] - end[0]) / (n - 1)``: one-time costs
(Ray actor start, store creation, prunelab's one model load) fall before the first end and
are left out. A trial's overhead is that cost minus its own compute (``run_s``: the trial's
time inside its worker, model load excluded), so it holds everything else: scheduling, the
actor call, database writes and MLflow logging for prunelab; process start, imports, the
model load and Tune's bookkeeping for a Tune trial. prunelab records a finished trial while its
worker already runs the next one, so only the part of the recording that the trial compute
does not cover shows as overhead; the time the orchestrator spends recording each trial is
printed as well (with no compute to hide behind, it would be the per-trial overhead).

Usage: ``python bench/orchestration_overhead.py [--trials 16] [--pg-url URL]``. It prints
measured numbers only; nothing is asserted about time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import ray
import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray import tune
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

import prunelab.orchestrator.sweep as sweep_module
from prunelab.orchestrator.spec import load_sweep
from prunelab.orchestrator.sweep import Stores, submit_sweep
from prunelab.orchestrator.tracking import Tracker
from prunelab.trial import Trial, TrialResult
from prunelab.workers.actor import Worker

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TRIVIAL = [
    "method=random",
    "keep_ratio=0.5",
    "eval.limit=1",
    "eval.warmup=0",
    "eval.max_new_tokens=1",
    "eval.fidelity=false",
    "workers.count=1",
]


def grid(first_seed: int, size: int) -> Any:
    """A plan of ``size`` trivial trials (one baseline + random seeds), fresh keys."""
    seeds = f"range({first_seed},{first_seed + size - 1})"
    return load_sweep("quickstart", [*TRIVIAL, f"seed={seeds}", f"name=bench{first_seed}"])


def median_s(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence a sweep's progress bar and table (stdout and stderr)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


# --------------------------------------------------------------------------- systems


def run_prunelab(
    plan: Any, root: Path
) -> tuple[list[tuple[float, float]], int, float, list[float]]:
    """A whole sweep on fresh SQLite stores: (end time, compute) of each trial as the
    orchestrator receives it, model loads, wall time, and the time the orchestrator spends
    recording each trial (database writes + MLflow child run)."""
    runs = root / f"prunelab-{uuid.uuid4().hex[:6]}"
    stores = Stores(
        db_url=f"sqlite:///{runs / 'prunelab.db'}",
        tracking_uri=f"sqlite:///{runs / 'mlflow.db'}",
        artifact_root=str(runs / "artifacts"),
        ray_address=None,
    )
    trials: list[tuple[float, float]] = []
    recording: list[float] = []
    original = sweep_module._Recorder.done

    def done(recorder: Any, dispatch: Any, result: TrialResult) -> None:
        # called once the worker has its next trial: recording overlaps that trial's compute
        trials.append((time.time(), result.run_s))
        start = time.perf_counter()
        original(recorder, dispatch, result)
        recording.append(time.perf_counter() - start)

    sweep_module._Recorder.done = done  # type: ignore[method-assign]
    start = time.perf_counter()
    try:
        with quiet():
            status = submit_sweep(plan, stores)
    finally:
        sweep_module._Recorder.done = original  # type: ignore[method-assign]
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"the prunelab sweep failed (exit {status})")
    client = MlflowClient(stores.tracking_uri)
    experiment = client.get_experiment_by_name(plan.name)
    (parent,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`prunelab.role` = 'sweep'"
    )
    return trials, int(parent.data.metrics["model_loads"]), wall, recording


def _tune_trainable(config: dict[str, Any], trials: list[Trial]) -> None:
    """A Tune function trainable: a fresh process state per trial, so it loads the model."""
    worker = Worker("tune", threads=1)
    result = worker.run(trials[config["index"]])
    tune.report(
        {
            "score": float(result.metrics["score"]),
            "model_loads": result.model_loads,
            "run_s": result.run_s,  # the trial itself, without the model load
            "end": time.time(),
        }
    )


def run_tune(plan: Any, root: Path) -> tuple[list[tuple[float, float]], int, float]:
    """The same grid through ``Tuner`` + ``grid_search``: (end time, compute) of each trial,
    model loads, wall time."""
    planned = list(plan.trials)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_tune_trainable, trials=planned), {"cpu": 1}),
        param_space={"index": tune.grid_search(list(range(len(planned))))},
        tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=False),
        run_config=tune.RunConfig(
            name=f"bench-{uuid.uuid4().hex[:6]}", storage_path=str(root / "tune"), verbose=0
        ),
    )
    start = time.perf_counter()
    with quiet():
        results = tuner.fit()
    wall = time.perf_counter() - start
    if results.errors:
        raise RuntimeError(f"Ray Tune trials failed: {results.errors[0]}")
    trials = sorted((float(r.metrics["end"]), float(r.metrics["run_s"])) for r in results)
    loads = sum(int(r.metrics["model_loads"]) for r in results)
    return trials, loads, wall


# --------------------------------------------------------------------------- floor


@ray.remote(num_cpus=1)
class Echo:
    def call(self, value: int) -> int:
        return value


def actor_call_s(repeat: int = 300) -> float:
    echo = Echo.remote()
    ray.get(echo.call.remote(0))
    try:
        return median_s(lambda: ray.get(echo.call.remote(1)), repeat)
    finally:
        ray.kill(echo)


def mlflow_child_run_s(tracking_uri: str, repeat: int = 40) -> float:
    """One child run: create (with parent and trial tags), one log_batch, terminate."""
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment(f"floor-{uuid.uuid4().hex[:8]}")
    parent = client.create_run(experiment).info.run_id
    params = [Param(k, "x") for k in ("model", "benchmark", "method", "keep_ratio", "seed")]
    names = ("score", "tflops", "flops_ratio", "prefill_ms", "latency_ms", "samples")

    def child() -> None:
        run = client.create_run(
            experiment, tags={"mlflow.parentRunId": parent, "prunelab.role": "trial"}
        )
        now = int(time.time() * 1000)
        metrics = [Metric(k, 1.0, now, 0) for k in names]
        client.log_batch(run.info.run_id, metrics=metrics, params=params)
        client.set_terminated(run.info.run_id, "FINISHED")

    child()
    return median_s(child, repeat)


# --------------------------------------------------------------------------- logging


def logging_rate(tracking_uri: str, artifact_root: str | None, trials: int, new: bool) -> float:
    """Trials logged per second by prunelab's Tracker (params, metrics, trial.yaml); ``new``:
    as a sweep logs the trials it ran, else with the search for an earlier run of the key (as
    a resumed sweep logs what a dead orchestrator finished)."""
    tracker = Tracker(tracking_uri, artifact_root)
    name = f"throughput-{uuid.uuid4().hex[:8]}"
    sweep_id = uuid.uuid4().hex[:12]
    parent = tracker.start_sweep(name, sweep_id, {"trials": trials})
    params = {"model": "tiny-llava", "benchmark": "shapes", "method": "random", "seed": 0}
    metrics = {k: 1.0 for k in ("score", "tflops", "flops_ratio", "prefill_ms", "samples")}
    start = time.perf_counter()
    for i in range(trials):
        tracker.log_trial(
            name,
            parent,
            sweep_id,
            f"k{i:06d}",
            f"t{i}",
            params,
            metrics,
            {"trial.yaml": "a: 1\n"},
            new=new,
        )
    return trials / (time.perf_counter() - start)


@contextlib.contextmanager
def pg_database(admin_url: str) -> Iterator[str | None]:
    """A fresh database on the PostgreSQL server, dropped afterwards (None: unreachable)."""
    name = f"prunelab_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        print(f"PostgreSQL unavailable ({str(exc).splitlines()[0]})")
        admin.dispose()
        yield None
        return
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="n, trials in the grid (>= 3)")
    parser.add_argument("--log-trials", type=int, default=100, help="trials per logging test")
    parser.add_argument("--pg-url", default=os.environ.get("PRUNELAB_TEST_PG_URL", PG_DEFAULT))
    args = parser.parse_args(argv)
    n = max(3, args.trials)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="prunelab-bench-"))
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}")

    plan = grid(100, n)
    *prunelab, recording = run_prunelab(plan, root)
    measured = {"prunelab": tuple(prunelab), "ray tune": run_tune(plan, root)}
    for system, (_, loads, wall) in measured.items():
        print(f"  {system:9} {n} trials: {wall:7.2f} s in all, {loads} model loads")
    call = actor_call_s()
    child = mlflow_child_run_s(f"sqlite:///{root / 'floor' / 'mlflow.db'}")
    floor = call + child

    rows = []
    for system, (trials, loads, _) in measured.items():
        ends = [end for end, _ in trials]
        cycle = (ends[-1] - ends[0]) / (len(ends) - 1)
        compute = statistics.mean(run_s for _, run_s in trials[1:])
        rows.append((system, cycle, compute, cycle - compute, loads))
    print()
    print(f"grid: {n} trivial trials (tiny-llava, 1 sample, 1 token), run one at a time")
    print()
    print("| system | per-trial cost | trial compute | per-trial overhead | model loads |")
    print("|---|---:|---:|---:|---:|")
    for system, cycle, compute, overhead, loads in rows:
        print(
            f"| {system} | {cycle * 1e3:.1f} ms | {compute * 1e3:.1f} ms | "
            f"{overhead * 1e3:.1f} ms | {loads} |"
        )
    print(
        f"| floor: actor call + MLflow child run | | | {floor * 1e3:.1f} ms "
        f"({call * 1e3:.2f} + {child * 1e3:.1f}) | |"
    )
    prunelab_overhead, tune_overhead = rows[0][3], rows[1][3]
    ratio = tune_overhead / prunelab_overhead if prunelab_overhead > 0 else float("inf")
    print()
    print(f"Ray Tune / prunelab overhead: {ratio:.1f}x (goal >= 20x)")
    print(f"prunelab overhead / floor: {prunelab_overhead / floor:.2f}x (goal <= 2x)")
    record = statistics.median(recording[1:])
    print(
        f"prunelab recording a trial (database writes + MLflow child run, in the orchestrator, "
        f"overlapping the worker's next trial): {record * 1e3:.1f} ms median, "
        f"{record / floor:.2f}x the floor"
    )
    print(f"model loads: prunelab {rows[0][4]} (goal: workers x models = 1), Ray Tune {rows[1][4]}")

    print()
    print("| MLflow store | trials logged per second (sweep) | (resume: with search) |")
    print("|---|---:|---:|")

    def rates(uri: str, artifacts: Path) -> str:
        new, resumed = (
            logging_rate(uri, str(artifacts / str(flag)), args.log_trials, flag)
            for flag in (True, False)
        )
        return f"{new:.1f} | {resumed:.1f}"

    sqlite = f"sqlite:///{root / 'rate' / 'mlflow.db'}"
    print(f"| SQLite | {rates(sqlite, root / 'rate')} |")
    with pg_database(args.pg_url) as pg:
        if pg is not None:
            print(f"| PostgreSQL | {rates(pg, root / 'rate-pg')} |")
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
