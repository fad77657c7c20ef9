"""The contract between a pruning method and the model adapters.

A method never touches a model. It is a frozen dataclass of hyperparameters that

1. turns a budget into a :class:`Plan` (`plan`): whether it acts before the LLM (vision stage)
   and at which decoder layers it drops visual tokens (layer stages), with the signals each
   stage needs;
2. chooses tokens from those signals (`select_vision`, `select_layer`): pure tensor math.

The adapter computes only the signals a plan asks for, calls the method, and applies the
selection (see ``prunelab.workers``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

__all__ = [
    "BUDGET_MODES",
    "AverageBudget",
    "Budget",
    "BudgetMode",
    "HyperparameterError",
    "LayerSelection",
    "LayerSignals",
    "LayerStep",
    "Plan",
    "PlanContext",
    "PreInferenceSignals",
    "PreInferenceStep",
    "PruningMethod",
    "TrainedHeadMethod",
    "VisionSelection",
    "VisionSignals",
]

QueryRows = Literal["last", "text", "visual", "all"]
BudgetMode = Literal["kept", "average"]
BUDGET_MODES: tuple[BudgetMode, ...] = ("kept", "average")
"""How a budget counts visual tokens (the trial axis ``budget_mode``):

- ``kept``: the tokens the method keeps at its pruning point (after a vision stage: those fed
  to the LLM; at decoder layer K: those every layer from K on sees), as single-stage papers
  (FastV, SGP, PREP) count it;
- ``average``: the visual tokens averaged over all decoder layers of the LLM, as multi-stage
  papers (PyramidDrop, SparseVLM, Polymorphic, InfoPrune) count it. A single-stage method at
  layer K keeping k of N tokens on an L-layer LLM averages (K * N + (L - K) * k) / L, so it
  solves for k (:class:`AverageBudget`).

