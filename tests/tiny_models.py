"""The tiny random models the worker tests run on, each built once per test session."""

from __future__ import annotations

import pytest

from prunelab.sweeps import group_config
from prunelab.trial import Trial, TrialResult
from prunelab.workers.adapters import adapter_for
from prunelab.workers.models import load_model

# every family's tiny model; the adapter invariants in test_adapters.py run on each
TINY_MODELS = [
    "tiny-llava",
    "tiny-internvl",
    "tiny-llava-next",
    "tiny-qwen2-vl",
    "tiny-qwen2.5-vl",
    "tiny-llava-small",
]
_LOADED: dict[str, tuple] = {}
_HEADS: dict[str, bytes] = {}


def model_config(name: str) -> dict:
    return group_config("model", name)


def load_tiny(name: str) -> tuple:
    """(LoadedModel, adapter) of a tiny model, built once per test session."""
    if name not in _LOADED:
        loaded = load_model(model_config(name))
        _LOADED[name] = (loaded, adapter_for(loaded))
    return _LOADED[name]


def guide_for(name: str) -> tuple | None:
    """The loaded guidance model of tiny model ``name`` (None: it has none)."""
    guide = model_config(name).get("guidance")
    return load_tiny(guide) if guide else None


def trained_vib_head(guide: str) -> dict:
    """A trial's ``vib_head`` entry: a pgp VIB head (default hyperparameters) trained for 2
    steps on tiny model ``guide``, trained once per test session."""
    if guide not in _HEADS:
        import prunelab.methods as M
        from prunelab.workers.vib import train_vib

        train = {
            "guide": model_config(guide),
            "benchmark": {"name": "shapes", "kind": "shapes", "split": "train"},
            "head": M.get("pgp")().head_hparams(),
            "steps": 2, "batch_size": 1, "limit": 2, "eval_samples": 1,
        }  # fmt: skip
        _HEADS[guide] = train_vib(train, loaded=load_tiny(guide)).blob
    return {"key": "", "state": _HEADS[guide]}


def trial_config(model: str, method: str, limit: int = 6, **axes) -> dict:
    """A trial's stored form (``Trial.to_dict``) on shapes; ``axes`` may also give any other
    field of a trial (``vib_head``, ``guidance_config``, ...)."""
    return {
        "model": model,
        "model_config": model_config(model),
        "benchmark": "shapes",
        "benchmark_config": {"name": "shapes", "kind": "shapes", "split": "test"},
        "method": method,
        "hparams": axes.pop("hparams", {}),
        "eval": {
            "limit": limit,
            "sample_seed": 0,
            "max_new_tokens": 3,
            "warmup": 0,
            "fidelity": True,
            "flops_convention": "pdrop",
            "heatmaps": 0,
        },
        **axes,
    }


def tiny_trial(model: str, method: str, limit: int = 6, **axes) -> Trial:
    """The :class:`Trial` of :func:`trial_config` (what a worker runs)."""
    return Trial.from_dict(trial_config(model, method, limit, **axes))


def average_trial_metrics(model: str, method: str, limit: int, keep_ratio: float, **axes) -> dict:
    """The metrics of a trial (``tiny_trial``) of a ``budget_is_average`` method on tiny model
    ``model`` at ``keep_ratio``, once checked that its visual tokens averaged over the LLM's
    layers are ``keep_ratio`` of those in, within one token."""
    from prunelab.workers.runner import run_trial

    loaded, adapter = load_tiny(model)
    trial = tiny_trial(model, method, limit, keep_ratio=keep_ratio, **axes)
    metrics = run_trial(loaded, adapter, trial).metrics
    average, budget = metrics["avg_visual_tokens"], keep_ratio * metrics["visual_tokens_in"]
    assert abs(average - budget) <= 1.0, f"{method} on {model}: average {average}, budget {budget}"
    return metrics


def assert_same_outputs(one: TrialResult, many: TrialResult) -> None:
    """Batched trial ``many`` gave the outputs of batch-1 trial ``one``: predictions, scores and
    kept counts exact, fidelity KL within 1e-5 (floating-point reassociation)."""
    fields = ("id", "prediction", "score", "visual_kept", "fidelity_top1")
    assert [{k: p[k] for k in fields} for p in many.predictions] == [
        {k: p[k] for k in fields} for p in one.predictions
    ]
    for a, b in zip(one.predictions, many.predictions, strict=True):
        assert b["fidelity_kl"] == pytest.approx(a["fidelity_kl"], abs=1e-5)
    for name in ("score", "visual_tokens_kept", "avg_visual_tokens", "tflops", "fidelity_top1"):
        assert many.metrics[name] == pytest.approx(one.metrics[name], rel=1e-9), name
    assert many.metrics["fidelity_kl"] == pytest.approx(one.metrics["fidelity_kl"], abs=1e-5)
