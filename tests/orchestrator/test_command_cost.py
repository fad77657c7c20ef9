"""What the quick commands import (issue 18): ``status`` and ``report`` read prunelab's database
only, so they import no torch, transformers, Ray or MLflow (nor matplotlib without
``--pareto``) and stay quick enough for ``watch prunelab status``; ``methods`` imports the methods,
which import torch only where they compute, so it imports no torch, transformers, Ray or
MLflow; and a dry run plans without Ray, MLflow, the worker or transformers' model code, and
without torch or transformers at all for llava-family models whose config the package ships
(``describe_model`` reads the shipped config.json as JSON; checked here against transformers'
config classes).

Each command runs in a fresh interpreter, as the ``prunelab`` command does, with the
``PRUNELAB_*`` variables pointing at stores under ``tmp_path``. Nothing here is about time:
``bench/cli_latency.py`` measures it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import trial_config

from prunelab.db import init_db, repo, session_factory
from prunelab.sweeps import group_config, group_names
from prunelab.workers import models

NAME = "cheap"

# runs each command line of argv[1] (JSON) through the CLI's main, then prints on its last
# line the exit statuses and which of the modules named in argv[2] each left imported
RUN = """
import json, sys
from prunelab.orchestrator.cli import main
watched = json.loads(sys.argv[2])
steps = []
for argv in json.loads(sys.argv[1]):
    status = main(argv)
    steps.append([status, sorted(m for m in watched if m in sys.modules)])
print(json.dumps(steps))
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of a command on stores under ``tmp_path``, whose database holds the
    sweep ``cheap``: a finished baseline, a finished fastv trial and a pending random one
    (recorded directly, no worker runs)."""
    url = f"sqlite:///{tmp_path / 'prunelab.db'}"
    engine = init_db(url)
    with session_factory(engine).begin() as session:
        sweep = repo.create_sweep(session, NAME, {}, "", "test:0")
        configs = [
            (trial_config("tiny-llava", "none"), True),
            (trial_config("tiny-llava", "fastv", keep_ratio=0.5, prune_layer=1), False),
            (trial_config("tiny-llava", "random", keep_ratio=0.5, seed=0, prune_layer=1), False),
        ]
        rows, _ = repo.add_trials(
            session,
            sweep.id,
            [(f"{i:064x}", config, base) for i, (config, base) in enumerate(configs)],
        )
        for row, score in zip(rows[:2], (80.0, 60.0), strict=True):
            assert repo.claim_trial(session, row.id, "test:0", "worker-0", None)
            repo.finish_trial(session, row.id, {"score": score}, "worker-0", None)
    engine.dispose()
    environ = {
        **os.environ,
        "PRUNELAB_DB_URL": url,
        "PRUNELAB_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PRUNELAB_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
        "HF_HUB_OFFLINE": "1",
    }
    environ.pop("RAY_ADDRESS", None)
    return environ


def run_commands(
    commands: list[list[str]], watched: tuple[str, ...], env: dict[str, str], cwd: Path
) -> list[tuple[int, list[str]]]:
    """Each command's exit status and the watched modules imported once it ran, all in one
    fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(commands), json.dumps(watched)],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [(status, imported) for status, imported in json.loads(result.stdout.splitlines()[-1])]


def test_status_and_report_import_no_model_ray_or_mlflow(
    env: dict[str, str], tmp_path: Path
) -> None:
    commands = [
        ["status"],
        ["status", "--json"],
        ["status", NAME],
        ["status", NAME, "--json"],
        ["report", NAME],
        ["report", NAME, "--format", "csv"],
        ["report", NAME, "--format", "latex"],
        ["report", NAME, "--out", str(tmp_path / "table.md")],
        ["status", "no-such-sweep"],  # bad input: one line, exit 2, nothing imported either
    ]
    steps = run_commands(
        commands, ("torch", "transformers", "ray", "mlflow", "matplotlib"), env, tmp_path
    )
    assert [status for status, _ in steps] == [0] * (len(commands) - 1) + [2]
    assert steps[-1][1] == []
    assert "fastv" in (tmp_path / "table.md").read_text()


