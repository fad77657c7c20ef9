"""Training stages of a sweep: the VIB heads of ``pgp`` trials, trained once and reused.

A sweep spec may declare named stages::

    stages:
      vib:                        # pgp's `stage` hyperparameter names it (default "vib")
        benchmark: shapes         # training data: a benchmark config ...
        split: train              # ... and its split
        steps: 0                  # 0: one epoch over `limit` samples (the paper: one epoch)
        batch_size: 4
        lr: 1.0e-4
        limit: 256
        seed: 0

Each pgp trial needs the head of (its model's guide, its head hyperparameters, the stage's
settings): :func:`head_spec` turns these into a training config whose sha256 is the head's
``key`` (part of the trial key). Before the trials run, :func:`ensure_heads` looks up a FINISHED
MLflow run tagged ``prunelab.role=vib``, ``prunelab.vib_key=<key>`` in the experiment
``prunelab-vib``; if there is none it trains the head (a Ray task on a worker's resources when
Ray is up, else in this process) and logs ``vib_head.safetensors`` + ``vib_config.json`` on such
a run. The head's bytes travel to the workers with the trial (never stored in the database).

A head that fails to train (the guide cannot be loaded, a bad training config, the training task
dies) fails only the trials that need it: the sweep collects the failure (``ensure_heads(...,
failures=...)``), :func:`fail_untrained` records those trials as failed with the reason and the
other trials run. No FINISHED head run is left for it, so the next submit trains it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prunelab.db import repo
from prunelab.orchestrator.config import WorkersConfig
from prunelab.trial import Trial
from prunelab.workers.vib import HEAD_FILE, TRAIN_DEFAULTS, VibResult, train_vib

__all__ = [
    "STAGE_DEFAULTS",
    "VIB_EXPERIMENT",
    "attach_heads",
    "ensure_heads",
    "fail_untrained",
    "find_head",
    "head_spec",
    "log_head",
    "stage_problems",
]

VIB_EXPERIMENT = "prunelab-vib"
TAG_ROLE = "prunelab.role"
TAG_KEY = "prunelab.vib_key"
STAGE_DEFAULTS: dict[str, Any] = {"kind": "vib", "benchmark": "shapes", "split": "train",
                                  **TRAIN_DEFAULTS}  # fmt: skip
_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,),
    "benchmark": (str,),
    "split": (str,),
    "steps": (int,),
    "batch_size": (int,),
    "lr": (int, float),
    "weight_decay": (int, float),
    "lora_alpha": (int, float),
    "limit": (int, type(None)),
    "seed": (int,),
    "max_answer_tokens": (int,),
    "eval_samples": (int,),
}


def stage_problems(stages: Any, where: str) -> list[str]:
    """One line per problem of a spec's ``stages`` mapping (empty: fine)."""
    if not isinstance(stages, dict):
        return [f"stages={stages!r} {where}: must be a mapping of stage name -> settings"]
    problems = []
    for name, settings in stages.items():
        if not isinstance(settings, dict):
            problems.append(f"stages.{name} {where}: must be a mapping of settings")
            continue
        for key, value in settings.items():
            if key not in _TYPES:
                allowed = ", ".join(sorted(_TYPES))
                problems.append(f"unknown key 'stages.{name}.{key}' {where} (allowed: {allowed})")
            elif not isinstance(value, _TYPES[key]) or isinstance(value, bool):
                problems.append(f"stages.{name}.{key}={value!r} {where}: wrong type")
        if settings.get("kind", "vib") != "vib":
            problems.append(f"stages.{name}.kind={settings['kind']!r} {where}: only 'vib' exists")
        for key in ("steps", "batch_size", "max_answer_tokens", "eval_samples", "limit"):
            value = settings.get(key)
            if isinstance(value, int) and value < (0 if key == "steps" else 1):
                problems.append(f"stages.{name}.{key}={value} {where}: too small")
        if isinstance(settings.get("lr"), (int, float)) and not settings["lr"] > 0:
            problems.append(f"stages.{name}.lr={settings['lr']} {where}: must be > 0")
    return problems


