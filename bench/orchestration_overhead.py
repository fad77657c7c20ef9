"""Per-trial orchestration cost: prunelab next to its peers in their best configuration, side
by side in one run; and MLflow logging throughput on SQLite and PostgreSQL.

One grid of n trivial trials (toy-llava, one sample, one new token, no fidelity, no heatmaps:
``quickstart`` with ``method=random`` seeds and its ``none`` baseline) runs through four
peers, one trial at a time in each. The trial's own work is the same function everywhere:
``prunelab.workers.actor.Worker.run`` on the same ``Trial`` objects, with a model loaded once
and kept (its ``run_s``, model load excluded, is the trial's own work). Each trial gets one
MLflow run on a fresh SQLite store of the peer's own.

- ``loop``, the floor: one process, a plain ``for`` loop; one MLflow child run per trial under
  a parent run, logged as prunelab logs it (the same params, metrics, tags and artifacts:
  ``create_run``, one ``log_batch``, one ``log_artifacts``, ``set_terminated``).
- ``tune``: Ray Tune as an expert sets it up: a class ``Trainable`` whose ``setup`` builds the
  worker (the model loads once per actor) and whose ``reset_config`` lets Tune reuse it
  (``reuse_actors=True``, ``max_concurrent_trials=1``, 1 CPU); each trial's ``step`` runs
  the trial and logs its MLflow child run exactly as ``loop`` does; ``verbose=0``, no
  checkpoints (``checkpoint_frequency=0``, ``checkpoint_at_end=False``), no syncing
  (``SyncConfig(sync_artifacts=False)``, local storage), Tune's own JSON/CSV/TensorBoard
  result files off (``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``: MLflow is the record); Ray
  started with ``address="local"``, no dashboard.
- ``tune+callback``: the same, with MLflow logged by Ray's ``MLflowLoggerCallback`` in the
  driver instead (the trial's params as the config, its metrics as the result; the callback
  logs them one call each, adds Tune's own result fields and logs no artifacts).
- ``prunelab``: ``prunelab sweep quickstart ...`` (the CLI's ``main``, called as the command
  calls it, in a process of its own: Ray start, one worker, both SQLite stores, MLflow child
  runs, Ray stop).

Every peer runs as a fresh process (``python bench/orchestration_overhead.py --peer ...``),
in a temporary directory of its own, ``RAY_ADDRESS`` unset (a Ray started by the peer is its
own and ends with it). The peers run in turn, in a rotated order, ``--repeats`` times; the
ratios are taken within each repeat (the same load on the machine), printed as min / median.

What is printed for each peer (medians over the repeats):
- per-trial cost: the interval between consecutive trial completions as the peer's
  orchestrator sees them (prunelab: its recorder receives the result; Tune: the driver's
  ``on_trial_complete``; the loop: the trial logged), ``(end[n-1] - end[0]) / (n - 1)``:
  one-time costs (imports, Ray start, the model load) fall before the first end;
- trial's own work: mean ``run_s`` of trials 2..n (the same function in every peer);
- overhead: per-trial cost minus the trial's own work. prunelab hands a worker its next trial
  before it records the last one, so only the part of the recording that the next trial's
  compute does not cover shows here; the orchestrator's time recording a trial (database
  writes + MLflow child run) is printed as well;
- CPU per trial: user + system CPU seconds of the peer's whole process tree (the orchestrator
  or driver and every process below it: Ray's GCS, raylet and workers; and the children they
  reaped), read from ``/proc`` at the first and the last trial end, over ``n - 1``;
- wall: end to end, from the peer's process start to its exit (imports, Ray start and stop,
  model load, stores);
- peak RSS of the orchestrator: ``VmHWM`` of the peer's own process at its end
  (:func:`peak_rss_kib`; prunelab: the CLI process that runs the sweep; Tune: the driver;
  the loop: its one process, which also holds the model), Ray's processes and workers not
  included.

Usage: ``python bench/orchestration_overhead.py [--trials 32] [--repeats 3] [--log-trials 100]
[--pg-url URL]`` (``--log-trials 0``: no logging-throughput table). Linux only (``/proc``).
It prints measured numbers only; nothing is asserted about time.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import pickle
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# the parent imports prunelab, torch and MLflow only to build the grid and read the stores;
# each peer imports what it needs in its own process

CHECKOUT = Path(__file__).resolve().parents[1]
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PEERS = ("loop", "tune", "tune+callback", "prunelab")
TRIVIAL = [
    "method=random",
    "keep_ratio=0.5",
    "eval.limit=1",
    "eval.warmup=0",
    "eval.max_new_tokens=1",
    "eval.fidelity=false",
    "eval.heatmaps=0",
    "workers.count=1",
]
HEAVY = ("torch", "transformers", "ray", "mlflow", "sqlalchemy", "hydra", "pandas", "pyarrow")
SWEEP_NAME = "orchestration"
SWEEP_ID = "0123456789ab"  # the loop's and tune's stand-in for prunelab's sweep id tag
TIMEOUT_S = 1200


def overrides(n: int) -> list[str]:
    """The grid: ``n`` trivial trials, the ``none`` baseline and ``n - 1`` random seeds."""
    return [*TRIVIAL, f"seed=range(100,{100 + n - 1})", f"name={SWEEP_NAME}"]


# --------------------------------------------------------------------------- measuring


def tree_cpu_s(root: int) -> tuple[float, int]:
    """User + system CPU seconds of process ``root`` and its live descendants, with what each
    has reaped of its own children (``/proc/<pid>/stat``); and how many processes that is."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parent[int(entry)] = int(fields[1])
        ticks[int(entry)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    tree, grew = {root}, True
    while grew:
        below = {pid for pid, ppid in parent.items() if ppid in tree} - tree
        tree |= below
        grew = bool(below)
    total = sum(ticks.get(pid, 0) for pid in tree)
    return total / os.sysconf("SC_CLK_TCK"), len(tree)


def peak_rss_kib() -> int:
    """This process's peak resident memory in KiB: ``VmHWM`` of ``/proc/self/status``, the
    high-water mark of its own address space. Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux
    carries that across ``execve`` from the process that forked it, so a peer's would never
    read below this bench's parent process (which has imported torch and MLflow)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class Clock:
    """A peer's trial completions as its orchestrator sees them: when, the trial's own work,
    the process tree's CPU at the first and the last, and the model loads of each worker."""

    def __init__(self, trials: int) -> None:
        self.trials = trials
        self.ends: list[float] = []
        self.work: list[float] = []
        self.cpu: list[float] = []
        self.processes = 0
        self.loads: dict[str, int] = {}

    def tick(self, run_s: float, worker: str, model_loads: int) -> None:
        self.ends.append(time.perf_counter())
        self.work.append(float(run_s))
        self.loads[worker] = int(model_loads)
        if len(self.ends) in (1, self.trials):
            cpu, self.processes = tree_cpu_s(os.getpid())
            self.cpu.append(cpu)

    def save(self, path: Path, **extra: Any) -> None:
        """The measurements and this process's peak RSS (KiB, :func:`peak_rss_kib`) as JSON."""
        peak = peak_rss_kib()
        fields = {"ends": self.ends, "work": self.work, "cpu": self.cpu, "loads": self.loads}
        heavy = [m for m in HEAVY if m in sys.modules]
        record = {**fields, "processes": self.processes, "rss_kib": peak, "heavy": heavy, **extra}
        path.write_text(json.dumps(record))


# --------------------------------------------------------------------------- MLflow records


def trial_record(
    trial: Any, result: Any, baseline: tuple[Mapping[str, Any], Sequence[float]] | None
) -> dict[str, Any]:
    """What prunelab logs for a finished trial (params, metrics with the baseline-relative
    ones, tags, artifacts), built with its helpers; ``baseline``: the baseline's own metrics
    and score replicates."""
    import yaml

    from prunelab.metrics import relative_metrics
    from prunelab.orchestrator.sweep import MODEL_PARAMS, in_table_units
    from prunelab.orchestrator.tracking import code_tags, environment_tags

    own = {k: v for k, v in result.metrics.items() if v == v and abs(v) != float("inf")}
    relative = {}
    if baseline is not None:
        relative = relative_metrics(own, baseline[0], result.replicates, baseline[1])
    metrics = {**own, **in_table_units(relative)}
    env = result.environment
    params = trial.run_params()
    params.update({f"model.{k}": env[k] for k in MODEL_PARAMS if k in env})
    attempt = {"attempt": 1, "worker": result.worker, "node": result.node, "kind": "finished"}
    artifacts: dict[str, str | bytes] = {
        "trial.yaml": yaml.safe_dump(trial.to_dict(), sort_keys=False),
        "attempts.json": json.dumps([attempt], indent=1) + "\n",
        "predictions.jsonl": "".join(json.dumps(p) + "\n" for p in result.predictions),
        **result.artifacts,
    }
    tags = {**code_tags(), **environment_tags(env), "prunelab.attempts": "1"}
    return {"params": params, "metrics": metrics, "tags": tags, "artifacts": artifacts}


def log_child_run(
    client: Any, experiment: str, parent: str, trial: Any, record: Mapping[str, Any]
) -> None:
    """One MLflow child run with ``record``: ``create_run``, one ``log_batch``, one
    ``log_artifacts`` of a temporary directory, ``set_terminated``."""
    from mlflow.entities import Metric, Param

    tags = {
        **record["tags"],
        "mlflow.parentRunId": parent,
        "prunelab.role": "trial",
        "prunelab.trial_key": trial.key,
        "prunelab.sweep_id": SWEEP_ID,
    }
    run_id = client.create_run(experiment, tags=tags, run_name=trial.method).info.run_id
    now = int(time.time() * 1000)
    params = [Param(k, str(v)) for k, v in record["params"].items() if v is not None]
    metrics = [Metric(k, float(v), now, 0) for k, v in record["metrics"].items()]
    client.log_batch(run_id, metrics=metrics, params=params)
    with tempfile.TemporaryDirectory(prefix="bench-artifacts-") as tmp:
        for name, content in record["artifacts"].items():
            target = Path(tmp, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        client.log_artifacts(run_id, tmp)
    client.set_terminated(run_id, "FINISHED")


def start_parent(tracking_uri: str, artifacts: Path) -> tuple[Any, str, str]:
    """A client, an experiment with its artifacts under ``artifacts``, and a parent run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment(SWEEP_NAME, artifact_location=artifacts.as_uri())
    parent = client.create_run(experiment, tags={"prunelab.role": "sweep"}).info.run_id
    return client, experiment, parent


class Baselines:
    """The baselines' own metrics and replicates by (model, benchmark), as a peer's process
    sees them finish (one trial at a time, the baseline first)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], tuple[dict[str, Any], tuple[float, ...]]] = {}

    def record(self, trial: Any, result: Any) -> dict[str, Any]:
        if trial.is_baseline:
            self.seen[trial.model, trial.benchmark] = (dict(result.metrics), result.replicates)
        return trial_record(trial, result, self.seen.get((trial.model, trial.benchmark)))


