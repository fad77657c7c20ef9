"""``eval.batch_size``: an int >= 1 or ``auto``, validated like every setting (a bad value
exits 2 with one line naming it, nothing written), and not part of a trial's key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from test_bad_input_fuzz import Case, check_one_line, no_run, quick, run_case  # noqa: F401

from prunelab.orchestrator.spec import load_sweep

BAD: dict[str, Case] = {
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


def test_keys_do_not_change_with_batch_size() -> None:
    base = keys([])
    assert keys(["eval.batch_size=1"]) == base
    assert keys(["eval.batch_size=16"]) == base
    assert keys(["eval.batch_size=auto"]) == base


def test_batch_size_reaches_the_plan() -> None:
    assert {t.eval.batch_size for t in load_sweep("quickstart", []).trials} == {1}
    plan = load_sweep("quickstart", ["eval.batch_size=4"])
    assert {t.eval.batch_size for t in plan.trials} == {4}
    plan = load_sweep("quickstart", ["eval.batch_size=auto"])
    assert {t.eval.batch_size for t in plan.trials} == {"auto"}
