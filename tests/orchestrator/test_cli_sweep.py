"""The whole CLI sweep on local Ray with its default stores (SQLite) and the commands around it.

The tests share one finished sweep (``finished_sweep``, tests/orchestrator/conftest.py:
``prunelab sweep ARGS`` run once), each on a copy of its stores; the commands that start no Ray
(status, report, methods) run in this process through ``main``. The same checks of the MLflow
runs (:func:`check_mlflow`) are made on a sweep whose stores are in PostgreSQL, named by
environment variables (test_store_faults.py), and on one that ``prunelab resume`` finished after
SIGTERM, SIGINT and ``kill -9`` (test_signals.py)."""

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

import prunelab.methods as M
from prunelab import __version__ as PRUNELAB_VERSION
from prunelab.orchestrator.cli import main

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
# 1 none + 2 random + 2 fastv; tiny budgets so the sweep takes seconds (finished_sweep's too)
ARGS = [
    "quickstart",
    "method=none,random,fastv",
    "keep_ratio=0.111,0.333",
    "eval.limit=4",
    "eval.warmup=0",
]


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


def here(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """``prunelab ARGS`` run in this process (a command that starts no Ray: status, report,
    methods), its stdout; the stores are the default ones of the current directory."""
    capsys.readouterr()
    assert main(list(args)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


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
        assert child.data.params["eval.max_new_tokens"] == "4"  # unset: the benchmark's (scenes)
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


def test_quickstart_on_sqlite_then_rerun_runs_nothing(
    finished_sweep, tmp_path, monkeypatch, capsys
):
    assert finished_sweep.args == ARGS
    first = finished_sweep.stdout  # `prunelab sweep ARGS` in a new directory
    assert "5 trials, 0 already finished, 5 to run" in first
    assert "| model | method | budget | scenes | mean score ratio (%) |" in first
    assert "| toy-llava | fastv | 11.1%" in first  # then the average kept, if shown
    runs = finished_sweep.copy_to(tmp_path)
    assert (runs / "mlflow.db").exists() and (runs / "prunelab.db").exists()
    check_mlflow(f"sqlite:///{runs / 'mlflow.db'}", trials=5)

    second = prunelab("sweep", *ARGS, cwd=tmp_path)
    assert "5 trials, 5 already finished, 0 to run" in second.stdout
    check_mlflow(f"sqlite:///{runs / 'mlflow.db'}", trials=5)  # no new child run

    monkeypatch.chdir(tmp_path)
    status = json.loads(here(capsys, "status", "quickstart", "--json"))
    assert [t["status"] for t in status["trials"]] == ["finished"] * 5
    assert all(t["attempts"] == 1 and t["mlflow_run_id"] for t in status["trials"])
    sweeps = json.loads(here(capsys, "status", "--json"))
    # the same spec again extends its sweep (a sweep is its name): one sweep
    assert len(sweeps) == 1 and all(s["status"] == "finished" for s in sweeps)

    md = here(capsys, "report", "quickstart", "--format", "md")
    assert md.count("| toy-llava |") == 5
    csv_out = tmp_path / "t.csv"
    here(capsys, "report", "quickstart", "--format", "csv", "--out", str(csv_out))
    assert csv_out.read_text().splitlines()[0] == (
        "model,method,budget,scenes,scenes_ci_low,scenes_ci_high,mean score ratio (%),"
        "mean score ratio (%)_ci_low,mean score ratio (%)_ci_high,TFLOPs"
    )
    latex = here(capsys, "report", "quickstart", "--format", "latex")
    assert "\\begin{tabular}" in latex


def test_methods_lists_registry(capsys):
    out = here(capsys, "methods")
    assert "fastv" in out and "queries='last'" in out and "default prune_layer=2" in out
    rows = json.loads(here(capsys, "methods", "--json"))
    assert {r["name"] for r in rows} == set(M.available())
    for name in M.available():  # every registered method heads a row of the listing
        assert f"\n{name} " in f"\n{out}"
