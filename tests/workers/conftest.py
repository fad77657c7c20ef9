"""Tiny models and trial configs for worker tests (built once per session: random weights)."""

from __future__ import annotations

import pytest

from prunelab.sweeps import group_config
from prunelab.workers.adapters import adapter_for
from prunelab.workers.models import load_model


def model_config(name: str) -> dict:
    return group_config("model", name)


@pytest.fixture(scope="session")
def tiny_llava():
    loaded = load_model(model_config("tiny-llava"))
    return loaded, adapter_for(loaded)


@pytest.fixture
def trial_config():
    def make(method: str, limit: int = 6, **axes) -> dict:
        return {
            "model": "tiny-llava",
            "model_config": model_config("tiny-llava"),
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
            },
            **axes,
        }

    return make
