"""Trial keys are stable across versions: the trials a version of prunelab recorded (before the
typed ``Trial``, see ``tests/data/legacy/make_db.py``) get the same keys by the version-1 recipe
when planned by this version, their stored configs read back as the same trials, and the
version bump (``KEY_VERSION``) really changes the keys it must."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import pytest

import prunelab.methods as M
from prunelab.db import init_db, repo, session_factory
from prunelab.orchestrator.spec import load_sweep
from prunelab.trial import KEY_VERSION, Trial, trial_key
from prunelab.workers.benchmarks import build_benchmark

LEGACY = Path(__file__).parents[1] / "data" / "legacy"
sys.path.insert(0, str(LEGACY))
from make_db import CASES, pinned  # noqa: E402


@pytest.fixture(scope="module")
def legacy_sessions(tmp_path_factory: pytest.TempPathFactory):
    copy = tmp_path_factory.mktemp("legacy") / "trials-v1.db"
    shutil.copy(LEGACY / "trials-v1.db", copy)
    engine = init_db(f"sqlite:///{copy}")  # migrations run on the old database
    yield session_factory(engine)
    engine.dispose()


# methods whose version (and hyperparameters) changed since the legacy database was written:
# a version bump is meant to change the keys of the method's trials
BUMPED = {"sparsevlm"}  # 2 -> 3: raters chosen once, `raters` / `schedule` hyperparameters
# models whose weights changed since: a new revision is meant to change the keys of its trials
REVISED = {"toy-llava"}  # retrained on scenes (issue 16)


def _key(trial: Trial, plan, version: int) -> str:
    return trial_key(
        trial,
        method_version=M.get(trial.method).version,
        model_revision=plan.model_infos[trial.model].revision,
        benchmark_identity=build_benchmark(dict(trial.benchmark_config)).describe(),
        version=version,
    )


@pytest.mark.parametrize(("name", "spec", "overrides"), CASES, ids=[c[0] for c in CASES])
def test_keys_of_stored_trials_unchanged(legacy_sessions, name, spec, overrides) -> None:
    plan = load_sweep(spec, [*pinned(overrides), f"name={name}"])
    with legacy_sessions() as session:
        sweep = repo.get_sweep(session, name)
        assert sweep is not None
        stored = {t.trial_key: t.config for t in repo.sweep_trials(session, sweep.id)}
    assert len(plan.trials) == len(stored)
    # the current recipe hashes its version and the scoring rule: no old key is reused
    assert KEY_VERSION == 2
    assert not {t.key for t in plan.trials} & set(stored)
    assert all(t.key == _key(t, plan, KEY_VERSION) for t in plan.trials)
    for trial, (key, config) in zip(plan.trials, stored.items(), strict=True):
        assert trial.method == config["method"]  # same order (baselines first)
        if trial.method in BUMPED or trial.model in REVISED:
            assert _key(trial, plan, 1) != key
            continue
        assert _key(trial, plan, 1) == key  # the same key by the version-1 recipe
        again = Trial.from_dict(config)  # an old row reads back as the same trial
        assert again == dataclasses.replace(trial, key=key)
        assert again.eval == trial.eval  # settings it lacks (scoring) take the defaults
        # the stored form is unchanged but for the settings added since (eval.scoring,
        # eval.timed_samples, eval.batch_size: not in the key)
        added = {"scoring": "lmms_eval", "timed_samples": 32, "batch_size": 1}
        new = again.to_dict()
        assert {k: new["eval"].pop(k) for k in added} == added
        assert new == config
        assert trial.to_dict() == {**new, "key": trial.key, "eval": {**new["eval"], **added}}
