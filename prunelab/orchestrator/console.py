"""What a command that runs trials shows on the console, and what goes to its log file.

The console of ``prunelab sweep`` / ``prunelab resume`` shows prunelab's own lines: where the
stores and the log file are, one :class:`Progress` line for the sweep, a failed trial's error,
prunelab's warnings, the results table. Everything else a sweep makes goes to a log file next
to the stores (``prunelab-runs/logs/<sweep>-<time>.log``; :func:`log_path`): the driver's Ray,
MLflow and transformers logging, its Python warnings, and the workers' logs, warnings and
printed output (each worker writes there itself: :func:`worker_log`, read by
:mod:`prunelab.workers.actor`); Ray is started with ``log_to_driver=False``
(:func:`log_to_driver`). With ``-v``/``--verbose`` all of it goes to the console instead, as
Ray and the libraries print it (no log file).

The log file is created when the first line is written to it (a command that stops on bad
input writes nothing), and one line on the console says where it is.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "Console",
    "Progress",
    "log_path",
    "log_to_driver",
    "open_console",
    "run_dir",
    "worker_log",
    "write",
]

# loggers that print to the console through handlers of their own (not the root logger's):
# in a quiet console their records go to the log file instead
LIBRARY_LOGGERS = ("ray", "transformers", "mlflow")
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_lock = threading.RLock()
_console: Console | None = None  # the console of the running command (open_console)
_progress: Progress | None = None  # the progress line on the console now, if any


def run_dir(stores: Any) -> Path:
    """The directory of a sweep's records: that of a SQLite database, else the one above a
    local artifact root, else ``./prunelab-runs``."""
    from sqlalchemy.engine import make_url

    try:
        url = make_url(stores.db_url)
    except Exception:
        url = None
    database = url.database if url is not None and url.drivername.startswith("sqlite") else None
    if database and database != ":memory:" and not database.startswith("file:"):
        return Path(database).resolve().parent
    root = stores.artifact_root
    if root and root.startswith("file://"):
        root = root[len("file://") :]
    if root and "://" not in root:
        return Path(root).resolve().parent
    return Path.cwd() / "prunelab-runs"


def log_path(stores: Any, name: str) -> Path:
    """``<run dir>/logs/<name>-<YYYYmmdd-HHMMSS>.log`` (``-2``, ``-3`` ... when taken)."""
    stem = f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    logs = run_dir(stores) / "logs"
    path, n = logs / f"{stem}.log", 1
    while path.exists():
        n += 1
        path = logs / f"{stem}-{n}.log"
    return path


class _LogFile:
    """The log file, opened (and its directory made) when it is first needed."""

    def __init__(self, path: Path, announce: Callable[[Path], None]) -> None:
        self.path = path
        self.announce = announce
        self.stream: TextIO | None = None

    def open(self) -> TextIO:
        with _lock:
            if self.stream is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.stream = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
                self.announce(self.path)
            return self.stream

    def close(self) -> None:
        with _lock:
            if self.stream is not None:
                self.stream.close()
                self.stream = None


class _FileHandler(logging.Handler):
    """Writes records to the :class:`_LogFile` (opening it on the first one)."""

    def __init__(self, file: _LogFile, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.file = file
        self.setFormatter(logging.Formatter(FILE_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.file.open().write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


class _ConsoleHandler(logging.Handler):
    """prunelab's own warnings on the console, above the progress line (:func:`write`)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(logging.WARNING)
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write(self.format(record), self.stream)
        except Exception:
            self.handleError(record)


