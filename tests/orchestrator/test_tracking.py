"""MLflow tracking: parent and child runs with the conventions of DESIGN.md, exactly once.

One MLflow store per backend for the whole module (creating one runs MLflow's migrations);
each test works in its own experiment.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import prunelab
from prunelab.orchestrator.tracking import (
    Tracker,
    code_tags,
    default_artifact_root,
    default_tracking_uri,
)

SWEEP_ID = "0123456789ab"
KEY = "f" * 64


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def tracker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tracker]:
    """A tracker on a fresh store: a SQLite file, or a fresh PostgreSQL database."""
    root = tmp_path_factory.mktemp("mlflow")
    if request.param == "sqlite":
        yield Tracker(f"sqlite:///{root}/store/mlflow.db", str(root / "artifacts"))
        return
    databases = request.getfixturevalue("pg_databases")
    url = databases.create()
    # A plain postgresql:// URI, as users write it: the tracker must pick psycopg 3.
    yield Tracker(url.replace("postgresql+psycopg://", "postgresql://"), str(root / "artifacts"))
    databases.drop(url)


@pytest.fixture
def name() -> str:
    """A fresh experiment (sweep) name."""
    return f"sweep-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def parent(tracker: Tracker, name: str) -> str:
    """The parent run of a sweep ``SWEEP_ID`` in experiment ``name``."""
    return tracker.start_sweep(name, SWEEP_ID, {"spec": "quickstart"})


def _trial(tracker: Tracker, name: str, parent: str, key: str = KEY, **changes: object) -> str:
    arguments: dict[str, object] = {
        "experiment": name,
        "parent_run_id": parent,
        "sweep_id": SWEEP_ID,
        "trial_key": key,
        "run_name": "fastv-r0.25-l2",
        "params": {"model": "toy-llava", "keep_ratio": 0.25, "prune_layer": 2},
        "metrics": {"score": 0.5},
        "artifacts": {},
    }
    arguments.update(changes)
    return tracker.log_trial(**arguments)  # type: ignore[arg-type]


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PRUNELAB_TRACKING_URI", raising=False)
    monkeypatch.delenv("PRUNELAB_ARTIFACT_ROOT", raising=False)
    assert default_tracking_uri() == f"sqlite:///{tmp_path}/prunelab-runs/mlflow.db"
    assert default_artifact_root() == str(tmp_path / "prunelab-runs" / "artifacts")
    monkeypatch.setenv("PRUNELAB_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("PRUNELAB_ARTIFACT_ROOT", "s3://bucket/prunelab")
    assert default_tracking_uri() == "http://mlflow:5000"
    assert default_artifact_root() == "s3://bucket/prunelab"
    remote = Tracker("http://mlflow:5000", "s3://bucket/prunelab")
    assert remote._artifact_location("quick") == "s3://bucket/prunelab/quick"


def test_experiment_get_or_create(tracker: Tracker, name: str) -> None:
    experiment_id = tracker.experiment_id(name)
    assert tracker.experiment_id(name) == experiment_id
    experiment = tracker.client.get_experiment(experiment_id)
    assert experiment.name == name
    assert tracker.artifact_root is not None
    assert experiment.artifact_location == (Path(tracker.artifact_root) / name).as_uri()
    # A deleted experiment is restored rather than shadowed.
    tracker.client.delete_experiment(experiment_id)
    fresh = Tracker(tracker.tracking_uri, tracker.artifact_root)
    assert fresh.experiment_id(name) == experiment_id
    assert tracker.client.get_experiment(experiment_id).lifecycle_stage == "active"


def test_experiment_created_once_by_concurrent_trackers(tracker: Tracker, name: str) -> None:
    trackers = [Tracker(tracker.tracking_uri, tracker.artifact_root) for _ in range(4)]
    barrier = threading.Barrier(len(trackers))
    ids: list[str] = []
    errors: list[BaseException] = []

    def create(other: Tracker) -> None:
        try:
            barrier.wait()
            ids.append(other.experiment_id(name))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(t,)) for t in trackers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(ids)) == 1 and len(ids) == len(trackers)


def test_start_sweep(tracker: Tracker, name: str) -> None:
    run_id = tracker.start_sweep(name, SWEEP_ID, {"spec": "quickstart", "workers": 2, "x": None})
    run = tracker.client.get_run(run_id)
    assert run.info.experiment_id == tracker.experiment_id(name)
    assert run.info.status == "RUNNING"
    assert run.info.run_name == f"{name}-{SWEEP_ID}"
    assert run.data.tags["prunelab.role"] == "sweep"
    assert run.data.tags["prunelab.sweep_id"] == SWEEP_ID
    assert run.data.tags["mlflow.runName"] == f"{name}-{SWEEP_ID}"
    assert "mlflow.parentRunId" not in run.data.tags
    assert run.data.params == {"spec": "quickstart", "workers": "2"}
    # Resuming the sweep reuses its parent run.
    tracker.finish_sweep(run_id, "KILLED")
    assert tracker.start_sweep(name, SWEEP_ID, {"spec": "quickstart", "resumed": 1}) == run_id
    run = tracker.client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params["resumed"] == "1"


def test_log_trial_run_contents(tracker: Tracker, name: str, parent: str, tmp_path: Path) -> None:
    png = bytes(range(256))
    run_id = _trial(
        tracker,
        name,
        parent,
        params={
            "model": "toy-llava",
            "method": "fastv",
            "keep_ratio": 0.25,
            "keep_tokens": None,
            "prune_layer": 2,
            "method.rank": True,
        },
        metrics={"score": 0.5, "samples": 64, "tflops": 1.25},
        artifacts={
            "trial.yaml": "method: fastv\n",
            "predictions.jsonl": '{"id": 0}\n',
            "importance/sample-0.png": png,
        },
    )
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == tracker.experiment_id(name)
    assert run.info.run_name == "fastv-r0.25-l2"
    tags = {k: v for k, v in run.data.tags.items() if k.startswith(("prunelab.", "mlflow.p"))}
    assert tags == {
        "mlflow.parentRunId": parent,
        "prunelab.role": "trial",
        "prunelab.trial_key": KEY,
        "prunelab.sweep_id": SWEEP_ID,
        **code_tags(),  # prunelab.version, and prunelab.git_commit in a checkout
    }
    assert tags["prunelab.version"] == prunelab.__version__
    assert run.data.params == {
        "model": "toy-llava",
        "method": "fastv",
        "keep_ratio": "0.25",
        "prune_layer": "2",
        "method.rank": "True",
    }
    assert run.data.metrics == {"score": 0.5, "samples": 64.0, "tflops": 1.25}
    local = Path(tracker.client.download_artifacts(run_id, "", str(tmp_path)))
    assert (local / "trial.yaml").read_text() == "method: fastv\n"
    assert (local / "predictions.jsonl").read_text() == '{"id": 0}\n'
    assert (local / "importance" / "sample-0.png").read_bytes() == png
    assert [r.info.run_id for r in tracker.trial_runs(name)] == [run_id]
    assert tracker.trial_runs(name, sweep_id="ffffffffffff") == []


def test_log_trial_is_idempotent(tracker: Tracker, name: str, parent: str) -> None:
    first = _trial(tracker, name, parent, metrics={"score": 0.5})
    second = _trial(tracker, name, parent, metrics={"score": 0.9})
    assert second == first
    runs = tracker.trial_runs(name)
    assert [r.info.run_id for r in runs] == [first]
    assert runs[0].data.metrics == {"score": 0.5}
    # The experiment may also be given by id.
    assert _trial(tracker, tracker.experiment_id(name), parent) == first


def test_a_new_trial_is_logged_without_a_search(
    tracker: Tracker, name: str, parent: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """new=True (the orchestrator finished the trial itself): no search for an earlier run,
    the same FINISHED run with its artifacts; new=False still finds it afterwards."""
    experiment_id = tracker.experiment_id(name)

    def no_search(*args: object) -> list:
        raise AssertionError("searched for an earlier run of a new trial")

    monkeypatch.setattr(tracker, "_search", no_search)
    run_id = _trial(
        tracker, name, parent, metrics={"score": 0.5}, artifacts={"a/b.txt": "x"}, new=True
    )
    monkeypatch.undo()
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"score": 0.5}
    local = Path(tracker.client.download_artifacts(run_id, "", str(tmp_path)))
    assert (local / "a" / "b.txt").read_text() == "x"
    assert _trial(tracker, experiment_id, parent, metrics={"score": 0.9}) == run_id


def test_unfinished_runs_of_a_trial_are_replaced(tracker: Tracker, name: str, parent: str) -> None:
    experiment_id = tracker.experiment_id(name)
    tags = {
        "mlflow.parentRunId": parent,
        "prunelab.role": "trial",
        "prunelab.trial_key": KEY,
        "prunelab.sweep_id": SWEEP_ID,
    }
    dangling = tracker.client.create_run(experiment_id, tags=tags).info.run_id  # RUNNING
    crashed = tracker.client.create_run(experiment_id, tags=tags).info.run_id
    tracker.client.set_terminated(crashed, "FAILED")
    run_id = _trial(tracker, name, parent)
    assert run_id not in (dangling, crashed)
    for stale in (dangling, crashed):
        assert tracker.client.get_run(stale).info.lifecycle_stage == "deleted"
    runs = tracker.trial_runs(name)
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"


def test_same_key_in_another_sweep_gets_its_own_run(
    tracker: Tracker, name: str, parent: str
) -> None:
    first = _trial(tracker, name, parent)
    other_parent = tracker.start_sweep(name, "ba9876543210", {})
    second = _trial(tracker, name, other_parent, sweep_id="ba9876543210")
    assert second != first
    assert len(tracker.trial_runs(name)) == 2
    assert [r.info.run_id for r in tracker.trial_runs(name, sweep_id="ba9876543210")] == [second]


def test_many_params_and_metrics(tracker: Tracker, name: str, parent: str) -> None:
    params = {f"method.p{i}": i for i in range(250)}
    metrics = {f"m{i}": float(i) for i in range(900)}
    run = tracker.client.get_run(_trial(tracker, name, parent, params=params, metrics=metrics))
    assert len(run.data.params) == 250 and run.data.params["method.p249"] == "249"
    assert len(run.data.metrics) == 900 and run.data.metrics["m899"] == 899.0


def test_sweep_metrics_artifacts_and_finish(
    tracker: Tracker, name: str, parent: str, tmp_path: Path
) -> None:
    tracker.log_sweep_metrics(parent, {"trials_finished": 6, "trials_failed": 0})
    tracker.log_sweep_artifacts(
        parent, {"table.md": "| a |\n", "table.csv": "a\n", "pareto.png": b"\x89PNG"}
    )
    tracker.finish_sweep(parent, "FINISHED")
    run = tracker.client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"trials_finished": 6.0, "trials_failed": 0.0}
    artifacts = {a.path for a in tracker.client.list_artifacts(parent)}
    assert artifacts == {"table.md", "table.csv", "pareto.png"}
    with pytest.raises(ValueError, match="invalid run status"):
        tracker.finish_sweep(parent, "DONE")  # type: ignore[arg-type]


def test_bad_input_creates_no_run(tracker: Tracker, name: str, parent: str) -> None:
    with pytest.raises(ValueError, match="relative path"):
        _trial(tracker, name, parent, artifacts={"../escape.txt": "x"})
    with pytest.raises(ValueError, match="trial key"):
        _trial(tracker, name, parent, key="k' or '1'='1")
    assert tracker.trial_runs(name) == []
    assert tracker.trial_runs("no-such-experiment") == []