# --------------------------------------------------------------------------- peers


def peer_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """The floor: one process, the trials in a loop, one MLflow child run each."""
    from prunelab.workers.actor import Worker

    trials = pickle.loads(Path(spec["trials"]).read_bytes())
    clock = Clock(len(trials))
    client, experiment, parent = start_parent(spec["tracking_uri"], Path(spec["artifacts"]))
    worker, baselines = Worker("loop", threads=1), Baselines()
    for trial in trials:
        result = worker.run(trial)
        log_child_run(client, experiment, parent, trial, baselines.record(trial, result))
        clock.tick(result.run_s, result.worker, result.model_loads)
    client.set_terminated(parent, "FINISHED")
    return {"clock": clock}


def _tune_trainable() -> type:
    """The class trainable (built after ray.tune is imported)."""
    from ray import tune

    class PrunelabTrial(tune.Trainable):
        """The trial in ``step``; the worker (and its model) built once per actor."""

        def setup(self, config: dict[str, Any], trials: list[Any], runs: dict | None) -> None:
            from prunelab.workers.actor import Worker

            self.trials, self.runs = trials, runs
            self.worker, self.baselines = Worker("tune", threads=1), Baselines()
            if runs is not None:
                from mlflow.tracking import MlflowClient

                self.client = MlflowClient(runs["tracking_uri"])

        def reset_config(self, new_config: dict[str, Any]) -> bool:
            return True  # reused for the next trial, the worker and its model kept

        def step(self) -> dict[str, Any]:
            trial = self.trials[self.config["trial"]["index"]]
            result = self.worker.run(trial)
            record = self.baselines.record(trial, result)
            if self.runs is not None:  # the trial's own run, logged here
                ids = self.runs["experiment"], self.runs["parent"]
                log_child_run(self.client, *ids, trial, record)
                reported: dict[str, Any] = {}
            else:  # MLflowLoggerCallback logs the reported metrics
                reported = dict(record["metrics"])
            return {
                **reported,
                "bench_run_s": result.run_s,
                "bench_worker": f"{result.worker}-{result.pid}",
                "bench_model_loads": result.model_loads,
                "done": True,
            }

    return PrunelabTrial


