"""Bad input, many kinds of it: each ends with exit status 2, exactly one line on stderr naming
the value and where it came from, and nothing in either store.

Every case runs ``prunelab sweep`` in this process with its stores in a temporary directory
(``--db-url``, ``--tracking-uri``, ``--artifact-root``), which must stay empty. Starting Ray or
submitting the sweep fails the test at once: validation must have stopped the input before.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest

import prunelab.orchestrator.scheduler as scheduler
import prunelab.orchestrator.sweep as sweep
from prunelab.orchestrator.cli import main
from prunelab.orchestrator.spec.compose import MAX_YAML_BYTES

CLI = "from the command line"


@dataclasses.dataclass(frozen=True)
class Case:
    """``args`` after ``prunelab sweep``; the line must contain ``value`` and ``where``.
    ``files``: spec files to write first (name -> text or bytes), in ``<tmp>/specs``."""

    args: tuple[str, ...]
    value: str
    where: str = CLI
    files: tuple[tuple[str, str | bytes], ...] = ()


def quick(*overrides: str, value: str | None = None) -> Case:
    """``prunelab sweep quickstart OVERRIDES``, the line naming the first override's value."""
    return Case(("quickstart", *overrides), value or overrides[0])


LONG = "a" * 300
OVERRIDES: dict[str, Case] = {
    # numbers that are not finite, anywhere
    "hp nan": quick("method.queries=nan"),
    "hp inf": quick("method.queries=inf"),
    "keep_ratio nan": quick("keep_ratio=nan"),
    "keep_ratio inf": quick("keep_ratio=inf"),
    "keep_ratio -inf": quick("keep_ratio=-inf"),
    "nan in a choice list": quick("keep_ratio=0.111,nan", value="keep_ratio=nan"),
    "prune_layer nan": quick("prune_layer=nan"),
    "seed inf": quick("seed=inf"),
    "keep_tokens inf": quick("keep_tokens=inf"),
    "limit nan": quick("eval.limit=nan"),
    "limit overflows to inf": quick("eval.limit=1e400", value="eval.limit=inf"),
    "sample_seed nan": quick("eval.sample_seed=nan"),
    "trial_timeout_s inf": quick("workers.trial_timeout_s=inf"),
    "trial_timeout_s nan": quick("workers.trial_timeout_s=nan"),
    "cpus_per_worker nan": quick("workers.cpus_per_worker=nan"),
    "cpus_per_worker inf": quick("workers.cpus_per_worker=inf"),
    "gpus_per_worker nan": quick("workers.gpus_per_worker=nan"),
    "gpus_per_worker inf": quick("workers.gpus_per_worker=inf"),
    "count nan": quick("workers.count=nan"),
    "placement_timeout_s nan": quick("workers.placement_timeout_s=nan"),
    "placement_timeout_s inf": quick("workers.placement_timeout_s=inf"),
    "stage lr nan": quick("+stages.vib.lr=nan", value="stages.vib.lr=nan"),
    "stage weight_decay inf": quick("+stages.vib.weight_decay=inf", value="weight_decay=inf"),
    # out of range
    "sample_seed negative": quick("eval.sample_seed=-1"),
    "heatmaps negative": quick("eval.heatmaps=-1"),
    "max_new_tokens zero": quick("eval.max_new_tokens=0"),
    "warmup negative": quick("eval.warmup=-1"),
    "limit zero": quick("eval.limit=0"),
    "trial_timeout_s zero": quick("workers.trial_timeout_s=0"),
    "trial_timeout_s negative": quick("workers.trial_timeout_s=-5"),
    "placement_timeout_s zero": quick("workers.placement_timeout_s=0"),
    "cpus_per_worker zero": quick("workers.cpus_per_worker=0"),
    "cpus_per_worker below Ray's precision": quick(
        "workers.cpus_per_worker=0.00001", value="workers.cpus_per_worker=1e-05"
    ),
    "gpus_per_worker negative": quick("workers.gpus_per_worker=-1"),
    "gpus_per_worker 1.5": quick("workers.gpus_per_worker=1.5"),
    "count zero": quick("workers.count=0"),
    "count negative": quick("workers.count=-1"),
    "max_attempts zero": quick("workers.max_attempts=0"),
    "stage lr negative": quick("+stages.vib.lr=-1", value="stages.vib.lr=-1"),
    "keep_ratio above 1": quick("keep_ratio=1.5"),
    "keep_ratio zero": quick("keep_ratio=0"),
    "keep_tokens zero": quick("keep_tokens=0"),
    "keep_tokens above the visual tokens": quick("keep_tokens=145"),
    "prune_layer beyond depth": quick("prune_layer=9", "method=fastv"),
    "prune_layer negative": quick("prune_layer=-1"),
    "--workers 0": Case(("quickstart", "--workers", "0"), "--workers=0", ""),
    # wrong types and unknown names
    "limit not a number": quick("eval.limit=abc"),
    "count a fraction": quick("workers.count=2.5"),
    "fidelity not a bool": quick("eval.fidelity=maybe"),
    "scoring unknown": quick("eval.scoring=nope"),
    "flops convention unknown": quick("eval.flops_convention=flat"),
    "hp wrong type": quick("method.queries=5"),
    "seed not an integer": quick("seed=0.5"),
    "seed a word": quick("seed=abc"),
    "list as one value": quick("keep_ratio=[0.1,0.2]", value="keep_ratio=[0.1, 0.2]"),
    "unknown model": quick("model=tiny-lava", value="'tiny-lava'"),
    "unknown method": quick("method=fastvv", value="'fastvv'"),
    "unknown benchmark": quick("benchmark=shape", value="'shape'"),
    "unknown axis": quick("+grid.keep_ration=0.5", value="keep_ration"),
    "unknown setting": quick("eval.limitt=4", value="eval.limitt"),
    "eval not a mapping": quick("eval=5"),
    "grid not a mapping": quick("grid=5"),
    "unset interpolation": quick(
        "eval.limit=${oc.env:PRUNELAB_FUZZ_UNSET}", value="PRUNELAB_FUZZ_UNSET"
    ),
    # axes that would hang: infinite, zero-step or huge ranges, huge grids, intervals
    "infinite range": quick("seed=range(0,inf)"),
    "zero step range": quick("seed=range(0,10,0)"),
    "million-value axis": quick("seed=range(0,1000000)"),
    "grid too large": quick(
        "seed=range(0,1000)", "keep_ratio=range(0.01,1,0.001)", value="5,940,000 points"
    ),
    "interval": quick("keep_ratio=interval(0,1)"),
    "glob on a number axis": quick("keep_ratio=glob(*)"),
    # names: MLflow experiment names, confined under the artifact root
    "name with ..": quick("name=../../x"),
    "absolute name": quick("name=/abs/x"),
    "name with a slash": quick("name=a/b"),
    "hidden name": quick("name=.hidden"),
    "name of 300 characters": quick(f"name={LONG}", value="(300 characters)"),
    "empty name": quick("name="),
    "name with a space": quick("name='a b'", value="name=a b"),
}


