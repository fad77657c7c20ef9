"""``prunelab delete``: remove a sweep from the stores, without asking (scripts call it); it
prints what it removed."""

from __future__ import annotations

import argparse

from prunelab.orchestrator.cli.common import (
    UsageError,
    check_stores,
    engine_if_exists,
    stores_from_args,
)

__all__ = ["cmd_delete"]


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete sweep ``args.sweep`` (an id, or a name: the newest sweep of that name): its rows,
    and with ``--runs`` its MLflow runs. No such sweep, no database, or a sweep whose
    orchestrator may still be running it (unless ``--force``): one line, exit status 2."""
    from prunelab.orchestrator.sweep import SweepBusy, delete_sweep

    stores = stores_from_args(args)
    if args.runs:
        check_stores(stores)  # MLflow's store too
    engine = engine_if_exists(stores.db_url)
    if engine is None:
        raise UsageError([f"no prunelab database at {stores.db_url}"])
    engine.dispose()
    try:
        return delete_sweep(args.sweep, stores, runs=args.runs, force=args.force)
    except (LookupError, SweepBusy) as exc:
        raise UsageError([str(exc.args[0])]) from None
