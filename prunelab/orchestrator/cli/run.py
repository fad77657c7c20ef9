"""``prunelab sweep`` and ``prunelab resume``: the commands that run trials, the checks made
before any worker starts (``--dry-run``, local placement), and how far a stopped sweep got."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

from prunelab.orchestrator import reaper
from prunelab.orchestrator.cli.common import (
    UsageError,
    check_stores,
    engine_if_exists,
    stores_from_args,
    stores_line,
)
from prunelab.orchestrator.console import open_console

__all__ = ["Running", "cmd_resume", "cmd_sweep", "progress_line"]


def cmd_sweep(args: argparse.Namespace) -> int:
    from prunelab.orchestrator.spec import SpecError, load_sweep

    overrides = list(args.overrides)
    if args.workers is not None:
        if args.workers < 1:
            raise UsageError([f"--workers={args.workers}: must be >= 1"])
        overrides.append(f"workers.count={args.workers}")
    try:
        plan = load_sweep(
            args.spec, overrides, skip_invalid=args.skip_invalid, dry_run=args.dry_run
        )
    except SpecError as exc:
        raise UsageError(exc.problems) from None
    for line in plan.warnings:
        print(f"prunelab: warning: {line}", file=sys.stderr)
    if plan.skipped:
        print(
            "prunelab: --skip-invalid: the grid points validation rejects are dropped "
            f"({len(plan.skipped)} problem(s)); the rest runs:",
            file=sys.stderr,
        )
        for line in plan.skipped:
            print(f"  {line}", file=sys.stderr)
    stores = stores_from_args(args)
    check_stores(stores)
    if args.dry_run:
        return _dry_run(plan, stores)
    from prunelab.orchestrator.sweep import SweepBusy, extension_state, submit_sweep

    # a sweep of that name is extended (unless --fresh): not while it may be running
    engine = None if args.fresh else engine_if_exists(stores.db_url)
    busy, earlier_unfinished = (
        (None, False) if engine is None else extension_state(engine, plan.name)
    )
    if busy is not None:
        raise UsageError([busy])
    args.console = open_console(stores, plan.name, getattr(args, "verbose", False))
    if args.rerun or earlier_unfinished or _unfinished(plan, stores):
        _check_local_placement(plan.workers, plan.origins, stores)
    print(stores_line(stores), file=sys.stderr)  # the input is good: the sweep starts
    # extending: the sweep of that name is the one run; --fresh: a sweep not known before
    known = sweep_ids(stores, plan.name) if args.fresh else None
    args.running = Running(stores, plan.name, known)
    try:
        return submit_sweep(plan, stores, rerun=args.rerun, fresh=args.fresh)
    except SweepBusy as exc:
        raise UsageError([str(exc)]) from None


def _unfinished(plan: Any, stores) -> bool:
    """Whether any trial of ``plan`` is not finished in the database (read only)."""
    from prunelab.db import repo, session_factory

    engine = engine_if_exists(stores.db_url)
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
    reaper.arm()  # this Ray's processes end with this process, even when it is killed
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
    from prunelab.orchestrator.estimate import (
        earlier_fixed_costs,
        earlier_throughput,
        estimate_tflops,
    )
    from prunelab.orchestrator.results import budget_label

    done: set[str] = set()
    throughput: dict[str, Any] = {}  # model -> Throughput of its earlier finished trials
    fixed = None  # FixedCosts measured on earlier sweeps
    engine = engine_if_exists(stores.db_url)
    if engine is not None:
        with session_factory(engine)() as session:
            found = repo.trials_by_keys(session, [t.key for t in plan.trials])
            done = {k for k, t in found.items() if t.status == "finished"}
            throughput = earlier_throughput(session, {t.model for t in plan.trials})
            fixed = earlier_fixed_costs(session)
    print(f"sweep {plan.name}: {len(plan.trials)} trials, {len(done)} already finished")
    print(
        f"{'key':10}  {'model':16} {'benchmark':10} {'method':12} {'budget':7} {'mode':7} "
        f"{'layer':5} {'seed':4}  hparams"
    )
    counts = _sample_counts(plan)  # benchmark -> samples per trial (None: data not here)
    total_tflops, unknown = 0.0, set()
    model_tflops: dict[str, float] = {}  # per model, of the trials to run
    samples = 0
    for trial in plan.trials:
        count = counts.get(trial.benchmark)
        if count is None:  # not here to count: eval.limit bounds it (no limit: nothing known)
            unknown.add(trial.benchmark)
            count = plan.eval.limit or 0
        tflops = estimate_tflops(trial, count)
        if trial.key not in done:
            total_tflops += tflops
            model_tflops[trial.model] = model_tflops.get(trial.model, 0.0) + tflops
            samples += count
        mark = " (done)" if trial.key in done else ""
        print(
            f"{trial.key[:10]}  {trial.model:16} {trial.benchmark:10} {trial.method:12} "
            f"{budget_label(trial):7} {_budget_mode(trial):7} "
            f"{_blank(trial.prune_layer):5} {_blank(trial.seed):4}  "
            f"{json.dumps(trial.hparams)}{mark}"
        )
    todo = [t for t in plan.trials if t.key not in done]
    bound = "at most " if unknown else ""
    print(
        f"to run: {len(todo)} trials, {bound}{samples:,} samples, {bound}{total_tflops:.3g} "
        f"TFLOPs of LLM prefill ({plan.eval.flops_convention} convention)"
    )
    if unknown:
        print(
            f"  counted at eval.limit={plan.eval.limit} samples per trial (the data is not "
            f"here to count) for: {', '.join(sorted(unknown))}"
        )
    workers = max(1, plan.workers.count)
    model_seconds, unmeasured = 0.0, []
    for model, tflops in model_tflops.items():
        measured = throughput.get(model)
        if measured is None:
            unmeasured.append(model)
            print(f"  {model}: no finished trials of this model yet, no measured time estimate")
            continue
        seconds = measured.seconds(tflops)
        model_seconds += seconds
        print(
            f"  {model}: about {_duration(seconds)} of model time at the throughput of "
            f"{measured.trials} earlier trial(s) ({measured.tflops_per_s:.3g} TFLOPs/s), "
            f"~{_duration(seconds / workers)} on {workers} worker(s)"
        )
    if fixed is not None and (fixed.startup_s is not None or fixed.per_trial_s is not None):
        overhead = fixed.seconds(len(todo), workers)
        print(
            f"  fixed costs measured on {fixed.sweeps} earlier sweep(s) and {fixed.trials} "
            f"trial(s): start-up ~{_duration(fixed.startup_s or 0.0)}, "
            f"~{_duration(fixed.per_trial_s or 0.0)} per trial beyond model time (model "
            "loads, warm-up, unpruned references, recording)"
        )
        partial = " (without the models not measured yet)" if unmeasured else ""
        print(
            f"  estimate: ~{_duration(overhead + model_seconds / workers)} on {workers} "
            f"worker(s){partial}"
        )
    return 0


def _duration(seconds: float) -> str:
    """``42 s``, ``3.5 min`` or ``2.1 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _sample_counts(plan: Any) -> dict[str, int | None]:
    """Per benchmark of ``plan``, the samples a trial evaluates: ``eval.limit`` or the split's
    size when smaller; None when the data is not there to count."""
    from prunelab.workers.benchmarks import build_benchmark

    counts: dict[str, int | None] = {}
    for name, config in plan.benchmarks.items():
        size = getattr(build_benchmark(config), "sample_count", lambda: None)()
        limit = plan.eval.limit
        counts[name] = None if size is None else (size if limit is None else min(size, limit))
    return counts


