"""Trial keys are stable across versions: the trials a version of prunelab recorded (before the
typed ``Trial``, see ``tests/data/legacy/make_db.py``) get the same keys, and their stored
configs read back as the same trials, when planned by this version."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import prunelab.methods as M
from prunelab.db import init_db, repo, session_factory
from prunelab.orchestrator.spec import load_sweep
from prunelab.trial import Trial, trial_key
from prunelab.workers.benchmarks import build_benchmark

LEGACY = Path(__file__).parents[1] / "data" / "legacy"
sys.path.insert(0, str(LEGACY))
from make_db import CASES  # noqa: E402


@pytest.fixture(scope="module")
def legacy_sessions(tmp_path_factory: pytest.TempPathFactory):
    copy = tmp_path_factory.mktemp("legacy") / "trials-v1.db"
    shutil.copy(LEGACY / "trials-v1.db", copy)
    engine = init_db(f"sqlite:///{copy}")  # migrations run on the old database
    yield session_factory(engine)
    engine.dispose()


@pytest.mark.parametrize(("name", "spec", "overrides"), CASES, ids=[c[0] for c in CASES])
def test_keys_of_stored_trials_unchanged(legacy_sessions, name, spec, overrides) -> None:
    plan = load_sweep(spec, [*overrides, f"name={name}"])
    with legacy_sessions() as session:
        sweep = repo.get_sweep(session, name)
        assert sweep is not None
        stored = {t.trial_key: t.config for t in repo.sweep_trials(session, sweep.id)}
    planned = {t.key: t for t in plan.trials}
    assert list(planned) == list(stored)  # same keys, same order (baselines first)
    for key, trial in planned.items():
        assert trial.to_dict() == stored[key]  # the stored form is unchanged
        again = Trial.from_dict(stored[key])  # and an old row reads back as the same trial
        assert again == trial and again.key == key
        assert again.to_dict() == stored[key]
        assert (
            trial_key(
                again,
                method_version=M.get(again.method).version,
                model_revision=plan.model_infos[again.model].revision,
                benchmark_identity=build_benchmark(dict(again.benchmark_config)).describe(),
            )
            == key
        )
