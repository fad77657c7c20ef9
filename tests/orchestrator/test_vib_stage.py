"""Training stages of a sweep: pgp trials carry the key of their VIB head, a sweep trains the
head once before its trials and a second run reuses it from MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from prunelab.orchestrator.spec import SpecError, load_sweep
from prunelab.orchestrator.vib_stage import VIB_EXPERIMENT

SPEC = """\
defaults: [base, _self_]
name: pgp-e2e
grid:
  model: tiny-llava
  benchmark: shapes
  method: pgp
  keep_ratio: 0.25
  prune_layer: 0
eval: {limit: 2, warmup: 0, max_new_tokens: 2}
workers: {count: 1}
stages:
  vib: {steps: 3, batch_size: 1, limit: 2, eval_samples: 1, lr: 0.003}
"""


def _spec(tmp_path: Path, text: str = SPEC) -> str:
    path = tmp_path / "pgp-e2e.yaml"
    path.write_text(text)
    return str(path)


def test_pgp_trials_carry_their_head_key(tmp_path: Path) -> None:
    plan = load_sweep(_spec(tmp_path))
    (baseline, trial) = plan.trials
    assert baseline.vib_head is None and trial.method == "pgp"
    head = trial.config()["vib_head"]
    assert head["stage"] == "vib" and head["train"]["steps"] == 3
    assert head["train"]["guide"]["name"] == "tiny-llava-small"
    assert head["train"]["benchmark"]["split"] == "train"
    assert head["train"]["head"]["gate"] == "sigmoid"
    # the head's settings and hyperparameters are part of the trial key
    more_steps = load_sweep(_spec(tmp_path), ["stages.vib.steps=4"]).trials[1]
    exp_gate = load_sweep(_spec(tmp_path), ["method.gate=exp"]).trials[1]
    keys = {trial.key, more_steps.key, exp_gate.key}
    heads = {trial.vib_head["key"], more_steps.vib_head["key"], exp_gate.vib_head["key"]}
    assert len(keys) == len(heads) == 3
    # two layers, one head
    both = load_sweep(_spec(tmp_path), ["prune_layer=0,2"]).trials[1:]
    assert len({t.key for t in both}) == 2 and len({t.vib_head["key"] for t in both}) == 1


def test_bad_stage_settings_are_reported(tmp_path: Path) -> None:
    bad = SPEC.replace("steps: 3", "stepz: 3").replace("lr: 0.003", "lr: -1")
    with pytest.raises(SpecError) as info:
        load_sweep(_spec(tmp_path, bad))
    text = "\n".join(info.value.problems)
    assert "unknown key 'stages.vib.stepz'" in text and "stages.vib.lr=-1" in text


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "prunelab.orchestrator.cli", *args],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_sweep_trains_the_head_once_and_reuses_it(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    first = _cli("sweep", spec, cwd=tmp_path)
    assert "training on tiny-llava-small" in first.stdout + first.stderr
    # --rerun runs the trials again: their head comes from MLflow, not a second training
    second = _cli("sweep", spec, "--rerun", cwd=tmp_path)
    assert "reusing run" in second.stdout + second.stderr
    assert "training on" not in second.stdout + second.stderr

    client = MlflowClient(f"sqlite:///{tmp_path}/prunelab-runs/mlflow.db")
    experiment = client.get_experiment_by_name(VIB_EXPERIMENT)
    heads = client.search_runs([experiment.experiment_id], "tags.`prunelab.role` = 'vib'")
    assert len(heads) == 1 and heads[0].info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(heads[0].info.run_id)}
    assert artifacts == {"vib_head.safetensors", "vib_config.json"}
    trials = client.search_runs(
        [client.get_experiment_by_name("pgp-e2e").experiment_id],
        "tags.`prunelab.role` = 'trial' and params.method = 'pgp'",
    )
    assert len(trials) == 2  # one per sweep run
    for run in trials:
        assert run.data.metrics["visual_tokens_kept"] == 36  # 0.25 of 144
        assert run.data.metrics["tflops_guidance"] > 0
