"""Run one trial on a loaded model: plan, prune, generate, score, measure. No Ray, no MLflow."""

from __future__ import annotations

import json
import re
import statistics
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import prunelab.methods as methods
from prunelab.methods.base import Plan, PlanContext, PruningMethod
from prunelab.workers.adapters import Adapter, Prepared
from prunelab.workers.attention import AttentionProbe, probe_attention
from prunelab.workers.benchmarks import build_benchmark
from prunelab.workers.benchmarks.base import Sample
from prunelab.workers.cost import kv_cache_bytes, trial_flops
from prunelab.workers.guidance import run_guidance
from prunelab.workers.heatmaps import render_token_fate, trace_token_fate
from prunelab.workers.models import LoadedModel
from prunelab.workers.preinference import PreInference, pre_inference_flops, run_pre_inference
from prunelab.workers.timing import Timer
from prunelab.workers.vib import trial_assets

DIAGNOSTIC_SAMPLES = 4  # samples whose vision-stage diagnostics go to a trial artifact

__all__ = ["ReferenceCache", "SampleResult", "TrialOutput", "build_method", "run_trial"]


def build_method(config: dict[str, Any]) -> tuple[PruningMethod, methods.Budget | None]:
    """The method instance and budget a trial config asks for."""
    method = methods.get(config["method"]).from_hparams(config.get("hparams") or {})
    method = method.bind(trial_assets(config))  # trained assets, e.g. pgp's VIB head
    budget = None
    if method.uses_budget:
        budget = methods.Budget(
            keep_ratio=config.get("keep_ratio"), keep_tokens=config.get("keep_tokens")
        )
    return method, budget


