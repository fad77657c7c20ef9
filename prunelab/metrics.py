"""The trial metrics, defined once: name, unit, how each is aggregated over a trial's samples.

:data:`METRICS` is the one table. The worker computes a trial's own metrics from it
(:func:`trial_metrics`, called by ``prunelab.workers.runner.aggregate``); the orchestrator
derives the metrics relative to the unpruned baseline from it (:func:`relative_metrics`), and
the per-trial table (``trials.csv``) takes its metric columns from it (:func:`table_columns`).

Adding a metric is one :class:`Metric` entry here. A per-sample value is an attribute of the
worker's per-sample result (``prunelab.workers.runner.SampleResult``) or a function of it and
the :class:`TrialContext`; a value the sample result does not hold yet needs one field there,
filled in the runner's sample loop.

Rules every entry follows:

- **Reported when measured.** A per-sample value of None means "not measured for this sample":
  such samples are left out of the aggregate, and a metric no sample has a value for is not
  reported at all (``fidelity_*`` without fidelity, ``decode_ms_per_token`` when no sample
  decoded more than one token, ``prep_layer`` without a pre-inference pass; the timings of
  samples outside the trial's timed subset, ``eval.timed_samples``, are None). ``when_nonzero``
  metrics are not reported when every sample's value is zero (``tflops_guidance``). A
  ``trial`` metric is read once per trial from the context; None: not reported
  (``peak_mem_mb`` off CUDA).
- **Units.** The reported value is ``aggregate(per-sample values) * scale / divisor``
  (``score``: x 100, a percentage; times: seconds x 1000, milliseconds; ``tflops``: / 1e12).
- **Families.** An entry with ``group_by`` is a family: its ``name`` is a template such as
  ``score.{category}``, and the trial gets one metric per distinct non-empty value of that
  sample attribute (sorted), aggregated over the samples of that group only.
- **Benchmarks' own metrics.** A benchmark with its own ``aggregate`` (MME, POPE, MMBench, ...)
  computes the entries marked ``from_benchmark`` itself: its value replaces the computed one of
  a plain entry (``score``), and its members replace the computed members of a family
  (``score.{category}``). Any other metric it returns (``pope_f1``, ``mme_acc_plus``, ...) is
  reported under the benchmark's own name; such names are the benchmark's, not this table's.
- **Baseline-relative.** A ``relative`` entry is ``own[relative_to] / baseline[relative_to]``
  against the unpruned trial of the same model and benchmark; the orchestrator derives it
  (:func:`relative_metrics`) once both trials are finished. It is left out when either value
  is missing or the baseline's is zero. :func:`relative_metrics` gives a fraction (1.0: as
  good / as costly as unpruned); MLflow, the database and ``trials.csv`` hold it in its
  entry's unit (``x scale``): ``score_ratio`` and its bounds in percent, ``flops_ratio`` a
  fraction.
- **Intervals.** An entry with a ``bound`` (``low`` / ``high``) is that bound of a 95%
  bootstrap interval (:mod:`prunelab.intervals`) of :data:`REPLICATED`, the one metric whose
  bootstrap replicates a trial carries (``TrialResult.replicates``, ``trials.replicates``). A
  ``trial`` bound (``score_ci_low``) is the percentile interval of the trial's own replicates,
  which the worker computes with the benchmark's own aggregate and supplies through the
  context (:attr:`TrialContext.score_interval`), in the unit of ``score``. A ``relative``
  bound (``score_ratio_ci_low``) is the paired interval of the ratio, replicate-wise own /
  baseline (:func:`prunelab.intervals.ratio_interval`), which :func:`relative_metrics`
  derives when both trials' replicates are given; pairing assumes both trials were evaluated
  on the same samples (same benchmark, eval ``limit`` and ``sample_seed``; the caller checks).
  A bound without its replicates is not reported.

Plain Python and numpy: no torch, no MLflow, no database (the orchestrator imports it).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prunelab import intervals

__all__ = [
    "AGGREGATES",
    "BOUNDS",
    "METRICS",
    "REPLICATED",
    "Metric",
    "TrialContext",
    "depends_on_scoring",
    "format_value",
    "lookup",
    "ratio",
    "relative_metrics",
    "table_columns",
    "trial_metrics",
]


@dataclass(frozen=True)
class TrialContext:
    """What per-sample values need besides the sample's own result; the worker fills it."""

    info: Any = None  # the model's ModelInfo: the shapes FLOPs and KV-cache sizes are taken from
    convention: str = "pdrop"  # the FLOPs convention (fastv, pdrop or exact)
    itemsize: int = 2  # bytes per KV-cache element (the dtype of the model's weights)
    peak_mem_bytes: float | None = None  # peak accelerator memory of the trial; None off CUDA
    # the 95% bootstrap interval (low, high) of the trial's score, in the unit of ``score``
    # (``intervals.percentile_interval`` of its replicates); None: not computed
    score_interval: tuple[float, float] | None = None
    # samples per second of the trial's whole evaluation loop; None: not measured
    samples_per_s: float | None = None


