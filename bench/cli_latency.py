"""Latency of the ``prunelab`` commands, and the fixed cost of a small local sweep.

Each command runs as a fresh process (``python -m prunelab.orchestrator.cli ...``), as a user
or ``watch prunelab status`` runs it, on stores the bench makes itself: one small sweep
(``sweep quickstart eval.limit=2 method=none,fastv keep_ratio=0.5 name=bench``) run once into a
temporary directory, the ``PRUNELAB_*`` variables pointing there. Its wall time is the fixed
cost of a small sweep (imports, Ray start and stop, worker start, model loads, stores).

Then ``status``, ``status bench``, ``report bench`` (md, csv, latex), ``methods`` and ``sweep
quickstart --dry-run`` run ``--repeat`` times each: median and min wall seconds, and which of
torch, transformers, ray, mlflow, hydra and matplotlib the command imported and its peak RSS
(one more run).

``--ray``: where a sweep's Ray time goes, in a fresh process per run: import of the scheduler
(torch, transformers and ray with it), its ``start_ray`` (a new local Ray), two trivial
actors started with an environment of their own as the pool's are (time until both answer),
and ``ray.shutdown``. ``--phases``: one more small sweep, in a process whose orchestrator
steps are timed (imports, spec, Ray start, stores and MLflow set-up, trials, table, Ray stop).

Which prunelab runs: the one importable from ``--tree`` (prepended to ``PYTHONPATH``; default:
this checkout). ``--baseline-commit REV`` clones this checkout at ``REV`` into a temporary
directory and times it too, its commands interleaved with the tree's (the same load on the
machine), each tree's sweep into stores of its own. Without it, compare by hand::

    git clone -q /path/to/checkout /tmp/before      # not git stash: others edit the tree
    python bench/cli_latency.py --tree /tmp/before  # before
    python bench/cli_latency.py                     # after

Usage: ``python bench/cli_latency.py [--repeat 5] [--baseline-commit HEAD] [--ray] [--phases]``.
It prints measured numbers only; nothing is asserted about time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
SWEEP = ["sweep", "quickstart", "eval.limit=2", "method=none,fastv", "keep_ratio=0.5", "name=bench"]
COMMANDS: dict[str, list[str]] = {
    "status": ["status"],
    "status bench": ["status", "bench"],
    "report bench": ["report", "bench"],
    "report bench --format csv": ["report", "bench", "--format", "csv"],
    "report bench --format latex": ["report", "bench", "--format", "latex"],
    "methods": ["methods"],
    "sweep quickstart --dry-run": ["sweep", "quickstart", "--dry-run"],
}
HEAVY = ("torch", "transformers", "ray", "mlflow", "hydra", "matplotlib")
# the command as the CLI runs it, then lines on stderr naming the heavy modules it imported and
# its peak resident memory (ru_maxrss: KiB on Linux)
PROBE = (
    "import atexit, resource, sys\n"
    "from prunelab.orchestrator.cli import main\n"
    "atexit.register(lambda: print('imported:', ' '.join(m for m in {heavy!r} "
    "if m in sys.modules) or '-', file=sys.stderr))\n"
    "atexit.register(lambda: print('maxrss:', resource.getrusage(resource.RUSAGE_SELF)"
    ".ru_maxrss, file=sys.stderr))\n"
    "sys.exit(main(sys.argv[1:]))\n"
)

RAY_PROBE = """
import json, time
start = time.perf_counter()
import ray
from prunelab.orchestrator.scheduler import start_ray
imported = time.perf_counter()
start_ray(None)
started = time.perf_counter()

class Echo:
    def pid(self):
        import os
        return os.getpid()

remote = ray.remote(num_cpus=1)(Echo).options(runtime_env={"env_vars": {"PRUNELAB_BENCH": "1"}})
actors = [remote.remote() for _ in range(2)]
ray.get([a.pid.remote() for a in actors])
ready = time.perf_counter()
ray.shutdown()
done = time.perf_counter()
print(json.dumps([imported - start, started - imported, ready - started, done - ready]))
"""

PHASES_PROBE = """
import contextlib, functools, io, sys, time
start = time.perf_counter()
events = []

