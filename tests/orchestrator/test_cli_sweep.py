"""The whole CLI sweep on local Ray: SQLite (default stores) and PostgreSQL (env vars)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from mlflow.tracking import MlflowClient
from PIL import Image
from sqlalchemy import create_engine, text

import prunelab.methods as M
from prunelab import __version__ as PRUNELAB_VERSION

pytestmark = pytest.mark.slow

TRIAL_METRICS = {
    "score", "score_ratio", "visual_tokens_in", "visual_tokens_kept", "avg_visual_tokens",
    "tflops", "flops_ratio", "prefill_ms", "latency_ms", "fidelity_top1", "fidelity_kl",
    "samples",
}  # fmt: skip
# params of the axes each method uses; unused axes are dropped from the trial, not logged
TRIAL_PARAMS = {
    "none": {"model", "benchmark", "method"},
    "fastv": {"model", "benchmark", "method", "keep_ratio", "prune_layer", "method.queries"},
    "random": {"model", "benchmark", "method", "keep_ratio", "prune_layer", "seed"},
}
# the eval settings that change results, logged with every trial
EVAL_PARAMS = {
    "eval.limit", "eval.sample_seed", "eval.max_new_tokens", "eval.fidelity",
    "eval.flops_convention", "eval.scoring",
}  # fmt: skip
MODEL_PARAMS = {"model.dtype", "model.attn_implementation"}
# 1 none + 2 random + 2 fastv; tiny budgets so the sweep takes seconds
ARGS = ["quickstart", "keep_ratio=0.111,0.333", "eval.limit=4", "eval.warmup=0"]


def prunelab(*args: str, cwd: Path, env: dict | None = None, check: bool = True):
    result = subprocess.run(
        [sys.executable, "-m", "prunelab.orchestrator.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def check_mlflow(tracking_uri: str, trials: int) -> None:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("prunelab.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("prunelab.role") == "trial"]
    assert parents and len(children) == trials
    first_parent = min(parents, key=lambda r: r.info.start_time)
    baseline = next(c for c in children if c.data.params["method"] == "none")
    # score_ratio is undefined (not logged) when the unpruned score is 0
    expected = TRIAL_METRICS - (set() if baseline.data.metrics["score"] > 0 else {"score_ratio"})
    keys = set()
    for child in children:
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == first_parent.info.run_id
        assert tags["prunelab.sweep_id"] == first_parent.data.tags["prunelab.sweep_id"]
        keys.add(tags["prunelab.trial_key"])
        method = child.data.params["method"]
        assert set(child.data.params) == TRIAL_PARAMS[method] | EVAL_PARAMS | MODEL_PARAMS
        assert child.data.params["eval.scoring"] == "lmms_eval"
        assert child.data.params["eval.max_new_tokens"] == "4"  # unset: the benchmark's (shapes)
        assert child.data.params["model.dtype"] == "float32"
        assert tags["prunelab.version"] == PRUNELAB_VERSION
        assert tags["prunelab.env.torch"] == torch.__version__
        assert tags["prunelab.env.transformers"] == transformers.__version__
        assert expected <= set(child.data.metrics), (method, set(child.data.metrics))
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"predictions.jsonl", "trial.yaml"} <= artifacts
        if method != "none":  # importance heatmaps of the first eval.heatmaps=2 samples
            maps = client.list_artifacts(child.info.run_id, "importance")
            assert len(maps) == 2 and all(a.path.endswith(".png") for a in maps)
        assert child.info.status == "FINISHED"
    assert len(keys) == trials
    parent_artifacts = {a.path for a in client.list_artifacts(first_parent.info.run_id)}
    assert {"table.md", "table.csv", "table.tex", "pareto.png", "trials.csv"} <= parent_artifacts
    png = client.download_artifacts(first_parent.info.run_id, "pareto.png")
    Image.open(png).verify()  # a real PNG


def test_quickstart_on_sqlite_then_rerun_runs_nothing(tmp_path):
    first = prunelab("sweep", *ARGS, cwd=tmp_path)
    assert "5 trials, 0 already finished, 5 to run" in first.stdout
    assert "| model | method | budget | shapes | mean score ratio (%) |" in first.stdout
    assert "| toy-llava | fastv | 11.1% |" in first.stdout
    runs = tmp_path / "prunelab-runs"
    assert (runs / "mlflow.db").exists() and (runs / "prunelab.db").exists()
    check_mlflow(f"sqlite:///{runs / 'mlflow.db'}", trials=5)

    second = prunelab("sweep", *ARGS, cwd=tmp_path)
    assert "5 trials, 5 already finished, 0 to run" in second.stdout
    check_mlflow(f"sqlite:///{runs / 'mlflow.db'}", trials=5)  # no new child run

    status = json.loads(prunelab("status", "quickstart", "--json", cwd=tmp_path).stdout)
    assert [t["status"] for t in status["trials"]] == ["finished"] * 5
    assert all(t["attempts"] == 1 and t["mlflow_run_id"] for t in status["trials"])
    sweeps = json.loads(prunelab("status", "--json", cwd=tmp_path).stdout)
    assert len(sweeps) == 2 and all(s["status"] == "finished" for s in sweeps)

    md = prunelab("report", "quickstart", "--format", "md", cwd=tmp_path).stdout
    assert md.count("| toy-llava |") == 5
    csv_out = tmp_path / "t.csv"
    prunelab("report", "quickstart", "--format", "csv", "--out", str(csv_out), cwd=tmp_path)
    assert csv_out.read_text().splitlines()[0] == (
        "model,method,budget,shapes,shapes_ci_low,shapes_ci_high,mean score ratio (%),"
        "mean score ratio (%)_ci_low,mean score ratio (%)_ci_high"
    )
    latex = prunelab("report", "quickstart", "--format", "latex", cwd=tmp_path).stdout
    assert "\\begin{tabular}" in latex


@pytest.mark.postgres
def test_quickstart_on_postgresql(tmp_path, pg_databases):
    ours, mlflow_db = pg_databases.create(), pg_databases.create()
    env = {"PRUNELAB_DB_URL": ours, "PRUNELAB_TRACKING_URI": mlflow_db}
    prunelab("sweep", *ARGS, cwd=tmp_path, env=env)
    assert not (tmp_path / "prunelab-runs" / "prunelab.db").exists()
    assert not (tmp_path / "prunelab-runs" / "mlflow.db").exists()
    engine = create_engine(ours.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as conn:
        rows = conn.execute(text("select status, mlflow_run_id from trials")).all()
    engine.dispose()
    assert len(rows) == 5 and all(s == "finished" and run for s, run in rows)
    check_mlflow(mlflow_db.replace("postgresql://", "postgresql+psycopg://", 1), trials=5)
    again = prunelab("sweep", *ARGS, cwd=tmp_path, env=env)
    assert "0 to run" in again.stdout


def test_methods_lists_registry(tmp_path):
    out = prunelab("methods", cwd=tmp_path).stdout
    assert "fastv" in out and "queries='last'" in out and "default prune_layer=2" in out
    rows = json.loads(prunelab("methods", "--json", cwd=tmp_path).stdout)
    assert {r["name"] for r in rows} == set(M.available())
    for name in M.available():  # every registered method heads a row of the listing
        assert f"\n{name} " in f"\n{out}"


def test_resume_finishes_a_trial_left_running(tmp_path):
    """An orchestrator died mid-trial: resume runs only that trial and logs it exactly once."""
    prunelab("sweep", *ARGS, cwd=tmp_path)
    runs = tmp_path / "prunelab-runs"
    sweep = json.loads(prunelab("status", "quickstart", "--json", cwd=tmp_path).stdout)
    victim = next(t for t in sweep["trials"] if t["method"] == "fastv")
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    client.delete_run(victim["mlflow_run_id"])
    engine = create_engine(f"sqlite:///{runs / 'prunelab.db'}")
    with engine.begin() as conn:
        orchestrator = conn.execute(text("select orchestrator from sweeps")).scalar_one()
        conn.execute(
            text(
                "update trials set status='running', metrics=null, mlflow_run_id=null, "
                "claimed_by=:o where id=:i"
            ),
            {"o": orchestrator, "i": victim["id"]},
        )
        conn.execute(text("update sweeps set status='running'"))
    engine.dispose()

    out = prunelab("resume", "quickstart", cwd=tmp_path).stdout
    assert "1 interrupted trial(s) back to pending" in out
    after = json.loads(prunelab("status", "quickstart", "--json", cwd=tmp_path).stdout)
    by_id = {t["id"]: t for t in after["trials"]}
    assert all(t["status"] == "finished" for t in after["trials"])
    assert by_id[victim["id"]]["attempts"] == 2
    assert sum(t["attempts"] for t in after["trials"]) == 6  # nothing else ran again
    check_mlflow(f"sqlite:///{runs / 'mlflow.db'}", trials=5)
