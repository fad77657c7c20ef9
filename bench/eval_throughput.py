"""Evaluation throughput of whole trials on the CPU: the worker's vision cache off and on.

    python bench/eval_throughput.py [--limit N] [--timed-samples N] [--repeats N]
                                    [--methods none,fastv] [--model toy-llava] [--threads N]
                                    [--batch-sizes 1,4,16,64]

Runs trials of each method (``none``; ``fastv`` at keep ratio 0.25, its default layer) on the
shipped ``toy-llava`` through ``runner.run_trial``, as a worker runs them, on ``limit``
samples of the test split of ``shapes`` (seed 0) with a sweep's other eval settings at their
defaults (``eval.warmup`` 2, ``eval.heatmaps`` 2, fidelity on, the benchmark's new tokens),
at each ``eval.batch_size`` of ``--batch-sizes`` (default 1; the timed subset always runs at
batch 1, the other samples that many at a time).

Two settings, each with the caches a worker holds once a sweep's first trial of the model and
benchmark has run (one unmeasured ``none`` trial fills them first, then one unmeasured trial of
each method warms the process: imports, heatmap rendering, the allocator):

- ``off``: the reference cache only (first-token log-probabilities of the unpruned model): every
  trial prepares each sample (processor) and runs the vision tower for it;
- ``on``: plus the worker's :class:`~prunelab.workers.caches.VisionCache` (default size): the
  samples outside the timed subset (``eval.timed_samples``, the first 32 by default, which run
  the vision tower for latency) take their prepared inputs and vision outputs from it.

Each repeat times every (method, setting) once, the settings interleaved in alternating order;
``samples/s`` is ``limit`` / the wall time of ``run_trial`` (scoring, fidelity, heatmaps and
artifacts included: what a sweep pays per trial), and ``eval samples/s`` the trial's own
``samples_per_s`` metric (its evaluation loop only). Medians over the repeats; the ratios on /
off and batch b / the first batch size are taken within each repeat. The two cache settings'
outputs (every metric but the measured times, predictions, bootstrap replicates, artifacts)
must be equal at each batch size, and each batch size's those of the first (predictions,
scores and kept counts exactly, ``fidelity_kl`` within 1e-5: batched fp32 sums reassociate),
or the bench exits 1. Measured, never asserted on time.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import prunelab.methods as methods
from prunelab.orchestrator.config import EvalConfig
from prunelab.sweeps import group_config
from prunelab.trial import Trial, TrialResult
from prunelab.workers.adapters import adapter_for
from prunelab.workers.caches import DEFAULT_VISION_CACHE_MB, CacheStats, VisionCache
from prunelab.workers.models import LoadedModel, load_model
from prunelab.workers.runner import ReferenceCache, run_trial

KEEP_RATIO = 0.25
SETTINGS = ("off", "on")
TIMINGS = {"prefill_ms", "latency_ms", "decode_ms_per_token", "samples_per_s", "peak_mem_mb"}
"""Measured times: the metrics that differ between any two runs."""
BATCH_METRICS = {"batch_size", "effective_batch_size"}  # what differs between batch sizes
KL_TOLERANCE = 1e-5


def make_trial(
    model: str, method: str, limit: int, timed_samples: int, batch_size: int = 1
) -> Trial:
    """A trial of ``method`` on shapes' test split (its default layer, seed 0)."""
    cls = methods.get(method)
    return Trial(
        model=model,
        benchmark="shapes",
        method=method,
        hparams={},
        keep_ratio=KEEP_RATIO if cls.uses_budget else None,
        prune_layer=cls.default_prune_layer if cls.uses_layer else None,
        seed=0 if cls.uses_seed else None,
        model_config=group_config("model", model),
        benchmark_config={"name": "shapes", "kind": "shapes", "split": "test"},
        eval=EvalConfig(
            limit=limit, sample_seed=0, timed_samples=timed_samples, batch_size=batch_size
        ),
    )