def spec(name: str, body: str | bytes, value: str, *others: tuple[str, str | bytes]) -> Case:
    """A spec file ``specs/<name>.yaml`` holding ``body`` (and ``others`` beside it)."""
    return Case((f"specs/{name}.yaml",), value, f"specs/{name}.yaml", ((name, body), *others))


GRID = "grid: {model: toy-llava, benchmark: shapes, method: 'none,fastv', keep_ratio: 0.25}"
HEAD = "defaults: [base, _self_]\nname: fuzz\n"


def alias_bomb() -> str:
    """Nine levels of nine aliases each: 387 million values once expanded."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return HEAD + "\n".join(lines) + "\n"


SPECS: dict[str, Case] = {
    "binary file": spec("bin", bytes(range(128, 256)), "not a UTF-8"),
    "NUL bytes": spec("nul", HEAD + "grid: {model: \x00}\n", "malformed YAML"),
    "includes itself": spec("self", "defaults: [base, self, _self_]\nname: s\n", "cycle"),
    "two specs include each other": spec(
        "ping",
        "defaults: [base, pong, _self_]\nname: p\n",
        "ping.yaml",
        ("pong", "defaults: [ping, _self_]\n"),
    ),
    "a loop of three": spec(
        "one",
        "defaults: [base, two, _self_]\nname: o\n",
        "three.yaml -> specs/one.yaml",
        ("two", "defaults: [three]\n"),
        ("three", "defaults: [one]\n"),
    ),
    "included file is binary": Case(
        ("specs/host.yaml",),
        "not a UTF-8",
        "specs/junk.yaml",
        (("host", "defaults: [base, junk, _self_]\nname: h\n"), ("junk", "\udcff\udcfe")),
    ),
    "alias bomb": spec("bomb", alias_bomb(), "aliases are expanded"),
    "deep nesting": spec("deep", HEAD + "x: " + "[" * 200 + "]" * 200 + "\n", "nested more"),
    "larger than the limit": spec("big", HEAD + "#" * MAX_YAML_BYTES + "\n", "larger than"),
    "malformed": spec("bad", HEAD + "grid: {model: [toy-llava\n", "malformed YAML"),
    "tab indentation": spec("tabs", HEAD + "grid:\n\tmodel: toy-llava\n", "malformed YAML"),
    "undefined alias": spec("alias", HEAD + "x: *nowhere\n", "malformed YAML"),
    "python tag": spec("tag", HEAD + "x: !!python/object:os.system {}\n", "malformed YAML"),
    "a list, not a mapping": spec("list", "- a\n- b\n", "not a list"),
    "keep_ratio .nan": spec("rnan", HEAD + GRID.replace("0.25", ".nan"), "grid.keep_ratio=nan"),
    "keep_ratio .inf": spec("rinf", HEAD + GRID.replace("0.25", ".inf"), "grid.keep_ratio=inf"),
    "nan in a choice string": spec(
        "cnan", HEAD + GRID.replace("0.25", "'0.25,nan'"), "keep_ratio=nan"
    ),
    "prune_layer .inf": spec(
        "linf", HEAD + GRID.replace("}", ", prune_layer: .inf}"), "grid.prune_layer=inf"
    ),
    "limit .inf": spec("linf2", HEAD + GRID + "\neval: {limit: .inf}\n", "eval.limit=inf"),
    "limit 1e400": spec("l400", HEAD + GRID + "\neval: {limit: 1.0e+400}\n", "eval.limit=inf"),
    "trial_timeout_s .inf": spec(
        "tinf", HEAD + GRID + "\nworkers: {trial_timeout_s: .inf}\n", "trial_timeout_s=inf"
    ),
    "cpus_per_worker .nan": spec(
        "cnan2", HEAD + GRID + "\nworkers: {cpus_per_worker: .nan}\n", "cpus_per_worker=nan"
    ),
    "gpus_per_worker .nan": spec(
        "gnan", HEAD + GRID + "\nworkers: {gpus_per_worker: .nan}\n", "gpus_per_worker=nan"
    ),
    "count .nan": spec("knan", HEAD + GRID + "\nworkers: {count: .nan}\n", "workers.count=nan"),
    "sample_seed -1": spec(
        "seed", HEAD + GRID + "\neval: {sample_seed: -1}\n", "eval.sample_seed=-1"
    ),
    "stage lr .nan": spec("snan", HEAD + GRID + "\nstages: {vib: {lr: .nan}}\n", "lr=nan"),
    "name ../../x": spec("n1", HEAD.replace("fuzz", "../../x") + GRID, "name=../../x"),
    "absolute name": spec("n2", HEAD.replace("fuzz", "/tmp/x") + GRID, "name=/tmp/x"),
    "name of 300 characters": spec("n3", HEAD.replace("fuzz", LONG) + GRID, "(300 characters)"),
    "grid a list": spec("glist", HEAD + "grid: [a, b]\n", 'grid=["a", "b"]'),
    "unknown top-level key": spec("key", HEAD + GRID + "\nworker: {count: 1}\n", "'worker'"),
}


def _write(directory: Path, files: tuple[tuple[str, str | bytes], ...]) -> None:
    for name, body in files:
        path = directory / f"{name}.yaml"
        if isinstance(body, bytes):
            path.write_bytes(body)
        else:  # surrogate escapes stand for raw bytes (an undecodable file)
            path.write_bytes(body.encode("utf-8", "surrogateescape"))


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation must stop bad input: starting Ray or submitting the sweep fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("bad input got past validation")

    monkeypatch.setattr(scheduler, "start_ray", refuse)
    monkeypatch.setattr(sweep, "submit_sweep", refuse)


def run_case(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Run ``prunelab sweep`` on ``case`` with temporary stores; check the exit status and that
    the stores were not touched; return the stderr lines."""
    specs = tmp_path / "specs"
    specs.mkdir()
    _write(specs, case.files)
    stores = tmp_path / "stores"
    stores.mkdir()
    flags = [
        "--db-url", f"sqlite:///{stores / 'prunelab.db'}",
        "--tracking-uri", f"sqlite:///{stores / 'mlflow.db'}",
        "--artifact-root", str(stores / "artifacts"),
    ]  # fmt: skip
    os.chdir(tmp_path)
    assert main(["sweep", *case.args, *flags]) == 2
    assert list(stores.iterdir()) == [], "something was written to a store"
    assert not (tmp_path / "prunelab-runs").exists()
    return capsys.readouterr().err.splitlines()


def check_one_line(case: Case, lines: list[str]) -> None:
    assert len(lines) == 1, "\n".join(lines)
    (line,) = lines
    assert line.startswith("prunelab: error: "), line
    assert case.value in line, line
    assert case.where in line, line


CASES: dict[str, Case] = {**OVERRIDES, **{f"spec: {k}": v for k, v in SPECS.items()}}


def test_the_list_is_long_enough() -> None:
    assert len(CASES) >= 80


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(
    name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_run: Callable[..., None],
) -> None:
    monkeypatch.chdir(tmp_path)
    case = CASES[name]
    check_one_line(case, run_case(case, tmp_path, capsys))