class ReferenceCache:
    """First-token log-probabilities of the unpruned model, kept by a worker across trials.

    Keyed by (model revision, benchmark identity, sample id), stored as float32 on the CPU (a
    lower precision would flip near-tied argmaxes); least recently used entries go first once
    ``max_bytes`` is exceeded.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[tuple[str, str, str], torch.Tensor] = OrderedDict()

    def get(self, key: tuple[str, str, str]) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: tuple[str, str, str], logprobs: torch.Tensor) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        value = logprobs.detach().to("cpu", torch.float32)
        self._entries[key] = value
        self.nbytes += value.nbytes
        while self.nbytes > self.max_bytes and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes


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
    prefill_s: float
    decode_s: float
    fidelity_kl: float | None = None
    fidelity_top1: float | None = None
    guidance_flops: float = 0.0  # the guidance model's generation (counted in tflops too)
    pre_inference_layer: int | None = None  # the layer a pre-inference pass chose (prep's k*)


@dataclass
class TrialOutput:
    metrics: dict[str, float]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    # files for the trial's MLflow run: relative name -> text or bytes (e.g. importance/*.png)
    artifacts: dict[str, str | bytes] = field(default_factory=dict)


def _sample_generator(seed: int | None, sample_id: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{sample_id}".encode()))


def _guidance_after_vision(guidance, kept: torch.Tensor | None) -> torch.Tensor | None:
    """The guide's scores for the layer stages: after a vision stage, those of the tokens it
    kept (anchors), in their order."""
    if guidance is None:
        return None
    if kept is None:
        return guidance.scores
    return guidance.scores[kept.to(guidance.scores.device)]


def _run_sample(
    adapter: Adapter,
    prepared: Prepared,
    method: PruningMethod,
    plan: Plan,
    generator: torch.Generator,
    max_new_tokens: int,
    timer: Timer,
    guide: tuple[Adapter, Sample] | None = None,
    on_pre_inference: Callable[[PreInference], None] | None = None,
    diagnostics: list[dict[str, list[float]]] | None = None,
):
    """Guidance (if the method has a guide), vision stage (if any), pre-inference (if the plan
    has one: it sets the plan's layers; its run goes to ``on_pre_inference``), then generation
    with the layer stages. Returns the generation (timings filled in), the vision stage's
    anchors and the guide's run. ``diagnostics``: collects the vision stage's diagnostic
    curves (``VisionSelection.diagnostics``), which the method computes only when given."""
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
    signals = adapter.vision_signals(prepared, plan.vision_signals)
    signals.generator = generator
    signals.family, signals.want_diagnostics = adapter.family, diagnostics is not None
    if plan.pre_inference is not None:
        pre_inference = run_pre_inference(adapter, prepared, method, plan, signals, timer.mark)
        plan = pre_inference.plan
        if on_pre_inference is not None:
            on_pre_inference(pre_inference)
    signals.guidance = guidance.scores if guidance is not None else None
    if plan.vision_keep is not None:
        selection = method.select_vision(signals, plan.vision_keep)
        tokens, kept_inputs = selection.tokens, selection.kept
        if diagnostics is not None and selection.diagnostics:
            diagnostics.append(selection.diagnostics)
    else:
        tokens, kept_inputs = signals.tokens, None
    probe = AttentionProbe(modules=adapter.attention_modules)
    pruner_kwargs = {
        "method": method,
        "steps": plan.layers,
        "probe": probe,
        "generator": generator,
        # after a vision stage, the scores of the tokens it kept (anchors) in their order
        "guidance": _guidance_after_vision(guidance, kept_inputs),
    }
    with probe_attention(probe):
        generation, first_ready = adapter.generate(
            prepared,
            tokens,
            lambda seq_len, visual: adapter.layer_pruner(seq_len, visual, **pruner_kwargs),
            max_new_tokens,
            timer.mark,
            kept=kept_inputs,
        )
    end = timer.mark()
    generation.prefill_s = timer.seconds(start, first_ready)
    generation.decode_s = timer.seconds(first_ready, end)
    return generation, kept_inputs, guidance


def _plan(
    method: PruningMethod,
    budget: methods.Budget | None,
    config: dict[str, Any],
    adapter: Adapter,
    prepared: Prepared,
    n_layers: int,
) -> Plan:
    """The method's plan for one prepared sample of a trial."""
    ctx = PlanContext(
        n_visual=prepared.n_visual,
        n_layers=n_layers,
        budget=budget,
        prune_layer=config.get("prune_layer"),
        seed=config.get("seed") or 0,
        family=adapter.family,
    )
    return method.plan(ctx)


def run_trial(
    loaded: LoadedModel,
    adapter: Adapter,
    config: dict[str, Any],
    references: ReferenceCache | None = None,
    progress: Callable[[int, int], None] | None = None,
    guide: tuple[LoadedModel, Adapter] | None = None,
) -> TrialOutput:
    """Evaluate one trial config (see ``TrialSpec.config``) and measure its costs.

    ``guide``: the smaller guidance model (and its adapter) of methods that need one.
    """
    method, budget = build_method(config)
    eval_cfg = config["eval"]
    benchmark = build_benchmark(config["benchmark_config"])
    bench_id = str(sorted(benchmark.describe().items()))
    samples: list[Sample] = benchmark.samples(eval_cfg["limit"], eval_cfg.get("sample_seed", 0))
    info = loaded.info
    timer = Timer(loaded.device)
    max_new = int(eval_cfg.get("max_new_tokens", 4))
    convention = eval_cfg.get("flops_convention", "pdrop")
    references = references if references is not None else ReferenceCache()
    unpruned = methods.get("none")()
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loaded.device)

    results: list[SampleResult] = []
    curves: list[dict[str, Any]] = []  # vision-stage diagnostics of the first samples
    with torch.inference_mode():
        for index, sample in enumerate(samples):
            prepared = adapter.prepare(sample)
            plan = _plan(method, budget, config, adapter, prepared, info.n_layers)
            guided = (guide[1], sample) if guide is not None else None
            if index == 0:
                for _ in range(int(eval_cfg.get("warmup", 0))):
                    _run_sample(
                        adapter, prepared, method, plan,
                        _sample_generator(config.get("seed"), sample.id), max_new, timer, guided,
                    )  # fmt: skip
            pre_runs: list[PreInference] = []
            sample_curves: list[dict] | None = [] if index < DIAGNOSTIC_SAMPLES else None
            generation, _, guidance = _run_sample(
                adapter, prepared, method, plan,
                _sample_generator(config.get("seed"), sample.id), max_new, timer, guided,
                on_pre_inference=pre_runs.append,
                diagnostics=sample_curves,
            )  # fmt: skip
            curves.extend({"sample": sample.id, **c} for c in sample_curves or [])
            prediction = adapter.decode(generation.token_ids)
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
                prefill_s=generation.prefill_s,
                decode_s=generation.decode_s,
            )
            if guidance is not None:
                assert guide is not None
                result.guidance_flops = trial_flops(
                    guidance.generation.lengths.tokens,
                    len(guidance.generation.token_ids),
                    guide[0].info,
                    convention,
                    guidance.generation.vision_flops,
                )
            for pre in pre_runs:  # counted with guidance: tflops_guidance and tflops
                result.guidance_flops += pre_inference_flops(pre, info, convention)
                result.pre_inference_layer = pre.layer
            if eval_cfg.get("fidelity", True):
                key = (info.revision, bench_id, sample.id)
                if not plan.prunes:
                    references.put(key, generation.first_logprobs)
                reference = references.get(key)
                if reference is None:
                    reference_gen, _, _ = _run_sample(
                        adapter, prepared, unpruned, Plan(),
                        _sample_generator(0, sample.id), 1, timer,
                    )  # fmt: skip
                    reference = reference_gen.first_logprobs
                    references.put(key, reference)
                result.fidelity_kl, result.fidelity_top1 = first_token_fidelity(
                    reference, generation.first_logprobs
                )
            results.append(result)
            if progress is not None:
                progress(index + 1, len(samples))

    official = None
    if callable(getattr(benchmark, "aggregate", None)):  # benchmarks with non-mean metrics
        official = benchmark.aggregate(  # type: ignore[attr-defined]
            [(s, r.prediction, r.score) for s, r in zip(samples, results, strict=True)]
        )
    metrics = aggregate(results, info, convention, loaded, official)
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
    heatmaps = _importance_heatmaps(
        adapter, method, budget, config, samples[: max(0, int(eval_cfg.get("heatmaps", 0)))],
        info.n_layers, timer, guide,
    )  # fmt: skip
    if curves:  # e.g. infoprune's MFI / MGI per selection step
        heatmaps[f"{method.name}/curves.json"] = json.dumps(curves)
    return TrialOutput(metrics=metrics, predictions=predictions, artifacts=heatmaps)