@dataclass
class Worker:
    """What a worker keeps across trials in one setting."""

    references: ReferenceCache = field(default_factory=ReferenceCache)
    cache: VisionCache | None = None


@dataclass
class Cell:
    """The repeats of one (method, setting)."""

    trial_s: list[float] = field(default_factory=list)
    eval_per_s: list[float] = field(default_factory=list)
    lookups: CacheStats = field(default_factory=CacheStats)
    first: TrialResult | None = None


def outputs(result: TrialResult) -> tuple[Any, ...]:
    """Everything a trial reports but its measured times."""
    metrics = {k: v for k, v in result.metrics.items() if k not in TIMINGS}
    return metrics, result.predictions, result.replicates, dict(result.artifacts)


def same_across_batches(one: TrialResult, other: TrialResult) -> bool:
    """``other`` (a batch size) reports what ``one`` (the first) does: predictions, scores,
    kept counts and every metric but the times exactly, ``fidelity_kl`` within tolerance."""

    def close(a: Any, b: Any) -> bool:
        return (a is None and b is None) or abs(a - b) <= KL_TOLERANCE

    skip = TIMINGS | BATCH_METRICS | {"fidelity_kl"}
    metrics = [{k: v for k, v in r.metrics.items() if k not in skip} for r in (one, other)]
    rows = [[{**p, "fidelity_kl": None} for p in r.predictions] for r in (one, other)]
    kl = [p["fidelity_kl"] for p in one.predictions], [p["fidelity_kl"] for p in other.predictions]
    return (
        metrics[0] == metrics[1]
        and rows[0] == rows[1]
        and one.replicates == other.replicates
        and dict(one.artifacts) == dict(other.artifacts)
        and close(one.metrics.get("fidelity_kl"), other.metrics.get("fidelity_kl"))
        and all(close(a, b) for a, b in zip(*kl, strict=True))
    )


def speedup(base: Cell, cell: Cell) -> str:
    """``cell`` against ``base``, repeat by repeat: samples/s of the whole trial (median, min,
    max) and of the evaluation loop (median)."""
    ratios = [a / b for a, b in zip(base.trial_s, cell.trial_s, strict=True)]
    evals = [b / a for a, b in zip(base.eval_per_s, cell.eval_per_s, strict=True)]
    return (
        f"samples/s {statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max "
        f"{max(ratios):.2f}x); eval samples/s {statistics.median(evals):.2f}x"
    )


