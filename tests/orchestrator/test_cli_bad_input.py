"""Bad input: exit status 2, one clear line per problem, nothing written anywhere."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect

from prunelab.orchestrator.cli import main

CASES = {
    "unknown model": (["quickstart", "model=tiny-lava"], "did you mean 'tiny-llava'"),
    "unknown method": (["quickstart", "method=fastvv"], "did you mean 'fastv'"),
    "unknown benchmark": (["quickstart", "benchmark=shape"], "did you mean 'shapes'"),
    "keep_ratio above 1": (["quickstart", "keep_ratio=1.5"], "keep_ratio=1.5"),
    "keep_ratio zero": (["quickstart", "keep_ratio=0"], "keep_ratio=0"),
    "keep_tokens zero": (["quickstart", "~keep_ratio", "keep_tokens=0"], "keep_tokens=0"),
    "keep_tokens above visual": (["quickstart", "keep_tokens=145"], "keep_tokens=145"),
    "prune_layer beyond depth": (["quickstart", "prune_layer=9"], "prune_layer=9"),
    "unknown axis": (["quickstart", "+grid.keep_ration=0.5"], "keep_ration"),
    "wrong hyperparameter type": (["quickstart", "method.queries=5"], "queries=5"),
    "bad eval value": (["quickstart", "eval.limit=abc"], "eval.limit"),
    "missing spec": (["no-such-spec"], "no-such-spec"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    args, expected = CASES[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PRUNELAB_DB_URL", raising=False)
    monkeypatch.delenv("PRUNELAB_TRACKING_URI", raising=False)
    assert main(["sweep", *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("prunelab: error:")]
    assert lines, err
    assert any(expected in line for line in lines), err
    assert "command line" in err or "no-such-spec" in err
    assert not (tmp_path / "prunelab-runs").exists()


def test_malformed_yaml_names_the_file(tmp_path, monkeypatch, capsys):
    spec = tmp_path / "broken.yaml"
    spec.write_text("defaults: [base, _self_]\nname: broken\ngrid: {model: [tiny-llava\n")
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml" in err
    assert not (tmp_path / "prunelab-runs").exists()


def test_spec_file_problem_names_the_file(tmp_path, monkeypatch, capsys):
    spec = tmp_path / "mine.yaml"
    spec.write_text(
        "defaults: [base, _self_]\nname: mine\n"
        "grid: {model: tiny-llava, benchmark: shapes, method: fastv, keep_ratio: 1.5}\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "keep_ratio=1.5" in err and "mine.yaml" in err


def test_several_problems_are_all_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "quickstart", "method=fastvv", "keep_ratio=1.5"]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("prunelab: error:")]
    assert len(lines) >= 2


@pytest.mark.postgres
def test_bad_input_writes_nothing_to_postgresql(tmp_path, monkeypatch, capsys, pg_url):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRUNELAB_DB_URL", pg_url)
    monkeypatch.setenv("PRUNELAB_TRACKING_URI", pg_url)
    assert main(["sweep", "quickstart", "keep_ratio=2"]) == 2
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    assert inspect(engine).get_table_names() == []
    engine.dispose()


def test_unreachable_database_is_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    url = "postgresql://postgres@127.0.0.1:5432/prunelab_no_such_db"
    assert main(["sweep", "quickstart", "--db-url", url]) == 2
    err = capsys.readouterr().err
    assert "prunelab_no_such_db" in err and "--db-url" in err
    assert not (tmp_path / "prunelab-runs").exists()
