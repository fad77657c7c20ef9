"""Browsing: ``prunelab ui``'s MLflow server serves a finished sweep through the REST API.

The server is started with exactly the command ``prunelab ui`` would run (`ui_command`) on the
SQLite tracking store and artifact root of a tiny sweep run through the CLI (a copy of the
session's ``finished_sweep``, tests/orchestrator/conftest.py).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from argparse import Namespace
from pathlib import Path

import pytest
from PIL import Image

from prunelab.orchestrator.cli.common import stores_from_args
from prunelab.orchestrator.cli.tools import ui_command
from prunelab.orchestrator.sweep import Stores

# the finished sweep: the unpruned baseline, and random and fastv at two budgets each
TRIALS = 5
SAMPLES = 4  # per trial


def test_ui_command_for_a_sqlite_store_and_artifact_root(tmp_path):
    stores = Stores(
        db_url="sqlite:///x.db",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        artifact_root=str(tmp_path / "artifacts"),
        ray_address=None,
    )
    assert ui_command(stores, "127.0.0.1", 5001) == [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
        "--host", "127.0.0.1", "--port", "5001",
        "--serve-artifacts", "--artifacts-destination", (tmp_path / "artifacts").as_uri(),
    ]  # fmt: skip


def test_ui_command_gives_postgresql_psycopg3_and_keeps_remote_artifact_roots():
    stores = Stores(
        db_url="sqlite:///x.db",
        tracking_uri="postgresql://me:secret@db:5432/mlflow",
        artifact_root="s3://bucket/prunelab",
        ray_address=None,
    )
    command = ui_command(stores, "0.0.0.0", 5000)
    store = command[command.index("--backend-store-uri") + 1]
    assert store == "postgresql+psycopg://me:secret@db:5432/mlflow"
    assert command[-2:] == ["--artifacts-destination", "s3://bucket/prunelab"]
    no_root = Stores("sqlite:///x.db", "sqlite:////tmp/m.db", None, None)
    assert "--artifacts-destination" not in ui_command(no_root, "127.0.0.1", 5000)


def test_ui_uses_the_configured_store(monkeypatch, tmp_path):
    """``prunelab ui`` reads the same flags and environment as every other command."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRUNELAB_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    monkeypatch.delenv("PRUNELAB_ARTIFACT_ROOT", raising=False)
    args = Namespace(tracking_uri=None, db_url=None, artifact_root=None, ray_address=None)
    command = ui_command(stores_from_args(args), "127.0.0.1", 5000)
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/env.db"
    artifacts = command[command.index("--artifacts-destination") + 1]
    assert artifacts == (tmp_path / "prunelab-runs" / "artifacts").as_uri()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(base: str, endpoint: str, **query: str) -> bytes:
    url = f"{base}{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def _post(base: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{base}{endpoint}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _wait_healthy(base: str, server: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow server exited with {server.returncode}")
        try:
            if _get(base, "/health").strip() == b"OK":
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"mlflow server not healthy after {timeout_s} s")


@pytest.mark.slow
def test_server_serves_a_finished_sweep(finished_sweep, tmp_path):
    runs = finished_sweep.copy_to(tmp_path)
    assert f"eval.limit={SAMPLES}" in finished_sweep.args
    stores = Stores(
        db_url=f"sqlite:///{runs / 'prunelab.db'}",
        tracking_uri=f"sqlite:///{runs / 'mlflow.db'}",
        artifact_root=str(runs / "artifacts"),
        ray_address=None,
    )
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(  # its own process group: the server's workers stop with it
        ui_command(stores, "127.0.0.1", port),
        cwd=tmp_path,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        _wait_healthy(base, server)
        experiment = json.loads(
            _get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="quickstart")
        )["experiment"]
        found = _post(
            base,
            "/api/2.0/mlflow/runs/search",
            {"experiment_ids": [experiment["experiment_id"]], "max_results": 100},
        )["runs"]

        def tags(run: dict) -> dict[str, str]:
            return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

        parents = [r for r in found if tags(r).get("prunelab.role") == "sweep"]
        children = [r for r in found if tags(r).get("prunelab.role") == "trial"]
        assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
        parent_id = parents[0]["info"]["run_id"]
        assert len(children) == TRIALS
        assert all(tags(c)["mlflow.parentRunId"] == parent_id for c in children)
        methods = {
            p["value"] for c in children for p in c["data"]["params"] if p["key"] == "method"
        }
        assert methods == {"none", "random", "fastv"}

        listed = json.loads(_get(base, "/api/2.0/mlflow/artifacts/list", run_id=parent_id))
        assert {"table.md", "table.csv", "table.tex", "pareto.png"} <= {
            f["path"] for f in listed["files"]
        }
        table = _get(base, "/get-artifact", path="table.md", run_uuid=parent_id).decode()
        assert table.startswith("| model | method | budget | scenes | mean score ratio (%) |")
        assert "| toy-llava | none | upper bound |" in table
        png = _get(base, "/get-artifact", path="pareto.png", run_uuid=parent_id)
        assert Image.open(io.BytesIO(png)).format == "PNG"

        for child in children:
            run_id = child["info"]["run_id"]
            files = json.loads(_get(base, "/api/2.0/mlflow/artifacts/list", run_id=run_id))
            paths = {f["path"] for f in files["files"]}
            assert {"predictions.jsonl", "trial.yaml"} <= paths
            predictions = _get(base, "/get-artifact", path="predictions.jsonl", run_uuid=run_id)
            assert len(predictions.decode().splitlines()) == SAMPLES
            method = next(p["value"] for p in child["data"]["params"] if p["key"] == "method")
            if method != "none":  # the pruned trials: heatmaps of their first two samples
                maps = json.loads(
                    _get(base, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path="importance")
                )["files"]
                assert len(maps) == 2
                heatmap = _get(base, "/get-artifact", path=maps[0]["path"], run_uuid=run_id)
                assert Image.open(io.BytesIO(heatmap)).format == "PNG"
    except BaseException:
        log.flush()
        sys.stderr.write(Path(log.name).read_text(errors="replace")[-4000:])
        raise
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()
