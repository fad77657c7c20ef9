"""Run one trial on a loaded model: plan, prune, generate, score, measure. No Ray, no MLflow.

A trial evaluates its samples one at a time (batch 1): prepare (processor), vision tower,
method, prefill and greedy decode under the method's hooks, score. Work that is the same in
every trial of a (model, benchmark, sample) comes from the worker's caches when it passes them
(:class:`ReferenceCache`: the unpruned first-token log-probabilities of the fidelity metrics;
:class:`~prunelab.workers.caches.VisionCache`: prepared inputs and vision outputs, bypassed by
methods that change the encoder), which give bit for bit what computing it again gives.

Latency is measured as the papers measure it, at batch 1 after warm-up, on the trial's timed
subset: its first ``eval.timed_samples`` samples, each run whole (vision tower included, never
from the cache); the other samples carry no timings. ``samples_per_s`` is the throughput of
the whole evaluation loop.

Batched evaluation (``eval.batch_size`` > 1, or ``auto``: :func:`resolve_batch_size`): the
untimed samples go through prefill and greedy decode ``batch_size`` at a time
(:func:`run_batch`: left padding, each sample its own position ids (M-RoPE rows included),
plan, vision-stage selection, layer-stage selection and KV cache, whatever its image size;
:mod:`prunelab.workers.batched`), with the outputs of batch 1 up to floating-point
reassociation. Adapters without a batched path (``VLMAdapter.batches``) and plans the batched
pruner cannot run (:func:`batch_problem`) run at batch 1; the trial logs why once and records
``effective_batch_size``.

Prefetch: the untimed samples are prepared (``adapter.prepare`` through the vision cache) on a
background thread (:class:`Prefetcher`), the next sample or batch while the model runs the
current one; the timed samples are prepared on the trial's thread with nothing alongside.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch

import prunelab.methods as methods
from prunelab.methods.base import Plan, PlanContext, PruningMethod, VisionSelection, VisionSignals
from prunelab.trial import Trial, TrialResult
from prunelab.workers.adapters import Adapter, Generation, Prepared
from prunelab.workers.attention import AttentionProbe, probe_attention
from prunelab.workers.batched import step_problem, steps_problem
from prunelab.workers.benchmarks import build_benchmark
from prunelab.workers.benchmarks.base import Sample, cut_at_stops
from prunelab.workers.benchmarks.resampling import score_replicates
from prunelab.workers.caches import ByteLRU, VisionCache, model_identity
from prunelab.workers.cost import trial_flops
from prunelab.workers.guidance import Guidance, run_guidance
from prunelab.workers.heatmaps import Caption, render_token_fate, token_fate
from prunelab.workers.models import LoadedModel
from prunelab.workers.preinference import PreInference, pre_inference_flops, run_pre_inference
from prunelab.workers.pruning import LayerPruner
from prunelab.workers.timing import Timer
from prunelab.workers.vib import trial_assets

DIAGNOSTIC_SAMPLES = 4  # samples whose vision-stage diagnostics go to a trial artifact
AUTO_BATCH_CPU = 8  # eval.batch_size=auto on a CPU
AUTO_BATCH_MAX = 64  # eval.batch_size=auto on a GPU: at most this many
log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

__all__ = [
    "Prefetcher",
    "ReferenceCache",
    "SampleInputs",
    "SampleResult",
    "SampleRun",
    "batch_problem",
    "build_method",
    "resolve_batch_size",
    "run_batch",
    "run_sample",
    "run_trial",
]


def build_method(trial: Trial) -> tuple[PruningMethod, methods.Budget | None]:
    """The method instance and budget a trial asks for (no budget: the method takes none)."""
    method, budget = methods.build(trial.method, trial.hparams, trial.keep_ratio, trial.keep_tokens)
    return method.bind(trial_assets(trial)), budget  # trained assets, e.g. pgp's VIB head


class ReferenceCache:
    """First-token log-probabilities of the unpruned model, kept by a worker across trials.

    Keyed by (model revision, benchmark identity, sample id), stored as float32 on the CPU (a
    lower precision would flip near-tied argmaxes); least recently used entries go first once
    ``max_bytes`` is exceeded (a :class:`~prunelab.workers.caches.ByteLRU`, as the worker's
    :class:`~prunelab.workers.caches.VisionCache`).
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self._store: ByteLRU[torch.Tensor] = ByteLRU(max_bytes)

    @property
    def max_bytes(self) -> int:
        return self._store.max_bytes

    @property
    def nbytes(self) -> int:
        return self._store.nbytes

    def get(self, key: tuple[str, str, str]) -> torch.Tensor | None:
        return self._store.get(key)

    def put(self, key: tuple[str, str, str], logprobs: torch.Tensor) -> None:
        value = logprobs.detach().to("cpu", torch.float32)
        self._store.put(key, value, value.nbytes)