def peer_tune(spec: dict[str, Any], callback: bool) -> dict[str, Any]:
    """Ray Tune, best configuration; MLflow logged in the trainable, or (``callback``) by
    ``MLflowLoggerCallback``."""
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import logging

    import ray
    from ray import tune

    trials = pickle.loads(Path(spec["trials"]).read_bytes())
    clock = Clock(len(trials))

    class Ends(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any):
            last = trial.last_result
            clock.tick(last["bench_run_s"], last["bench_worker"], last["bench_model_loads"])

    callbacks: list[Any] = [Ends()]
    runs = None
    uri, artifacts = spec["tracking_uri"], Path(spec["artifacts"])
    if callback:
        from mlflow.tracking import MlflowClient
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        MlflowClient(uri).create_experiment(SWEEP_NAME, artifact_location=artifacts.as_uri())
        callbacks.insert(0, MLflowLoggerCallback(tracking_uri=uri, experiment_name=SWEEP_NAME))
    else:
        client, experiment, parent = start_parent(uri, artifacts)
        runs = {"tracking_uri": uri, "experiment": experiment, "parent": parent}
    # the trial's params as its config (MLflowLoggerCallback logs the config as params)
    configs = [
        {"index": i, **{k: v for k, v in t.run_params().items() if v is not None}}
        for i, t in enumerate(trials)
    ]
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    try:
        trainable = tune.with_parameters(_tune_trainable(), trials=trials, runs=runs)
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            param_space={"trial": tune.grid_search(configs)},
            tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
            run_config=tune.RunConfig(
                name="bench",
                storage_path=str(Path(spec["work"], "tune")),
                verbose=0,
                callbacks=callbacks,
                checkpoint_config=tune.CheckpointConfig(
                    checkpoint_frequency=0, checkpoint_at_end=False
                ),
                sync_config=tune.SyncConfig(sync_artifacts=False),
            ),
        )
        results = tuner.fit()
        if results.errors:
            raise RuntimeError(f"Ray Tune trials failed: {results.errors[0]}")
    finally:
        ray.shutdown()
    if runs is not None:
        client.set_terminated(parent, "FINISHED")
    return {"clock": clock}


