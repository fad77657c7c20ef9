"""The read-only commands: ``status``, ``report``, ``methods``, ``score`` and ``rescore`` (which
writes a new sweep from stored predictions, running no model)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from prunelab.orchestrator.cli.common import (
    UsageError,
    check_stores,
    engine_if_exists,
    stores_from_args,
    write_output,
)

__all__ = ["cmd_methods", "cmd_report", "cmd_rescore", "cmd_score", "cmd_status"]


def cmd_status(args: argparse.Namespace) -> int:
    from prunelab.db import repo, session_factory

    stores = stores_from_args(args)
    engine = engine_if_exists(stores.db_url)
    if engine is None:
        if args.sweep:
            raise UsageError([f"no prunelab database at {stores.db_url}"])
        print("[]" if args.json else "no sweeps yet")
        return 0
    with session_factory(engine)() as session:
        if not args.sweep:
            named = repo.named_sweep_ids(session)  # what each name refers to (its newest)
            sweeps = [
                {
                    "id": s.id,
                    "name": s.name,
                    "by_name": s.id in named,
                    "created": s.created.isoformat(timespec="seconds"),
                    "status": s.status,
                    "trials": repo.trial_status_counts(session, s.id),
                }
                for s in repo.list_sweeps(session)
            ]
            if args.json:
                print(json.dumps(sweeps, indent=2))
            else:
                width = max([len(str(s["id"])) for s in sweeps] + [2])
                print(f"{'id':{width}}  {'name':20} {'created':19}  {'status':11} trials")
                for s in sweeps:
                    counts = ", ".join(f"{n} {k}" for k, n in sorted(s["trials"].items()))
                    # a sweep its name no longer means (an earlier --fresh one): by id only
                    name = s["name"] if s["by_name"] else f"({s['name']})"
                    print(f"{s['id']:{width}}  {name:20} {s['created']}  {s['status']:11} {counts}")
                if not all(s["by_name"] for s in sweeps):
                    print("(name): an earlier sweep of that name, reachable by its id")
            return 0
        sweep = repo.get_sweep(session, args.sweep)
        if sweep is None:
            raise UsageError([f"no sweep with id or name {args.sweep!r}"])
        rows = [(t, t.trial) for t in repo.sweep_trials(session, sweep.id)]
        attempts = repo.trial_attempts(session, [t.id for t, _ in rows])
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
                # each attempt that ended without a result, oldest first
                "failed_attempts": [a.as_dict() for a in attempts.get(t.id, [])],
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
        for a in t["failed_attempts"]:
            where = f" on {a['worker']}" if a["worker"] else ""
            print(f"      attempt {a['attempt']}{where}: {a['kind']}: {_first_line(a['error'])}")
    return 0


def _first_line(text: str, width: int = 100) -> str:
    lines = text.strip().splitlines()
    return lines[0][:width] if lines else ""


def _progress(statuses: Iterable[str]) -> dict[str, int]:
    """Trials per status (every status, zero included) and ``total``."""
    counts = dict.fromkeys(("finished", "running", "pending", "failed"), 0)
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return {**counts, "total": sum(counts.values())}


def cmd_report(args: argparse.Namespace) -> int:
    from prunelab.db import repo, session_factory
    from prunelab.orchestrator.results import build_report, column_problem
    from prunelab.orchestrator.tables import report_csv, report_latex, report_markdown

    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    problems = [f"--columns {p}" for c in columns if (p := column_problem(c)) is not None]
    if problems:
        raise UsageError(problems)
    figure_type = None
    if args.pareto:  # a bad extension is found before anything is printed or written
        from prunelab.orchestrator.plots import figure_format

        try:
            figure_type = figure_format(args.pareto)
        except ValueError as exc:
            raise UsageError([f"--pareto {exc}"]) from None
    stores = stores_from_args(args)
    engine = engine_if_exists(stores.db_url)
    if engine is None:
        raise UsageError([f"no prunelab database at {stores.db_url}"])
    with session_factory(engine)() as session:
        sweep = repo.get_sweep(session, args.sweep)
        if sweep is None:
            raise UsageError([f"no sweep with id or name {args.sweep!r}"])
        report = build_report(
            ((t.trial, t.status, t.metrics, t.replicates)
             for t in repo.sweep_trials(session, sweep.id)),
            columns,
        )  # fmt: skip
    render = {"md": report_markdown, "csv": report_csv, "latex": report_latex}[args.format]
    text = render(report)
    if args.out:
        write_output("--out", args.out, text.encode())
    else:
        sys.stdout.write(text)
    if figure_type is not None:
        from prunelab.orchestrator.plots import pareto_figure

        write_output("--pareto", args.pareto, pareto_figure(report, figure_type))
    return 0


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

    stores = stores_from_args(args)
    check_stores(stores)
    if engine_if_exists(stores.db_url) is None:
        raise UsageError([f"no prunelab database at {stores.db_url}"])
    try:
        return rescore_sweep(args.sweep, args.scoring, stores)
    except (LookupError, ValueError) as exc:
        raise UsageError([str(exc.args[0])]) from None