def timed_run(loaded: LoadedModel, adapter: Any, trial: Trial, worker: Worker, cell: Cell) -> None:
    before = dataclasses.replace(worker.cache.stats) if worker.cache is not None else None
    start = time.perf_counter()
    result = run_trial(loaded, adapter, trial, worker.references, vision_cache=worker.cache)
    cell.trial_s.append(time.perf_counter() - start)
    cell.eval_per_s.append(result.metrics["samples_per_s"])
    if worker.cache is not None and before is not None:
        cell.lookups = worker.cache.stats.since(before)
    if cell.first is None:
        cell.first = result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=EvalConfig().limit, help="samples per trial")
    parser.add_argument(
        "--timed-samples", type=int, default=EvalConfig().timed_samples,
        help="eval.timed_samples: samples timed for latency (they run the vision tower)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="none,fastv")
    parser.add_argument("--model", default="toy-llava")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (a worker's default: 1)"
    )
    parser.add_argument("--batch-sizes", default="1", help="eval.batch_size values, e.g. 1,4,16,64")
    args = parser.parse_args(argv)
    names = args.methods.split(",")
    unknown = [n for n in names if n not in methods.available()]
    if unknown:
        print(f"--methods: unknown {', '.join(unknown)}")
        return 2
    sizes_text = args.batch_sizes.split(",")
    if not all(t.strip().isdigit() and int(t) >= 1 for t in sizes_text):
        print(f"--batch-sizes={args.batch_sizes}: must be integers >= 1, comma-separated")
        return 2
    sizes = list(dict.fromkeys(int(t) for t in sizes_text))
    torch.set_num_threads(args.threads)
    loaded = load_model({**group_config("model", args.model), "device": "cpu"})
    adapter = adapter_for(loaded)
    trials = {
        (n, b): make_trial(args.model, n, args.limit, args.timed_samples, b)
        for n in names
        for b in sizes
    }
    settings = EvalConfig(limit=args.limit, timed_samples=args.timed_samples)
    print(
        f"device: CPU ({torch.get_num_threads()} thread(s)); model {args.model} "
        f"({loaded.info.n_visual} visual tokens); shapes test split; eval.batch_size "
        f"{', '.join(map(str, sizes))} (timed subset at batch 1); eval: limit "
        f"{settings.limit}, timed_samples {settings.timed_samples},"
        f" warmup {settings.warmup}, heatmaps {settings.heatmaps}, fidelity on; vision cache "
        f"{DEFAULT_VISION_CACHE_MB:g} MiB; median of {args.repeats} repeats, settings "
        "interleaved"
    )

    workers = {
        "off": Worker(),
        "on": Worker(cache=VisionCache(int(DEFAULT_VISION_CACHE_MB * 2**20))),
    }
    fill = make_trial(args.model, "none", args.limit, args.timed_samples)
    for worker in workers.values():  # a sweep's first trial of the model and benchmark
        run_trial(loaded, adapter, fill, worker.references, vision_cache=worker.cache)
        for trial in trials.values():  # and each trial, unmeasured: imports, allocator
            run_trial(loaded, adapter, trial, worker.references, vision_cache=worker.cache)
    cells = {(n, s, b): Cell() for n in names for s in SETTINGS for b in sizes}
    for repeat in range(args.repeats):
        order = SETTINGS if repeat % 2 == 0 else SETTINGS[::-1]
        for name in names:
            for size in sizes:
                for setting in order:
                    cell = cells[name, setting, size]
                    timed_run(loaded, adapter, trials[name, size], workers[setting], cell)

    header = (
        f"{'method':<8} {'cache':<5} {'batch':>5} {'trial s':>8} {'samples/s':>10} "
        f"{'eval samples/s':>15} {'vision hits/misses':>19} {'inputs hits/misses':>19}"
    )
    print()
    print(header)
    print("-" * len(header))
    for name in names:
        for size in sizes:
            for setting in SETTINGS:
                cell = cells[name, setting, size]
                trial_s = statistics.median(cell.trial_s)
                looked = cell.lookups
                on = setting == "on"
                vision = f"{looked.vision_hits}/{looked.vision_misses}" if on else "-"
                inputs = f"{looked.input_hits}/{looked.input_misses}" if on else "-"
                print(
                    f"{name:<8} {setting:<5} {size:>5} {trial_s:>8.2f} "
                    f"{args.limit / trial_s:>10.1f} {statistics.median(cell.eval_per_s):>15.1f} "
                    f"{vision:>19} {inputs:>19}"
                )
    print()
    failed = []
    for name in names:
        for size in sizes:
            off, on = cells[name, "off", size], cells[name, "on", size]
            print(f"{name} batch {size}: cache on / off, {speedup(off, on)}")
            assert off.first is not None and on.first is not None
            if outputs(off.first) != outputs(on.first):
                failed.append(f"{name} batch {size} (cache on / off)")
        for setting in SETTINGS:
            first = cells[name, setting, sizes[0]]
            for size in sizes[1:]:
                cell = cells[name, setting, size]
                print(f"{name} cache {setting}: batch {size} / {sizes[0]}, {speedup(first, cell)}")
                assert first.first is not None and cell.first is not None
                if not same_across_batches(first.first, cell.first):
                    failed.append(f"{name} cache {setting} (batch {size} / {sizes[0]})")
    if failed:
        print(f"OUTPUTS DIFFER: {'; '.join(failed)}")
        return 1
    print(
        f"outputs equal with the cache on and off and at batch sizes "
        f"{', '.join(map(str, sizes))}: {', '.join(names)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