def peer_prunelab(spec: dict[str, Any]) -> dict[str, Any]:
    """``prunelab sweep ...`` through the CLI's ``main`` in this process, its recorder's
    ``done`` timed (the stores come from the ``PRUNELAB_*`` variables). The process exits once
    its measurements are saved, as the ``prunelab`` command exits once ``main`` returns: it
    is called as the command calls it (``exiting=True``)."""
    from prunelab.orchestrator import sweep
    from prunelab.orchestrator.cli import main

    clock = Clock(spec["n"])
    recording: list[float] = []
    original = sweep.Recorder.done

    def done(recorder: Any, dispatch: Any, result: Any) -> None:
        # called once the worker has its next trial: recording overlaps that trial's compute
        clock.tick(result.run_s, f"{result.worker}-{result.pid}", result.model_loads)
        start = time.perf_counter()
        original(recorder, dispatch, result)
        recording.append(time.perf_counter() - start)

    sweep.Recorder.done = done  # type: ignore[method-assign]
    # as the command calls it; a checkout from before ``exiting`` (a before/after comparison)
    # has no such argument
    exiting = {"exiting": True} if "exiting" in inspect.signature(main).parameters else {}
    status = main(spec["argv"], **exiting)
    if status != 0:
        raise RuntimeError(f"the prunelab sweep failed (exit {status})")
    return {"clock": clock, "recording": recording}