def mark(name):
    events.append((time.perf_counter() - start, name))

import ray
from prunelab.orchestrator import cli, scheduler, spec, sweep
mark("imports (cli, spec, sweep, scheduler: torch, transformers, ray, mlflow)")

def timed(owner, name, label):
    inner = getattr(owner, name, None)
    if inner is None:
        return

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        mark(label + " begins")
        try:
            return inner(*args, **kwargs)
        finally:
            mark(label + " ends")

    setattr(owner, name, wrapper)

timed(spec, "load_sweep", "load_sweep (spec, grid, validation)")
timed(scheduler, "start_ray", "start_ray")
timed(sweep, "submit_sweep", "submit_sweep")
timed(scheduler.WorkerPool, "__init__", "WorkerPool (actors asked for)")
timed(scheduler.WorkerPool, "run", "WorkerPool.run (workers start, load the model, run)")
timed(sweep, "close_sweep", "close_sweep (runs, table)")
timed(ray, "shutdown", "ray.shutdown")
with contextlib.redirect_stdout(io.StringIO()):
    status = cli.main(sys.argv[1:])
mark(f"main returns {status}")
previous = 0.0
for at, name in events:
    print(f"  {at:7.2f} s  (+{at - previous:6.2f})  {name}")
    previous = at
"""


def env_for(tree: Path, stores: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PRUNELAB_DB_URL"] = f"sqlite:///{stores / 'prunelab.db'}"
    env["PRUNELAB_TRACKING_URI"] = f"sqlite:///{stores / 'mlflow.db'}"
    env["PRUNELAB_ARTIFACT_ROOT"] = str(stores / "artifacts")
    env.pop("RAY_ADDRESS", None)  # a local Ray of the sweep's own
    return env


def run(
    argv: list[str], env: dict[str, str], cwd: Path, code: str | None = None
) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds and result of ``python -m prunelab.orchestrator.cli ARGV`` (or ``python -c
    CODE ARGV``) in a fresh process."""
    how = ["-m", "prunelab.orchestrator.cli"] if code is None else ["-c", code]
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, *how, *argv], env=env, cwd=cwd, capture_output=True, text=True
    )
    return time.perf_counter() - start, result