def _importance_heatmaps(
    adapter: Adapter,
    method: PruningMethod,
    budget: methods.Budget | None,
    config: dict[str, Any],
    samples: list[Sample],
    n_layers: int,
    timer: Timer,
    guide: tuple[LoadedModel, Adapter] | None,
) -> dict[str, str | bytes]:
    """``importance/<sample id>.png`` per sample: its tokens kept / merged / dropped over the
    image. Each sample runs once more, untimed, with the trial's plan and seeded generator (so
    the same selection) under a trace; nothing for a method that prunes nothing."""
    artifacts: dict[str, str | bytes] = {}
    max_new = int(config["eval"].get("max_new_tokens", 4))
    with torch.inference_mode():
        for sample in samples:
            prepared = adapter.prepare(sample)
            plan = _plan(method, budget, config, adapter, prepared, n_layers)
            if not plan.prunes:
                break
            guided = (guide[1], sample) if guide is not None else None

            def run(traced_adapter, traced_method, prepared=prepared, plan=plan, sample=sample,
                    guided=guided) -> None:  # fmt: skip
                _run_sample(
                    traced_adapter, prepared, traced_method, plan,
                    _sample_generator(config.get("seed"), sample.id), max_new, timer, guided,
                )  # fmt: skip

            fate = trace_token_fate(adapter, method, prepared.coords, run)
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", sample.id)
            artifacts[f"importance/{name}.png"] = render_token_fate(
                sample.image, fate, title=f"{config['method']} {sample.id}"
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
) -> dict[str, float]:
    """Trial metrics: means over samples, medians for latency.

    ``benchmark_metrics``: what the benchmark's own ``aggregate`` computed (its headline
    ``score``, ``score.<category>`` and extras); they replace the mean score and categories.
    """
    flops = [
        trial_flops(r.tokens_per_layer, r.new_tokens, info, convention, r.vision_flops)
        + r.guidance_flops
        for r in results
    ]
    itemsize = next(loaded.model.parameters()).element_size()
    kv = [
        kv_cache_bytes(r.tokens_per_layer, r.new_tokens, info.n_kv_heads, info.head_dim, itemsize)
        for r in results
    ]
    decode_per_token = [r.decode_s / (r.new_tokens - 1) for r in results if r.new_tokens > 1]
    metrics: dict[str, float] = {
        "score": 100.0 * statistics.fmean(r.score for r in results),
        "visual_tokens_in": statistics.fmean(r.visual_in for r in results),
        "visual_tokens_kept": statistics.fmean(r.visual_kept for r in results),
        "avg_visual_tokens": statistics.fmean(r.avg_visual for r in results),
        "tflops": statistics.fmean(flops) / 1e12,
        "prefill_ms": 1000 * statistics.median(r.prefill_s for r in results),
        "latency_ms": 1000 * statistics.median(r.prefill_s + r.decode_s for r in results),
        "kv_cache_mb": statistics.fmean(kv) / 2**20,
        "samples": float(len(results)),
    }
    if any(r.guidance_flops for r in results):
        metrics["tflops_guidance"] = statistics.fmean(r.guidance_flops for r in results) / 1e12
    if decode_per_token:
        metrics["decode_ms_per_token"] = 1000 * statistics.median(decode_per_token)
    chosen = [r.pre_inference_layer for r in results if r.pre_inference_layer is not None]
    if chosen:
        metrics["prep_layer"] = statistics.fmean(chosen)  # mean layer chosen by pre-inference
    categories = sorted({r.category for r in results if r.category})
    for category in categories:
        scores = [r.score for r in results if r.category == category]
        metrics[f"score.{category}"] = 100.0 * statistics.fmean(scores)
    if benchmark_metrics is not None:
        metrics = {k: v for k, v in metrics.items() if not k.startswith("score.")}
        metrics.update({k: float(v) for k, v in benchmark_metrics.items()})
    fidelity = [r for r in results if r.fidelity_kl is not None]
    if fidelity:
        metrics["fidelity_kl"] = statistics.fmean(r.fidelity_kl for r in fidelity)  # type: ignore[misc]
        metrics["fidelity_top1"] = statistics.fmean(r.fidelity_top1 for r in fidelity)  # type: ignore[misc]
    if loaded.device.type == "cuda":
        metrics["peak_mem_mb"] = torch.cuda.max_memory_allocated(loaded.device) / 2**20
    return metrics