SampleValue = Callable[[Any, TrialContext], "float | None"]
TrialValue = Callable[[TrialContext], "float | None"]

AGGREGATES: dict[str, Callable[[list[float]], float] | None] = {
    "mean": statistics.fmean,
    "median": statistics.median,
    "sum": sum,
    "count": None,  # the number of samples (no per-sample value)
    "trial": None,  # read once per trial from the context (``value(context)``)
    "relative": None,  # derived by the orchestrator against the unpruned baseline
}
"""How a metric is aggregated over a trial's samples."""

REPLICATED = "score"
"""The metric whose bootstrap replicates a trial carries (what ``bound`` entries bound)."""

BOUNDS = ("low", "high")
"""The bounds of an interval an entry can be (``Metric.bound``)."""


@dataclass(frozen=True)
class Metric:
    """One trial metric (see the module docstring for the rules).

    ``value``: for per-sample aggregates, the attribute of the per-sample result or a function
    ``(sample, context) -> float | None`` (None: not measured for that sample); for ``trial``,
    a function ``(context) -> float | None``; unused for ``count`` and ``relative``.
    ``column`` / ``fmt``: the header and format spec of the metric's column in the per-trial
    table (``trials.csv`` / its markdown); None: not a column / ``str(value)``.
    """

    name: str
    unit: str
    aggregate: str
    description: str
    value: str | SampleValue | TrialValue | None = None
    scale: float = 1.0
    divisor: float = 1.0
    relative_to: str | None = None  # ``relative``: the metric this one is a ratio of
    group_by: str | None = None  # a family: one metric per value of this sample attribute
    when_nonzero: bool = False  # not reported when every sample's value is zero
    from_benchmark: bool = False  # a benchmark's own aggregate gives it (see the module doc)
    bound: str | None = None  # a bound (low, high) of the 95% interval (see the module doc)
    column: str | None = None
    fmt: str | None = None

    def __post_init__(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"metric {self.name}: unknown aggregate {self.aggregate!r}")
        if (self.aggregate == "relative") != (self.relative_to is not None):
            raise ValueError(f"metric {self.name}: relative metrics (only) name relative_to")
        if self.group_by is not None and self._placeholder not in self.name:
            raise ValueError(f"metric {self.name}: a family's name holds {self._placeholder}")
        if self.bound is not None:
            self._check_bound()

    def _check_bound(self) -> None:
        if self.bound not in BOUNDS:
            raise ValueError(f"metric {self.name}: bound is one of {BOUNDS}, not {self.bound!r}")
        if self.aggregate not in ("trial", "relative"):
            raise ValueError(f"metric {self.name}: interval bounds are trial or relative metrics")
        if self.aggregate == "relative" and self.relative_to != REPLICATED:
            raise ValueError(f"metric {self.name}: only {REPLICATED} has replicates to bound")

    @property
    def _placeholder(self) -> str:
        return "{" + str(self.group_by) + "}"

    def member(self, group: str) -> str:
        """A family member's name: ``score.{category}`` -> ``score.<group>``."""
        return self.name.replace(self._placeholder, str(group))

    def matches(self, name: str) -> bool:
        """Whether ``name`` is this metric (or, for a family, one of its members)."""
        if self.group_by is None:
            return name == self.name
        prefix, _, suffix = self.name.partition(self._placeholder)
        return (
            len(name) > len(prefix) + len(suffix)
            and name.startswith(prefix)
            and name.endswith(suffix)
        )

    def sample_value(self, sample: Any, context: TrialContext) -> float | None:
        if isinstance(self.value, str):
            return getattr(sample, self.value)
        assert self.value is not None, f"metric {self.name} has no per-sample value"
        return self.value(sample, context)  # type: ignore[call-arg]