def head_spec(
    stage: str,
    settings: dict[str, Any] | None,
    guide_config: dict[str, Any],
    guide_revision: str,
    benchmark_config: dict[str, Any],
    head_hparams: dict[str, Any],
) -> dict[str, Any]:
    """The ``vib_head`` entry of a trial config: ``key`` and the ``train`` config behind it."""
    merged = {**STAGE_DEFAULTS, **(settings or {})}
    train = {
        "guide": guide_config,
        "guide_revision": guide_revision,
        "benchmark": {**benchmark_config, "split": merged["split"]},
        "head": head_hparams,
        **{k: merged[k] for k in TRAIN_DEFAULTS},
    }
    if isinstance(train["lr"], int):
        train["lr"] = float(train["lr"])
    text = json.dumps(train, sort_keys=True, separators=(",", ":"), default=str)
    key = hashlib.sha256(text.encode()).hexdigest()
    return {"key": key, "stage": stage, "train": {**train, "key": key}}


# -- MLflow -------------------------------------------------------------------------------------
def find_head(tracker: Any, key: str) -> str | None:
    """Run id of a FINISHED run holding the head ``key`` (None: not trained yet)."""
    experiment = tracker.client.get_experiment_by_name(VIB_EXPERIMENT)
    if experiment is None:
        return None
    runs = tracker._search(
        experiment.experiment_id, f"tags.`{TAG_ROLE}` = 'vib' and tags.`{TAG_KEY}` = '{key}'"
    )
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return finished[0].info.run_id if finished else None


def log_head(tracker: Any, result: VibResult, train: dict[str, Any]) -> str:
    """Log a trained head on a new run of ``prunelab-vib``; returns the run id."""
    key = str(train["key"])
    client = tracker.client
    run = client.create_run(
        tracker.experiment_id(VIB_EXPERIMENT),
        tags={TAG_ROLE: "vib", TAG_KEY: key},
        run_name=f"vib-{train['guide'].get('name', 'guide')}-{key[:8]}",
    )
    run_id = run.info.run_id
    try:
        for name, value in {**train["head"], **{k: train[k] for k in TRAIN_DEFAULTS}}.items():
            client.log_param(run_id, name, value)
        client.log_param(run_id, "guide", train["guide"].get("name"))
        client.log_param(run_id, "benchmark", train["benchmark"].get("name"))
        client.log_param(run_id, "split", train["benchmark"].get("split"))
        for step, row in enumerate(result.losses):
            for name, value in row.items():
                client.log_metric(run_id, f"train_{name}", value, step=step)
        client.log_metric(run_id, "eval_loss_before", result.eval_before)
        client.log_metric(run_id, "eval_loss_after", result.eval_after)
        client.log_metric(run_id, "train_seconds", result.seconds)
        with tempfile.TemporaryDirectory(prefix="prunelab-vib-") as tmp:
            (Path(tmp) / HEAD_FILE).write_bytes(result.blob)
            (Path(tmp) / "vib_config.json").write_text(
                json.dumps(train, indent=2, sort_keys=True, default=str)
            )
            client.log_artifacts(run_id, tmp)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def head_blob(tracker: Any, run_id: str) -> bytes:
    """The safetensors bytes of the head logged on ``run_id``."""
    with tempfile.TemporaryDirectory(prefix="prunelab-vib-") as tmp:
        path = tracker.client.download_artifacts(run_id, HEAD_FILE, tmp)
        return Path(path).read_bytes()


def head_uri(tracker: Any, run_id: str) -> str:
    return f"{tracker.client.get_run(run_id).info.artifact_uri}/{HEAD_FILE}"


# -- before the trials ----------------------------------------------------------------------------
def _train_task(train: dict[str, Any]) -> VibResult:
    return train_vib(train)


def _train(train: dict[str, Any], workers: WorkersConfig | None) -> VibResult:
    """Train on a Ray task with a worker's resources when Ray is up, else in this process."""
    import ray

    if not ray.is_initialized():
        return train_vib(train)
    workers = workers or WorkersConfig()
    task = ray.remote(
        num_cpus=workers.cpus_per_worker, num_gpus=workers.gpus_per_worker, max_retries=0
    )(_train_task)
    return ray.get(task.remote(train))


