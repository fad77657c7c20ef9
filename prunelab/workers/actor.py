"""The worker: holds one loaded model across trials and runs trials on it.

Plain Python; the orchestrator wraps it with ``ray.remote`` (Ray appears only where actors are
created). A worker loads a model the first time a trial asks for it and keeps it until a trial
for another model arrives.

Across trials it also keeps work that is the same in every trial of a (model, benchmark,
sample): the unpruned model's first-token log-probabilities (``ReferenceCache``, for the
fidelity metrics) and the samples' prepared inputs and vision-tower outputs
(:class:`~prunelab.workers.caches.VisionCache`, ``vision_cache_mb`` of CPU memory, the sweep's
``workers.vision_cache_mb``), both byte-bounded LRUs. A trial's result names the cache's size
and the trial's hits and misses in its ``environment`` (MLflow tags ``prunelab.env.vision_cache_*``
and ``prunelab.env.input_cache_*``), and the worker logs them.

The orchestrator imports this module for the class alone (``ray.remote(Worker)``): torch,
transformers and the runner are imported by the methods that use them, in the worker's own
process, so the orchestrator holds no model library for the workers' sake.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import socket
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import prunelab
from prunelab.trial import Trial, TrialResult
from prunelab.workers.faults import inject as inject_faults

if TYPE_CHECKING:
    from prunelab.workers.caches import CacheStats

__all__ = ["WORKER_LOG_ENV", "TrialFailure", "Worker", "route_output"]

# set by the orchestrator on the worker processes it starts: where they send their logs,
# warnings and output (prunelab.orchestrator.console.worker_log)
WORKER_LOG_ENV = "PRUNELAB_WORKER_LOG"

log = logging.getLogger(__name__)


class TrialFailure(RuntimeError):
    """A trial failed for a reason worth recording (e.g. out of memory); the worker is fine."""


def route_output(worker_id: str, target: str | None = None) -> None:
    """Send this worker process's logs, warnings and output where ``target`` (default
    ``$PRUNELAB_WORKER_LOG``) says; unset: leave them as they are (a worker in a test).

    ``-``: its stderr at INFO, which Ray brings to the console of a verbose sweep. A path: the
    sweep's log file (a quiet sweep), one line per record naming the worker: prunelab's logs at
    INFO, Python's warnings, transformers' logging (no progress bars: ``Loading weights``, the
    hub's downloads) and whatever the trial's code prints. A path whose directory is not on
    this machine (a worker on another node of a cluster): left in Ray's own worker logs there.
    """
    target = os.environ.get(WORKER_LOG_ENV) if target is None else target
    if not target:
        return
    form = logging.Formatter(
        f"%(asctime)s {worker_id} pid={os.getpid()} %(levelname)s %(name)s: %(message)s"
    )
    own = logging.getLogger("prunelab")
    own.setLevel(logging.INFO)
    if target == "-":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(form)
        own.addHandler(handler)
        own.propagate = False
        return
    if not os.path.isdir(os.path.dirname(target)):
        return
    stream = open(target, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (the process's)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(form)
    logging.getLogger().addHandler(handler)  # prunelab's, py.warnings, transformers' records
    logging.captureWarnings(True)
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    sys.stdout = sys.stderr = stream  # what the trial's code prints, tqdm bars included


class Worker:
    """One loaded model (and guidance models) and the caches kept with it across trials.

    ``threads``: torch's CPU threads (None: torch's default). ``vision_cache_mb``: the size of
    the cache of prepared inputs and vision outputs, in MiB (None: the default,
    :data:`~prunelab.workers.caches.DEFAULT_VISION_CACHE_MB`; 0: off).
    """

    def __init__(
        self, worker_id: str, threads: int | None = None, vision_cache_mb: float | None = None
    ) -> None:
        import torch

        from prunelab.workers.caches import DEFAULT_VISION_CACHE_MB, VisionCache
        from prunelab.workers.runner import ReferenceCache

        route_output(worker_id)
        self.worker_id = worker_id
        if threads:
            torch.set_num_threads(threads)
        self.loaded = None
        self.adapter = None
        self.model_key: str | None = None
        self.model_loads = 0
        self.references = ReferenceCache()
        if vision_cache_mb is None:
            vision_cache_mb = DEFAULT_VISION_CACHE_MB
        self.vision_cache_mb = float(vision_cache_mb)
        self.vision_cache = VisionCache(int(self.vision_cache_mb * 2**20))
        self.guides: dict[str, tuple[Any, Any]] = {}  # guidance models, kept like the model
        log.info("started on %s, %d thread(s)", socket.gethostname(), torch.get_num_threads())

    def identity(self) -> dict[str, Any]:
        return {"worker": self.worker_id, "node": socket.gethostname(), "pid": os.getpid()}

    def environment(self, cache: CacheStats | None = None) -> dict[str, str]:
        """What the trial ran on: software versions, the loaded model's settings and the
        vision cache's size (MiB); with ``cache``, the trial's lookups in it."""
        import torch
        import transformers

        env = {
            "prunelab": prunelab.__version__,
            # a plain str: a TorchVersion would import torch where the result is unpickled
            "torch": str(torch.__version__),
            "transformers": transformers.__version__,
            "vision_cache_mb": f"{self.vision_cache_mb:g}",
        }
        if cache is not None:
            env.update(
                vision_cache_hits=str(cache.vision_hits),
                vision_cache_misses=str(cache.vision_misses),
                input_cache_hits=str(cache.input_hits),
                input_cache_misses=str(cache.input_misses),
            )
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
        import torch

        from prunelab.workers.adapters import adapter_for
        from prunelab.workers.models import load_model

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
        seconds = time.perf_counter() - start
        log.info("loaded model %s in %.1f s", model_name, seconds)
        return seconds

    def _ensure_guide(self, guide_config: Mapping[str, Any] | None) -> tuple[Any, float]:
        """The guidance model of a trial (loaded once, kept with the model), and load time."""
        from prunelab.workers.adapters import adapter_for
        from prunelab.workers.models import ModelSpec, load_model

        if guide_config is None:
            return None, 0.0
        spec = ModelSpec.from_config(dict(guide_config))
        if spec.name in self.guides:
            return self.guides[spec.name], 0.0
        start = time.perf_counter()
        loaded = load_model(spec)
        self.guides[spec.name] = (loaded, adapter_for(loaded))
        return self.guides[spec.name], time.perf_counter() - start

    def prepare(self, trial: Trial) -> bool:
        """Load what ``trial`` runs on (its model and guidance model) ahead of it; whether
        that worked.

        The pool asks a worker to do this as soon as it has started, for the trial it will
        hand it first, so that the load overlaps the orchestrator's own set-up instead of
        following it. A load that fails here is only logged: the worker is left holding no
        model, and the trial loads it again when it runs, failing (or being retried) as any
        trial whose load fails does."""
        import torch

        try:
            self._ensure_model(trial.model, trial.model_config)
            self._ensure_guide(trial.guidance_config)
        except Exception as exc:  # out of memory included: the trial's own load reports it
            self.loaded = self.adapter = None
            self.model_key = None
            self.guides.clear()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning(
                "loading %s ahead of trial %s failed (the trial loads it again): %s: %s",
                trial.model, trial.key[:10], type(exc).__name__, exc,
            )  # fmt: skip
            return False
        return True

    def run(self, trial: Trial) -> TrialResult:
        """Run one trial; its result says how long it ran and where."""
        import torch

        from prunelab.workers.runner import run_trial

        try:
            load_s = self._ensure_model(trial.model, trial.model_config)
            guide, guide_s = self._ensure_guide(trial.guidance_config)
            load_s += guide_s
            start = time.perf_counter()
            inject_faults(trial)  # test-only; a no-op unless PRUNELAB_TEST_FAULTS is set
            before = dataclasses.replace(self.vision_cache.stats)
            result = run_trial(
                self.loaded, self.adapter, trial, self.references, guide=guide,
                vision_cache=self.vision_cache,
            )  # fmt: skip
            lookups = self.vision_cache.stats.since(before)
        except torch.cuda.OutOfMemoryError as exc:
            # free what the failed trial held; the model (if fully loaded) stays for the next
            if self.adapter is None:
                self.loaded, self.model_key = None, None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.error("trial %s (%s): out of memory: %s", trial.key[:10], trial.method, exc)
            raise TrialFailure(f"out of memory: {exc}") from None
        except Exception:
            log.exception("trial %s (%s) failed", trial.key[:10], trial.method)
            raise
        log.info(
            "trial %s (%s) ran in %.1f s; cache: %s, %.1f of %g MiB held",
            trial.key[:10], trial.method, time.perf_counter() - start, lookups.describe(),
            self.vision_cache.nbytes / 2**20, self.vision_cache_mb,
        )  # fmt: skip
        return dataclasses.replace(
            result,
            run_s=time.perf_counter() - start,
            load_s=load_s,
            model_loads=self.model_loads,
            environment=self.environment(lookups),
            **self.identity(),
        )