# -- per-sample values the sample result does not hold directly --------------------------------
def _latency_s(sample: Any, context: TrialContext) -> float | None:
    """Prefill + decode (None: a sample outside the trial's timed subset)."""
    if sample.prefill_s is None or sample.decode_s is None:
        return None
    return sample.prefill_s + sample.decode_s


def _decode_s_per_token(sample: Any, context: TrialContext) -> float | None:
    """Decode time per generated token after the first (None: one token or fewer, or a
    sample outside the trial's timed subset)."""
    if sample.decode_s is None or sample.new_tokens <= 1:
        return None
    return sample.decode_s / (sample.new_tokens - 1)


def _flops(sample: Any, context: TrialContext) -> float:
    """The sample's generation under the trial's FLOPs convention, guidance / pre-inference
    runs included."""
    from prunelab.workers.cost import trial_flops  # plain Python; only the worker calls it

    return (
        trial_flops(
            sample.tokens_per_layer,
            sample.new_tokens,
            context.info,
            context.convention,
            sample.vision_flops,
        )
        + sample.guidance_flops
    )


def _kv_cache_bytes(sample: Any, context: TrialContext) -> float:
    from prunelab.workers.cost import kv_cache_bytes

    info = context.info
    return kv_cache_bytes(
        sample.tokens_per_layer, sample.new_tokens, info.n_kv_heads, info.head_dim,
        context.itemsize,
    )  # fmt: skip


def _peak_mem_bytes(context: TrialContext) -> float | None:
    return context.peak_mem_bytes


def _samples_per_s(context: TrialContext) -> float | None:
    return context.samples_per_s


def _score_ci_low(context: TrialContext) -> float | None:
    return None if context.score_interval is None else context.score_interval[0]


def _score_ci_high(context: TrialContext) -> float | None:
    return None if context.score_interval is None else context.score_interval[1]


