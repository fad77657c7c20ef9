"""MLflow tracking of sweeps and trials (the only prunelab module that imports mlflow).

One experiment per sweep name, one parent run per sweep and one child run per trial of the
sweep (FINISHED, or FAILED with its error; a trial reused from an earlier sweep gets a copy of
the run that computed it, tagged ``prunelab.reused_from``), with the tags of DESIGN.md
("MLflow conventions"). A child run's start and end are the trial's own (ms since the epoch,
given by the caller). Experiments are tagged ``mlflow.experimentKind`` so that MLflow 3's UI
opens them on their runs table. Everything goes through an
`MlflowClient` bound to one tracking URI, never through mlflow's global fluent API, so a
process may drive several sweeps and stores at once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Final, Literal, cast
from urllib.parse import urlparse

from sqlalchemy.exc import DBAPIError

import prunelab
from prunelab.db.engine import normalize_db_url, schema_lock

# mlflow is imported where it is used: the commands that only read prunelab's database
# (status, report) take the store defaults from here without paying for mlflow's import
if TYPE_CHECKING:
    from mlflow.entities import Experiment, Run
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

__all__ = [
    "ARTIFACT_ROOT_ENV",
    "TRACKING_URI_ENV",
    "Tracker",
    "code_tags",
    "default_artifact_root",
    "default_tracking_uri",
    "environment_tags",
]

TRACKING_URI_ENV: Final = "PRUNELAB_TRACKING_URI"
ARTIFACT_ROOT_ENV: Final = "PRUNELAB_ARTIFACT_ROOT"

TAG_ROLE: Final = "prunelab.role"
TAG_SWEEP_ID: Final = "prunelab.sweep_id"
TAG_TRIAL_KEY: Final = "prunelab.trial_key"
TAG_PARENT: Final = "mlflow.parentRunId"
TAG_RESCORED_FROM: Final = "prunelab.rescored_from"  # the run whose predictions were rescored
TAG_REUSED_FROM: Final = "prunelab.reused_from"  # a reused trial's copy: the run that computed it
TAG_ERROR: Final = "prunelab.error"  # a FAILED trial run: its error (the whole text: error.txt)

# MLflow 3's UI opens an experiment on the page of its kind (the runs table, or GenAI traces
# when the tag is missing and it guesses); the value the UI's "machine learning" kind has
TAG_EXPERIMENT_KIND: Final = "mlflow.experimentKind"
EXPERIMENT_KIND: Final = "custom_model_development"

# tags a reused trial's copy does not take from the original: the copy's own place (sweep,
# parent, role, key) and MLflow's own (run name, user, source: ``mlflow.*``, but for the
# run's description, `_NOTE`), which MLflow sets on every run
_OWN_TAGS: Final = frozenset({TAG_ROLE, TAG_SWEEP_ID, TAG_TRIAL_KEY, TAG_PARENT})
_NOTE: Final = "mlflow.note.content"  # a run's description: copied with the run
_ERROR_TAG_CHARS: Final = 4000  # MLflow caps tag values (8000 characters in MLflow 3)

# MLflow's SQLAlchemy store on PostgreSQL: at most 5 + 5 connections per process
_MLFLOW_PG_POOL: Final = {
    "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "5",
    "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "5",
}

# MLflow calls that lost their database connection (a terminated backend, a restarted server)
# are made again, this many times in all, after these pauses; MLflow's engine pre-pings the
# connections it takes from its pool, so a retry gets a live one
_ATTEMPTS: Final = 4
_RETRY_PAUSES_S: Final = (0.5, 1.0, 2.0)

_SHUTDOWN: Final = frozenset({"57P01", "57P02", "57P03"})  # admin/crash shutdown, cannot connect

_DB_SCHEMES: Final = frozenset({"postgresql", "postgres", "mysql", "sqlite", "mssql"})
_SAFE_TAG_VALUE = re.compile(r"[A-Za-z0-9_.:-]+")

Artifacts = Mapping[str, str | bytes]


@functools.lru_cache(maxsize=1)
def code_tags() -> dict[str, str]:
    """The orchestrator's code: ``prunelab.version`` and, when prunelab runs from a git
    checkout, ``prunelab.git_commit`` (``-dirty`` appended when tracked files are modified)."""
    tags = {"prunelab.version": prunelab.__version__}
    root = Path(prunelab.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return tags
    git = ["git", "-C", str(root)]
    try:
        commit = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return tags
    tags["prunelab.git_commit"] = commit + ("-dirty" if dirty else "")
    return tags


def environment_tags(environment: Mapping[str, str]) -> dict[str, str]:
    """Tags of what a trial ran on (``TrialResult.environment``): ``prunelab.env.<name>``."""
    return {f"prunelab.env.{name}": str(value) for name, value in sorted(environment.items())}


RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
TrialStatus = Literal["FINISHED", "FAILED"]


def default_tracking_uri() -> str:
    """``$PRUNELAB_TRACKING_URI``, else ``sqlite:///<cwd>/prunelab-runs/mlflow.db``."""
    env = os.environ.get(TRACKING_URI_ENV)
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'prunelab-runs' / 'mlflow.db'}"


