"""Tiny models and trial configs for worker tests (built once per session: random weights)."""

from __future__ import annotations

import pytest
from tiny_models import TINY_MODELS, load_tiny
from tiny_models import trial_config as tiny_trial_config


@pytest.fixture(scope="session")
def tiny_llava():
    return load_tiny("tiny-llava")


@pytest.fixture(params=TINY_MODELS)
def tiny(request):
    """Each tiny family in turn: (LoadedModel, adapter)."""
    return load_tiny(request.param)


@pytest.fixture
def trial_config():
    """Trial configs on tiny-llava: ``make(method, limit=6, **axes)``."""

    def make(method: str, limit: int = 6, **axes) -> dict:
        return tiny_trial_config("tiny-llava", method, limit, **axes)

    return make