# -- the table ----------------------------------------------------------------------------------
METRICS: tuple[Metric, ...] = (
    Metric(
        "score", "%", "mean",
        "headline score: 100 x the mean per-sample score (a benchmark's own aggregate, where it "
        "has one, gives it on its own scale, e.g. OCRBench's points out of 1000)",
        value="score", scale=100.0, from_benchmark=True, column="score", fmt=".1f",
    ),
    Metric(
        "score_ci_low", "%", "trial",
        "lower bound of the score's 95% bootstrap interval (units resampled, the benchmark's "
        "own aggregate per replicate; supplied by the worker), in the unit of score",
        value=_score_ci_low, bound="low", fmt=".1f",
    ),
    Metric(
        "score_ci_high", "%", "trial",
        "upper bound of the score's 95% bootstrap interval (see score_ci_low)",
        value=_score_ci_high, bound="high", fmt=".1f",
    ),
    Metric(
        "score_ratio", "%", "relative",
        "100 x score / the unpruned trial's score (same model and benchmark), in percent "
        "(100: as good as unpruned), as MLflow, the database, trials.csv and the report's "
        "mean score ratio (%) have it; relative_metrics gives the fraction, the orchestrator "
        "logs it x scale (prunelab.orchestrator.sweep.in_table_units), its bounds likewise",
        relative_to="score", scale=100.0, column="score ratio (%)", fmt=".1f",
    ),
    Metric(
        "score_ratio_ci_low", "%", "relative",
        "lower bound of score_ratio's paired 95% bootstrap interval (replicate-wise score / "
        "the unpruned trial's score, on the same samples), in percent as score_ratio",
        relative_to="score", bound="low", fmt=".1f",
    ),
    Metric(
        "score_ratio_ci_high", "%", "relative",
        "upper bound of score_ratio's paired 95% bootstrap interval (see score_ratio_ci_low), "
        "in percent",
        relative_to="score", bound="high", fmt=".1f",
    ),
    Metric(
        "score.{category}", "%", "mean",
        "score over the samples of one category (one metric per category)",
        value="score", scale=100.0, group_by="category", from_benchmark=True,
    ),
    Metric(
        "visual_tokens_in", "tokens", "mean",
        "visual tokens of the image entering the LLM, before pruning",
        value="visual_in",
    ),
    Metric(
        "visual_tokens_kept", "tokens", "mean",
        "visual tokens left at the LLM's last layer",
        value="visual_kept",
    ),
    Metric(
        "avg_visual_tokens", "tokens", "mean",
        "visual tokens averaged over the LLM's layers",
        value="avg_visual", column="avg tokens", fmt=".1f",
    ),
    Metric(
        "tflops", "TFLOPs", "mean",
        "FLOPs of one sample's generation (trial's convention), guidance and pre-inference "
        "included",
        value=_flops, divisor=1e12, column="TFLOPs", fmt=".3g",
    ),
    Metric(
        "flops_ratio", "fraction", "relative",
        "tflops / the unpruned trial's tflops (same model and benchmark)",
        relative_to="tflops", column="FLOPs ratio", fmt=".1%",
    ),
    Metric(
        "tflops_guidance", "TFLOPs", "mean",
        "the part of tflops spent by a guidance model or pre-inference pass",
        value="guidance_flops", divisor=1e12, when_nonzero=True,
    ),
    Metric(
        "prefill_ms", "ms", "median",
        "time to the first token (vision, guidance, pre-inference and prefill), at batch 1 "
        "after warm-up, over the trial's timed subset (eval.timed_samples)",
        value="prefill_s", scale=1000.0, column="prefill ms", fmt=".1f",
    ),
    Metric(
        "latency_ms", "ms", "median",
        "time of the whole generation (prefill and decoding), over the timed subset",
        value=_latency_s, scale=1000.0,
    ),
    Metric(
        "decode_ms_per_token", "ms", "median",
        "decoding time per generated token after the first, over the timed subset",
        value=_decode_s_per_token, scale=1000.0,
    ),
    Metric(
        "samples_per_s", "samples/s", "trial",
        "throughput of the trial's whole evaluation: its samples / the wall time of its "
        "evaluation loop (warm-up and fidelity references included, heatmaps not)",
        value=_samples_per_s,
    ),
    Metric(
        "kv_cache_mb", "MiB", "mean",
        "keys and values held at the end of generation (all layers)",
        value=_kv_cache_bytes, divisor=2**20,
    ),
    Metric("samples", "samples", "count", "samples the trial evaluated"),
    Metric(
        "prep_layer", "layer", "mean",
        "the layer a pre-inference pass chose (prep's k*), averaged over samples",
        value="pre_inference_layer",
    ),
    Metric(
        "fidelity_kl", "nats", "mean",
        "KL(unpruned || pruned) of the first generated token's distribution",
        value="fidelity_kl",
    ),
    Metric(
        "fidelity_top1", "fraction", "mean",
        "share of samples whose first token is the unpruned model's",
        value="fidelity_top1", column="top-1 agree", fmt=".1%",
    ),
    Metric(
        "peak_mem_mb", "MiB", "trial",
        "peak accelerator memory allocated during the trial (CUDA only)",
        value=_peak_mem_bytes, divisor=2**20,
    ),
)  # fmt: skip
"""Every trial metric, in report order."""


def lookup(name: str) -> Metric | None:
    """The table entry of a metric name (a family's entry for its members); None: not one of
    the table's (e.g. an extra metric of a benchmark's own aggregate)."""
    for metric in METRICS:
        if metric.matches(name):
            return metric
    return None


# -- the worker: a trial's own metrics ----------------------------------------------------------
def _aggregate(metric: Metric, samples: Sequence[Any], context: TrialContext) -> float | None:
    """One metric over ``samples`` (None: not reported)."""
    if metric.aggregate == "count":
        raw: float | None = float(len(samples))
    elif metric.aggregate == "trial":
        raw = metric.value(context) if callable(metric.value) else None  # type: ignore[call-arg]
    else:
        values = [v for v in (metric.sample_value(s, context) for s in samples) if v is not None]
        if not values or (metric.when_nonzero and not any(values)):
            return None
        aggregate = AGGREGATES[metric.aggregate]
        assert aggregate is not None
        raw = aggregate(values)
    if raw is None:
        return None
    return raw * metric.scale / metric.divisor


