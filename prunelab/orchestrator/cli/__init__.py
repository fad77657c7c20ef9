"""``prunelab``: submit, resume, inspect and report sweeps.

Exit status: 0 when every trial finished, 1 when some failed (or workers kept dying while
starting), 2 on bad input (one line per problem on stderr, before any worker starts and before
anything is written), 74 when a trial's result could not be written (its artifacts or MLflow
run: a read-only or full disk, a name too long; one line names the path and the OS error; the
sweep is left resumable), 75 when no worker could be placed within
``workers.placement_timeout_s`` (the sweep is left resumable), 130 when interrupted by Ctrl-C
or SIGTERM (the sweep is left resumable: one line says how far it got and how to resume it),
141 when stdout was closed (``prunelab status | head -1``; nothing more is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from prunelab.orchestrator.cli.browse import (
    cmd_methods,
    cmd_report,
    cmd_rescore,
    cmd_score,
    cmd_status,
)
from prunelab.orchestrator.cli.common import SCORING, UsageError
from prunelab.orchestrator.cli.manage import cmd_delete
from prunelab.orchestrator.cli.run import cmd_resume, cmd_sweep, progress_line
from prunelab.orchestrator.cli.tools import cmd_train_vib, cmd_ui

__all__ = [
    "BAD_INPUT",
    "BROKEN_PIPE",
    "INTERRUPTED",
    "NOT_PLACED",
    "NOT_RECORDED",
    "WORKERS_FAILED",
    "main",
]

BAD_INPUT = 2
WORKERS_FAILED = 1  # as a sweep with failed trials: workers kept dying while starting
NOT_RECORDED = 74  # EX_IOERR: a result could not be written; resume once the disk can
NOT_PLACED = 75  # EX_TEMPFAIL: no worker could be placed; resume once the cluster can
INTERRUPTED = 130  # 128 + SIGINT, for SIGTERM too: both stop a sweep the same way
BROKEN_PIPE = 141  # 128 + SIGPIPE, what a tool killed by the closed pipe would return


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", help="MLflow store (env PRUNELAB_TRACKING_URI)")
    common.add_argument("--db-url", help="prunelab database (env PRUNELAB_DB_URL)")
    common.add_argument("--artifact-root", help="MLflow artifacts (env PRUNELAB_ARTIFACT_ROOT)")
    common.add_argument("--ray-address", help="Ray cluster to join (env RAY_ADDRESS)")
    verbose = (
        "Ray's, MLflow's, transformers' and the workers' output on the console (default: "
        "the sweep's log file, next to the stores)"
    )
    common.add_argument(  # after the command too: `prunelab sweep SPEC -v`
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose
    )

    parser = argparse.ArgumentParser(
        prog="prunelab", description="Ablation sweeps of visual-token pruning on VLMs."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sweep", parents=[common], help="submit and run a sweep")
    p.add_argument("spec", help="spec file (YAML) or name of a shipped spec (e.g. quickstart)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. method=fastv,pdrop")
    p.add_argument("--dry-run", action="store_true", help="print the trials and an estimate")
    p.add_argument("--workers", type=int, help="number of Ray workers (workers.count)")
    p.add_argument("--rerun", action="store_true", help="run finished trials again")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start a new sweep under the spec's name (default: a sweep of that name is "
        "extended with the spec's trials); the earlier one stays, by its id",
    )
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="drop the grid points validation rejects (a layer or budget a method cannot "
        "reach on a model), listing each and why, and run the rest",
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("delete", parents=[common], help="delete a sweep (asks nothing)")
    p.add_argument("sweep", help="sweep id, or name (the newest sweep of that name)")
    p.add_argument(
        "--runs",
        action="store_true",
        help="delete its MLflow runs too (its parent and trial runs; other sweeps' runs, "
        "copies of shared trials included, are not touched)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="delete it even if it is marked running by an orchestrator that may be alive",
    )
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("resume", parents=[common], help="finish an interrupted sweep")
    p.add_argument("sweep", help="sweep id or name")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="run the sweep's failed trials again too (a fresh set of attempts each)",
    )
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("status", parents=[common], help="sweeps, or one sweep's trials")
    p.add_argument("sweep", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("report", parents=[common], help="baseline-relative results table")
    p.add_argument("sweep")
    p.add_argument("--format", choices=("md", "csv", "latex"), default="md")
    p.add_argument(
        "--columns",
        default="tflops",
        help="cost columns after the mean ratio, comma-separated metrics (default tflops; "
        "e.g. tflops,latency_ms,kv_cache_mb,fidelity_top1; '' for none)",
    )
    p.add_argument("--out", help="write the table to this file instead of stdout")
    p.add_argument(
        "--pareto",
        metavar="FILE",
        help="also write the Pareto plot to this file: .pdf, .svg or .png (300 dpi)",
    )
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


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _stop_ray() -> None:
    """End this process's Ray session now (a local Ray's processes with it), if any."""
    if _ray_is_up():
        sys.modules["ray"].shutdown()


def _error(line: str) -> None:
    print(f"prunelab: error: {line}", file=sys.stderr)


def _pool_error(exc: Exception) -> int | None:
    """The exit status of a sweep that could not go on (its worker pool, or the recording of
    a result), after its one line; None when ``exc`` is something else."""
    sweep = sys.modules.get("prunelab.orchestrator.sweep")
    if sweep is not None and isinstance(exc, sweep.RecordingError):
        return NOT_RECORDED
    scheduler = sys.modules.get("prunelab.orchestrator.scheduler")
    if scheduler is None or not isinstance(exc, scheduler.PoolError):
        return None
    return NOT_PLACED if isinstance(exc, scheduler.PlacementTimeout) else WORKERS_FAILED


def _silence_stdout() -> None:
    """After a closed pipe: send what is left of stdout nowhere, so that exiting is quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line: options and a sweep's overrides in any order (``sweep quickstart
    name=x --ray-address A eval.limit=16``; argparse alone ends ``overrides`` at the first
    option). Anything else unknown is a usage error (exit 2)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _exit_quickly() -> None:
    """Prepare this process to exit: the objects it holds (Ray's, MLflow's, SQLAlchemy's
    modules and what the command made) go to the garbage collector's permanent generation, so
    the interpreter's shutdown no longer walks them in collection after collection while it
    tears the modules down (a second or more with those loaded). The process ends next and its
    memory goes back with it; the atexit handlers (Ray's, logging's) still run."""
    gc.freeze()


