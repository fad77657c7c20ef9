"""End a local Ray's processes when the orchestrator that started them is killed.

``ray.shutdown()`` ends a local Ray's processes when the orchestrator exits normally, on
Ctrl-C, SIGTERM or an error. ``kill -9`` (or the OOM killer) gives it no chance: Ray's GCS,
raylet and workers then end by themselves, but its dashboard and runtime-env agents stay,
about 220 MB a node, for as long as the machine runs.

:func:`arm` starts one small watcher process per orchestrator. While the orchestrator runs, the
watcher notes every Ray process below it (Ray's processes are its children and their children).
When the orchestrator is gone, the watcher kills the ones still running, then exits. Processes
are identified by pid and start time, so a pid reused by an unrelated process is never touched.
Only processes whose command line names Ray are noted: the orchestrator's other children (a
pytest run's, say) are left alone. Linux only (it reads ``/proc``); elsewhere ``arm`` does
nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["arm", "ray_descendants"]

PROC = Path("/proc")
POLL_S = 1.0  # how often the watcher looks at the orchestrator and its Ray processes

Process = tuple[int, int]  # (pid, start time in clock ticks since boot)

_armed: dict[int, subprocess.Popen] = {}  # orchestrator pid -> the watcher started for it


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) of ``pid``, or None when it does not exist."""
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19]), fields[0]


def _alive(process: Process) -> bool:
    """Whether ``process`` still runs: the same pid with the same start time, not a zombie."""
    stat = _stat(process[0])
    return stat is not None and stat[1] == process[1] and stat[2] not in ("Z", "X")


def _is_ray(pid: int) -> bool:
    """Whether ``pid`` is a Ray process: a worker or agent (``ray::IDLE``,
    ``ray::DashboardAgent``) or a program of Ray's package (``.../ray/core/src/ray/raylet``)."""
    try:
        cmdline = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False
    return cmdline.startswith(b"ray::") or b"/ray/" in cmdline


def ray_descendants(root: int) -> set[Process]:
    """The Ray processes below ``root`` (children, their children, ...), as (pid, start)."""
    parents: dict[int, tuple[int, int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                parents[int(entry.name)] = (stat[0], stat[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, (parent, _) in parents.items() if parent in frontier} - found
        found |= frontier
    found.discard(os.getpid())
    return {(pid, parents[pid][1]) for pid in found if _is_ray(pid)}


def watch(orchestrator: Process) -> list[Process]:
    """Note ``orchestrator``'s Ray processes until it is gone; then kill those still running.
    Returns the processes it killed."""
    noted: set[Process] = set()
    while _alive(orchestrator):
        noted |= ray_descendants(orchestrator[0])
        noted = {p for p in noted if _alive(p)}
        time.sleep(POLL_S)
    killed = [p for p in sorted(noted) if _alive(p)]
    for pid, _ in killed:
        with contextlib.suppress(OSError):  # ended meanwhile
            os.kill(pid, signal.SIGKILL)
    return killed


def arm(pid: int | None = None) -> None:
    """Start the watcher of orchestrator ``pid`` (this process by default), once per pid.

    The watcher runs in a session of its own, so the signal that stops the orchestrator's
    process group (Ctrl-C in a terminal) does not stop it too.
    """
    pid = os.getpid() if pid is None else pid
    stat = _stat(pid)
    if stat is None or pid in _armed:  # no /proc (not Linux), or already watched
        return
    _armed[pid] = subprocess.Popen(
        [sys.executable, "-m", "prunelab.orchestrator.reaper", str(pid), str(stat[1])],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


if __name__ == "__main__":
    watch((int(sys.argv[1]), int(sys.argv[2])))