def ensure_heads(
    tracker: Any,
    trials: Iterable[Trial],
    workers: WorkersConfig | None = None,
    echo: Any = print,
    failures: dict[str, str] | None = None,
) -> dict[str, bytes]:
    """The head of every distinct ``vib_head`` key among ``trials``: reused from MLflow
    when trained before, else trained and logged now. Returns {key: safetensors bytes}.

    A head whose training or logging raises: with ``failures`` given, its key -> a one-line
    reason (head, training config, error) goes there, it is absent from the result and the
    other heads are still handled; without ``failures`` the exception propagates."""
    trials = list(trials)
    blobs: dict[str, bytes] = {}
    for trial in trials:
        spec = trial.vib_head
        if not spec or spec["key"] in blobs or spec["key"] in (failures or {}):
            continue
        key = spec["key"]
        run_id = find_head(tracker, key)
        if run_id is not None:
            echo(f"vib head {key[:12]} ({spec.get('stage')}): reusing run {run_id}")
            blobs[key] = head_blob(tracker, run_id)
            continue
        guide = spec["train"]["guide"].get("name")
        echo(f"vib head {key[:12]} ({spec.get('stage')}): training on {guide}")
        try:
            result = _train(spec["train"], workers)
            run_id = log_head(tracker, result, spec["train"])  # a failed log ends FAILED
        except Exception as exc:
            if failures is None:
                raise
            failures[key] = _failure(spec, exc)
            users = sum((t.vib_head or {}).get("key") == key for t in trials)
            echo(f"{failures[key]} ({users} trial(s) that need it fail, the others run)")
            continue
        echo(
            f"vib head {key[:12]}: trained in {result.seconds:.1f} s, eval loss "
            f"{result.eval_before:.4g} -> {result.eval_after:.4g} (run {run_id})"
        )
        blobs[key] = result.blob
    return blobs


def _failure(spec: dict[str, Any], exc: BaseException) -> str:
    """One line: which head (key, stage, guide, training data and settings) failed, and why."""
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause  # the training task's own exception, without Ray's traceback dump
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    if len(message) > 500:
        message = message[:497] + "..."
    train = spec["train"]
    bench = train["benchmark"]
    settings = ", ".join(f"{k}={train[k]}" for k in ("steps", "batch_size", "lr", "limit"))
    return (
        f"vib head {spec['key'][:12]} (stage {spec.get('stage')!r}: guide "
        f"{train['guide'].get('name')}, {bench.get('name')}/{bench.get('split')}, {settings}, "
        f"gate={train['head'].get('gate')}) failed to train: {message}"
    )


def fail_untrained(
    sessions: Any, orchestrator: str, dispatches: list[Any], failures: dict[str, str]
) -> tuple[list[Any], list[Any]]:
    """Split ``dispatches`` (with ``trial_id`` and ``trial``) on their head: those whose head
    failed (``failures``: key -> reason, from :func:`ensure_heads`) are claimed and failed in
    the database with the reason, as an attempt that failed for good, and are not to be
    dispatched. A trial another orchestrator holds is left to it. Returns (to run, failed)."""
    run, failed = [], []
    for dispatch in dispatches:
        spec = dispatch.trial.vib_head
        reason = failures.get(spec["key"]) if spec else None
        if reason is None:
            run.append(dispatch)
            continue
        with sessions.begin() as session:
            if repo.claim_trial(session, dispatch.trial_id, orchestrator, "", None):
                repo.fail_trial(session, dispatch.trial_id, reason)
                failed.append(dispatch)
    return run, failed


def attach_heads(dispatches: Iterable[Any], blobs: dict[str, bytes]) -> list[Any]:
    """The dispatches, each trial with a head carrying its bytes as ``vib_head.state``."""
    attached = []
    for dispatch in dispatches:
        spec = dispatch.trial.vib_head
        if spec:
            head = {**spec, "state": blobs[spec["key"]]}
            dispatch = dataclasses.replace(dispatch, trial=dispatch.trial.with_head(head))
        attached.append(dispatch)
    return attached
