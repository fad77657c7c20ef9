"""``prunelab score`` (saved predictions, no model) and ``prunelab rescore`` (a finished sweep's
stored predictions under the other rule, nothing rerun)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy import create_engine

from prunelab.db import repo, session_factory
from prunelab.orchestrator.cli import main
from prunelab.orchestrator.cli.common import SCORING
from prunelab.orchestrator.config import SCORING_RULES
from prunelab.workers.benchmarks import build_benchmark
from prunelab.workers.benchmarks.offline import score_rows
from prunelab.workers.benchmarks.resampling import score_summary

# POPE rows: exact yes/no (lmms-eval) and the authors' first-word rule disagree on some
POPE_ROWS = [
    {"id": "1", "question": "Is there a cat in the image?", "answer": "yes", "prediction": "Yes"},
    {"id": "2", "question": "Is there a dog in the image?", "answer": "no", "prediction": "No."},
    {"id": "3", "question": "Is there a car in the image?", "answer": "yes",
     "prediction": "Yes, there is a car."},
    {"id": "4", "question": "Is there a tree in the image?", "answer": "no",
     "prediction": "yes"},
]  # fmt: skip


NO_ANSWER = {"id": "1", "question": "Is it?", "prediction": "yes"}
NO_PREDICTION = {"id": "1", "question": "Is it?", "answer": "yes"}


def _errors(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.strip()]


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_choices_are_the_schema_rules() -> None:
    assert SCORING == SCORING_RULES


@pytest.mark.parametrize("scoring", SCORING_RULES)
def test_score_prints_what_score_rows_computes(tmp_path, capsys, scoring) -> None:
    rows = _write_rows(tmp_path / "rows.jsonl", POPE_ROWS)
    assert main(["score", "pope", str(rows), "--scoring", scoring, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = score_rows({"name": "pope", "kind": "pope"}, enumerate(POPE_ROWS, 1), scoring)
    assert printed["samples"] == expected.samples
    assert printed["metrics"] == pytest.approx(expected.metrics)
    assert [s["id"] for s in printed["samples"]] == ["1", "2", "3", "4"]
    assert all("prompt" in s and "score" in s for s in printed["samples"])


def test_the_two_rules_differ_on_pope(tmp_path, capsys) -> None:
    rows = _write_rows(tmp_path / "rows.jsonl", POPE_ROWS)
    scores = {}
    for scoring in SCORING_RULES:
        assert main(["score", "pope", str(rows), "--scoring", scoring, "--json"]) == 0
        scores[scoring] = [s["score"] for s in json.loads(capsys.readouterr().out)["samples"]]
    assert scores["lmms_eval"] != scores["official"]


@pytest.mark.parametrize(
    ("args", "lines", "expected"),
    [
        (["nosuch"], POPE_ROWS, "benchmark 'nosuch'"),
        (["popee"], POPE_ROWS, "did you mean 'pope'"),
        (["pope"], "bad", "line 2: not JSON"),
        (["pope"], [NO_ANSWER], "line 1: missing column 'answer'"),
        (["pope"], [NO_PREDICTION], "line 1: missing column 'prediction'"),
        (["pope"], [POPE_ROWS[0], POPE_ROWS[0]], "line 2: column 'id'"),
    ],
)  # fmt: skip
def test_score_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, lines, expected) -> None:
    path = tmp_path / "rows.jsonl"
    if lines == "bad":
        path.write_text(json.dumps(POPE_ROWS[0]) + "\n{not json\n")
    else:
        _write_rows(path, lines)
    assert main(["score", args[0], str(path)]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and expected in errors[0], errors


# -- rescore ----------------------------------------------------------------------------------
def _pope_parquet(path: Path) -> Path:
    pq.write_table(
        pa.table(
            {
                "question_id": [r["id"] for r in POPE_ROWS],
                "question": [r["question"] for r in POPE_ROWS],
                "answer": [r["answer"] for r in POPE_ROWS],
                "category": ["random"] * len(POPE_ROWS),
                "image": [_png() for _ in POPE_ROWS],
            }
        ),
        path,
    )
    return path


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_rescore_a_finished_sweep(tmp_path, monkeypatch, capsys) -> None:
    data = _pope_parquet(tmp_path / "pope.parquet")
    (tmp_path / "benchmark").mkdir()
    (tmp_path / "benchmark" / "mypope.yaml").write_text(f"name: mypope\nkind: pope\npath: {data}\n")
    spec = tmp_path / "mine.yaml"
    spec.write_text(
        "defaults: [base, _self_]\nname: mine\n"
        "grid: {model: tiny-llava, benchmark: mypope, method: 'none,random', keep_ratio: 0.5}\n"
        "eval: {limit: null, warmup: 0, heatmaps: 0}\nworkers: {count: 1}\n"
    )
    monkeypatch.chdir(tmp_path)
    stores = [
        f"--db-url=sqlite:///{tmp_path}/db.sqlite",
        f"--tracking-uri=sqlite:///{tmp_path}/mlflow.db",
        f"--artifact-root={tmp_path}/artifacts",
    ]
    assert main(["sweep", str(spec), *stores]) == 0
    assert main(["rescore", "mine", "--scoring", "official", *stores]) == 0
    capsys.readouterr()
    assert main(["rescore", "mine", "--scoring", "lmms_eval", *stores]) == 2  # its own rule
    assert _errors(capsys) == ["prunelab: error: sweep 'mine' is already scored under lmms_eval"]

    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    with session_factory(engine)() as session:
        first = repo.get_sweep(session, "mine")
        assert first is not None
        original = {t.trial.method: t for t in repo.sweep_trials(session, first.id)}
        sweep = repo.get_sweep(session, "mine.official")
        assert sweep is not None and sweep.status == "finished"
        rescored = {t.trial.method: t for t in repo.sweep_trials(session, sweep.id)}
    assert set(rescored) == set(original) == {"none", "random"}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for method, row in rescored.items():
        old = original[method]
        assert row.status == "finished" and row.trial.eval.scoring == "official"
        assert row.trial_key != old.trial_key
        # the cost metrics are the original's; the score metrics are the official rule's
        assert row.metrics["tflops"] == old.metrics["tflops"]
        run = client.get_run(row.mlflow_run_id)
        assert run.data.tags["prunelab.rescored_from"] == old.mlflow_run_id
        assert run.data.params["eval.scoring"] == "official"
        lines = client.download_artifacts(row.mlflow_run_id, "predictions.jsonl", str(tmp_path))
        predictions = [json.loads(x) for x in Path(lines).read_text().splitlines()]
        benchmark = build_benchmark({"name": "mypope", "kind": "pope", "path": str(data),
                                     "scoring": "official"})  # fmt: skip
        samples = {s.id: s for s in benchmark.samples(None, 0)}
        scored = [
            (samples[p["id"]], p["prediction"], benchmark.score(p["prediction"], samples[p["id"]]))
            for p in predictions
        ]
        expected, replicates = score_summary(benchmark, scored)
        for name, value in expected.items():
            assert row.metrics[name] == pytest.approx(value), name
        assert row.replicates == pytest.approx(list(replicates))
    parent = client.get_run(sweep.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    # baseline-relative metrics are derived again, against the rescored baseline
    assert rescored["random"].metrics["flops_ratio"] == pytest.approx(
        original["random"].metrics["flops_ratio"]
    )