@dataclass
class SampleResult:
    id: str
    category: str
    question: str
    answers: list[str]
    prediction: str
    score: float
    visual_in: int
    visual_kept: int
    avg_visual: float
    tokens_per_layer: list[int]
    new_tokens: int
    vision_flops: float
    # timings of a sample in the trial's timed subset (``eval.timed_samples``); None: untimed
    prefill_s: float | None
    decode_s: float | None
    fidelity_kl: float | None = None
    fidelity_top1: float | None = None
    guidance_flops: float = 0.0  # the guidance model's generation (counted in tflops too)
    pre_inference_layer: int | None = None  # the layer a pre-inference pass chose (prep's k*)


@dataclass
class SampleRun:
    """One sample through a method (:func:`run_sample`): what the trial measures of it and
    what its importance heatmap draws."""

    generation: Generation  # the (pruned) generation, prefill_s / decode_s filled in
    # the generation's layer-stage pruner (exited): visual_positions (M,) of the visual tokens
    # entering the LLM, kept_at (per layer step, the visual tokens it kept), lengths
    pruner: LayerPruner
    vision: VisionSelection | None = None  # the vision stage's selection (None: no such stage)
    guidance: Guidance | None = None  # the guidance model's run, for methods with a guide
    pre_inference: PreInference | None = None  # the pre-inference pass, for plans with one

    @property
    def kept(self) -> torch.Tensor | None:
        """(M,) the input token each visual token entering the LLM is anchored on (None: all
        N tokens, as they are)."""
        return None if self.vision is None else self.vision.kept

    @property
    def diagnostics(self) -> dict[str, list[float]]:
        """The vision stage's diagnostic curves (computed when ``run_sample`` was asked for
        them; empty otherwise)."""
        return (self.vision.diagnostics if self.vision is not None else None) or {}


@dataclass(frozen=True)
class SampleInputs:
    """Where a trial's samples get their prepared inputs and vision signals: from the adapter,
    or through the worker's :class:`~prunelab.workers.caches.VisionCache` (shared by the
    trials of the same model and benchmark; see :mod:`prunelab.workers.caches`).

    ``cache`` None: everything is computed (no cache, or a method that changes the encoder).
    ``model`` / ``benchmark``: the identities entries are keyed by, with the sample id.
    """

    adapter: Adapter
    device: torch.device
    cache: VisionCache | None = None
    model: str = ""
    benchmark: str = ""

    def prepare(self, sample: Sample) -> Prepared:
        """The sample's processor output on the model's device."""
        if self.cache is None:
            return self.adapter.prepare(sample)
        key = (self.model, self.benchmark, sample.id)
        return self.cache.prepared(key, lambda: self.adapter.prepare(sample), self.device)

    def encoder(
        self, sample: Sample, prepared: Prepared
    ) -> Callable[[frozenset[str]], VisionSignals] | None:
        """``run_sample``'s ``encode`` for ``prepared`` (None: the adapter's, uncached)."""
        cache = self.cache
        if cache is None:
            return None
        key = (self.model, self.benchmark, sample.id)

        def encode(wanted: frozenset[str]) -> VisionSignals:
            return cache.signals(
                key, wanted, lambda: self.adapter.vision_signals(prepared, wanted), self.device
            )

        return encode


