"""``prunelab ui`` prints a link per experiment that opens its runs table: MLflow 3.17's UI
opens an experiment on its GenAI pages unless the link asks for the model-training view
(checked with headless Chromium: the link shows the runs table, the bare one the traces
overview)."""

from __future__ import annotations

from pathlib import Path

from prunelab.orchestrator.cli.tools import WORKFLOW, ui_links
from prunelab.orchestrator.tracking import Tracker


def test_each_experiment_gets_a_link_to_its_runs_table(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, str(tmp_path / "artifacts"))
    ids = {name: tracker.experiment_id(name) for name in ("quickstart", "baselines")}
    assert ui_links(uri, "127.0.0.1", 5000) == [
        (name, f"http://127.0.0.1:5000/#/experiments/{ids[name]}?{WORKFLOW}")
        for name in ("baselines", "quickstart")
    ]
    assert WORKFLOW == "workflowType=machine_learning"


def test_an_unreadable_store_gives_no_links(tmp_path: Path) -> None:
    assert ui_links(f"sqlite:///{tmp_path / 'no' / 'such' / 'mlflow.db'}", "h", 1) == []