class Console:
    """The console of one command: quiet (``log`` is the log file's path) or verbose (None).

    :meth:`start` routes the loggers; :meth:`close` puts them back as they were.
    """

    def __init__(self, log: Path | None, stream: TextIO | None = None) -> None:
        self.log = log
        self.stream = stream  # None: sys.stderr when written
        self.file = None if log is None else _LogFile(log, self._announce)
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool, int]] = []
        self._added: list[tuple[logging.Logger, logging.Handler]] = []
        self._warnings = False

    @property
    def verbose(self) -> bool:
        return self.file is None

    def _announce(self, path: Path) -> None:
        write(
            f"prunelab: log: {path} (Ray, MLflow, transformers and the workers' output; "
            "-v shows them here)",
            self.stream,
        )

    def _replace(self, logger: logging.Logger, handlers: list[logging.Handler], level: int):
        self._saved.append((logger, list(logger.handlers), logger.propagate, logger.level))
        logger.handlers = handlers
        logger.propagate = False
        logger.setLevel(level)

    def start(self) -> Console:
        global _console
        own = logging.getLogger("prunelab")
        handlers: list[logging.Handler] = [_ConsoleHandler(self.stream)]
        if self.file is not None:
            handlers.append(_FileHandler(self.file, logging.INFO))
        self._replace(own, handlers, logging.INFO)
        if self.file is not None:
            self._quiet_libraries()
        with _lock:
            _console = self
        return self

    def _quiet_libraries(self) -> None:
        """The libraries' loggers into the log file; Python's warnings too (``py.warnings``,
        through the root logger: its filters still apply, ``-W error`` still raises)."""
        assert self.file is not None
        # each library sets up its console handler when imported: import them first (the
        # sweep imports all three anyway), so that none adds one after this
        import mlflow  # noqa: F401
        import ray  # noqa: F401
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger("transformers")  # its handler is made on first use
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            # a handler each: ray.init sets the formatter of the handlers of the "ray" logger
            self._replace(logger, [_FileHandler(self.file)], logger.level)
        root = logging.getLogger()
        handler = _FileHandler(self.file)
        root.addHandler(handler)
        self._added.append((root, handler))
        logging.captureWarnings(True)
        self._warnings = True

    def close(self) -> None:
        global _console
        with _lock:
            if _console is self:
                _console = None
        if self._warnings:
            logging.captureWarnings(False)
            self._warnings = False
        for logger, handler in reversed(self._added):
            logger.removeHandler(handler)
        for logger, handlers, propagate, level in reversed(self._saved):
            logger.handlers = handlers
            logger.propagate = propagate
            logger.setLevel(level)
        self._added.clear()
        self._saved.clear()
        if self.file is not None:
            self.file.close()


def open_console(stores: Any, name: str, verbose: bool = False) -> Console:
    """Start the console of a command that runs sweep ``name`` on ``stores``: quiet (a log
    file under :func:`run_dir`) unless ``verbose``. The caller closes it."""
    if verbose:  # every worker's lines, without Ray's notices of lines it left out
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # read when ray is imported
    return Console(None if verbose else log_path(stores, name)).start()


def log_to_driver() -> bool:
    """Whether Ray forwards the workers' output to this process's console (``ray.init``'s
    ``log_to_driver``): not while a quiet console runs (the workers write to its log file)."""
    console = _console
    return console is None or console.verbose


def worker_log() -> str | None:
    """Where the workers started now send their logs, warnings and output: the log file's
    path (created now, so that the workers find it), ``-`` for their stderr (verbose: Ray
    brings it to the console), None when no console runs (left as Ray has it)."""
    console = _console
    if console is None:
        return None
    if console.file is None:
        return "-"
    console.file.open()
    return str(console.file.path)