def depends_on_scoring(name: str) -> bool:
    """Whether metric ``name`` changes with the scoring rule: the entries a benchmark's own
    aggregate gives (``score``, ``score.<category>``), the score's interval, the baseline-
    relative ratios of the score, and a benchmark's extras (names the table does not define)."""
    entry = lookup(name)
    if entry is None:
        return True
    if entry.aggregate == "relative":
        return entry.relative_to == REPLICATED
    return entry.from_benchmark or entry.bound is not None


def trial_metrics(
    samples: Sequence[Any],
    context: TrialContext,
    benchmark_metrics: Mapping[str, float] | None = None,
    scoring_only: bool = False,
) -> dict[str, float]:
    """A trial's own metrics from its per-sample results: every non-``relative`` entry of
    :data:`METRICS`, by the module's rules.

    ``benchmark_metrics``: what the benchmark's own ``aggregate`` computed (its headline
    ``score``, ``score.<category>`` and extras); they replace the ``from_benchmark`` entries.
    ``scoring_only``: only the metrics that :func:`depends_on_scoring` (a rescore of saved
    predictions: the samples need only ``score`` and ``category``).
    """
    if not samples:
        raise ValueError("a trial's metrics need at least one sample")
    metrics: dict[str, float] = {}
    replaced: set[str] = set()  # computed members of families a benchmark computes itself
    for metric in METRICS:
        if metric.aggregate == "relative":
            continue
        if scoring_only and not (metric.from_benchmark or metric.bound is not None):
            continue
        if metric.group_by is None:
            value = _aggregate(metric, samples, context)
            if value is not None:
                metrics[metric.name] = value
            continue
        key = metric.group_by
        for group in sorted({getattr(s, key) for s in samples if getattr(s, key)}):
            members = [s for s in samples if getattr(s, key) == group]
            value = _aggregate(metric, members, context)
            if value is not None:
                metrics[metric.member(group)] = value
                if metric.from_benchmark:
                    replaced.add(metric.member(group))
    if benchmark_metrics is not None:
        metrics = {k: v for k, v in metrics.items() if k not in replaced}
        metrics.update({k: float(v) for k, v in benchmark_metrics.items()})
    return metrics


# -- the orchestrator: metrics relative to the unpruned baseline --------------------------------
def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``; None when either is missing or the reference is zero."""
    if value is None or not reference:
        return None
    return float(value) / float(reference)


def relative_metrics(
    own: Mapping[str, Any],
    baseline: Mapping[str, Any] | None,
    own_replicates: Sequence[float] | None = None,
    baseline_replicates: Sequence[float] | None = None,
) -> dict[str, float]:
    """The ``relative`` metrics of a finished trial against its finished unpruned baseline
    (same model and benchmark), e.g. ``score_ratio`` and ``flops_ratio``; those undefined (a
    value missing, a zero baseline value, no baseline) are absent.

    With both trials' score replicates (of equal length: trials on the same samples), the
    ``bound`` entries too: the paired percentile interval of replicate-wise own / baseline
    (:func:`prunelab.intervals.ratio_interval`). The caller pairs only trials evaluated on the
    same samples (same eval ``limit`` and ``sample_seed``). A bound is reported only with its
    ratio (not against a zero baseline score)."""
    out: dict[str, float] = {}
    if not baseline:
        return out
    interval = intervals.ratio_interval(own_replicates, baseline_replicates)
    for metric in METRICS:
        if metric.relative_to is None:
            continue
        value = ratio(own.get(metric.relative_to), baseline.get(metric.relative_to))
        if value is not None and metric.bound is not None:
            value = None if interval is None else interval[BOUNDS.index(metric.bound)]
        if value is not None:
            out[metric.name] = value
    return out


# -- the per-trial table ------------------------------------------------------------------------
def table_columns() -> list[Metric]:
    """The metrics with a column in the per-trial table (``trials.csv``), in table order."""
    return [metric for metric in METRICS if metric.column is not None]


def format_value(metric: Metric | None, value: Any) -> str | None:
    """A metric's value as the per-trial markdown table prints it (``str(value)`` for a
    metric without a format, or not in the table); None: missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return format(value, metric.fmt) if metric is not None and metric.fmt else str(value)