def _budget_mode(trial: Any) -> str:
    """How the trial counts its budget: its ``budget_mode``, else its method's own way."""
    import prunelab.methods as M

    if trial.budget_mode is not None:
        return str(trial.budget_mode)
    cls = M.get(trial.method)
    return cls.own_budget_mode() if cls.uses_budget else ""


def _blank(value: Any) -> str:
    return "" if value is None else str(value)


def cmd_resume(args: argparse.Namespace) -> int:
    from prunelab.orchestrator.sweep import resume_sweep

    stores = stores_from_args(args)
    check_stores(stores)
    if engine_if_exists(stores.db_url) is None:
        raise UsageError([f"no prunelab database at {stores.db_url}"])
    recorded = _recorded_workers(stores, args.sweep)
    if recorded is not None:  # the sweep exists (else: one line says so, nothing logged)
        args.console = open_console(stores, args.sweep, getattr(args, "verbose", False))
        origins = {f"workers.{k}": f"(recorded with sweep {args.sweep})" for k in recorded}
        _check_local_placement(_workers_config(recorded), origins, stores)
    args.running = Running(stores, args.sweep, known=None)
    try:
        return resume_sweep(args.sweep, stores, retry_failed=args.retry_failed)
    except LookupError as exc:
        raise UsageError([str(exc.args[0])]) from None


def _recorded_workers(stores, ref: str) -> dict[str, Any] | None:
    """The ``workers`` section a sweep was recorded with (None: no such sweep)."""
    from prunelab.db import repo, session_factory

    engine = engine_if_exists(stores.db_url)
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


@dataclass(frozen=True)
class Running:
    """The sweep a command runs, to say how far it got when it stops early: ``ref`` (a name
    or id) and, for a new sweep, the ids of the sweeps of that name that existed before."""

    stores: Any
    ref: str
    known: frozenset[str] | None


def sweep_ids(stores, name: str) -> frozenset[str]:
    """Ids of the recorded sweeps named ``name`` (read only; none without a database)."""
    from sqlalchemy import select

    from prunelab.db import Sweep, session_factory

    engine = engine_if_exists(stores.db_url)
    if engine is None:
        return frozenset()
    with session_factory(engine)() as session:
        return frozenset(session.scalars(select(Sweep.id).where(Sweep.name == name)))


def progress_line(running: Running | None) -> str:
    """``after 11/37 trials; resume with `prunelab resume NAME``` for the sweep a command was
    running, or why there is nothing to resume."""
    nothing = "before the sweep was recorded; nothing to resume"
    if running is None:
        return nothing
    from prunelab.db import repo, session_factory

    try:
        engine = engine_if_exists(running.stores.db_url)
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