def write(line: str, stream: TextIO | None = None) -> None:
    """Print ``line`` on the console (stderr), above the progress line if one is shown."""
    with _lock:
        if _progress is not None:
            _progress.write(line)
            return
        out = stream or sys.stderr
        out.write(line + "\n")
        out.flush()


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 10 s`` or ``2 h 05 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """The one progress line of a sweep: ``sweep NAME: 3/10 done, 2 running, 1 failed, ETA
    1 min 20 s``.

    On a terminal it is redrawn in place (``\\r``); elsewhere (a CI log, a file) each change is
    one line. :func:`write` prints lines above it. The ETA is the mean duration of the trials
    finished here (claimed to done), times the trials left, over the trials seen running at
    once. ``clock`` is for tests.
    """

    def __init__(
        self,
        name: str,
        total: int,
        done: int = 0,
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        global _progress
        self.name, self.total, self.done = name, total, done
        self.failed_count = 0
        self.elsewhere = 0
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty()) if tty is None else tty
        self.clock = clock
        self.started_at: dict[Any, float] = {}  # running trial -> when it was claimed
        self.ended_at: dict[Any, float] = {}  # ... -> when its worker took another one
        self.on: dict[Any, Any] = {}  # worker -> the trial it runs
        self.durations: list[float] = []
        self.parallel = 1  # the most trials seen running at once
        self.shown = ""  # the line on the console now
        self.width = 0  # its length (a terminal's line is blanked before a shorter one)
        self.closed = False
        with _lock:
            _progress = self
            self._draw()

    # -- what happens to trials --------------------------------------------------------------
    def started(self, trial: Any, worker: Any = None) -> None:
        """``trial`` was claimed for ``worker``. A worker runs one trial at a time: the one
        it ran before has ended, though its result may be reported after this."""
        with _lock:
            now = self.clock()
            before = self.on.get(worker)
            if worker is not None and before in self.started_at:
                self.ended_at.setdefault(before, now)
            self.on[worker] = trial
            self.started_at[trial] = now
            self.parallel = max(self.parallel, self.running())
            self._draw()

    def _end(self, trial: Any) -> float | None:
        """Forget running ``trial``; how long it ran (None: not seen starting)."""
        start = self.started_at.pop(trial, None)
        end = self.ended_at.pop(trial, None)
        return None if start is None else (end if end is not None else self.clock()) - start

    def finished(self, trial: Any) -> None:
        """``trial`` finished: one more done, its duration counts for the ETA."""
        with _lock:
            seconds = self._end(trial)
            if seconds is not None:
                self.durations.append(seconds)
            self.done += 1
            self._draw()

    def failed(self, trial: Any = None, count: int = 1) -> None:
        """``count`` trials failed for good (``trial``, if it was running)."""
        with _lock:
            self._end(trial)
            self.failed_count += count
            self._draw()

    def released(self, trial: Any) -> None:
        """``trial`` stopped running and waits to run again (a retry)."""
        with _lock:
            self._end(trial)
            self._draw()

    def running(self) -> int:
        """Trials running now (claimed, and their workers still on them)."""
        return len(self.started_at) - len(self.ended_at)

    def waiting(self, elsewhere: int) -> None:
        """``elsewhere`` trials of the sweep run under another orchestrator."""
        with _lock:
            self.elsewhere = elsewhere
            self._draw()

    # -- the line ----------------------------------------------------------------------------
    def eta(self) -> float | None:
        """Seconds left (None: no trial has finished here yet)."""
        if not self.durations:
            return None
        left = self.total - self.done - self.failed_count
        mean = sum(self.durations) / len(self.durations)
        return left * mean / self.parallel

    def line(self) -> str:
        parts = [f"{self.done}/{self.total} done", f"{self.running()} running"]
        if self.failed_count:
            parts.append(f"{self.failed_count} failed")
        if self.elsewhere:
            parts.append(f"{self.elsewhere} under another orchestrator")
        left = self.total - self.done - self.failed_count
        if left > 0:
            eta = self.eta()
            parts.append("ETA " + ("?" if eta is None else _duration(eta)))
        return f"sweep {self.name}: " + ", ".join(parts)

    def _draw(self, force: bool = False) -> None:
        if self.closed:
            return
        line = self.line()
        if line == self.shown and not force:
            return
        if self.tty:
            columns = shutil.get_terminal_size((100, 24)).columns
            line = line[: max(20, columns - 1)]
            self.stream.write("\r" + line + " " * max(0, self.width - len(line)))
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.shown = line

    def write(self, text: str) -> None:
        """Print ``text`` (a line) above the progress line."""
        with _lock:
            if self.tty and self.width and not self.closed:
                self.stream.write("\r" + " " * self.width + "\r")
                self.width = 0
            self.stream.write(text + "\n")
            self.stream.flush()
            if self.tty and not self.closed:
                self._draw(force=True)

    def close(self) -> None:
        """End the line (a terminal's with a newline), so what follows starts on its own."""
        global _progress
        with _lock:
            if self.closed:
                return
            self._draw()
            if self.tty and self.width:
                self.stream.write("\n")
                self.stream.flush()
            self.closed = True
            if _progress is self:
                _progress = None
