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
    head = trial.vib_head
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


MIXED = """\
defaults: [base, _self_]
name: pgp-broken-head
grid:
  model: tiny-llava
  benchmark: shapes
  method: none,random,pgp
  keep_ratio: 0.25
  prune_layer: 0
  method.gate: sigmoid,exp
eval: {limit: 2, warmup: 0, max_new_tokens: 2, heatmaps: 0}
workers: {count: 1}
stages:
  vib: {steps: 1, batch_size: 1, limit: 1, eval_samples: 1, lr: 0.003}
"""


@pytest.mark.slow
def test_a_head_that_fails_to_train_fails_only_its_trials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    from prunelab.db import Trial, make_engine, session_factory
    from prunelab.orchestrator import vib_stage
    from prunelab.orchestrator.sweep import Stores, submit_sweep

    # the exp-gate head's guide cannot be loaded: its training task fails on the worker
    real_train = vib_stage._train
    attempts: list[str] = []

    def train(train: dict, workers: dict | None):
        if train["head"]["gate"] != "exp":
            return real_train(train, workers)
        attempts.append(train["key"])
        missing = {**train["guide"], "source": "pretrained", "path": str(tmp_path / "no-guide")}
        return real_train({**train, "guide": missing}, workers)

    monkeypatch.setattr(vib_stage, "_train", train)
    runs = tmp_path / "prunelab-runs"
    stores = Stores(
        db_url=f"sqlite:///{runs / 'prunelab.db'}",
        tracking_uri=f"sqlite:///{runs / 'mlflow.db'}",
        artifact_root=str(runs / "artifacts"),
        ray_address=None,
    )
    plan = load_sweep(_spec(tmp_path, MIXED))
    (broken,) = [t for t in plan.trials if t.hparams.get("gate") == "exp"]
    key = broken.vib_head["key"]

    def trials() -> dict[str, Trial]:
        engine = make_engine(stores.db_url)
        try:
            with session_factory(engine)() as session:
                return {t.trial_key: t for t in session.query(Trial).all()}
        finally:
            engine.dispose()

    try:
        assert submit_sweep(plan, stores) == 1  # failed trials: non-zero exit status
        table = capsys.readouterr().out
        assert attempts == [key]
        by_key = trials()
        assert len(by_key) == len(plan.trials) == 4  # none, random, pgp x 2 heads
        victim = by_key[broken.key]
        assert (victim.status, victim.attempts, victim.claimed_by) == ("failed", 1, None)
        assert victim.mlflow_run_id is None and victim.worker == ""  # never dispatched
        error = victim.error or ""
        assert error.startswith(f"vib head {key[:12]} (stage 'vib': guide tiny-llava-small")
        assert "gate=exp) failed to train: ValueError: cannot read the config of" in error
        assert "Traceback" not in error and "\n" not in error
        others = [t for t in by_key.values() if t is not victim]
        assert all(t.status == "finished" and t.attempts == 1 for t in others)
        assert {t.config["method"] for t in others} == {"none", "random", "pgp"}
        # the table shows the failed trial
        (failed_row,) = [row for row in table.splitlines() if "| pgp (gate=exp) |" in row]
        (good_row,) = [row for row in table.splitlines() if "| pgp (gate=sigmoid) |" in row]
        assert "failed" in failed_row and "failed" not in good_row

        client = MlflowClient(stores.tracking_uri)
        sweep_runs = client.search_runs(
            [client.get_experiment_by_name("pgp-broken-head").experiment_id]
        )
        children = [r for r in sweep_runs if r.data.tags["prunelab.role"] == "trial"]
        logged = sorted(r.data.tags["prunelab.trial_key"] for r in children)
        assert logged == sorted(by_key)  # every trial once, the failed one included
        status = {r.data.tags["prunelab.trial_key"]: r.info.status for r in children}
        assert all(status[t.trial_key] == "FINISHED" for t in others)
        assert status[broken.key] == "FAILED"  # with its error, to act on it in MLflow
        (failed_run,) = [r for r in children if r.info.status == "FAILED"]
        assert failed_run.data.tags["prunelab.error"] == error
        (parent,) = [r for r in sweep_runs if r.data.tags["prunelab.role"] == "sweep"]
        assert parent.info.status == "FAILED"
        # the good head was trained and logged; nothing at all for the broken one
        heads = client.search_runs([client.get_experiment_by_name(VIB_EXPERIMENT).experiment_id])
        assert [r.info.status for r in heads] == ["FINISHED"]
        assert heads[0].data.tags["prunelab.vib_key"] != key

        # a later submit gives the failed trial a fresh attempt: the head is trained again
        assert submit_sweep(load_sweep(_spec(tmp_path, MIXED)), stores) == 1
        assert attempts == [key, key]
        victim = trials()[broken.key]
        assert (victim.status, victim.attempts) == ("failed", 1)
        assert all(trials()[t.trial_key].status == "finished" for t in others)
        everything = client.search_runs(
            [e.experiment_id for e in client.search_experiments()], max_results=1000
        )
        assert not [r for r in everything if r.info.status == "RUNNING"]
    finally:
        ray.shutdown()