def default_artifact_root() -> str:
    """``$PRUNELAB_ARTIFACT_ROOT``, else ``<cwd>/prunelab-runs/artifacts``."""
    env = os.environ.get(ARTIFACT_ROOT_ENV)
    if env:
        return env
    return str(Path.cwd() / "prunelab-runs" / "artifacts")


def _is_db_uri(uri: str) -> bool:
    """Whether ``uri`` names a database store (SQLAlchemy URL) rather than a server."""
    return urlparse(uri).scheme.split("+")[0] in _DB_SCHEMES


def _normalize_tracking_uri(uri: str) -> str:
    """Give ``postgresql://`` psycopg 3 and create the directory of a SQLite store."""
    scheme = urlparse(uri).scheme
    if scheme in ("postgresql", "postgres"):
        return normalize_db_url(uri).render_as_string(hide_password=False)
    if scheme.startswith("sqlite"):
        database = normalize_db_url(uri).database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return uri


def _has_scheme(location: str) -> bool:
    return len(urlparse(location).scheme) > 1  # one letter is a Windows drive


def _check_tag_value(name: str, value: str) -> str:
    """Values used inside search filters must not need quoting."""
    if not _SAFE_TAG_VALUE.fullmatch(value):
        raise ValueError(f"{name} {value!r} may only contain letters, digits and _.:-")
    return value


def _artifact_parts(name: str) -> tuple[str, ...]:
    """The path components of an artifact name; it must stay inside the run."""
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"artifact name {name!r} must be a relative path inside the run")
    return relative.parts


def _write_artifacts(directory: Path, artifacts: Artifacts) -> None:
    """Write ``artifacts`` (relative path -> text or bytes) under ``directory``."""
    for name, content in artifacts.items():
        target = directory.joinpath(*_artifact_parts(name))
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")


