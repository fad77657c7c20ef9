"""Scores without a model.

``prunelab score BENCHMARK ROWS.jsonl`` scores saved predictions of any origin (one JSON
object per line: the benchmark's dataset columns, ``id`` and the raw ``prediction``).

``prunelab rescore SWEEP --scoring RULE`` scores the stored predictions of a finished sweep's
trials under the other rule. Each rescored trial is a new trial (its ``eval.scoring`` differs,
so does its key) with the original's cost metrics, the new score metrics and intervals, in a
new sweep ``<sweep>.<rule>`` with its own MLflow parent run and table; its child runs carry the
tag ``prunelab.rescored_from`` (the run whose predictions were scored). Nothing is rerun. A
later sweep with ``eval.scoring=RULE`` reuses the rescored trials: generation is the same.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prunelab.orchestrator.config import SCORING_RULES

__all__ = ["load_rows", "rescore_sweep", "resolve_benchmark", "score_file"]


def resolve_benchmark(ref: str) -> dict[str, Any]:
    """A benchmark config: a shipped one by name (``textvqa``), or a YAML file."""
    from prunelab.registry import did_you_mean
    from prunelab.sweeps import SWEEPS_DIR, group_config

    path = Path(ref)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"benchmark file {ref}: expected a mapping")
        return data
    try:
        return group_config("benchmark", ref)
    except (FileNotFoundError, OSError):
        known = sorted(p.stem for p in (SWEEPS_DIR / "benchmark").glob("*.yaml"))
        raise ValueError(
            f"benchmark {ref!r}: no such benchmark config or YAML file{did_you_mean(ref, known)}"
        ) from None


def load_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` of each non-blank line; ValueError naming a bad line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {number}: not JSON ({exc.msg})") from None


def score_file(benchmark: str, rows: Path, scoring: str) -> dict[str, Any]:
    """``{"samples": [...], "metrics": {...}}`` of the saved predictions in ``rows``."""
    from prunelab.workers.benchmarks.offline import RowError, score_rows

    if scoring not in SCORING_RULES:
        raise ValueError(f"--scoring={scoring!r}: expected one of {', '.join(SCORING_RULES)}")
    config = resolve_benchmark(benchmark)
    try:
        scored = score_rows(config, load_rows(rows), scoring)
    except RowError as exc:
        raise ValueError(f"{rows} {exc}") from None
    return {"samples": scored.samples, "metrics": scored.metrics}


# -- rescoring a sweep ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Rescored:
    """What the sweep recorder needs of a trial it did not dispatch (cf. scheduler.Dispatch)."""

    trial_id: int
    trial: Any


def _retarget(trial: Any, scoring: str) -> Any:
    """The trial under ``scoring``, with its key (computed as the planner computes it)."""
    import prunelab.methods as M
    from prunelab.trial import trial_key
    from prunelab.workers.benchmarks import build_benchmark
    from prunelab.workers.models import describe_model

    moved = dataclasses.replace(trial, eval=dataclasses.replace(trial.eval, scoring=scoring))
    key = trial_key(
        moved,
        method_version=M.get(trial.method).version,
        model_revision=describe_model(dict(trial.model_config)).revision,
        benchmark_identity=build_benchmark(dict(trial.benchmark_config)).describe(),
    )
    return dataclasses.replace(moved, key=key)


def _rescored_result(tracker: Any, row: Any, trial: Any) -> Any:
    """The :class:`TrialResult` of ``row``'s stored predictions scored as ``trial`` says."""
    from prunelab.metrics import depends_on_scoring, lookup
    from prunelab.trial import TrialResult
    from prunelab.workers.benchmarks import build_benchmark
    from prunelab.workers.benchmarks.resampling import score_summary

    text = tracker.read_artifact(row.mlflow_run_id, "predictions.jsonl")
    if text is None:
        raise LookupError(f"trial {row.id}: its run {row.mlflow_run_id} has no predictions.jsonl")
    predictions = [json.loads(line) for line in text.splitlines() if line.strip()]
    benchmark = build_benchmark({**trial.benchmark_config, "scoring": trial.eval.scoring})
    samples = {s.id: s for s in benchmark.samples(trial.eval.limit, trial.eval.sample_seed)}
    scored = []
    for p in predictions:
        sample = samples.get(str(p["id"]))
        if sample is None:
            raise LookupError(f"trial {row.id}: sample {p['id']!r} is not in the benchmark data")
        scored.append((sample, p["prediction"], benchmark.score(p["prediction"], sample)))
    metrics, replicates = score_summary(benchmark, scored)
    kept = {  # the cost metrics; baseline-relative ones are derived again when logged
        k: v
        for k, v in (row.metrics or {}).items()
        if not depends_on_scoring(k) and (lookup(k) is None or lookup(k).aggregate != "relative")
    }
    rescored = [{**p, "score": score} for p, (_, _, score) in zip(predictions, scored, strict=True)]
    return TrialResult(
        metrics={**kept, **metrics},
        predictions=rescored,
        replicates=tuple(float(r) for r in replicates),
        worker="rescore",
        node=socket.gethostname(),
        rescored_from=row.mlflow_run_id,
    )