class Prefetcher(Generic[T, R]):
    """``work`` over ``items`` in order, computed ahead of the caller on one background thread.

    Iterating yields ``(item, work(item))`` in order. Before waiting for item i it hands the
    items up to i + ``ahead(i)`` to the thread, which runs them one after another: while the
    caller uses item i, the next ones are being computed, and at most ``ahead(i) + 1``
    results are ever pending (a bounded queue). ``ahead(i)`` 0 with item i not handed over
    yet: the caller computes it itself, with nothing running alongside. An exception raised
    by ``work`` is raised by the iteration at its item, as computing it there would raise it.
    ``enabled`` False: every item is computed by the caller when its turn comes.

    A context manager: on exit the work not started is cancelled and the thread joined.
    ``work`` runs on another thread: thread-local state (``torch.inference_mode``, ...) is
    its own to set.
    """

    def __init__(
        self,
        work: Callable[[T], R],
        items: Sequence[T],
        ahead: Callable[[int], int] = lambda index: 1,
        enabled: bool = True,
    ) -> None:
        self._work = work
        self._items = list(items)
        self._ahead = ahead
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="prunelab-prefetch")
            if enabled
            else None
        )
        self._pending: dict[int, Future[R]] = {}
        self._handed = 0  # items handed to the thread (or computed by the caller) so far

    def __enter__(self) -> Prefetcher[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel the work not started, wait for the running one, stop the thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def __iter__(self) -> Iterator[tuple[T, R]]:
        for index, item in enumerate(self._items):
            if self._executor is None:
                yield item, self._work(item)
                continue
            last = min(len(self._items) - 1, index + max(0, self._ahead(index)))
            if self._handed == index and last == index:  # nothing ahead: compute it here
                self._handed += 1
                yield item, self._work(item)
                continue
            while self._handed <= last:
                self._pending[self._handed] = self._executor.submit(
                    self._work, self._items[self._handed]
                )
                self._handed += 1
            yield item, self._pending.pop(index).result()


def _sample_generator(seed: int | None, sample_id: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{sample_id}".encode()))


def _guidance_after_vision(
    guidance: Guidance | None, kept: torch.Tensor | None
) -> torch.Tensor | None:
    """The guide's scores for the layer stages: after a vision stage, those of the tokens it
    kept (anchors), in their order."""
    if guidance is None:
        return None
    if kept is None:
        return guidance.scores
    return guidance.scores[kept.to(guidance.scores.device)]


def _vision_signals(
    adapter: Adapter,
    prepared: Prepared,
    plan: Plan,
    encode: Callable[[frozenset[str]], VisionSignals] | None,
    generator: torch.Generator | None,
    diagnostics: bool,
) -> VisionSignals:
    """The vision signals ``plan`` asks for, from the adapter or ``encode`` (the worker's
    cache), with the sample's generator and what the method may read of the run."""
    if encode is None:
        signals = adapter.vision_signals(prepared, plan.vision_signals)
    else:
        signals = encode(plan.vision_signals)
    signals.generator = generator
    signals.family, signals.want_diagnostics = adapter.family, diagnostics
    return signals


def run_sample(
    adapter: Adapter,
    prepared: Prepared,
    method: PruningMethod,
    plan: Plan,
    generator: torch.Generator,
    max_new_tokens: int,
    timer: Timer,
    guide: tuple[Adapter, Sample] | None = None,
    diagnostics: bool = False,
    vision_positions: str | None = None,
    encode: Callable[[frozenset[str]], VisionSignals] | None = None,
) -> SampleRun:
    """One sample through ``method``: guidance (if the method has a guide), vision stage (if
    any), pre-inference (if the plan has one: it sets the plan's layers), then generation with
    the layer stages under a pruner built here for the LLM input.

    ``diagnostics``: ask the vision stage for its diagnostic curves (the method computes them
    only when asked). ``vision_positions``: how the LLM numbers a vision stage's kept tokens
    (``packed`` / ``original``; None: the family's default). ``encode``: the sample's vision
    signals for a set of wanted signals (a :class:`SampleInputs` lookup in the worker's vision
    cache); None: the adapter's ``vision_signals``, the vision tower run now. The generation's
    ``prefill_s`` runs from the start (guidance and vision tower included) to the first
    token's logits, its ``decode_s`` from there to the last token.
    """
    start = timer.mark()
    guidance = None
    if method.needs_guidance:
        if guide is None:
            raise ValueError(f"method {method.name} needs a guidance model; none was loaded")
        guidance = run_guidance(guide[0], method, guide[1], max_new_tokens, timer.mark)
        if guidance.scores.numel() != prepared.n_visual:
            raise RuntimeError(
                f"the guidance model makes {guidance.scores.numel()} visual tokens for this "
                f"image, the model {prepared.n_visual}: they must match one to one"
            )
    signals = _vision_signals(adapter, prepared, plan, encode, generator, diagnostics)
    pre_inference = None
    if plan.pre_inference is not None:
        pre_inference = run_pre_inference(adapter, prepared, method, plan, signals, timer.mark)
        plan = pre_inference.plan
    signals.guidance = guidance.scores if guidance is not None else None
    vision = None
    if plan.vision_keep is not None:
        vision = method.select_vision(signals, plan.vision_keep)
    tokens, kept = (vision.tokens, vision.kept) if vision is not None else (signals.tokens, None)
    probe = AttentionProbe(modules=adapter.attention_modules)
    with probe_attention(probe):
        llm_input = adapter.llm_input(prepared, tokens, kept, vision_positions)
        pruner = adapter.layer_pruner(
            llm_input,
            method=method,
            steps=plan.layers,
            probe=probe,
            generator=generator,
            # after a vision stage, the scores of the tokens it kept (anchors) in their order
            guidance=_guidance_after_vision(guidance, kept),
        )
        generation, first_ready = adapter.generate(
            prepared, llm_input, max_new_tokens, timer.mark, pruner=pruner
        )
    end = timer.mark()
    generation.prefill_s = timer.seconds(start, first_ready)
    generation.decode_s = timer.seconds(first_ready, end)
    return SampleRun(generation, pruner, vision, guidance, pre_inference)


def batch_problem(adapter: Adapter, method: PruningMethod, plan: Plan) -> str | None:
    """Why samples of ``method`` with ``plan`` cannot share a batch on ``adapter`` (None: they
    can; :func:`run_batch`)."""
    if not getattr(adapter, "batches", False):
        return f"the {adapter.family} family does not batch (its adapter has no batched path)"
    if method.needs_guidance:
        return f"{method.name} runs a guidance model per sample"
    if plan.pre_inference is not None:
        return f"{method.name} runs a pre-inference pass per sample"
    for step in plan.layers:
        problem = step_problem(step)
        if problem is not None:
            return f"{method.name}: {problem}"
    return None


def resolve_batch_size(setting: int | str, loaded: LoadedModel, tokens: int) -> int:
    """The batch size of ``eval.batch_size``: the number itself; ``auto`` on a CPU
    :data:`AUTO_BATCH_CPU`; ``auto`` on a GPU as many samples of ``tokens`` (prompt and
    generated) as half its free memory holds, at about 16 hidden states per token on top of
    the KV cache, from 1 to :data:`AUTO_BATCH_MAX`."""
    if setting != "auto":
        return max(1, int(setting))
    if loaded.device.type != "cuda":
        return AUTO_BATCH_CPU
    info = loaded.info
    itemsize = next(loaded.model.parameters()).element_size()
    kv = 2 * info.n_layers * info.n_kv_heads * info.head_dim
    per_sample = tokens * itemsize * (kv + 16 * info.hidden_size)
    free, _ = torch.cuda.mem_get_info(loaded.device)
    return max(1, min(AUTO_BATCH_MAX, int(free // 2 // max(per_sample, 1))))


def run_batch(
    adapter: Adapter,
    prepared: Sequence[Prepared],
    method: PruningMethod,
    plan: Plan | Sequence[Plan],
    generators: Sequence[torch.Generator],
    max_new_tokens: int,
    diagnostics: Sequence[bool] = (),
    vision_positions: str | None = None,
    encoders: Sequence[Callable[[frozenset[str]], VisionSignals] | None] = (),
) -> list[tuple[Generation, VisionSelection | None]]:
    """Samples through ``method`` in one batched generation: each sample's vision signals and
    vision-stage selection (with its own ``generators`` entry), then one left-padded prefill
    whose layer stages select per sample, and a greedy decode.

    ``plan``: the samples' plan, or each sample's (they differ where the samples' images make
    different numbers of visual tokens: a budget is a share of each); every plan must pass
    :func:`batch_problem` and their layer stages must be at the same layers
    (:func:`~prunelab.workers.batched.steps_problem`). Returns each sample's generation (no
    timings) and vision selection, in order. ``diagnostics`` / ``encoders``: per sample, as
    ``run_sample``'s.
    """
    size = len(prepared)
    plans = [plan] * size if isinstance(plan, Plan) else list(plan)
    if len(plans) != size:
        raise ValueError(f"{len(plans)} plans for {size} samples")
    problem = steps_problem([p.layers for p in plans])
    if problem is not None:
        raise ValueError(f"these samples cannot share a batch: {problem}")
    wants = list(diagnostics) or [False] * size
    encodes = list(encoders) or [None] * size
    llm_inputs, visions = [], []
    for sample, own, generator, want, encode in zip(
        prepared, plans, generators, wants, encodes, strict=True
    ):
        signals = _vision_signals(adapter, sample, own, encode, generator, want)
        vision = None
        if own.vision_keep is not None:
            vision = method.select_vision(signals, own.vision_keep)
        tokens, kept = (
            (vision.tokens, vision.kept) if vision is not None else (signals.tokens, None)
        )
        llm_inputs.append(adapter.llm_input(sample, tokens, kept, vision_positions))
        visions.append(vision)
    batch = adapter.batch_input(llm_inputs)  # type: ignore[attr-defined]
    probe = AttentionProbe(modules=adapter.attention_modules, chunks=True)
    with probe_attention(probe):
        pruner = adapter.batch_pruner(  # type: ignore[attr-defined]
            batch,
            method=method,
            steps=plans[0].layers,
            probe=probe,
            generators=generators,
            sample_steps=[p.layers for p in plans],
        )
        generations = adapter.generate_batch(  # type: ignore[attr-defined]
            prepared, llm_inputs, batch, max_new_tokens, pruner
        )
    return list(zip(generations, visions, strict=True))


def _plan(
    method: PruningMethod,
    budget: methods.Budget | None,
    trial: Trial,
    adapter: Adapter,
    prepared: Prepared,
    n_layers: int,
) -> Plan:
    """The method's plan for one prepared sample of a trial."""
    ctx = PlanContext(
        n_visual=prepared.n_visual,
        n_layers=n_layers,
        budget=budget,
        prune_layer=trial.prune_layer,
        seed=trial.seed or 0,
        family=adapter.family,
        budget_mode=trial.budget_mode,  # type: ignore[arg-type]
    )
    return method.plan_trial(ctx)


def run_trial(
    loaded: LoadedModel,
    adapter: Adapter,
    trial: Trial,
    references: ReferenceCache | None = None,
    progress: Callable[[int, int], None] | None = None,
    guide: tuple[LoadedModel, Adapter] | None = None,
    vision_cache: VisionCache | None = None,
    prefetch: bool = True,
) -> TrialResult:
    """Evaluate one trial and measure its costs: its metrics, predictions and artifacts (how
    long and where it ran is the worker's to fill in).

    ``guide``: the smaller guidance model (and its adapter) of methods that need one.
    ``vision_cache``: the worker's cache of prepared inputs and vision-tower outputs, read and
    filled unless the method changes the encoder (``changes_encoder``); None: none.

    Timing, comparable with the papers' (batch 1, after warm-up): the first
    ``eval.timed_samples`` samples (in the benchmark's deterministic order) are the timed
    subset. The first of them runs ``eval.warmup`` untimed times first; each of them runs the
    whole pipeline (vision tower included, never from the cache), and only their timings make
    ``prefill_ms``, ``decode_ms_per_token`` and ``latency_ms`` (medians). The other samples
    may take their vision signals from the cache and carry no timings. ``samples_per_s`` is
    the throughput of the whole evaluation loop (every sample, warm-up and fidelity references
    included; heatmaps excluded).

    ``eval.batch_size`` > 1: the samples after the timed subset run that many at a time
    (:func:`run_batch`), or one at a time where they cannot (:func:`batch_problem`; logged
    once). The metrics then hold ``batch_size`` (the resolved setting) and
    ``effective_batch_size`` (the largest batch that ran: 1 when the trial fell back).

    ``prefetch``: prepare the samples after the timed subset (``adapter.prepare``, through the
    vision cache) on a background thread, the next sample or batch while the model runs the
    current one (:class:`Prefetcher`); the results are the same either way, and an error in
    preparing a sample is raised here when the loop reaches it. False: each on this thread
    when its turn comes.
    """
    method, budget = build_method(trial)
    settings = trial.eval
    benchmark = build_benchmark({**trial.benchmark_config, "scoring": settings.scoring})
    bench_id = str(sorted(benchmark.describe().items()))
    samples: list[Sample] = benchmark.samples(settings.limit, settings.sample_seed)
    info = loaded.info
    timer = Timer(loaded.device)
    max_new = settings.max_new_tokens or benchmark.max_new_tokens
    convention = settings.flops_convention
    references = references if references is not None else ReferenceCache()
    unpruned = methods.get("none")()
    cached = vision_cache is not None and vision_cache.enabled and not method.changes_encoder
    inputs = SampleInputs(
        adapter, loaded.device, vision_cache if cached else None, model_identity(loaded), bench_id
    )
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loaded.device)

    results: list[SampleResult] = []
    curves: list[dict[str, Any]] = []  # vision-stage diagnostics of the first samples
    batch_size: int | None = None  # eval.batch_size, resolved on the first sample
    effective = 1  # the largest batch a generation ran
    fallback: str | None = None  # why samples ran at batch 1 though batch_size > 1 (logged once)
    pending: list[tuple[int, Sample, Prepared]] = []  # untimed samples waiting for a batch

    def record(
        index: int,
        sample: Sample,
        prepared: Prepared,
        plan: Plan,
        generation: Generation,
        timed: bool,
        guidance: Guidance | None = None,
        pre_inference: PreInference | None = None,
    ) -> None:
        """The sample's result (fidelity against the unpruned reference included)."""
        prediction = cut_at_stops(adapter.decode(generation.token_ids), benchmark.until)
        result = SampleResult(
            id=sample.id,
            category=sample.category,
            question=sample.question,
            answers=sample.answers,
            prediction=prediction,
            score=benchmark.score(prediction, sample),
            visual_in=generation.visual_in,
            visual_kept=generation.lengths.visual[-1],
            avg_visual=statistics.fmean(generation.lengths.visual),
            tokens_per_layer=list(generation.lengths.tokens),
            new_tokens=len(generation.token_ids),
            vision_flops=generation.vision_flops,
            prefill_s=generation.prefill_s if timed else None,
            decode_s=generation.decode_s if timed else None,
        )
        if guidance is not None:
            assert guide is not None
            guided_gen = guidance.generation
            result.guidance_flops = trial_flops(
                guided_gen.lengths.tokens,
                len(guided_gen.token_ids),
                guide[0].info,
                convention,
                guided_gen.vision_flops,
            )
        if pre_inference is not None:  # counted with guidance: tflops_guidance, tflops
            result.guidance_flops += pre_inference_flops(pre_inference, info, convention)
            result.pre_inference_layer = pre_inference.layer
        if settings.fidelity:
            key = (info.revision, bench_id, sample.id)
            if not plan.prunes:
                references.put(key, generation.first_logprobs)
            reference = references.get(key)
            if reference is None:
                reference = run_sample(
                    adapter, prepared, unpruned, Plan(),
                    _sample_generator(0, sample.id), 1, timer,
                    encode=inputs.encoder(sample, prepared),
                ).generation.first_logprobs  # fmt: skip
                references.put(key, reference)
            result.fidelity_kl, result.fidelity_top1 = first_token_fidelity(
                reference, generation.first_logprobs
            )
        results.append(result)
        if progress is not None:
            progress(index + 1, len(samples))

    def run_one(index: int, sample: Sample, prepared: Prepared, plan: Plan) -> None:
        """One sample at batch 1 (``run_sample``); the timed subset's are timed."""
        guided = (guide[1], sample) if guide is not None else None
        timed = index < settings.timed_samples
        if index == 0:
            for _ in range(settings.warmup):
                run_sample(
                    adapter, prepared, method, plan,
                    _sample_generator(trial.seed, sample.id), max_new, timer, guided,
                    vision_positions=trial.vision_positions,
                )  # fmt: skip
        want_curves = index < DIAGNOSTIC_SAMPLES
        run = run_sample(
            adapter, prepared, method, plan,
            _sample_generator(trial.seed, sample.id), max_new, timer, guided,
            diagnostics=want_curves, vision_positions=trial.vision_positions,
            encode=None if timed else inputs.encoder(sample, prepared),
        )  # fmt: skip
        if want_curves and run.diagnostics:
            curves.append({"sample": sample.id, **run.diagnostics})
        record(
            index, sample, prepared, plan, run.generation, timed, run.guidance, run.pre_inference
        )

    def flush() -> None:
        """Run the pending samples: as one batch when they share a plan the batch can run,
        else one at a time."""
        nonlocal effective, fallback
        if not pending:
            return
        items = list(pending)
        pending.clear()
        plans = [_plan(method, budget, trial, adapter, p, info.n_layers) for _, _, p in items]
        problem = next(filter(None, (batch_problem(adapter, method, p) for p in plans)), None)
        if problem is None:  # plans differ in their budgets where images differ in size
            problem = steps_problem([p.layers for p in plans])
        runs = None
        if problem is None and len(items) > 1:
            runs = run_batch(
                adapter, [p for _, _, p in items], method, plans,
                [_sample_generator(trial.seed, s.id) for _, s, _ in items], max_new,
                diagnostics=[i < DIAGNOSTIC_SAMPLES for i, _, _ in items],
                vision_positions=trial.vision_positions,
                encoders=[inputs.encoder(s, p) for _, s, p in items],
            )  # fmt: skip
        if runs is None:
            if problem is not None and fallback is None:
                fallback = problem
                log.info(
                    "trial %s (%s): eval.batch_size=%s: running at batch 1: %s",
                    trial.key[:10], trial.method, settings.batch_size, problem,
                )  # fmt: skip
            for (index, sample, prepared), plan in zip(items, plans, strict=True):
                run_one(index, sample, prepared, plan)
            return
        effective = max(effective, len(items))
        for (index, sample, prepared), plan, (generation, vision) in zip(
            items, plans, runs, strict=True
        ):
            diagnostics = (vision.diagnostics if vision is not None else None) or {}
            if index < DIAGNOSTIC_SAMPLES and diagnostics:
                curves.append({"sample": sample.id, **diagnostics})
            record(index, sample, prepared, plan, generation, False)

    def prepare(sample: Sample) -> Prepared:  # on the prefetch thread: its own inference mode
        with torch.inference_mode():
            return inputs.prepare(sample)

    def ahead(index: int) -> int:
        """Samples prepared in the background while sample ``index`` runs: none while a timed
        sample runs (its latency is the model's alone), else the next batch."""
        return 0 if index < settings.timed_samples else batch_size or 1

    started = time.perf_counter()
    with torch.inference_mode(), Prefetcher(prepare, samples, ahead, prefetch) as prepared_samples:
        for index, (sample, prepared) in enumerate(prepared_samples):
            if batch_size is None:
                tokens = prepared.input_ids.shape[1] + max_new
                batch_size = resolve_batch_size(settings.batch_size, loaded, tokens)
            if batch_size > 1 and index >= settings.timed_samples:
                pending.append((index, sample, prepared))
                if len(pending) >= batch_size:
                    flush()
                continue
            flush()
            run_one(
                index,
                sample,
                prepared,
                _plan(method, budget, trial, adapter, prepared, info.n_layers),
            )
        flush()
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)
    elapsed = time.perf_counter() - started
    samples_per_s = len(samples) / elapsed if elapsed > 0 else None

    scored = [(s, r.prediction, r.score) for s, r in zip(samples, results, strict=True)]
    official = None
    if callable(getattr(benchmark, "aggregate", None)):  # benchmarks with non-mean metrics
        official = benchmark.aggregate(scored)  # type: ignore[attr-defined]
    replicates = score_replicates(benchmark, scored) if scored else None
    metrics = aggregate(
        results, info, convention, loaded, official, replicates, samples_per_s=samples_per_s
    )
    if batch_size is not None and batch_size > 1:  # what eval.batch_size asked, and ran
        metrics["batch_size"] = float(batch_size)
        metrics["effective_batch_size"] = float(effective)
    predictions = [
        {
            k: getattr(r, k)
            for k in (
                "id",
                "category",
                "question",
                "answers",
                "prediction",
                "score",
                "visual_kept",
                "fidelity_top1",
                "fidelity_kl",
            )
        }
        for r in results
    ]
    artifacts = _importance_heatmaps(
        inputs, method, budget, trial, samples[: max(0, settings.heatmaps)], info.n_layers,
        timer, guide, max_new, results[: max(0, settings.heatmaps)],
    )  # fmt: skip
    if curves:  # e.g. infoprune's MFI / MGI per selection step
        artifacts[f"{method.name}/curves.json"] = json.dumps(curves)
    return TrialResult(
        metrics=metrics,
        predictions=predictions,
        artifacts=artifacts,
        replicates=() if replicates is None else tuple(float(r) for r in replicates),
    )


def _importance_heatmaps(
    inputs: SampleInputs,
    method: PruningMethod,
    budget: methods.Budget | None,
    trial: Trial,
    samples: list[Sample],
    n_layers: int,
    timer: Timer,
    guide: tuple[LoadedModel, Adapter] | None,
    max_new: int,
    results: Sequence[SampleResult] = (),
) -> dict[str, str | bytes]:
    """``importance/<sample id>.png`` per sample: the method's token scores and each token's
    fate (kept / merged / dropped) over the image, captioned with the question, answers and the
    trial's prediction (``results``). Each sample runs once more, untimed, with the trial's plan
    and seeded generator (so the same selection), and its run tells what was chosen; nothing
    for a method that prunes nothing. ``inputs``: where the samples' inputs and vision signals
    come from (the trial's, so the worker's cache when the trial may use it)."""
    adapter = inputs.adapter
    artifacts: dict[str, str | bytes] = {}
    with torch.inference_mode():
        for index, sample in enumerate(samples):
            prepared = inputs.prepare(sample)
            plan = _plan(method, budget, trial, adapter, prepared, n_layers)
            if not plan.prunes:
                break
            guided = (guide[1], sample) if guide is not None else None
            run = run_sample(
                adapter, prepared, method, plan, _sample_generator(trial.seed, sample.id),
                max_new, timer, guided, vision_positions=trial.vision_positions,
                encode=inputs.encoder(sample, prepared),
            )  # fmt: skip
            pruner = run.pruner
            fate = token_fate(
                prepared.coords, run.vision, pruner.visual_positions, pruner.kept_at,
                pruner.scores_at,
            )  # fmt: skip
            final = run.pre_inference.plan if run.pre_inference is not None else plan
            result = results[index] if index < len(results) else None
            caption = Caption(
                method=trial.method, budget=budget, positions=trial.vision_positions,
                layers=tuple(step.layer for step in final.layers), title=sample.id,
                question=sample.question, answers=sample.answers,
                prediction=None if result is None else result.prediction,
                score=None if result is None else result.score,
            )  # fmt: skip
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", sample.id)
            artifacts[f"importance/{name}.png"] = render_token_fate(
                np.asarray(sample.image), fate, caption=caption
            )
    return artifacts


def first_token_fidelity(reference: torch.Tensor, pruned: torch.Tensor) -> tuple[float, float]:
    """KL(unpruned || pruned) of first-token distributions (V,) log-probs, and top-1 agreement."""
    kl = torch.sum(reference.exp() * (reference - pruned)).clamp_min(0.0)
    return float(kl), float(reference.argmax() == pruned.argmax())


def aggregate(
    results: list[SampleResult],
    info,
    convention: str,
    loaded: LoadedModel,
    benchmark_metrics: dict[str, float] | None = None,
    replicates: Sequence[float] | None = None,
    samples_per_s: float | None = None,
) -> dict[str, float]:
    """Trial metrics: every entry of the table :data:`prunelab.metrics.METRICS` (names, units
    and how each is aggregated over samples are defined there, nowhere else).

    Adding a metric is one entry in that table; if it needs a per-sample value that
    :class:`SampleResult` does not hold, also one field there, filled in :func:`run_trial`'s
    sample loop. ``benchmark_metrics``: what the benchmark's own ``aggregate`` computed (its
    headline ``score``, ``score.<category>`` and extras); they replace the mean score and
    categories. ``replicates``: the bootstrap replicates of ``score``, whose percentile
    interval is ``score_ci_low`` / ``score_ci_high``. ``samples_per_s``: the throughput of
    the trial's evaluation loop (None: not measured).
    """
    from prunelab.intervals import percentile_interval
    from prunelab.metrics import TrialContext, trial_metrics

    peak = None
    if loaded.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(loaded.device)
    context = TrialContext(
        info=info,
        convention=convention,
        itemsize=next(loaded.model.parameters()).element_size(),
        peak_mem_bytes=peak,
        score_interval=percentile_interval(replicates) if replicates is not None else None,
        samples_per_s=samples_per_s,
    )
    return trial_metrics(results, context, benchmark_metrics)
