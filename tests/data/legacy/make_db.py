"""Writes ``trials-v1.db``: the trials of a set of sweeps, recorded by prunelab as of commit
9eca559 (before the typed ``Trial``), for ``tests/orchestrator/test_trial_keys.py``.

Run once with that version installed (``python tests/data/legacy/make_db.py``); the database is
committed so later versions are checked against what an older prunelab wrote, not against
themselves. Each sweep is recorded the way ``submit_sweep`` records one (``create_sweep`` +
``add_trials``); no trial runs.
"""

from __future__ import annotations

from pathlib import Path

from prunelab.db import init_db, repo, session_factory
from prunelab.orchestrator.spec import load_sweep

HERE = Path(__file__).parent
DB = HERE / "trials-v1.db"

_COMMON = "none,random,fastv,pdrop,sparsevlm,visionzip,tome,divprune,prumerge_plus"
ALL_TINY = f"{_COMMON},sgp,pgp,polymorphic,infoprune,prep"
NO_GUIDE = f"{_COMMON},polymorphic,infoprune,prep"

# the shipped quickstart as of 9eca559, which every case extends: pinned, so that later changes
# to the quickstart (scenes, more methods, 200 samples) do not change what a case plans
QUICKSTART_9ECA559 = {
    "benchmark": "shapes",
    "method": "none,random,fastv",
    "prune_layer": "2",
    "eval.limit": "32",
    "eval.batch_size": "1",  # added since (not in the key): the default of then
}


def pinned(overrides: list[str]) -> list[str]:
    """A case's overrides after the 9eca559 quickstart's values of the keys they do not set."""
    given = {o.lstrip("~+").partition("=")[0] for o in overrides}
    return [f"{k}={v}" for k, v in QUICKSTART_9ECA559.items() if k not in given] + overrides


# (sweep name, spec, overrides): each is planned and recorded as one sweep
CASES: list[tuple[str, str, list[str]]] = [
    ("quickstart", "quickstart", []),
    (
        "every-method-ratio",
        "quickstart",
        [
            "model=tiny-llava",
            f"method={ALL_TINY}",
            "keep_ratio=0.25,0.5",
            "prune_layer=2",
            "seed=0,1",
        ],
    ),
    (
        "every-method-tokens",
        "quickstart",
        ["model=tiny-llava", f"method={ALL_TINY}", "~keep_ratio", "keep_tokens=48,100"],
    ),
    (
        "families",
        "quickstart",
        [
            "model=tiny-qwen2-vl,tiny-qwen2.5-vl,tiny-internvl,tiny-llava-next",
            f"method={NO_GUIDE}",
            "keep_ratio=0.3",
            "eval.limit=8",
            "eval.max_new_tokens=2",
        ],
    ),
    (
        "hparams",
        "quickstart",
        [
            "model=toy-llava",
            "method=fastv,tome",
            "method.metric=keys,tokens",
            "prune_layer=1,3",
            "keep_ratio=0.5",
            "eval.fidelity=false",
            "eval.flops_convention=fastv",
        ],
    ),
]


def main() -> None:
    DB.unlink(missing_ok=True)
    engine = init_db(f"sqlite:///{DB}")
    sessions = session_factory(engine)
    for name, spec, overrides in CASES:
        plan = load_sweep(spec, [*pinned(overrides), f"name={name}"])
        with sessions.begin() as session:
            sweep = repo.create_sweep(session, plan.name, plan.spec, plan.spec_yaml, "legacy")
            repo.add_trials(
                session, sweep.id, [(t.key, t.config(), t.is_baseline) for t in plan.trials]
            )
        print(f"{name}: {len(plan.trials)} trials")
    engine.dispose()


if __name__ == "__main__":
    main()
