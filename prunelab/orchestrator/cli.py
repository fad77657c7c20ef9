"""``prunelab``: submit, resume, inspect and report sweeps.

Exit status: 0 when every trial finished, 1 when some failed (or workers kept dying while
starting), 2 on bad input (one line per problem on stderr, before any worker starts and before
anything is written), 75 when no worker could be placed within ``workers.placement_timeout_s``
(the sweep is left resumable), 130 when interrupted by Ctrl-C or SIGTERM (the sweep is left
resumable: one line says how far it got and how to resume it), 141 when stdout was closed
(``prunelab status | head -1``; nothing more is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["main"]

BAD_INPUT = 2
WORKERS_FAILED = 1  # as a sweep with failed trials: workers kept dying while starting
NOT_PLACED = 75  # EX_TEMPFAIL: no worker could be placed; resume once the cluster can
INTERRUPTED = 130  # 128 + SIGINT, for SIGTERM too: both stop a sweep the same way
BROKEN_PIPE = 141  # 128 + SIGPIPE, what a tool killed by the closed pipe would return
SCORING = ("lmms_eval", "official")  # prunelab.orchestrator.config.SCORING_RULES (not imported)


class UsageError(Exception):
    """Bad input: each line of ``problems`` is printed on stderr and the exit status is 2."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def _stores(args: argparse.Namespace):
    from prunelab.db.engine import default_db_url
    from prunelab.orchestrator.sweep import Stores
    from prunelab.orchestrator.tracking import default_artifact_root, default_tracking_uri

    tracking_uri = args.tracking_uri or default_tracking_uri()
    # an MLflow server decides where artifacts go (it serves them); a local store gets ours
    served = tracking_uri.startswith(("http://", "https://"))
    return Stores(
        db_url=args.db_url or default_db_url(),
        tracking_uri=tracking_uri,
        artifact_root=args.artifact_root or (None if served else default_artifact_root()),
        ray_address=args.ray_address or os.environ.get("RAY_ADDRESS"),
    )


def _check_stores(stores) -> None:
    """Reject unusable store URLs before anything runs."""
    from prunelab.db.engine import DatabaseUnavailableError, check_db_url

    problems = []
    try:
        check_db_url(stores.db_url)
    except DatabaseUnavailableError as exc:
        problems.append(f"--db-url / PRUNELAB_DB_URL: {exc}")
    scheme = stores.tracking_uri.split(":", 1)[0]
    if scheme not in ("sqlite", "postgresql", "postgresql+psycopg", "http", "https", "file"):
        problems.append(
            f"--tracking-uri / PRUNELAB_TRACKING_URI={stores.tracking_uri!r}: expected a "
            "sqlite://, postgresql://, http(s):// or file: URI"
        )
    if problems:
        raise UsageError(problems)


def _engine_if_exists(db_url: str):
    """An engine on an existing database, or None (read-only commands never create one)."""
    from sqlalchemy import inspect

    from prunelab.db.engine import make_engine, normalize_db_url

    url = normalize_db_url(db_url)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        return None
    engine = make_engine(db_url)
    if not inspect(engine).has_table("trials"):
        return None
    return engine


# -- commands ---------------------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    from prunelab.orchestrator.spec import SpecError, load_sweep

    overrides = list(args.overrides)
    if args.workers is not None:
        if args.workers < 1:
            raise UsageError([f"--workers={args.workers}: must be >= 1"])
        overrides.append(f"workers.count={args.workers}")
    try:
        plan = load_sweep(args.spec, overrides)
    except SpecError as exc:
        raise UsageError(exc.problems) from None
    stores = _stores(args)
    _check_stores(stores)
    if args.dry_run:
        return _dry_run(plan, stores)
    from prunelab.orchestrator.sweep import submit_sweep

    if args.rerun or _unfinished(plan, stores):
        _check_local_placement(plan.workers, plan.origins, stores)
    args.running = _Running(stores, plan.name, _sweep_ids(stores, plan.name))
    return submit_sweep(plan, stores, rerun=args.rerun)


