"""``prunelab train-vib`` (one PGP head, outside a sweep) and ``prunelab ui`` (the MLflow UI on
the configured stores)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from prunelab.orchestrator.cli.common import (
    UsageError,
    check_stores,
    stores_from_args,
)

__all__ = ["cmd_train_vib", "cmd_ui", "ui_command"]


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
    stores = stores_from_args(args)
    check_stores(stores)
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


WORKFLOW = "workflowType=machine_learning"
"""MLflow 3's UI opens an experiment on its GenAI pages (traces) unless the link asks for the
model-training view, whatever the experiment's ``mlflow.experimentKind`` tag says (3.17)."""


def ui_links(tracking_uri: str, host: str, port: int) -> list[tuple[str, str]]:
    """(experiment name, link to its runs table in the UI) of each experiment of the store
    (none when the store cannot be read yet)."""
    from prunelab.orchestrator.tracking import Tracker

    try:
        experiments = Tracker(tracking_uri).client.search_experiments()
    except Exception:  # an empty or unreadable store: the UI shows that itself
        return []
    base = f"http://{host}:{port}/#/experiments"
    return [
        (e.name, f"{base}/{e.experiment_id}?{WORKFLOW}")
        for e in sorted(experiments, key=lambda e: e.name)
        if e.name != "Default"
    ]


def cmd_ui(args: argparse.Namespace) -> int:
    stores = stores_from_args(args)
    if stores.tracking_uri.startswith(("http://", "https://")):
        print(f"the tracking store is an MLflow server already: open {stores.tracking_uri}")
        return 0
    command = ui_command(stores, args.host, args.port)
    print(f"MLflow UI on http://{args.host}:{args.port} (store {stores.tracking_uri})")
    for name, link in ui_links(stores.tracking_uri, args.host, args.port):
        print(f"  {name}: {link}")
    sys.stdout.flush()
    os.execv(sys.executable, command)
    return 0  # not reached