def run_peer(name: str, spec_path: Path) -> None:
    """A peer in this process (``--peer``): its measurements to the spec's ``out``."""
    spec = json.loads(spec_path.read_text())
    if name == "loop":
        measured = peer_loop(spec)
    elif name in ("tune", "tune+callback"):
        measured = peer_tune(spec, callback=name == "tune+callback")
    elif name == "prunelab":
        measured = peer_prunelab(spec)
    else:
        raise SystemExit(f"unknown peer {name!r}")
    clock = measured.pop("clock")
    clock.save(Path(spec["out"]), **measured)


# --------------------------------------------------------------------------- the parent


def peer_dir(root: Path, repeat: int, peer: str) -> Path:
    return root / f"r{repeat}-{peer.replace('+', '-')}"


def launch(peer: str, work: Path, trials_file: Path, n: int) -> dict[str, Any]:
    """Run ``peer`` in a fresh process in ``work``: its measurements and its wall time."""
    work.mkdir(parents=True)
    out = work / "measured.json"
    spec = {
        "n": n,
        "trials": str(trials_file),
        "work": str(work),
        "out": str(out),
        "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "artifacts": str(work / "artifacts"),
        "argv": ["sweep", "quickstart", *overrides(n)],
    }
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)  # a local Ray of the peer's own
    env["PRUNELAB_DB_URL"] = f"sqlite:///{work / 'prunelab.db'}"
    env["PRUNELAB_TRACKING_URI"] = spec["tracking_uri"]
    env["PRUNELAB_ARTIFACT_ROOT"] = spec["artifacts"]
    command = [sys.executable, str(Path(__file__).resolve()), "--peer", peer, str(work)]
    start = time.perf_counter()
    result = subprocess.run(
        command, env=env, cwd=work, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    wall = time.perf_counter() - start
    if result.returncode != 0 or not out.exists():
        raise SystemExit(
            f"{peer}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return {**json.loads(out.read_text()), "wall": wall}


def summarize(measured: dict[str, Any]) -> dict[str, Any]:
    ends, work, cpu = measured["ends"], measured["work"], measured["cpu"]
    n = len(ends)
    cycle = (ends[-1] - ends[0]) / (n - 1)
    own = statistics.mean(work[1:])
    row = {
        "cycle": cycle,
        "work": own,
        "overhead": cycle - own,
        "cpu": (cpu[-1] - cpu[0]) / (n - 1),
        "wall": measured["wall"],
        "rss": measured["rss_kib"] / 1024,
        "loads": float(sum(measured["loads"].values())),
        "processes": float(measured["processes"]),
        "trials": float(n),
        "heavy": measured["heavy"],
    }
    if measured.get("recording"):
        row["recording"] = statistics.median(measured["recording"][1:])
    return row


def logged_per_run(tracking_uri: str) -> tuple[int, int, int, int, int]:
    """Trial runs in the store, and the params, metrics, tags and artifact files of the
    newest one (a pruned trial: the baseline runs first)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(SWEEP_NAME)
    runs = client.search_runs([experiment.experiment_id], max_results=10_000)
    runs = [r for r in runs if r.data.tags.get("prunelab.role") != "sweep"]
    newest = max(runs, key=lambda r: r.info.start_time)

    def files(path: str | None = None) -> int:
        entries = client.list_artifacts(newest.info.run_id, path)
        return sum(files(e.path) if e.is_dir else 1 for e in entries)

    data = newest.data
    return len(runs), len(data.params), len(data.metrics), len(data.tags), files()


def logging_rate(tracking_uri: str, artifact_root: str | None, trials: int, new: bool) -> float:
    """Trials logged per second by prunelab's Tracker (params, metrics, trial.yaml); ``new``:
    as a sweep logs the trials it ran, else with the search for an earlier run of the key (as
    a resumed sweep logs what a dead orchestrator finished)."""
    from prunelab.orchestrator.tracking import Tracker

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
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

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


def span(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    """``median (min-max)`` of ``values`` x ``scale``."""
    low, mid, high = min(values) * scale, statistics.median(values) * scale, max(values) * scale
    return f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def ratio(a: float, b: float) -> float | None:
    """a / b; None where it means nothing (b not positive)."""
    return a / b if b > 0 else None


def min_median(values: Sequence[float | None]) -> str:
    known = [v for v in values if v is not None]
    if len(known) < len(values) or not known:
        return "n/a"
    return f"{min(known):.2f} / {statistics.median(known):.2f}"


def measure(n: int, repeats: int, root: Path) -> None:
    import torch

    from prunelab.orchestrator.spec import load_sweep

    plan = load_sweep("quickstart", overrides(n))
    if len(plan.trials) != n:
        raise SystemExit(f"the grid has {len(plan.trials)} trials, expected {n}")
    trials_file = root / "trials.pkl"
    trials_file.write_bytes(pickle.dumps(list(plan.trials)))
    import ray

    print(
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}, {sys.executable}"
    )
    print(f"grid: {n} trivial trials (prunelab sweep quickstart {' '.join(overrides(n))})")
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows: dict[str, list[dict[str, Any]]] = {peer: [] for peer in PEERS}
    for repeat in range(repeats):
        order = PEERS[repeat % len(PEERS) :] + PEERS[: repeat % len(PEERS)]
        walls = []
        for peer in order:
            work = peer_dir(root, repeat, peer)
            rows[peer].append(summarize(launch(peer, work, trials_file, n)))
            walls.append(f"{peer} {rows[peer][-1]['wall']:.1f} s")
        load = os.getloadavg()[0]
        print(f"  repeat {repeat + 1}/{repeats}: {', '.join(walls)}; load {load:.2f}")

    print()
    print(f"each peer, median (min-max) of {repeats} repeats:")
    print()
    print(
        "| peer | per-trial cost | trial's own work | overhead | CPU per trial | wall "
        "| orchestrator peak RSS | model loads |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for peer in PEERS:
        got = rows[peer]
        cells = [
            f"{span([r['cycle'] for r in got], 1e3)} ms",
            f"{span([r['work'] for r in got], 1e3)} ms",
            f"{span([r['overhead'] for r in got], 1e3)} ms",
            f"{span([r['cpu'] for r in got], 1e3)} ms",
            f"{span([r['wall'] for r in got])} s",
            f"{span([r['rss'] for r in got], digits=0)} MB",
            f"{max(r['loads'] for r in got):.0f}",
        ]
        print(f"| {peer} | {' | '.join(cells)} |")
    recording = [r["recording"] for r in rows["prunelab"] if "recording" in r]
    if recording:
        print()
        print(
            "prunelab recording a trial in the orchestrator (database writes + MLflow child "
            f"run; overlaps the worker's next trial): {span(recording, 1e3)} ms median"
        )
    print()
    print("| peer | processes in its tree (CPU counted over them) | its orchestrator imported |")
    print("|---|---:|---|")
    for peer in PEERS:
        count = int(statistics.median(r["processes"] for r in rows[peer]))
        print(f"| {peer} | {count} | {' '.join(rows[peer][0]['heavy']) or '-'} |")

    print()
    print("logged per trial run (the newest run of repeat 1's store):")
    print()
    print("| peer | trial runs | params | metrics | tags | artifact files |")
    print("|---|---:|---:|---:|---:|---:|")
    for peer in PEERS:
        store = f"sqlite:///{peer_dir(root, 0, peer) / 'mlflow.db'}"
        print(f"| {peer} | {' | '.join(str(x) for x in logged_per_run(store))} |")
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print_ratios(rows, repeats)


def print_ratios(rows: dict[str, list[dict[str, Any]]], repeats: int) -> None:
    ours = rows["prunelab"]
    print()
    print(f"prunelab / peer, within each repeat, min / median of {repeats}:")
    print()
    print("| peer | per-trial cost | overhead | CPU per trial | wall | orchestrator peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    for peer in PEERS[:-1]:
        cells = [
            min_median([ratio(a[key], b[key]) for a, b in zip(ours, rows[peer], strict=True)])
            for key in ("cycle", "overhead", "cpu", "wall", "rss")
        ]
        print(f"| {peer} | {' | '.join(cells)} |")
    loop = rows["loop"]
    overhead = [ratio(a["overhead"], b["overhead"]) for a, b in zip(ours, loop, strict=True)]
    wall = [ratio(a["wall"], b["wall"]) for a, b in zip(ours, loop, strict=True)]
    print()
    print(f"prunelab overhead / loop overhead: {min_median(overhead)} (goal <= 1.2)")
    print(f"prunelab wall / loop wall: {min_median(wall)} (goal <= 1.2)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32, help="n, trials in the grid (>= 3)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each peer")
    parser.add_argument("--log-trials", type=int, default=100, help="trials per logging test")
    parser.add_argument("--pg-url", default=os.environ.get("PRUNELAB_TEST_PG_URL", PG_DEFAULT))
    parser.add_argument("--keep", action="store_true", help="keep the temporary stores")
    parser.add_argument("--peer", help=argparse.SUPPRESS)  # internal: run one peer
    parser.add_argument("work", nargs="?", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer:
        run_peer(args.peer, args.work / "spec.json")
        return 0
    import logging

    import mlflow  # its import sets its logger's level: quieted after

    logging.getLogger(mlflow.__name__).setLevel(logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="prunelab-bench-"))
    try:
        if args.log_trials > 0:
            print("| MLflow store | trials logged per second (sweep) | (resume: with search) |")
            print("|---|---:|---:|")

            def rates(uri: str, artifacts: Path) -> str:
                new, resumed = (
                    logging_rate(uri, str(artifacts / str(flag)), args.log_trials, flag)
                    for flag in (True, False)
                )
                return f"{new:.1f} | {resumed:.1f}"

            sqlite = f"sqlite:///{root / 'rate' / 'mlflow.db'}"
            (root / "rate").mkdir()
            print(f"| SQLite | {rates(sqlite, root / 'rate')} |")
            with pg_database(args.pg_url) as pg:
                if pg is not None:
                    print(f"| PostgreSQL | {rates(pg, root / 'rate-pg')} |")
            print()
        measure(max(3, args.trials), max(1, args.repeats), root)
    finally:
        if args.keep:
            print(f"stores kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