def rescore_sweep(ref: str, scoring: str, stores: Any) -> int:
    """Rescore sweep ``ref``'s finished trials under ``scoring`` into the sweep
    ``<name>.<scoring>``; the exit status (0; 1 when a trial could not be rescored)."""
    from prunelab.db import init_db, repo, session_factory
    from prunelab.orchestrator.sweep import Recorder, close_sweep, orchestrator_id
    from prunelab.orchestrator.tracking import Tracker

    if scoring not in SCORING_RULES:
        raise ValueError(f"--scoring={scoring!r}: expected one of {', '.join(SCORING_RULES)}")
    # one predictions.jsonl download per trial: MLflow's bar for each would bury the table
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    engine = init_db(stores.db_url)
    sessions = session_factory(engine)
    with sessions() as session:
        sweep = repo.get_sweep(session, ref)
        if sweep is None:
            raise LookupError(f"no sweep with id or name {ref!r}")
        rows = [t for t in repo.sweep_trials(session, sweep.id) if t.status == "finished"]
        for row in rows:
            session.expunge(row)
        spec = dict(sweep.spec or {})
    if not rows:
        raise LookupError(f"sweep {ref!r} has no finished trials to rescore")
    if all(row.trial.eval.scoring == scoring for row in rows):
        raise ValueError(f"sweep {ref!r} is already scored under {scoring}")
    name = f"{sweep.name}.{scoring}"
    spec.update(name=name, eval={**(spec.get("eval") or {}), "scoring": scoring})
    planned = [(row, _retarget(row.trial, scoring)) for row in rows]
    orchestrator = orchestrator_id()
    tracker = Tracker(stores.tracking_uri, stores.artifact_root)
    with sessions.begin() as session:
        created = repo.create_sweep(session, name, spec, yaml.safe_dump(spec), orchestrator)
        new_id = created.id
        new_rows, already = repo.add_trials(
            session, new_id, [(t.key, t.to_dict(), t.is_baseline) for _, t in planned]
        )
        pending = {r.trial_key for r in new_rows if r.status == "pending"}
        ids = {r.trial_key: r.id for r in new_rows}
    print(
        f"rescoring sweep {sweep.name} as {name} ({new_id}): {len(planned)} trials, "
        f"{already} already scored under {scoring}"
    )
    parent = tracker.start_sweep(
        name, new_id, {"spec": yaml.safe_dump(spec)[:6000], "rescored_from": sweep.id}
    )
    with sessions.begin() as session:
        repo.set_sweep_mlflow_run(session, new_id, parent)
    recorder = Recorder(engine, tracker, new_id, orchestrator)
    for row, trial in planned:
        if trial.key not in pending:
            continue
        handle = _Rescored(ids[trial.key], trial)
        if not recorder.claim(handle, "rescore"):
            continue  # another process claimed it meanwhile
        try:
            result = _rescored_result(tracker, row, trial)
        except (LookupError, KeyError, ValueError) as exc:
            recorder.failed(handle, f"rescore: {exc}", retryable=False)
            continue
        recorder.done(handle, result)
    recorder.flush()
    return close_sweep(recorder)