def _unfinished(plan: Any, stores) -> bool:
    """Whether any trial of ``plan`` is not finished in the database (read only)."""
    from prunelab.db import repo, session_factory

    engine = _engine_if_exists(stores.db_url)
    if engine is None:
        return True
    with session_factory(engine)() as session:
        found = repo.trials_by_keys(session, [t.key for t in plan.trials])
    return any(t.key not in found or found[t.key].status != "finished" for t in plan.trials)


def _check_local_placement(workers: Any, origins: dict[str, str], stores) -> None:
    """A local Ray started by prunelab has this machine's CPUs and GPUs and no more, so a
    worker that fits on no node is bad input, found before anything is written (the Ray
    started here is the sweep's). A cluster may still grow (an autoscaler adds nodes), so a
    sweep there waits instead, at most ``workers.placement_timeout_s``."""
    from prunelab.orchestrator.scheduler import (
        cluster_capacity,
        held_ray_logs,
        is_local,
        placement_problems,
        replay_logs,
        start_ray,
    )

    if not is_local(stores.ray_address):
        return
    with held_ray_logs() as notices:  # Ray's start-up notices: after the check, if it passes
        start_ray(stores.ray_address)
    problems = placement_problems(
        workers.cpus_per_worker,
        workers.gpus_per_worker,
        cluster_capacity(),
        origins,
        "the local Ray started by prunelab (set --ray-address to use a cluster)",
    )
    if problems:
        raise UsageError(problems)
    replay_logs(notices)


def _dry_run(plan: Any, stores) -> int:
    from prunelab.db import repo, session_factory
    from prunelab.orchestrator.estimate import earlier_throughput, estimate_tflops
    from prunelab.orchestrator.results import budget_label

    done: set[str] = set()
    throughput: dict[str, Any] = {}  # model -> Throughput of its earlier finished trials
    engine = _engine_if_exists(stores.db_url)
    if engine is not None:
        with session_factory(engine)() as session:
            found = repo.trials_by_keys(session, [t.key for t in plan.trials])
            done = {k for k, t in found.items() if t.status == "finished"}
            throughput = earlier_throughput(session, {t.model for t in plan.trials})
    print(f"sweep {plan.name}: {len(plan.trials)} trials, {len(done)} already finished")
    print(
        f"{'key':10}  {'model':16} {'benchmark':10} {'method':12} {'budget':7} {'layer':5} "
        f"{'seed':4}  hparams"
    )
    total_tflops = 0.0
    model_tflops: dict[str, float] = {}  # per model, of the trials to run
    for trial in plan.trials:
        tflops = estimate_tflops(trial)
        if trial.key not in done:
            total_tflops += tflops
            model_tflops[trial.model] = model_tflops.get(trial.model, 0.0) + tflops
        mark = " (done)" if trial.key in done else ""
        print(
            f"{trial.key[:10]}  {trial.model:16} {trial.benchmark:10} {trial.method:12} "
            f"{budget_label(trial):7} {_blank(trial.prune_layer):5} {_blank(trial.seed):4}  "
            f"{json.dumps(trial.hparams)}{mark}"
        )
    todo = [t for t in plan.trials if t.key not in done]
    limit = plan.eval.limit
    samples = f"{limit * len(todo)} samples" if limit is not None else "all samples"
    print(
        f"to run: {len(todo)} trials, {samples}, about {total_tflops:.3g} TFLOPs of LLM "
        f"prefill ({plan.eval.flops_convention} convention)"
    )
    workers = max(1, plan.workers.count)
    for model, tflops in model_tflops.items():
        measured = throughput.get(model)
        if measured is None:
            print(f"  {model}: no finished trials of this model yet, no measured time estimate")
            continue
        seconds = measured.seconds(tflops)
        print(
            f"  {model}: about {_duration(seconds)} of model time at the throughput of "
            f"{measured.trials} earlier trial(s) ({measured.tflops_per_s:.3g} TFLOPs/s), "
            f"~{_duration(seconds / workers)} on {workers} worker(s)"
        )
    return 0