def test_report_imports_matplotlib_only_for_the_plot(env: dict[str, str], tmp_path: Path) -> None:
    plot = tmp_path / "pareto.svg"
    steps = run_commands(
        [["report", NAME], ["report", NAME, "--pareto", str(plot)]],
        ("torch", "transformers", "ray", "mlflow", "matplotlib"),
        env,
        tmp_path,
    )
    assert steps == [(0, []), (0, ["matplotlib"])]
    assert plot.read_bytes().lstrip().startswith(b"<?xml")


# the model library's model code (what a family module imported with it before issue 18: most
# of a dry run's time) and the worker that runs trials
MODEL_CODE = ("transformers.modeling_utils", "transformers.processing_utils")
PLANNING_WATCHED = (
    "torch",
    "transformers",
    *MODEL_CODE,
    "prunelab.workers.runner",
    "ray",
    "mlflow",
)


def test_methods_and_dry_run_import_no_model_library(env: dict[str, str], tmp_path: Path) -> None:
    """``methods`` imports the methods and nothing watched: no torch (a method imports it
    where it computes with tensors, and neither ``prunelab.methods`` nor
    ``prunelab.workers.models`` imports it at import time). A dry run plans the
    trials and estimates their cost without Ray, MLflow or the worker, and without
    transformers for models whose config the package ships (the built-in toy-llava, the hub
    checkpoints' configs): the family registry and the adapter modules import no
    transformers. Tiny models are described through transformers' config classes (and the
    word-level tokenizer), still without any model code. Nor torch for the llava families:
    the VIB stage's module (``prunelab.workers.vib``), the adapters (``adapters.llava``,
    ``.llava_next``, ``.base``) and the layer pruners import it where they compute (the tiny
    models' config classes bring it with transformers). A dry run writes nothing: the stores
    under ``tmp_path`` are as they were."""
    before = _files(tmp_path)
    steps = run_commands(
        [
            ["methods"],
            ["sweep", "quickstart", "--dry-run"],
            ["sweep", "quickstart", "model=llava-1.5-7b,llava-next-7b", "--dry-run"],
            ["sweep", "quickstart", "model=tiny-llava-next,tiny-internvl", "--dry-run"],
        ],
        PLANNING_WATCHED,
        env,
        tmp_path,
    )
    assert steps[0] == (0, [])
    assert steps[1] == (0, [])
    assert steps[2] == (0, [])
    assert steps[3] == (0, ["torch", "transformers"])
    assert _files(tmp_path) == before


def _files(root: Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of everything under ``root``."""
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    )


@pytest.mark.parametrize("name", group_names("model"))
def test_planning_describes_every_shipped_model_as_the_workers_do(name: str) -> None:
    """``describe_model`` from the shipped config.json read without transformers gives what
    transformers' config classes give, revision included: the same trial keys, shapes and
    FLOPs either way (that the llava-family ones are read without transformers: the dry runs
    above)."""
    config = group_config("model", name)
    assert models.describe_model(config) == models.describe_model(config, library=True)


def test_the_orchestrator_imports_no_model_library_for_its_workers() -> None:
    """The sweep's modules and the worker class it hands to ``ray.remote`` import neither
    torch nor transformers: the worker imports them in its own process (issue 20: the
    orchestrator need not hold a model library)."""
    code = (
        "import sys, json\n"
        "import prunelab.orchestrator.sweep, prunelab.orchestrator.scheduler\n"
        "from prunelab.workers.actor import Worker\n"
        "print(json.dumps([m for m in ('torch', 'transformers') if m in sys.modules]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_the_worker_environment_is_plain_strings() -> None:
    """A trial's result crosses to the orchestrator pickled: a ``TorchVersion`` in it (what
    ``torch.__version__`` is) would import torch there when unpickled."""
    from prunelab.workers.actor import Worker

    env = Worker("worker-test", vision_cache_mb=0).environment()
    assert env and all(type(value) is str for value in env.values()), env
