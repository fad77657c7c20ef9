"""The throughput settings ``eval.timed_samples``, ``eval.batch_size`` (an int >= 1 or
``auto``) and ``workers.vision_cache_mb``: validated like every setting (a bad value exits 2
with one line naming it, nothing written), and none changes a trial's key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from test_bad_input_fuzz import Case, check_one_line, no_run, quick, run_case  # noqa: F401

from prunelab.orchestrator.spec import load_sweep

BAD: dict[str, Case] = {
    "timed_samples zero": quick("eval.timed_samples=0"),
    "timed_samples negative": quick("eval.timed_samples=-3"),
    "timed_samples not a number": quick("eval.timed_samples=abc"),
    "timed_samples a fraction": quick("eval.timed_samples=2.5"),
    "timed_samples nan": quick("eval.timed_samples=nan"),
    "vision_cache_mb negative": quick("workers.vision_cache_mb=-1"),
    "vision_cache_mb nan": quick("workers.vision_cache_mb=nan"),
    "vision_cache_mb inf": quick("workers.vision_cache_mb=inf"),
    "vision_cache_mb a word": quick("workers.vision_cache_mb=lots"),
    "batch_size zero": quick("eval.batch_size=0"),
    "batch_size negative": quick("eval.batch_size=-2"),
    "batch_size a fraction": quick("eval.batch_size=2.5"),
    "batch_size a word": quick("eval.batch_size=lots"),
    "batch_size a bool": quick("eval.batch_size=true"),
    "batch_size nan": quick("eval.batch_size=nan"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_value_is_one_line_and_exit_2(
    name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_run: Callable[..., None],  # noqa: F811
) -> None:
    monkeypatch.chdir(tmp_path)
    case = BAD[name]
    check_one_line(case, run_case(case, tmp_path, capsys))


def keys(overrides: list[str]) -> list[str]:
    return [t.key for t in load_sweep("quickstart", overrides).trials]


def test_keys_do_not_change_with_timing_or_cache_settings() -> None:
    base = keys([])
    assert keys(["eval.timed_samples=32"]) == base  # the default, spelled out
    assert keys(["eval.timed_samples=4", "workers.vision_cache_mb=0"]) == base
    assert keys(["workers.vision_cache_mb=512.5"]) == base
    assert keys(["eval.batch_size=1"]) == base
    assert keys(["eval.batch_size=16"]) == base
    assert keys(["eval.batch_size=auto"]) == base


def test_settings_reach_the_plan() -> None:
    plan = load_sweep("quickstart", ["eval.timed_samples=7", "workers.vision_cache_mb=64"])
    assert {t.eval.timed_samples for t in plan.trials} == {7}
    assert plan.workers.vision_cache_mb == 64
    default = load_sweep("quickstart", [])
    assert {t.eval.timed_samples for t in default.trials} == {32}
    assert default.workers.vision_cache_mb == 2048
    assert {t.eval.batch_size for t in default.trials} == {"auto"}  # the quickstart's
    plan = load_sweep("quickstart", ["eval.batch_size=4"])
    assert {t.eval.batch_size for t in plan.trials} == {4}
    plan = load_sweep("quickstart", ["eval.batch_size=1"])  # base.yaml's default
    assert {t.eval.batch_size for t in plan.trials} == {1}