def _duration(seconds: float) -> str:
    """``42 s``, ``3.5 min`` or ``2.1 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _blank(value: Any) -> str:
    return "" if value is None else str(value)


def cmd_resume(args: argparse.Namespace) -> int:
    from prunelab.orchestrator.sweep import resume_sweep

    stores = _stores(args)
    _check_stores(stores)
    if _engine_if_exists(stores.db_url) is None:
        raise UsageError([f"no prunelab database at {stores.db_url}"])
    recorded = _recorded_workers(stores, args.sweep)
    if recorded is not None:
        origins = {f"workers.{k}": f"(recorded with sweep {args.sweep})" for k in recorded}
        _check_local_placement(_workers_config(recorded), origins, stores)
    args.running = _Running(stores, args.sweep, known=None)
    try:
        return resume_sweep(args.sweep, stores)
    except LookupError as exc:
        raise UsageError([str(exc.args[0])]) from None


def _recorded_workers(stores, ref: str) -> dict[str, Any] | None:
    """The ``workers`` section a sweep was recorded with (None: no such sweep)."""
    from prunelab.db import repo, session_factory

    engine = _engine_if_exists(stores.db_url)
    if engine is None:
        return None
    with session_factory(engine)() as session:
        sweep = repo.get_sweep(session, ref)
        return None if sweep is None else dict((sweep.spec or {}).get("workers") or {})


def _workers_config(recorded: dict[str, Any]) -> Any:
    """A recorded ``workers`` section as the schema's type (settings it lacks: defaults)."""
    import dataclasses

    from prunelab.orchestrator.config import WorkersConfig

    known = {f.name for f in dataclasses.fields(WorkersConfig)}
    return WorkersConfig(**{k: v for k, v in recorded.items() if k in known})


def cmd_status(args: argparse.Namespace) -> int:
    from prunelab.db import repo, session_factory

    stores = _stores(args)
    engine = _engine_if_exists(stores.db_url)
    if engine is None:
        if args.sweep:
            raise UsageError([f"no prunelab database at {stores.db_url}"])
        print("[]" if args.json else "no sweeps yet")
        return 0
    with session_factory(engine)() as session:
        if not args.sweep:
            sweeps = [
                {
                    "id": s.id,
                    "name": s.name,
                    "created": s.created.isoformat(timespec="seconds"),
                    "status": s.status,
                    "trials": repo.trial_status_counts(session, s.id),
                }
                for s in repo.list_sweeps(session)
            ]
            if args.json:
                print(json.dumps(sweeps, indent=2))
            else:
                for s in sweeps:
                    counts = ", ".join(f"{n} {k}" for k, n in sorted(s["trials"].items()))
                    print(f"{s['id']}  {s['name']:20} {s['created']}  {s['status']:11} {counts}")
            return 0
        sweep = repo.get_sweep(session, args.sweep)
        if sweep is None:
            raise UsageError([f"no sweep with id or name {args.sweep!r}"])
        rows = [(t, t.trial) for t in repo.sweep_trials(session, sweep.id)]
        trials = [
            {
                "id": t.id,
                "trial_key": t.trial_key,
                "method": trial.method,
                "model": trial.model,
                "benchmark": trial.benchmark,
                "keep_ratio": trial.keep_ratio,
                "keep_tokens": trial.keep_tokens,
                "prune_layer": trial.prune_layer,
                "status": t.status,
                "attempts": t.attempts,
                "worker": t.worker,
                "error": t.error,
                "score": (t.metrics or {}).get("score"),
                "mlflow_run_id": t.mlflow_run_id,
            }
            for t, trial in rows
        ]
    progress = _progress(t["status"] for t in trials)
    if args.json:
        print(json.dumps({"id": sweep.id, "name": sweep.name, "status": sweep.status,
                          "progress": progress, "trials": trials}, indent=2))  # fmt: skip
        return 0
    print(f"sweep {sweep.name} ({sweep.id}): {sweep.status}")
    print(
        f"progress: {progress['finished']}/{progress['total']} finished, "
        f"{progress['running']} running, {progress['pending']} pending, "
        f"{progress['failed']} failed"
    )
    for t in trials:
        budget = t["keep_tokens"] or t["keep_ratio"] or ""
        score = "" if t["score"] is None else f"{t['score']:.1f}"
        error = f"  {t['error'].splitlines()[0][:80]}" if t["error"] else ""
        print(
            f"{t['id']:5} {t['trial_key'][:10]} {t['method']:12} {budget!s:6} "
            f"{'' if t['prune_layer'] is None else t['prune_layer']!s:3} {t['status']:9} "
            f"attempts={t['attempts']} {score}{error}"
        )
    return 0