def check(label: str, result: subprocess.CompletedProcess) -> None:
    if result.returncode != 0:
        raise SystemExit(
            f"{label}: exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )


def describe(tree: Path, env: dict[str, str], cwd: Path) -> str:
    """Where prunelab is imported from by the commands (run in ``cwd``: ``python -c`` puts its
    working directory first on ``sys.path``), and the tree's commit."""
    found = subprocess.run(
        [sys.executable, "-c", "import prunelab; print(prunelab.__file__)"],
        env=env, cwd=cwd, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    git = ["git", "-C", str(tree)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    mark = "-dirty" if dirty.stdout.strip() else ""
    return f"{found} (git {commit.stdout.strip() or '?'}{mark})"


def time_commands(envs: dict[str, dict[str, str]], cwd: Path, repeat: int) -> None:
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeat):  # interleaved: every command and tree under the same load
        for name, argv in COMMANDS.items():
            for label, env in envs.items():
                seconds, result = run(argv, env, cwd)
                check(f"{label}: {name}", result)
                times.setdefault((name, label), []).append(seconds)
    imported: dict[tuple[str, str], str] = {}
    rss: dict[tuple[str, str], str] = {}
    for name, argv in COMMANDS.items():  # one more run each, not timed: imports, memory
        for label, env in envs.items():
            _, result = run(argv, env, cwd, PROBE.format(heavy=HEAVY))
            check(f"{label}: {name}", result)
            lines = [x for x in result.stderr.splitlines() if x.startswith("imported:")]
            imported[name, label] = lines[-1].removeprefix("imported: ") if lines else "?"
            peaks = [x for x in result.stderr.splitlines() if x.startswith("maxrss:")]
            rss[name, label] = f"{int(peaks[-1].split()[1]) // 1024}" if peaks else "?"
    width = max(len(name) for name in COMMANDS) + 2
    tree_width = max(len(label) for label in envs) + 2
    print(
        f"  {'command':{width}}{'tree':{tree_width}}{'median':>7} {'min':>7} {'MiB':>5}  imported"
    )
    for name in COMMANDS:
        for label in envs:
            values = times[name, label]
            print(
                f"  {name:{width}}{label:{tree_width}}{statistics.median(values):7.2f} "
                f"{min(values):7.2f} {rss[name, label]:>5}  {imported[name, label]}"
            )


def time_ray(envs: dict[str, dict[str, str]], cwd: Path, repeat: int) -> None:
    rows: dict[str, list[list[float]]] = {label: [] for label in envs}
    for _ in range(repeat):
        for label, env in envs.items():
            _, result = run([], env, cwd, RAY_PROBE)
            check(f"{label}: start_ray", result)
            rows[label].append(json.loads(result.stdout.strip().splitlines()[-1]))
    tree_width = max(len(label) for label in envs) + 2
    print(
        f"  {'tree':{tree_width}}{'import':>8} {'start_ray':>10} {'2 actors':>9} "
        f"{'shutdown':>9} {'total':>7}  (median s of {repeat})"
    )
    for label, values in rows.items():
        medians = [statistics.median(column) for column in zip(*values, strict=True)]
        print(
            f"  {label:{tree_width}}{medians[0]:8.2f} {medians[1]:10.2f} {medians[2]:9.2f} "
            f"{medians[3]:9.2f} {sum(medians):7.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each command")
    parser.add_argument("--tree", type=Path, default=CHECKOUT, help="prunelab source tree")
    parser.add_argument("--baseline-commit", help="also time this commit (a clone of it)")
    parser.add_argument("--ray", action="store_true", help="time a local Ray's start and stop")
    parser.add_argument("--phases", action="store_true", help="time a small sweep's steps")
    parser.add_argument("--keep", action="store_true", help="keep the temporary stores")
    opts = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="prunelab-cli-latency-"))
    trees = {"tree": opts.tree.resolve()}
    if opts.baseline_commit:
        baseline = work / "baseline"
        subprocess.run(["git", "clone", "-q", str(CHECKOUT), str(baseline)], check=True)
        subprocess.run(["git", "-C", str(baseline), "checkout", "-q", opts.baseline_commit],
                       check=True)  # fmt: skip
        trees = {f"baseline {opts.baseline_commit}": baseline, **trees}
    try:
        print(f"{sys.executable}; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}")
        envs: dict[str, dict[str, str]] = {}
        for label, tree in trees.items():
            stores = work / f"stores-{len(envs)}"
            stores.mkdir()
            envs[label] = env_for(tree, stores)
            print(f"{label}: prunelab from {describe(tree, envs[label], work)}")

        print(f"\nsmall sweep, fixed cost (wall s): prunelab {' '.join(SWEEP)}")
        for label, env in envs.items():
            seconds, result = run(SWEEP, env, work)
            check(f"{label}: sweep", result)
            print(f"  {label:24} {seconds:7.2f}")

        print(
            f"\ncommands (wall s, {opts.repeat} runs each in fresh processes; load "
            f"{os.getloadavg()[0]:.2f})"
        )
        time_commands(envs, work, opts.repeat)
        if opts.ray:
            print(f"\nlocal Ray (fresh process each; load {os.getloadavg()[0]:.2f})")
            time_ray(envs, work, max(1, min(opts.repeat, 3)))
        if opts.phases:
            for label, env in envs.items():
                phases = work / f"phases-{label.replace(' ', '-')}"
                phases.mkdir()
                env = env_for(Path(env["PYTHONPATH"].split(os.pathsep)[0]), phases)
                print(f"\nsteps of a small sweep, {label} (load {os.getloadavg()[0]:.2f}):")
                _, result = run(SWEEP, env, work, PHASES_PROBE)
                check(f"{label}: phases", result)
                print(result.stdout.rstrip())
        print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    finally:
        if opts.keep:
            print(f"stores kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