def main(argv: Sequence[str] | None = None, *, exiting: bool | None = None) -> int:
    """Run the command of ``argv`` (default: this process's arguments); its exit status.

    ``exiting``: the process exits once this returns (default: when ``argv`` is None, as the
    ``prunelab`` command and ``python -m prunelab.orchestrator.cli`` call it), so its exit is
    prepared to be quick (:func:`_exit_quickly`). A caller that goes on leaves it False."""
    if exiting is None:
        exiting = argv is None
    try:
        return _main(argv)
    finally:
        if exiting:
            _exit_quickly()


def _main(argv: Sequence[str] | None) -> int:
    args = parse(argv)
    joined = _ray_is_up()  # a caller's Ray session is left as it was; one started here ends
    try:
        with _stop_signals():
            try:
                status = int(args.func(args))
                sys.stdout.flush()  # a closed pipe shows here, not at exit
                return status
            except KeyboardInterrupt:
                _stop_ray()
                running = getattr(args, "running", None)
                print(f"prunelab: interrupted {progress_line(running)}", file=sys.stderr)
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
        _error(f"{exc}; stopped {progress_line(getattr(args, 'running', None))}")
        return status
    finally:
        if not joined:
            _stop_ray()  # the workers and a local Ray's processes end with the command
        console = getattr(args, "console", None)  # a sweep's (cli.run): its loggers back
        if console is not None:
            console.close()
