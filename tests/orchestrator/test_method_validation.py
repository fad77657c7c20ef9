"""A method's plan that cannot work on a model (stage layers beyond its depth, an average
budget out of reach) is bad input: exit status 2, the value and the model named, nothing
written to the database."""

from __future__ import annotations

import pytest

from prunelab.orchestrator.cli import main

CASES = {
    # tiny-llava has 4 decoder layers
    "pdrop layers beyond depth": (
        ["method=pdrop", "method.layers=[8,16,24]"],
        ["pdrop.layers=[8, 16, 24]", "'tiny-llava'", "4 layers"],
    ),
    "sparsevlm layers beyond depth": (
        ["method=sparsevlm", "method.layers=[2,6,15]"],
        ["sparsevlm.layers=[2, 6, 15]", "'tiny-llava'", "4 layers"],
    ),
    "average budget out of reach": (
        ["method=pdrop", "keep_ratio=0.05"],
        ["average of 7.2 visual tokens", "'tiny-llava'", "out of reach"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_impossible_plan_exits_2_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    args, expected = CASES[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PRUNELAB_DB_URL", raising=False)
    monkeypatch.delenv("PRUNELAB_TRACKING_URI", raising=False)
    database = tmp_path / "explicit.db"
    argv = ["sweep", "quickstart", "model=tiny-llava", *args, "--db-url", f"sqlite:///{database}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("prunelab: error:")]
    assert any(all(text in line for text in expected) for line in lines), err
    assert not database.exists()
    assert not (tmp_path / "prunelab-runs").exists()


def test_default_database_is_not_created_either(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PRUNELAB_DB_URL", raising=False)
    monkeypatch.delenv("PRUNELAB_TRACKING_URI", raising=False)
    assert main(["sweep", "quickstart", "method=pdrop", "method.layers=[8,16,24]"]) == 2
    assert "pdrop.layers=[8, 16, 24]" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_layers_within_depth_are_accepted(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["sweep", "quickstart", "method=pdrop,sparsevlm", "keep_ratio=0.5"]
    assert main([*args, "method.layers=[1,2]", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pdrop" in out and "sparsevlm" in out