def _progress(statuses: Iterable[str]) -> dict[str, int]:
    """Trials per status (every status, zero included) and ``total``."""
    counts = dict.fromkeys(("finished", "running", "pending", "failed"), 0)
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return {**counts, "total": sum(counts.values())}


def cmd_report(args: argparse.Namespace) -> int:
    from prunelab.db import repo, session_factory
    from prunelab.orchestrator.results import (
        build_report,
        report_csv,
        report_latex,
        report_markdown,
    )

    stores = _stores(args)
    engine = _engine_if_exists(stores.db_url)
    if engine is None:
        raise UsageError([f"no prunelab database at {stores.db_url}"])
    with session_factory(engine)() as session:
        sweep = repo.get_sweep(session, args.sweep)
        if sweep is None:
            raise UsageError([f"no sweep with id or name {args.sweep!r}"])
        report = build_report(
            (t.trial, t.status, t.metrics, t.replicates)
            for t in repo.sweep_trials(session, sweep.id)
        )
    render = {"md": report_markdown, "csv": report_csv, "latex": report_latex}[args.format]
    text = render(report)
    if args.out:
        _write_output("--out", args.out, text.encode())
    else:
        sys.stdout.write(text)
    if args.pareto:
        from prunelab.orchestrator.plots import pareto_png

        _write_output("--pareto", args.pareto, pareto_png(report))
    return 0


def _write_output(flag: str, path: str, content: bytes) -> None:
    """Write a file the user named; one that cannot be written is bad input."""
    try:
        Path(path).write_bytes(content)
    except OSError as exc:
        raise UsageError([f"{flag} {path}: cannot write: {exc.strerror or exc}"]) from None