Both are the same for a vision stage (every layer sees the kept tokens)."""
VisionSignalName = Literal["cls_attention", "key_metric"]


class HyperparameterError(ValueError):
    """A method hyperparameter has the wrong name, type or range."""


@dataclass(frozen=True)
class Budget:
    """How many visual tokens to keep: a ratio of those entering the LLM, or an absolute count."""

    keep_ratio: float | None = None
    keep_tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.keep_ratio is None) == (self.keep_tokens is None):
            raise ValueError("give exactly one of keep_ratio and keep_tokens")
        if self.keep_ratio is not None and (problem := self.ratio_problem(self.keep_ratio)):
            raise ValueError(f"keep_ratio={self.keep_ratio}: {problem}")
        if self.keep_tokens is not None and (problem := self.tokens_problem(self.keep_tokens)):
            raise ValueError(f"keep_tokens={self.keep_tokens}: {problem}")

    @staticmethod
    def ratio_problem(value: Any) -> str | None:
        """What is wrong with ``value`` as a keep_ratio (None: nothing)."""
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return "must be a number in (0, 1]"
        return None if 0.0 < value <= 1.0 else "must be in (0, 1]"

    @staticmethod
    def tokens_problem(value: Any) -> str | None:
        """What is wrong with ``value`` as a keep_tokens (None: nothing)."""
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        return None if ok else "must be an integer >= 1"

    def reach_problem(self, n_visual: int) -> str | None:
        """Why this budget cannot be met on a model with ``n_visual`` tokens (None: it can)."""
        if self.keep_tokens is not None and self.keep_tokens > n_visual:
            return f"must be <= {n_visual}"
        return None

    def tokens(self, n_visual: int) -> int:
        """Visual tokens to keep out of ``n_visual`` (at least 1, at most ``n_visual``)."""
        if self.keep_tokens is not None:
            return min(self.keep_tokens, n_visual)
        assert self.keep_ratio is not None
        return max(1, min(n_visual, round(self.keep_ratio * n_visual)))

    def average_target(self, n_visual: int) -> float:
        """The average over the LLM's layers this budget asks for: keep_ratio * N (unrounded),
        or keep_tokens (at most N)."""
        if self.keep_ratio is not None:
            return self.keep_ratio * n_visual
        return float(self.tokens(n_visual))


@dataclass(frozen=True)
class PlanContext:
    """What a method knows when it plans one sample."""

    n_visual: int  # visual tokens the model would feed its LLM unpruned
    n_layers: int  # decoder layers of the LLM
    budget: Budget | None  # None for methods that do not prune
    prune_layer: int | None  # the trial's prune_layer axis (None: the method's default)
    seed: int
    family: str | None = None  # model family (llava, qwen2_vl, ...) for per-family defaults
    # the trial's budget_mode axis; None: the method's own (``PruningMethod.own_budget_mode``)
    budget_mode: BudgetMode | None = None


@dataclass(frozen=True)
class LayerStep:
    """Drop visual tokens at the input of decoder layer ``layer`` (0-based), keeping ``keep``.

    Signals: attention rows of the queries named by ``queries`` over the whole current
    sequence, taken from the previous layer's attention (``attention_from="previous"``: layer
    ``layer - 1``, as FastV) or computed with layer ``layer``'s own query/key projections and
    rotary embedding on its input (``"self"``: PyramidDrop's lightweight attention); the hidden
    states entering the layer (``needs_hidden``); the LLM's input embeddings of the current
    tokens (``needs_embeddings``, SparseVLM's raters).
    """

    layer: int
    keep: int
    queries: QueryRows | None = "last"
    needs_hidden: bool = False
    positions: Literal["original", "renumber"] = "original"
    attention_from: Literal["previous", "self"] = "previous"
    needs_embeddings: bool = False


@dataclass(frozen=True)
class PreInferenceStep:
    """A cheap extra prefill that chooses the plan's layer before the real forward (PREP).

    The LLM runs over the prompt with the visual tokens replaced by the method's pooled tokens
    (``PruningMethod.pool_pre_inference``) and stops after decoder layer ``max(layers) - 1``.
    ``layers``: depths k whose signals are recorded: with ``hidden`` the (S', D) hidden states
    after k decoder layers (k = 0: the input embeddings); with ``text_attention`` (k >= 1) the
    attention rows of the prompt text after the image at decoder layer k - 1. ``candidates``:
    the layers the method chooses among (``PruningMethod.after_pre_inference``).
    """

    candidates: tuple[int, ...]
    layers: tuple[int, ...]
    hidden: bool = True
    text_attention: bool = False


@dataclass(frozen=True)
class Plan:
    vision_keep: int | None = None  # tokens kept by the vision stage; None: no vision stage
    vision_signals: frozenset[VisionSignalName] = frozenset()
    layers: tuple[LayerStep, ...] = ()
    # a pre-inference pass to run first; it returns the final plan (None: no such pass)
    pre_inference: PreInferenceStep | None = None
    # a pre-inference plan whose single stage must average this budget once its layer is
    # chosen (``budget_mode=average``): the final plan is ``average.solve(final)``
    average: AverageBudget | None = None

    def __post_init__(self) -> None:
        layers = [s.layer for s in self.layers]
        if layers != sorted(set(layers)):
            raise ValueError(f"layer steps must be strictly increasing, got {layers}")

    @property
    def prunes(self) -> bool:
        return self.vision_keep is not None or bool(self.layers)

    def visual_per_layer(self, n_visual: int, n_layers: int) -> list[int]:
        """The visual tokens each of the ``n_layers`` decoder layers sees under this plan."""
        visual = self.vision_keep if self.vision_keep is not None else n_visual
        steps = {step.layer: step.keep for step in self.layers}
        per_layer = []
        for layer in range(n_layers):
            visual = min(visual, steps.get(layer, visual))
            per_layer.append(visual)
        return per_layer

    def average_visual(self, n_visual: int, n_layers: int) -> float:
        """Eq. (4) of PyramidDrop: visual tokens averaged over the ``n_layers`` decoder layers."""
        return sum(self.visual_per_layer(n_visual, n_layers)) / n_layers


@dataclass(frozen=True)
class AverageBudget:
    """``budget_mode=average`` for a single-stage plan: ``target`` visual tokens averaged over
    ``n_layers`` decoder layers, out of ``n_visual``."""

    target: float
    n_visual: int
    n_layers: int
    method: str

    def lowest(self, layer: int) -> float:
        """The lowest average a single stage at ``layer`` reaches (it keeps 1 token)."""
        return (layer * self.n_visual + (self.n_layers - layer)) / self.n_layers

    def keep(self, layer: int) -> int:
        """The tokens a single stage at ``layer`` keeps so that the average is closest to
        ``target``: k = (L * target - K * N) / (L - K), rounded; ValueError when no k in
        [1, N] comes within one token of it."""
        n, depth = self.n_visual, self.n_layers
        keep = max(1, min(n, round((depth * self.target - layer * n) / (depth - layer))))
        reached = (layer * n + (depth - layer) * keep) / depth
        if abs(reached - self.target) > 1.0:
            raise ValueError(
                f"{self.method}: budget_mode=average: an average of {self.target:g} visual "
                f"tokens is out of reach at layer {layer} (the {layer} layer(s) before it see "
                f"all {n}; the lowest average there is {self.lowest(layer):.1f} over {depth} "
                "layers); use budget_mode=kept, an earlier layer or a larger budget"
            )
        return keep

    def solve(self, plan: Plan) -> Plan:
        """``plan`` with its stage's keep solved for the average. A vision stage alone already
        averages its keep; a pre-inference plan is checked at its provisional (deepest) layer
        and solved once the pass has chosen its layer."""
        if plan.pre_inference is not None:
            for step in plan.layers:
                self.keep(step.layer)
            return dataclasses.replace(plan, average=self)
        if not plan.layers:
            return plan
        if plan.vision_keep is not None or len(plan.layers) != 1:
            raise ValueError(
                f"{self.method}: budget_mode=average needs the method to solve its stages "
                "for the average; this plan has several stages"
            )
        (step,) = plan.layers
        solved = dataclasses.replace(step, keep=self.keep(step.layer))
        return dataclasses.replace(plan, layers=(solved,), average=None)


@dataclass
class VisionSignals:
    """Signals of the vision stage for one image; N = visual tokens entering the LLM."""

    tokens: torch.Tensor  # (N, D) projected visual tokens (LLM embedding space)
    # (N, 3) long: (tile, row, col) of each token on its tile's token grid. Tile 0 is the whole
    # image (LLaVA-1.5, Qwen2-VL) or the base/thumbnail view (LLaVA-NeXT, InternVL).
    coords: torch.Tensor
    # (N,) attention the encoder's CLS query gives each token at the feature layer (head mean;
    # aggregated over the patches a token merges); mean attention received where there is no CLS
    cls_attention: torch.Tensor | None = None
    key_metric: torch.Tensor | None = None  # (N, d_k) encoder keys at the feature layer, head mean
    generator: torch.Generator | None = None  # seeded per sample, for stochastic methods
    guidance: torch.Tensor | None = None  # (N,) guidance-model scores (guided vision stages)
    family: str | None = None  # model family (llava, qwen2_vl, ...) for per-family defaults
    # the runner asks for VisionSelection.diagnostics (only for the first samples of a trial)
    want_diagnostics: bool = False


@dataclass
class VisionSelection:
    """The result of a vision stage."""

    tokens: torch.Tensor  # (M, D) tokens that replace the N visual tokens, in sequence order
    kept: torch.Tensor  # (M,) index into the N inputs of the token each output is anchored on
    assignment: torch.Tensor | None = (
        None  # (N,) output index each input was merged into, -1: dropped
    )
    # named curves (e.g. infoprune's MFI / MGI per selection step) when want_diagnostics asked
    # for them; the runner logs those of the first samples as a trial artifact
    diagnostics: dict[str, list[float]] | None = None
    # (N,) the score each input token was ranked by (e.g. visionzip's CLS attention), higher:
    # more important; drawn by the importance heatmaps. None: the method ranks by no score
    scores: torch.Tensor | None = None


@dataclass
class LayerSelection:
    """The result of a layer stage that merges as well as drops, or hands state on.

    ``keep``: sorted (k,) indices into ``LayerSignals.visual`` of the tokens that stay (each
    keeps its sequence slot and position). ``hidden``: (k, D) replacement hidden states for
    those tokens (e.g. a kept token with the pruned tokens merged into it), or None.
    ``carry``: a tensor the pruner hands to the method's next layer step of the same sample as
    ``LayerSignals.carry`` (e.g. SparseVLM's rater mask over the text tokens, which layer
    steps never drop), or None.
    """

    keep: torch.Tensor
    hidden: torch.Tensor | None = None
    carry: torch.Tensor | None = None


@dataclass
class LayerSignals:
    """Signals of one layer stage; S = current sequence length, V = current visual tokens."""

    visual: torch.Tensor  # (V,) positions of the visual tokens in the current sequence
    text: torch.Tensor  # (S - V,) positions of the text tokens in the current sequence
    attention: torch.Tensor | None = None  # (H, Q, S) softmax rows of the requested queries
    query_positions: torch.Tensor | None = None  # (Q,) sequence positions of those queries
    hidden: torch.Tensor | None = None  # (S, D) hidden states entering the layer
    embeddings: torch.Tensor | None = None  # (S, D) the LLM's input embeddings of those tokens
    generator: torch.Generator | None = None
    guidance: torch.Tensor | None = None  # (V,) guidance-model scores of the visual tokens
    carry: torch.Tensor | None = None  # the previous layer step's LayerSelection.carry


@dataclass
class PreInferenceSignals:
    """What a pre-inference pass recorded; S' = its sequence length, r = pooled visual tokens.

    ``text`` are the prompt's text tokens after the last visual token (the question), the
    queries of ``attention``; text before the image (system prompt) is not among them.
    """

    visual: torch.Tensor  # (r,) positions of the pooled visual tokens in the pass's sequence
    text: torch.Tensor  # (M,) positions of the text tokens after the last visual token
    hidden: dict[int, torch.Tensor]  # depth k -> (S', D) hidden states after k decoder layers
    attention: dict[int, torch.Tensor]  # depth k -> (H, M, S') rows of ``text`` at layer k - 1


@dataclass(frozen=True)
class PruningMethod:
    """Base of every method: hyperparameters are the dataclass fields of a subclass.

    Class attributes describe the method to the sweep machinery (``prunelab methods`` lists
    them):

    - ``name``: registry key (``@register``), as sweeps and trial configs name the method.
    - ``version``: part of the trial key; bump it when the method's results change.
    - ``stages``: one line on where it acts, for ``prunelab methods``.
    - ``uses_budget`` / ``uses_layer`` / ``uses_seed``: the trial axes it reads; the planner
      drops the others from its trials, and the runner passes no budget without ``uses_budget``.
    - ``budget_is_average``: its ``plan`` solves its stages so that the visual tokens averaged
      over the LLM's layers equal the budget (multi-stage methods); otherwise it keeps the
      budget at its pruning point. That is its own ``budget_mode`` (:data:`BUDGET_MODES`);
      :meth:`plan_trial` applies a trial's other mode.
    - ``default_prune_layer``: the layer used when the grid has no prune_layer.
    - ``min_prune_layer``: the first layer it can act at (:meth:`layer_range`).
    - ``needs_guidance``: runs the model config's smaller ``guidance`` model alongside (the
      planner requires one, the runner loads it); ``guidance_signal`` is what the guide
      supplies: ``"attention"`` rows of its generation (:meth:`score_guidance`) or the
      ``"hidden"`` states of its visual tokens from one prefill (:meth:`score_hidden`).
    - ``changes_encoder``: its stages change the vision tower's own computation (merging or
      pruning inside the encoder, an encoder-stage hook), so the encoder's outputs of a sample
      differ from the unpruned ones: its trials bypass the worker's cache of prepared inputs and
      vision outputs (``prunelab.workers.caches``), which every other method shares. No
      registered method does yet (ToMe here merges the projected tokens, after the encoder).
    - a method whose trials need a head trained first (a sweep's ``stages:``, ``prunelab
      train-vib``) is a :class:`TrainedHeadMethod`; one with a pre-inference pass (PREP) says
      so in its plans (``Plan.pre_inference``).
    - ``paper``: the reference, shown by ``prunelab methods``.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    stages: ClassVar[str] = ""
    uses_budget: ClassVar[bool] = True
    uses_layer: ClassVar[bool] = False
    uses_seed: ClassVar[bool] = False
    budget_is_average: ClassVar[bool] = False
    needs_guidance: ClassVar[bool] = False
    changes_encoder: ClassVar[bool] = False
    guidance_signal: ClassVar[Literal["attention", "hidden"]] = "attention"
    default_prune_layer: ClassVar[int | None] = None
    min_prune_layer: ClassVar[int] = 0
    paper: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _check_field_types(self)

    # -- planning -------------------------------------------------------------------------
    def plan(self, ctx: PlanContext) -> Plan:
        raise NotImplementedError

    @classmethod
    def own_budget_mode(cls) -> BudgetMode:
        """How this method's ``plan`` counts a budget (see :data:`BUDGET_MODES`)."""
        return "average" if cls.budget_is_average else "kept"

    def plan_trial(self, ctx: PlanContext) -> Plan:
        """:meth:`plan` with the trial's ``budget_mode`` applied: ``average`` solves a
        single-stage plan's keep for the average over the LLM's layers; ``kept`` is not
        defined for a multi-stage schedule (whose stages are solved for an average)."""
        plan = self.plan(ctx)
        mode = ctx.budget_mode or self.own_budget_mode()
        if ctx.budget is None or mode == self.own_budget_mode():
            return plan
        if not plan.layers and plan.pre_inference is None:
            return plan  # a vision stage alone: kept and average are the same
        if mode == "kept":
            raise ValueError(
                f"{self.name}: budget_mode=kept is not defined for its multi-stage schedule, "
                "which is solved for an average over the LLM's layers; use budget_mode=average"
            )
        target = ctx.budget.average_target(ctx.n_visual)
        return AverageBudget(target, ctx.n_visual, ctx.n_layers, self.name).solve(plan)

    def unsupported(self, family: str) -> str | None:
        """Why this method is not defined for a model ``family`` (None: it is). Checked when
        a sweep is validated, before anything runs."""
        return None

    # -- selection ------------------------------------------------------------------------
    def select_vision(self, signals: VisionSignals, keep: int) -> VisionSelection:
        raise NotImplementedError(f"{self.name} has no vision stage")

    def select_layer(self, step: LayerStep, signals: LayerSignals) -> torch.Tensor | LayerSelection:
        """Return the sorted (step.keep,) indices into ``signals.visual`` to keep, or a
        :class:`LayerSelection` that also replaces the kept tokens' hidden states."""
        raise NotImplementedError(f"{self.name} has no layer stage")

    def score_layer(self, step: LayerStep, signals: LayerSignals) -> torch.Tensor | None:
        """The (V,) scores ``select_layer`` ranks ``signals.visual`` by at ``step`` (higher:
        more important), or None (default) for a method that ranks by none (e.g. random).
        Pure; the pruner records them for the importance heatmaps (``LayerPruner.scores_at``)."""
        return None

    def score_guidance(self, rows: list[torch.Tensor], visual: torch.Tensor) -> torch.Tensor:
        """Guidance methods: (N,) scores of the visual tokens from the guidance model's
        attention ``rows`` ((H, Q, S) per layer and forward of its generation; the queries are
        the prompt's text tokens in the prefill and the new token in each decode step) over
        the N ``visual`` sequence positions."""
        raise NotImplementedError(f"{self.name} does not use a guidance model")

    def score_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Guidance methods with ``guidance_signal = "hidden"``: (N,) scores of the visual
        tokens from the guide's (N, d) hidden states of them (layer ``guidance_layer``)."""
        raise NotImplementedError(f"{self.name} does not score guide hidden states")

    def bind(self, assets: Mapping[str, Any]) -> PruningMethod:
        """The method with a trial's trained assets (e.g. a VIB head) attached; by default
        the method itself. ``assets`` are read by the worker from the trial config."""
        return self

    def pool_pre_inference(self, signals: VisionSignals) -> VisionSelection:
        """Pre-inference methods: the (r, D) tokens that stand for the N visual tokens in the
        pre-inference pass, ``kept`` (r,) strictly increasing anchors into the N inputs (their
        placeholders and positions), ``assignment`` (N,) the pooled token of each input."""
        raise NotImplementedError(f"{self.name} has no pre-inference pass")

    def after_pre_inference(self, plan: Plan, signals: PreInferenceSignals) -> tuple[Plan, int]:
        """Pre-inference methods: the final plan for the sample (no ``pre_inference`` left) and
        the layer chosen from the pass's ``signals``."""
        raise NotImplementedError(f"{self.name} has no pre-inference pass")

    # -- what a trial can ask of it --------------------------------------------------------
    @classmethod
    def layer_range(cls, n_layers: int) -> tuple[int, int]:
        """The ``prune_layer`` values this method can act at on an LLM of ``n_layers``."""
        return cls.min_prune_layer, n_layers - 1

    def plan_problem(self, ctx: PlanContext) -> str | None:
        """Why this method cannot plan a trial in ``ctx`` (None: it can): the first line of
        the error its ``plan`` raises, e.g. a budget its stages cannot reach."""
        try:
            self.plan_trial(ctx)
        except ValueError as exc:
            text = str(exc).strip()
            return text.splitlines()[0] if text else type(exc).__name__
        return None

    # -- hyperparameters ------------------------------------------------------------------
    @classmethod
    def hyperparameters(cls) -> dict[str, Any]:
        """Hyperparameter names and defaults."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any] | None = None) -> PruningMethod:
        """Build from a mapping, rejecting unknown names and wrong types."""
        hparams = dict(hparams or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(hparams) - known)
        if unknown:
            allowed = ", ".join(sorted(known)) or "none"
            raise HyperparameterError(
                f"unknown hyperparameter(s) {', '.join(unknown)} for method {cls.name} "
                f"(allowed: {allowed})"
            )
        return cls(**hparams)


@runtime_checkable
class TrainedHeadMethod(Protocol):
    """A method (e.g. pgp) whose trials need a head trained first: the
    sweep's training stage ``stages.<stage>`` trains it, once per distinct ``head_hparams()``
    (the hyperparameters that decide the head, part of its key)."""

    stage: str

    def head_hparams(self) -> dict[str, Any]: ...


def _check_field_types(obj: Any) -> None:
    """Check field values against their annotations (int, float, bool, str, Literal, unions)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        expected = hints[f.name]
        if not _matches(value, expected):
            raise HyperparameterError(
                f"{type(obj).name}.{f.name}={value!r}: expected {_describe(expected)}"
            )


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    if origin in (tuple, list):
        return isinstance(value, (tuple, list)) and all(
            _matches(v, typing.get_args(tp)[0]) for v in value
        )
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``scores`` (V,), returned in increasing index order (k,)."""
    import torch

    k = min(k, scores.shape[-1])
    return torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values
