"""Tiny models and trials for worker tests (built once per session: random weights)."""

from __future__ import annotations

import pytest
from tiny_models import TINY_MODELS, load_tiny, tiny_trial

from prunelab.trial import Trial


@pytest.fixture(scope="session")
def tiny_llava():
    return load_tiny("tiny-llava")


@pytest.fixture(params=TINY_MODELS)
def tiny(request):
    """Each tiny family in turn: (LoadedModel, adapter)."""
    return load_tiny(request.param)


@pytest.fixture
def make_trial():
    """Trials on tiny-llava: ``make(method, limit=6, **axes)``."""

    def make(method: str, limit: int = 6, **axes) -> Trial:
        return tiny_trial("tiny-llava", method, limit, **axes)

    return make