def cmd_methods(args: argparse.Namespace) -> int:
    import prunelab.methods as methods

    rows = []
    for name in methods.available():
        cls = methods.get(name)
        axes = [a for a, used in (("budget", cls.uses_budget), ("prune_layer", cls.uses_layer),
                                  ("seed", cls.uses_seed)) if used]  # fmt: skip
        rows.append(
            {
                "name": name,
                "version": cls.version,
                "stages": cls.stages,
                "axes": axes,
                "default_prune_layer": cls.default_prune_layer,
                "hyperparameters": cls.hyperparameters(),
                "paper": cls.paper,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max((len(row["name"]) for row in rows), default=0) + 1
    pad = " " * (width + 2)
    for row in rows:
        hps = ", ".join(f"{k}={v!r}" for k, v in row["hyperparameters"].items()) or "-"
        layer = row["default_prune_layer"]
        print(f"{row['name']:{width}} v{row['version']}  stage: {row['stages']}")
        print(f"{pad}axes: {', '.join(row['axes']) or '-'}"
              + (f" (default prune_layer={layer})" if layer is not None else ""))  # fmt: skip
        print(f"{pad}hyperparameters: {hps}")
        if row["paper"]:
            print(f"{pad}paper: {row['paper']}")
    return 0


def cmd_train_vib(args: argparse.Namespace) -> int:
    """Train (or reuse) one PGP VIB head on a guide model and log it to MLflow."""
    import prunelab.methods as methods
    from prunelab.orchestrator.tracking import Tracker
    from prunelab.orchestrator.vib_stage import (
        find_head,
        head_spec,
        head_uri,
        log_head,
        stage_problems,
    )
    from prunelab.sweeps import group_config
    from prunelab.workers.models import describe_model
    from prunelab.workers.vib import train_vib

    problems: list[str] = []
    configs: dict[str, dict[str, Any]] = {}
    for group, name in (("model", args.guide), ("benchmark", args.benchmark)):
        try:
            configs[group] = group_config(group, name)
        except FileNotFoundError:
            flag = "--guide" if group == "model" else "--benchmark"
            problems.append(f"{flag}={name}: no {group} config prunelab/sweeps/{group}/{name}.yaml")
    hparams: dict[str, Any] = {}
    for item in args.hparam or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            problems.append(f"--hparam {item!r}: expected NAME=VALUE")
            continue
        import yaml

        hparams[name] = yaml.safe_load(value)
    method = None
    try:
        method = methods.get("pgp").from_hparams(hparams)
    except (ValueError, TypeError) as exc:
        problems.append(f"--hparam: {exc}")
    settings = {
        k: v
        for k, v in {
            "split": args.split, "steps": args.steps, "batch_size": args.batch_size,
            "lr": args.lr, "limit": args.limit, "seed": args.seed, "lora_alpha": args.lora_alpha,
        }.items()
        if v is not None
    }  # fmt: skip
    problems += stage_problems({"train-vib": settings}, "(command line)")
    info = None
    if "model" in configs:
        try:
            info = describe_model(configs["model"])
        except Exception as exc:  # config checks of third-party classes raise many kinds
            problems.append(f"--guide={args.guide}: {str(exc).splitlines()[0]}")
    if problems:
        raise UsageError(problems)
    assert method is not None and info is not None
    spec = head_spec(
        "train-vib", settings, configs["model"], info.revision, configs["benchmark"],
        method.head_hparams(),  # type: ignore[attr-defined]
    )  # fmt: skip
    stores = _stores(args)
    _check_stores(stores)
    tracker = Tracker(stores.tracking_uri, stores.artifact_root)
    run_id = None if args.retrain else find_head(tracker, spec["key"])
    if run_id is not None:
        print(f"vib head {spec['key']}: already trained (run {run_id}); --retrain to train again")
    else:

        def progress(step: int, steps: int, loss: float) -> None:
            if step == 1 or step == steps or step % max(1, steps // 10) == 0:
                print(f"step {step}/{steps}: loss {loss:.4f}", flush=True)

        result = train_vib(spec["train"], progress=progress)
        run_id = log_head(tracker, result, spec["train"])
        print(
            f"trained in {result.seconds:.1f} s; eval loss {result.eval_before:.4f} -> "
            f"{result.eval_after:.4f}"
        )
    print(f"key: {spec['key']}")
    print(f"run: {run_id}")
    print(f"uri: {head_uri(tracker, run_id)}")
    return 0


def ui_command(stores, host: str, port: int) -> list[str]:
    """The ``mlflow server`` command serving the UI (and artifacts) on ``stores``' tracking store.

    A database store gets the driver prunelab uses (psycopg 3 for PostgreSQL); experiments
    created from the UI put their artifacts under the configured artifact root, and existing
    ones are served from where they are.
    """
    from prunelab.db.engine import normalize_db_url

    store = stores.tracking_uri
    if store.split(":", 1)[0] in ("postgresql", "postgres"):
        store = normalize_db_url(store).render_as_string(hide_password=False)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", store,
        "--host", host, "--port", str(port),
    ]  # fmt: skip
    if stores.artifact_root:
        root = stores.artifact_root
        if "://" not in root:
            root = Path(root).expanduser().resolve().as_uri()
        command += ["--serve-artifacts", "--artifacts-destination", root]
    return command


def cmd_ui(args: argparse.Namespace) -> int:
    stores = _stores(args)
    if stores.tracking_uri.startswith(("http://", "https://")):
        print(f"the tracking store is an MLflow server already: open {stores.tracking_uri}")
        return 0
    command = ui_command(stores, args.host, args.port)
    print(f"MLflow UI on http://{args.host}:{args.port} (store {stores.tracking_uri})")
    sys.stdout.flush()
    os.execv(sys.executable, command)
    return 0  # not reached


# -- parser -------------------------------------------------------------------------------------
def cmd_score(args: argparse.Namespace) -> int:
    from prunelab.orchestrator.rescore import score_file

    try:
        scored = score_file(args.benchmark, Path(args.rows), args.scoring)
    except ValueError as exc:
        raise UsageError([str(exc)]) from None
    if args.json:
        print(json.dumps(scored, ensure_ascii=False))
    else:
        for name, value in sorted(scored["metrics"].items()):
            print(f"{name:24} {value:.4f}")
    return 0


def cmd_rescore(args: argparse.Namespace) -> int:
    from prunelab.orchestrator.rescore import rescore_sweep

    stores = _stores(args)
    _check_stores(stores)
    if _engine_if_exists(stores.db_url) is None:
        raise UsageError([f"no prunelab database at {stores.db_url}"])
    try:
        return rescore_sweep(args.sweep, args.scoring, stores)
    except (LookupError, ValueError) as exc:
        raise UsageError([str(exc.args[0])]) from None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", help="MLflow store (env PRUNELAB_TRACKING_URI)")
    common.add_argument("--db-url", help="prunelab database (env PRUNELAB_DB_URL)")
    common.add_argument("--artifact-root", help="MLflow artifacts (env PRUNELAB_ARTIFACT_ROOT)")
    common.add_argument("--ray-address", help="Ray cluster to join (env RAY_ADDRESS)")

    parser = argparse.ArgumentParser(
        prog="prunelab", description="Ablation sweeps of visual-token pruning on VLMs."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sweep", parents=[common], help="submit and run a sweep")
    p.add_argument("spec", help="spec file (YAML) or name of a shipped spec (e.g. quickstart)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. method=fastv,pdrop")
    p.add_argument("--dry-run", action="store_true", help="print the trials and an estimate")
    p.add_argument("--workers", type=int, help="number of Ray workers (workers.count)")
    p.add_argument("--rerun", action="store_true", help="run finished trials again")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("resume", parents=[common], help="finish an interrupted sweep")
    p.add_argument("sweep", help="sweep id or name")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("status", parents=[common], help="sweeps, or one sweep's trials")
    p.add_argument("sweep", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("report", parents=[common], help="baseline-relative results table")
    p.add_argument("sweep")
    p.add_argument("--format", choices=("md", "csv", "latex"), default="md")
    p.add_argument("--out", help="write the table to this file instead of stdout")
    p.add_argument("--pareto", metavar="PNG", help="also write the Pareto plot to this file")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("methods", help="registered methods and their hyperparameters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("train-vib", parents=[common], help="train a PGP VIB head on a guide")
    p.add_argument("--guide", required=True, help="guide model config (e.g. tiny-llava-small)")
    p.add_argument("--benchmark", default="shapes", help="training data (benchmark config)")
    p.add_argument("--split", help="benchmark split (default train)")
    p.add_argument("--steps", type=int, help="optimiser steps (0: one epoch over --limit)")
    p.add_argument("--batch-size", type=int, help="samples per step")
    p.add_argument("--lr", type=float, help="AdamW learning rate")
    p.add_argument("--limit", type=int, help="training samples")
    p.add_argument("--seed", type=int)
    p.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (scale = alpha/rank)")
    p.add_argument("--hparam", action="append", metavar="NAME=VALUE",
                   help="a pgp head hyperparameter, e.g. gate=exp, lora_rank=0")  # fmt: skip
    p.add_argument("--retrain", action="store_true", help="train even if the head exists")
    p.set_defaults(func=cmd_train_vib)

    p = sub.add_parser("score", help="score saved predictions (JSON lines) without a model")
    p.add_argument("benchmark", help="benchmark config name (e.g. textvqa) or YAML file")
    p.add_argument("rows", help="JSON lines: the dataset columns, `id` and `prediction`")
    p.add_argument("--scoring", choices=SCORING, default="lmms_eval")
    p.add_argument("--json", action="store_true", help="per-sample scores and metrics as JSON")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("rescore", parents=[common], help="rescore a sweep's predictions")
    p.add_argument("sweep", help="sweep id or name")
    p.add_argument("--scoring", choices=SCORING, required=True)
    p.set_defaults(func=cmd_rescore)

    p = sub.add_parser("ui", parents=[common], help="serve the MLflow UI on the store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    return parser


# -- interruptions, resumable stops and closed pipes --------------------------------------------
@dataclass(frozen=True)
class _Running:
    """The sweep a command runs, to say how far it got when it stops early: ``ref`` (a name
    or id) and, for a new sweep, the ids of the sweeps of that name that existed before."""

    stores: Any
    ref: str
    known: frozenset[str] | None


def _sweep_ids(stores, name: str) -> frozenset[str]:
    """Ids of the recorded sweeps named ``name`` (read only; none without a database)."""
    from sqlalchemy import select

    from prunelab.db import Sweep, session_factory

    engine = _engine_if_exists(stores.db_url)
    if engine is None:
        return frozenset()
    with session_factory(engine)() as session:
        return frozenset(session.scalars(select(Sweep.id).where(Sweep.name == name)))


def _progress_line(running: _Running | None) -> str:
    """``after 11/37 trials; resume with `prunelab resume NAME``` for the sweep a command was
    running, or why there is nothing to resume."""
    nothing = "before the sweep was recorded; nothing to resume"
    if running is None:
        return nothing
    from prunelab.db import repo, session_factory

    try:
        engine = _engine_if_exists(running.stores.db_url)
        if engine is None:
            return nothing
        with session_factory(engine)() as session:
            sweep = repo.get_sweep(session, running.ref)
            if sweep is None or (running.known is not None and sweep.id in running.known):
                return nothing
            counts = repo.trial_status_counts(session, sweep.id)
            newest = repo.get_sweep(session, sweep.name)
            ref = sweep.name if newest is not None and newest.id == sweep.id else sweep.id
    except Exception as exc:  # the store may be what failed: still say how to go on
        return f"progress unknown ({exc}); resume with `prunelab resume {running.ref}`"
    done, total = counts.get("finished", 0), sum(counts.values())
    return f"after {done}/{total} trials; resume with `prunelab resume {ref}`"


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGINT (Ctrl-C) and SIGTERM (docker stop, Slurm, systemd) raise KeyboardInterrupt in
    the main thread, the first time: the sweep's own clean-up (its running trials back to
    pending, its workers stopped, its runs marked KILLED) then runs without a second signal
    cutting it short. A signal the parent set to be ignored stays ignored. The handlers in
    place before are put back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = [False]

    def stop(signum: int, frame: Any) -> None:
        if not fired[0]:
            fired[0] = True
            raise KeyboardInterrupt

    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN:
            continue
        previous[signum] = signal.SIG_DFL if current is None else current
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop_ray() -> None:
    """End this process's Ray session now (a local Ray's processes with it), if any."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _error(line: str) -> None:
    print(f"prunelab: error: {line}", file=sys.stderr)


def _pool_error(exc: Exception) -> int | None:
    """The exit status of a worker pool that could not go on, after its one line; None when
    ``exc`` is something else."""
    scheduler = sys.modules.get("prunelab.orchestrator.scheduler")
    if scheduler is None or not isinstance(exc, scheduler.PoolError):
        return None
    return NOT_PLACED if isinstance(exc, scheduler.PlacementTimeout) else WORKERS_FAILED


def _silence_stdout() -> None:
    """After a closed pipe: send what is left of stdout nowhere, so that exiting is quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _stop_signals():
            try:
                status = int(args.func(args))
                sys.stdout.flush()  # a closed pipe shows here, not at exit
                return status
            except KeyboardInterrupt:
                _stop_ray()
                running = getattr(args, "running", None)
                print(f"prunelab: interrupted {_progress_line(running)}", file=sys.stderr)
                return INTERRUPTED
    except UsageError as exc:
        for line in exc.problems:
            _error(line)
        return BAD_INPUT
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE
    except Exception as exc:
        status = _pool_error(exc)
        if status is None:
            raise
        _stop_ray()
        _error(f"{exc}; stopped {_progress_line(getattr(args, 'running', None))}")
        return status


if __name__ == "__main__":
    sys.exit(main())
