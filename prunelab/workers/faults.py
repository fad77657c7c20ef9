"""Test-only fault injection into workers: ``PRUNELAB_TEST_FAULTS``.

Never set in production. The fault tests of the orchestrator set this environment variable
before Ray starts (Ray worker processes inherit it) to make a worker fail mid-trial in a
controlled way. Its value is a JSON list of rules, or ``@PATH`` of a file holding one (read
again at every trial, so a test can change the rules of a running cluster). A rule applies to
a trial when every key of its ``match`` object (dotted keys reach into nested sections, e.g.
``eval.sample_seed``) equals the value in the trial's stored form (``Trial.to_dict``; a missing
``match`` matches every trial)::

    [{"fault": "kill", "match": {"method": "fastv"}, "once": "/tmp/x/killed"},
     {"fault": "oom", "match": {"method": "random"}},
     {"fault": "sleep", "seconds": 2}]

Faults:

* ``kill``: the worker process SIGKILLs itself (a crashed process, as seen by Ray).
* ``oom``: raises ``torch.cuda.OutOfMemoryError`` from inside the trial.
* ``error``: raises ``RuntimeError(message)`` from inside the trial (a bug in the trial's
  code: the same config fails the same way every time).
* ``sleep``: sleeps ``seconds`` before the trial (a slow or hung trial).

``once``: a file path; the rule fires only for the process that creates that file first
(``O_CREAT | O_EXCL``), so across all workers and retries it fires exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Final

from prunelab.trial import Trial

__all__ = ["FAULTS_ENV", "inject"]

FAULTS_ENV: Final = "PRUNELAB_TEST_FAULTS"


def _claim_once(path: str) -> bool:
    """True for the first caller (any process) that creates ``path``."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _matches(rule: dict[str, Any], config: dict[str, Any]) -> bool:
    match = rule.get("match") or {}
    return all(_lookup(config, key) == value for key, value in match.items())


def _rules() -> list[dict[str, Any]]:
    raw = os.environ.get(FAULTS_ENV, "").strip()
    if raw.startswith("@"):
        try:
            raw = Path(raw[1:]).read_text().strip()
        except FileNotFoundError:
            return []
    return json.loads(raw) if raw else []


def inject(trial: Trial) -> None:
    """Apply the rules of ``$PRUNELAB_TEST_FAULTS`` that match ``trial`` (no-op when unset)."""
    rules = _rules()
    config = trial.to_dict() if rules else {}  # the stored form the dotted keys reach into
    for rule in rules:
        if not _matches(rule, config):
            continue
        if rule.get("once") and not _claim_once(rule["once"]):
            continue
        fault = rule["fault"]
        if fault == "sleep":
            time.sleep(float(rule.get("seconds", 1.0)))
        elif fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault == "oom":
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by a test)")
        elif fault == "error":
            raise RuntimeError(rule.get("message", "injected by a test"))
        else:
            raise ValueError(f"{FAULTS_ENV}: unknown fault {fault!r}")