def _lost_connection(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it wraps (MLflow wraps SQLAlchemy's), is a database
    connection that was dropped (SQLAlchemy invalidated it) or could not be made (SQLSTATE
    class 08, or 57P01-57P03: the server shut the connection down or is starting)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DBAPIError):
            state = str(getattr(current.orig, "sqlstate", None) or "")
            if current.connection_invalidated or state.startswith("08") or state in _SHUTDOWN:
                return True
        current = current.__cause__ or current.__context__
    return False


class _LostConnectionFilter(logging.Filter):
    """Drops MLflow's traceback of a lost database connection: `_retried` says it in a line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[1] and _lost_connection(record.exc_info[1]))


log = logging.getLogger(__name__)
logging.getLogger("mlflow.store.db.utils").addFilter(_LostConnectionFilter())


class _RetryingClient:
    """An `MlflowClient` whose public calls are made again (at most `_ATTEMPTS` in all) when
    they fail on a lost database connection; anything else is the client's own."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        if name.startswith("_") or not callable(value):
            return value
        return functools.partial(_retried, value)


def _retried(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, made again after a pause while it fails on a lost
    database connection (`_lost_connection`), at most `_ATTEMPTS` times in all."""
    for attempt, pause in enumerate(_RETRY_PAUSES_S[: _ATTEMPTS - 1], start=1):
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            if not _lost_connection(exc):
                raise
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning(
                "MLflow %s lost its database connection (%s); trying again (%d/%d)",
                getattr(call, "__name__", "call"), reason, attempt + 1, _ATTEMPTS,
            )  # fmt: skip
        time.sleep(pause)
    return call(*args, **kwargs)


def _not_found(exc: MlflowException) -> bool:
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    return exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


class Tracker:
    """Log sweeps (parent runs) and trials (child runs) to one MLflow tracking store.

    ``artifact_root``: where new experiments keep their artifacts (``<root>/<name>``; a
    path or a URI); None leaves it to the tracking server's default.

    Every MLflow call is made again, a few times, when it fails on a lost database connection.
    On PostgreSQL, MLflow's tables are created (when missing) under prunelab's schema lock, so
    concurrent orchestrators on a new store do not race to create them.
    """

    def __init__(self, tracking_uri: str, artifact_root: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = _normalize_tracking_uri(tracking_uri)
        postgres = urlparse(self.tracking_uri).scheme.startswith("postgresql")
        if postgres:
            # MLflow's own engine on PostgreSQL: a bounded pool, like prunelab's (make_engine);
            # read by MLflow when the store is created, so an explicit setting still wins
            for name, value in _MLFLOW_PG_POOL.items():
                os.environ.setdefault(name, value)
        self.artifact_root = artifact_root
        if postgres:
            # MLflow creates its store, and its tables when missing, with the client (or at
            # its first call): under the lock of prunelab's own migrations
            with schema_lock(self.tracking_uri):
                client = MlflowClient(self.tracking_uri)
                client.search_experiments(max_results=1)
        else:
            client = MlflowClient(self.tracking_uri)
        self.client = cast(MlflowClient, _RetryingClient(client))
        self._experiment_ids: dict[str, str] = {}

    def __repr__(self) -> str:
        uri = self.tracking_uri
        if _is_db_uri(uri):
            uri = normalize_db_url(uri).render_as_string(hide_password=True)
        return f"Tracker({uri!r}, artifact_root={self.artifact_root!r})"

    # ----------------------------------------------------------------- experiments

    def _artifact_location(self, name: str) -> str | None:
        root = self.artifact_root
        if root is None:
            return None
        if _has_scheme(root):
            return f"{root.rstrip('/')}/{name}"
        return (Path(root).expanduser().resolve() / name).as_uri()

    def experiment_id(self, name: str) -> str:
        """Id of the experiment ``name``, created (or restored if deleted) when needed, and
        tagged ``mlflow.experimentKind`` (`EXPERIMENT_KIND`) unless it has a kind already."""
        from mlflow.exceptions import MlflowException

        cached = self._experiment_ids.get(name)
        if cached is not None:
            return cached
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(
                    name,
                    artifact_location=self._artifact_location(name),
                    tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND},
                )
            except MlflowException:
                # Another process created it between our lookup and create.
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
                self._ensure_kind(experiment)
        else:
            experiment_id = experiment.experiment_id
            if experiment.lifecycle_stage == "deleted":
                self.client.restore_experiment(experiment_id)
            self._ensure_kind(experiment)
        self._experiment_ids[name] = experiment_id
        return experiment_id

    def _ensure_kind(self, experiment: Experiment) -> None:
        """Tag an experiment made before prunelab set its kind (or by someone else) with
        `EXPERIMENT_KIND`; a kind already chosen (in the UI, by a user) is kept."""
        if TAG_EXPERIMENT_KIND not in (experiment.tags or {}):
            self.client.set_experiment_tag(
                experiment.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND
            )

    def _resolve_experiment(self, experiment: str) -> str:
        """An experiment id from an experiment name or id; a name that names no experiment
        (e.g. in a store that was lost and started anew) gets one, as `experiment_id`."""
        from mlflow.exceptions import MlflowException

        if experiment in self._experiment_ids:
            return self._experiment_ids[experiment]
        if experiment in self._experiment_ids.values():
            return experiment
        if self.client.get_experiment_by_name(experiment) is None:
            try:
                found = self.client.get_experiment(experiment)
            except MlflowException:
                pass  # neither a name nor an id: a name of an experiment to create
            else:
                self._ensure_kind(found)
                self._experiment_ids[found.name] = found.experiment_id
                return found.experiment_id
        return self.experiment_id(experiment)

    def _search(self, experiment_id: str, filter_string: str) -> list[Run]:
        """All active runs of an experiment matching ``filter_string`` (every page)."""
        from mlflow.entities import ViewType

        runs: list[Run] = []
        page_token: str | None = None
        while True:
            page = self.client.search_runs(
                [experiment_id],
                filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=1000,
                page_token=page_token,
            )
            runs.extend(page)
            page_token = page.token
            if not page_token:
                return runs

    # ----------------------------------------------------------------- logging

    def _log_batch(
        self,
        run_id: str,
        params: Mapping[str, Any],
        metrics: Mapping[str, float],
        timestamp: int | None = None,
    ) -> None:
        """Params (stringified, None omitted) and metrics (as float, at ``timestamp``, ms;
        None: now) in one ``log_batch`` call, which splits them into as many requests as
        MLflow's batch limits need."""
        from mlflow.entities import Metric, Param

        if timestamp is None:
            timestamp = int(time.time() * 1000)
        param_list = [Param(k, str(v)) for k, v in params.items() if v is not None]
        metric_list = [Metric(k, float(v), timestamp, 0) for k, v in metrics.items()]
        if param_list or metric_list:
            self.client.log_batch(run_id, metrics=metric_list, params=param_list)

    def _log_artifacts(self, run_id: str, artifacts: Artifacts, uri: str | None = None) -> None:
        """Store ``artifacts`` in the run's artifact location (``uri``: the run's
        ``artifact_uri`` when the caller has it, which saves looking the run up). A local
        location is written in place; any other goes through its artifact repository."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
        from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

        if not artifacts:
            return
        if uri is None:
            uri = self.client.get_run(run_id).info.artifact_uri
        repository = get_artifact_repository(uri, tracking_uri=self.tracking_uri)
        if isinstance(repository, LocalArtifactRepository):
            _write_artifacts(Path(repository.artifact_dir), artifacts)
            return
        with tempfile.TemporaryDirectory(prefix="prunelab-artifacts-") as tmp:
            _write_artifacts(Path(tmp), artifacts)
            repository.log_artifacts(tmp)

    def start_sweep(
        self, name: str, sweep_id: str, params: Mapping[str, Any], start_time: int | None = None
    ) -> str:
        """Start the parent run of a sweep in experiment ``name``; return its run id.

        If the sweep already has a parent run (a resumed sweep, or a crash before its id
        was saved), that run is set RUNNING again and returned instead of a new one: it keeps
        its start time. ``start_time`` (ms since the epoch; None: now): when the sweep was
        created, the start of a new parent run (one made again after its store was lost too).
        """
        experiment_id = self.experiment_id(name)
        sweep_id = _check_tag_value("sweep id", sweep_id)
        existing = self._search(
            experiment_id,
            f"tags.`{TAG_ROLE}` = 'sweep' and tags.`{TAG_SWEEP_ID}` = '{sweep_id}'",
        )
        if existing:
            run = existing[0]
            self.client.update_run(run.info.run_id, status="RUNNING")
            missing = {k: v for k, v in params.items() if k not in run.data.params}
            self._log_batch(run.info.run_id, missing, {})
            return run.info.run_id
        run = self.client.create_run(
            experiment_id,
            start_time=start_time,
            tags={TAG_ROLE: "sweep", TAG_SWEEP_ID: sweep_id, **code_tags()},
            run_name=f"{name}-{sweep_id}",
        )
        self._log_batch(run.info.run_id, params, {})
        return run.info.run_id

    def log_trial(
        self,
        experiment: str,
        parent_run_id: str,
        sweep_id: str,
        trial_key: str,
        run_name: str,
        params: Mapping[str, Any],
        metrics: Mapping[str, float],
        artifacts: Artifacts,
        new: bool = False,
        tags: Mapping[str, str] | None = None,
        *,
        status: TrialStatus = "FINISHED",
        start_time: int | None = None,
        end_time: int | None = None,
        error: str | None = None,
    ) -> str:
        """Log a trial as a child run of ``parent_run_id``; return its id.

        ``status``: FINISHED (a trial with its result), or FAILED (a trial that failed for
        good: ``error`` says why, in the tag ``prunelab.error`` and the artifact
        ``error.txt``). ``start_time`` / ``end_time`` (ms since the epoch; None: now): the
        trial's own start and end (its metrics are stamped with its end).

        Tags: prunelab's (role, sweep id, trial key, parent), :func:`code_tags`, and ``tags``
        (e.g. :func:`environment_tags` of the worker that ran it).

        ``experiment`` is an experiment name or id. Idempotent per (sweep, trial_key): if
        the sweep already has a FINISHED run for this key, its id is returned and nothing
        is logged; its other runs for the key (left by a crash, or a failure before the
        trial ran again) are deleted first. ``new=True``: the caller knows the sweep has no
        run for this key (it finished the trial itself and logs each trial once), so the
        search for one is skipped.
        """
        if status not in ("FINISHED", "FAILED"):
            raise ValueError(f"invalid trial run status {status!r}")
        for name in artifacts:
            _artifact_parts(name)
        artifacts = dict(artifacts)
        tags = dict(tags or {})
        if error is not None:
            artifacts["error.txt"] = error if error.endswith("\n") else error + "\n"
            tags[TAG_ERROR] = error[:_ERROR_TAG_CHARS]

        def fill(run: Run) -> None:
            self._log_batch(run.info.run_id, params, metrics, end_time)
            self._log_artifacts(run.info.run_id, artifacts, run.info.artifact_uri)

        tags = {**code_tags(), **tags}
        return self._trial_run(
            experiment, parent_run_id, sweep_id, trial_key, run_name, tags, fill,
            new=new, status=status, start_time=start_time, end_time=end_time,
        )  # fmt: skip

    def log_reused_trial(
        self,
        experiment: str,
        parent_run_id: str,
        sweep_id: str,
        trial_key: str,
        source_run_id: str,
    ) -> str | None:
        """Give a trial reused from an earlier sweep its child run in this sweep: a copy of
        run ``source_run_id`` (the run that computed it) with its name, params, metrics,
        tags, artifacts, start and end, tagged ``prunelab.reused_from`` with the source's id
        (the source's own ``prunelab.reused_from`` if it is a copy itself). Idempotent per
        (sweep, trial_key), as :meth:`log_trial`. Returns the copy's id; None when the source
        run is gone (deleted, or its store lost), nothing logged.
        """
        from mlflow.exceptions import MlflowException

        try:
            source = self.client.get_run(source_run_id)
        except MlflowException as exc:
            if not _not_found(exc):
                raise
            return None
        if source.info.lifecycle_stage == "deleted":
            return None
        tags = {
            key: value
            for key, value in source.data.tags.items()
            if key not in _OWN_TAGS and (key == _NOTE or not key.startswith("mlflow."))
        }
        tags[TAG_REUSED_FROM] = source.data.tags.get(TAG_REUSED_FROM, source_run_id)
        end_time = source.info.end_time

        def fill(run: Run) -> None:
            self._log_batch(run.info.run_id, source.data.params, source.data.metrics, end_time)
            self._copy_artifacts(source.info.artifact_uri, run.info.artifact_uri)

        return self._trial_run(
            experiment, parent_run_id, sweep_id, trial_key, source.info.run_name, tags, fill,
            new=False, status="FINISHED", start_time=source.info.start_time, end_time=end_time,
        )  # fmt: skip

    def _trial_run(
        self,
        experiment: str,
        parent_run_id: str,
        sweep_id: str,
        trial_key: str,
        run_name: str,
        tags: Mapping[str, str],
        fill: Callable[[Run], None],
        *,
        new: bool,
        status: TrialStatus,
        start_time: int | None,
        end_time: int | None,
    ) -> str:
        """The child run of a trial, made once per (sweep, trial_key) (see
        :meth:`log_trial`): created with prunelab's tags and ``tags``, filled by ``fill``,
        ended ``status`` at ``end_time``; a run whose filling fails is ended FAILED."""
        experiment_id = self._resolve_experiment(experiment)
        sweep_id = _check_tag_value("sweep id", sweep_id)
        trial_key = _check_tag_value("trial key", trial_key)
        previous = (
            []
            if new
            else self._search(
                experiment_id,
                f"tags.`{TAG_TRIAL_KEY}` = '{trial_key}' and tags.`{TAG_SWEEP_ID}` = '{sweep_id}'",
            )
        )
        for run in previous:
            if run.info.status == "FINISHED":
                return run.info.run_id
        for run in previous:
            self.client.delete_run(run.info.run_id)
        run = self.client.create_run(
            experiment_id,
            start_time=start_time,
            tags={
                **tags,
                TAG_PARENT: parent_run_id,
                TAG_ROLE: "trial",
                TAG_TRIAL_KEY: trial_key,
                TAG_SWEEP_ID: sweep_id,
            },
            run_name=run_name,
        )
        run_id = run.info.run_id
        try:
            fill(run)
        except BaseException:
            with contextlib.suppress(Exception):  # keep the original error
                self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, status, end_time=end_time)
        return run_id

    def _copy_artifacts(self, source_uri: str, target_uri: str) -> None:
        """Copy every artifact under ``source_uri`` (a run's artifact location) to
        ``target_uri``: file to file between local locations, else through a temporary
        directory and the locations' artifact repositories."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
        from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

        source = get_artifact_repository(source_uri, tracking_uri=self.tracking_uri)
        target = get_artifact_repository(target_uri, tracking_uri=self.tracking_uri)
        if isinstance(source, LocalArtifactRepository):
            directory = Path(source.artifact_dir)
            if not directory.is_dir() or not any(directory.iterdir()):
                return
            if isinstance(target, LocalArtifactRepository):
                shutil.copytree(directory, target.artifact_dir, dirs_exist_ok=True)
                return
            target.log_artifacts(str(directory))
            return
        if not source.list_artifacts():
            return
        with tempfile.TemporaryDirectory(prefix="prunelab-artifacts-") as tmp:
            source.download_artifacts("", dst_path=tmp)
            target.log_artifacts(tmp)

    def read_artifact(self, run_id: str, name: str) -> str | None:
        """The text of run ``run_id``'s artifact ``name``; None when the run or file is gone."""
        from mlflow.exceptions import MlflowException

        _artifact_parts(name)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self.client.download_artifacts(run_id, name, tmp)
            except (MlflowException, OSError):
                return None
            return Path(path).read_text()

    def log_sweep_artifacts(self, parent_run_id: str, artifacts: Artifacts) -> None:
        """Attach artifacts (relative path -> text or bytes) to a sweep's parent run."""
        self._log_artifacts(parent_run_id, artifacts)

    def log_sweep_metrics(self, parent_run_id: str, metrics: Mapping[str, float]) -> None:
        """Log summary metrics on a sweep's parent run."""
        self._log_batch(parent_run_id, {}, metrics)

    def finish_sweep(self, parent_run_id: str, status: RunStatus = "FINISHED") -> None:
        """End a sweep's parent run with ``status`` (FINISHED, FAILED or KILLED)."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"invalid run status {status!r}")
        self.client.set_terminated(parent_run_id, status)

    # ----------------------------------------------------------------- reading

    def missing_runs(self, run_ids: Collection[str], experiment: str | None = None) -> set[str]:
        """The ids among ``run_ids`` of runs that no longer exist, or were deleted (e.g. a
        store lost and started anew). ``experiment``: the name of the experiment that most of
        them belong to, searched at once; the others are looked up one by one."""
        from mlflow.exceptions import MlflowException

        active: set[str] = set()
        if experiment is not None and run_ids:
            found = self.client.get_experiment_by_name(experiment)
            if found is not None:
                runs = self._search(found.experiment_id, "")
                active = {run.info.run_id for run in runs}
        missing = set()
        for run_id in set(run_ids) - active:
            try:
                run = self.client.get_run(run_id)
            except MlflowException as exc:
                if not _not_found(exc):
                    raise
                missing.add(run_id)
                continue
            if run.info.lifecycle_stage == "deleted":
                missing.add(run_id)
        return missing

    def trial_runs(self, experiment_name: str, sweep_id: str | None = None) -> list[Run]:
        """Active trial runs of an experiment (optionally of one sweep); [] if none."""
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            return []
        filter_string = f"tags.`{TAG_ROLE}` = 'trial'"
        if sweep_id is not None:
            sweep_id = _check_tag_value("sweep id", sweep_id)
            filter_string += f" and tags.`{TAG_SWEEP_ID}` = '{sweep_id}'"
        return self._search(experiment.experiment_id, filter_string)
