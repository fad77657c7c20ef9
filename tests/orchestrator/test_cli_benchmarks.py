"""A benchmark whose data file is missing or malformed fails sweep validation: exit 2, the
benchmark and the path named, before anything runs or is written."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prunelab.orchestrator.cli import main


def _errors(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.startswith("prunelab: error:")]


def test_shipped_benchmark_without_data_exits_2(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRUNELAB_DATA", str(data))
    monkeypatch.delenv("PRUNELAB_DB_URL", raising=False)
    monkeypatch.delenv("PRUNELAB_TRACKING_URI", raising=False)
    assert main(["sweep", "quickstart", "benchmark=pope,mme"]) == 2
    lines = _errors(capsys)
    for name, folder in (("pope", "POPE"), ("mme", "MME")):
        assert any(f"benchmark {name!r}" in x and str(data / folder) in x for x in lines), lines
    assert not (tmp_path / "prunelab-runs").exists()


def _pope_spec(tmp_path: Path, target: Path) -> Path:
    """A spec (``mine.yaml``) running tiny-llava on benchmark ``mypope``, a pope config of
    ``target``, both written under ``tmp_path``."""
    (tmp_path / "benchmark").mkdir()
    (tmp_path / "benchmark" / "mypope.yaml").write_text(
        f"name: mypope\nkind: pope\npath: {target}\n"
    )
    spec = tmp_path / "mine.yaml"
    spec.write_text(
        "defaults: [base, _self_]\nname: mine\n"
        "grid: {model: tiny-llava, benchmark: mypope, method: none}\n"
    )
    return spec


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file or directory"),
        (b"PAR1 this is not parquet", "not a readable parquet file"),
        ("columns", "missing column(s) answer, image"),
    ],
)
def test_spec_benchmark_with_bad_file_exits_2(tmp_path, monkeypatch, capsys, content, expected):
    target = tmp_path / "files" / "pope.parquet"
    target.parent.mkdir()
    if content == "columns":
        pq.write_table(pa.table({"question": ["Is there a cat?"]}), target)
    elif content is not None:
        target.write_bytes(content)
    spec = _pope_spec(tmp_path, target)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PRUNELAB_DB_URL", raising=False)
    monkeypatch.delenv("PRUNELAB_TRACKING_URI", raising=False)
    assert main(["sweep", str(spec)]) == 2
    lines = _errors(capsys)
    assert any("benchmark 'mypope'" in x and str(target) in x and expected in x for x in lines), (
        lines
    )
    assert not (tmp_path / "prunelab-runs").exists()


def test_good_file_validates(tmp_path, monkeypatch, capsys):
    target = tmp_path / "pope.parquet"
    pq.write_table(
        pa.table({"question": ["Is there a cat?"], "answer": ["yes"], "image": [b"png"]}), target
    )
    spec = _pope_spec(tmp_path, target)
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(spec), "--dry-run"]) == 0, capsys.readouterr().err
