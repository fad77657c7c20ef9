"""Tiny models and trial configs for worker tests (built once per session: random weights)."""

from __future__ import annotations

import pytest
from tiny_models import TINY_MODELS, load_tiny, model_config


@pytest.fixture(scope="session")
def tiny_llava():
    return load_tiny("tiny-llava")


@pytest.fixture(params=TINY_MODELS)
def tiny(request):
    """Each tiny family in turn: (LoadedModel, adapter)."""
    return load_tiny(request.param)


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
