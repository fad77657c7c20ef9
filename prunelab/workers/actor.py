"""The worker: holds one loaded model across trials and runs trials on it.

Plain Python; the orchestrator wraps it with ``ray.remote`` (Ray appears only where actors are
created). A worker loads a model the first time a trial asks for it and keeps it until a trial
for another model arrives.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import torch
import transformers

import prunelab
from prunelab.trial import Trial, TrialResult
from prunelab.workers.adapters import adapter_for
from prunelab.workers.faults import inject as inject_faults
from prunelab.workers.models import ModelSpec, load_model
from prunelab.workers.runner import ReferenceCache, run_trial

__all__ = ["TrialFailure", "Worker"]


class TrialFailure(RuntimeError):
    """A trial failed for a reason worth recording (e.g. out of memory); the worker is fine."""


class Worker:
    def __init__(self, worker_id: str, threads: int | None = None) -> None:
        self.worker_id = worker_id
        if threads:
            torch.set_num_threads(threads)
        self.loaded = None
        self.adapter = None
        self.model_key: str | None = None
        self.model_loads = 0
        self.references = ReferenceCache()
        self.guides: dict[str, tuple[Any, Any]] = {}  # guidance models, kept like the model

    def identity(self) -> dict[str, Any]:
        return {"worker": self.worker_id, "node": socket.gethostname(), "pid": os.getpid()}

    def environment(self) -> dict[str, str]:
        """What the trial ran on: software versions and the loaded model's settings."""
        env = {
            "prunelab": prunelab.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        if self.loaded is not None:
            spec = self.loaded.spec
            env.update(
                device=str(self.loaded.device),
                dtype=str(spec.dtype),
                attn_implementation=str(spec.attn_implementation),
            )
        return env

    def holds(self) -> str | None:
        return self.model_key

    def _ensure_model(self, model_name: str, model_config: Mapping[str, Any]) -> float:
        if self.model_key == model_name and self.loaded is not None:
            return 0.0
        self.loaded = self.adapter = None
        self.guides.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        start = time.perf_counter()
        self.loaded = load_model(dict(model_config))
        self.adapter = adapter_for(self.loaded)
        self.model_key = model_name
        self.model_loads += 1
        return time.perf_counter() - start

    def _ensure_guide(self, guide_config: Mapping[str, Any] | None) -> tuple[Any, float]:
        """The guidance model of a trial (loaded once, kept with the model), and load time."""
        if guide_config is None:
            return None, 0.0
        spec = ModelSpec.from_config(dict(guide_config))
        if spec.name in self.guides:
            return self.guides[spec.name], 0.0
        start = time.perf_counter()
        loaded = load_model(spec)
        self.guides[spec.name] = (loaded, adapter_for(loaded))
        return self.guides[spec.name], time.perf_counter() - start

    def run(self, trial: Trial) -> TrialResult:
        """Run one trial; its result says how long it ran and where."""
        try:
            load_s = self._ensure_model(trial.model, trial.model_config)
            guide, guide_s = self._ensure_guide(trial.guidance_config)
            load_s += guide_s
            start = time.perf_counter()
            inject_faults(trial)  # test-only; a no-op unless PRUNELAB_TEST_FAULTS is set
            result = run_trial(self.loaded, self.adapter, trial, self.references, guide=guide)
        except torch.cuda.OutOfMemoryError as exc:
            # free what the failed trial held; the model (if fully loaded) stays for the next
            if self.adapter is None:
                self.loaded, self.model_key = None, None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise TrialFailure(f"out of memory: {exc}") from None
        return dataclasses.replace(
            result,
            run_s=time.perf_counter() - start,
            load_s=load_s,
            model_loads=self.model_loads,
            environment=self.environment(),
            **self.identity(),
        )
