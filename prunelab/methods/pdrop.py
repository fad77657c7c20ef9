"""PyramidDrop (Xing et al., CVPR 2025, "PyramidDrop: Accelerating Your Large Vision-Language
Models via Pyramid Visual Redundancy Reduction", arXiv:2410.17247; code: Cooperx521/PyramidDrop).

The LLM is split into S+1 stages at layers l_1 < ... < l_S. At the input of layer l_s the visual
tokens are ranked by the attention the last instruction token gives them and only the top
``k_s`` stay for all later layers (prefill and KV cache), a pyramid of token counts:

    (1)  a_j   = 1/H sum_h softmax(q_last^h K^h / sqrt(d))_j      attention of the last token to
                                                                  visual token j, head mean
    (2)  keep  = top-k_s of a over the V current visual tokens    kept in sequence order
    (3)  k_s   = floor(N * lambda^s)                              s = 1..S, N = visual tokens in

Budget (``budget_is_average``): the papers report the *average* number of visual tokens over
the L decoder layers,

    (4)  avg = (l_1 * N + sum_s (l_{s+1} - l_s) * k_s) / L        l_{S+1} = L,

so ``plan`` solves (4) = budget for lambda (bisection on the integer schedule; within one token
of keep_ratio * N, or of keep_tokens). With ``lam`` given, lambda is fixed and the first-stage
keep is solved instead: k_s = floor(N * r * lambda^(s-1)).

Mapping of the paper's settings (LLaVA-1.5, N=576, L=32):
- README/scripts default ``--layer_list [8,16,24] --image_token_ratio_list [0.5,0.25,0.125]``
  (lambda=0.5) averages (8*576 + 8*288 + 8*144 + 8*72)/32 = 270 tokens = keep_ratio 0.469.
- With layers 8,16,24 no lambda reaches an average below 8/32*576 = 144 (the first 8 layers see
  all tokens; issue #10 of the official repository). For the 192/128/64 rows of the paper's
  Table 2 the author's advice (issue #29) is to move the stages earlier, e.g. layers 2,8,16 with
  lambda=0.19 for 64 tokens, keeping the lambda, lambda^2, ... structure and solving (4). Hence
  the default ``layers=None`` tries both the paper's 8,16,24 and the author's 2,8,16 and takes,
  among those that reach the budget, the one whose solved lambda is closest to the paper's 0.5
  (this avoids degenerate pyramids such as 8,16,24 with lambda ~= 0: 1 token left after layer 8
  for 144 tokens). On LLaVA-1.5: 270 tokens -> 8,16,24 with lambda = 0.5 (288/144/72);
  192 -> 2,8,16, lambda ~= 0.56 (322/180/101); 128 -> 2,8,16, lambda ~= 0.42 (242/102/42);
  64 -> 2,8,16, lambda ~= 0.19 (111/21/4), the author's example.
  Third-party evaluation scripts also use 2,10,20 with a fixed lambda=0.5 and a first-stage
  ratio fitted to the budget (0.32/0.16/0.08 for 128 tokens): ``layers=[2,10,20], lam=0.5``.
- Other depths: the 32-layer stage layers scale to round(l * L / 32), kept strictly increasing
  and in [1, L-1] (4 layers: 1,2,3). An explicit ``layers`` is used as given (no scaling).

Choices:
- Layer numbering: the official ``layer_list`` entry l drops after 0-based layer l - 1
  (``rank_layer = layer_idx + 1``), so 0-based layer l is the first with fewer tokens:
  ``LayerStep(layer=l)``.
- Ranking attention (``rank_attention``): the official code computes (1) with the q/k
  projections of layer l_s applied to layer l_s's input (a separate "lightweight attention"
  for the last instruction token's query only, after the input norm and RoPE). ``"self"``
  (default) does exactly that in the layer-l_s pre-hook (``LayerStep.attention_from="self"``:
  one query row and the keys are projected; the model's SDPA/FlashAttention kernels are
  untouched); ``"previous"`` reads layer l_s - 1's real attention row instead, as FastV-style
  reimplementations of PyramidDrop do (one layer earlier, no extra projection).
- Query: the last token of the prompt (the official ``prompt_len + image_tokens - 1`` at
  inference); ``queries="last"``. Heads: mean (official ``torch.mean(attn_weights, dim=0)``).
- Positions: renumbered after each drop (official ``position_ids[i, :cur_len] = arange``, and
  decoding positions shifted by the number of dropped tokens): ``positions="renumber"``.
- Keep counts are floored (official ``int(N * ratio)``), at least 1; steps that would drop
  nothing are left out of the plan.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from prunelab.methods.base import (
    Budget,
    HyperparameterError,
    LayerSignals,
    LayerStep,
    Plan,
    PlanContext,
    PruningMethod,
    top_k_sorted,
)
from prunelab.methods.registry import register

if TYPE_CHECKING:
    import torch

__all__ = [
    "LOW_BUDGET_LAYERS",
    "PAPER_DEPTH",
    "PAPER_LAMBDA",
    "PAPER_LAYERS",
    "PyramidDrop",
    "average_target",
    "average_visual",
    "check_highest_layer",
    "check_layers",
    "layer_steps",
    "lowest_average",
    "out_of_reach",
    "pdrop_scores",
    "plan_average",
    "plan_inputs",
    "pyramid_ratios",
    "scale_layers",
    "solve_keeps",
]

PAPER_DEPTH = 32  # decoder layers of LLaVA-1.5-7B, for which the papers give their layers
PAPER_LAYERS = (8, 16, 24)  # official README / scripts
LOW_BUDGET_LAYERS = (2, 8, 16)  # the author's advice for 128/64 tokens (official issue #29)
PAPER_LAMBDA = 0.5  # the paper's default per-stage ratio


def scale_layers(
    layers: Sequence[int], n_layers: int, low: int, high: int, paper_depth: int = PAPER_DEPTH
) -> tuple[int, ...]:
    """Layers given for a ``paper_depth``-layer LLM (32: LLaVA-1.5-7B) mapped onto ``n_layers``:
    round(l * n_layers / paper_depth), at least ``low``, strictly increasing; those that would
    exceed ``high`` are left out."""
    scaled: list[int] = []
    for layer in layers:
        value = max(low, math.floor(layer * n_layers / paper_depth + 0.5))
        if scaled:
            value = max(value, scaled[-1] + 1)
        if value > high:
            break
        scaled.append(value)
    return tuple(scaled)


def average_visual(
    n_visual: int, n_layers: int, layers: Sequence[int], keeps: Sequence[int]
) -> float:
    """Eq. (4): visual tokens averaged over the ``n_layers`` decoder layers when the input of
    layer ``layers[s]`` keeps ``keeps[s]`` (every layer before ``layers[0]`` sees ``n_visual``)."""
    total = layers[0] * n_visual
    ends = (*layers[1:], n_layers)
    for start, end, keep in zip(layers, ends, keeps, strict=True):
        total += (end - start) * keep
    return total / n_layers


def plan_average(plan: Plan, n_visual: int, n_layers: int) -> float:
    """Eq. (4) for a whole plan: visual tokens averaged over the decoder layers when a vision
    stage (if any) leaves ``plan.vision_keep`` of ``n_visual`` and its layer steps follow."""
    return plan.average_visual(n_visual, n_layers)


def average_target(budget: Budget, n_visual: int) -> float:
    """The average a multi-stage method aims at: keep_ratio * N (unrounded), or keep_tokens."""
    return budget.average_target(n_visual)


def _schedule(n_visual: int, ratios: Sequence[float]) -> tuple[int, ...]:
    """Eq. (3): k_s = floor(N * ratio_s), at least 1, never more than the previous stage."""
    keeps: list[int] = []
    previous = n_visual
    for ratio in ratios:
        keep = min(previous, max(1, math.floor(n_visual * ratio)))
        keeps.append(keep)
        previous = keep
    return tuple(keeps)


def pyramid_ratios(n_stages: int, lam: float | None = None) -> Callable[[float], list[float]]:
    """Stage ratios as a function of the solved x: x^s (``lam=None``, x is lambda), or
    x * lam^(s-1) (x is the first-stage ratio), s = 1..n_stages."""
    if lam is None:
        return lambda x: [x ** (s + 1) for s in range(n_stages)]
    return lambda x: [x * lam**s for s in range(n_stages)]


def solve_keeps(
    n_visual: int,
    n_layers: int,
    layers: Sequence[int],
    target: float,
    ratios: Callable[[float], Sequence[float]],
) -> tuple[tuple[int, ...], float] | None:
    """Per-stage keeps k_s = floor(N * ratios(x)[s]) whose eq. (4) average is closest to
    ``target``, and the solved x; None if that average is more than one token away (the
    budget is out of reach of these layers).

    ``ratios`` must be continuous and non-decreasing in x on [0, 1]. x is found by bisection:
    the average is then a non-decreasing step function of x whose steps are at most
    (L - l_1) / L < 1 token, so the closest value is within half a token when in reach.
    """

    def keeps(x: float) -> tuple[int, ...]:
        return _schedule(n_visual, ratios(x))

    def average(x: float) -> float:
        return average_visual(n_visual, n_layers, layers, keeps(x))

    if average(0.0) >= target:
        x = 0.0
    elif average(1.0) < target:
        x = 1.0
    else:
        low, high = 0.0, 1.0  # average(low) < target <= average(high)
        for _ in range(64):
            mid = (low + high) / 2
            if average(mid) >= target:
                high = mid
            else:
                low = mid
        x = low if target - average(low) <= average(high) - target else high
    if abs(average(x) - target) > 1.0:
        return None
    return keeps(x), x


def layer_steps(
    n_visual: int,
    layers: Sequence[int],
    keeps: Sequence[int],
    make: Callable[[int, int], LayerStep],
) -> tuple[LayerStep, ...]:
    """``make(layer, keep)`` for each stage that drops tokens (stages keeping all are skipped)."""
    steps = []
    previous = n_visual
    for layer, keep in zip(layers, keeps, strict=True):
        if keep < previous:
            steps.append(make(layer, keep))
            previous = keep
    return tuple(steps)


def check_layers(name: str, layers: Sequence[int] | None, lowest: int) -> tuple[int, ...] | None:
    """Validate a ``layers`` hyperparameter (None, or strictly increasing ints >= ``lowest``)."""
    if layers is None:
        return None
    values = tuple(layers)
    shown = list(values)
    if not values:
        raise HyperparameterError(f"{name}.layers={shown}: give at least one layer (or null)")
    if values[0] < lowest:
        raise HyperparameterError(f"{name}.layers={shown}: layers must be >= {lowest}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise HyperparameterError(f"{name}.layers={shown}: must be strictly increasing")
    return values


def plan_inputs(name: str, ctx: PlanContext) -> tuple[int, int, float]:
    """``(n_visual, n_layers, average target)`` of a multi-stage method's plan; ``name``'s model
    needs at least 2 decoder layers (one that sees every token, one with fewer)."""
    assert ctx.budget is not None
    n, depth = ctx.n_visual, ctx.n_layers
    target = average_target(ctx.budget, n)
    if depth < 2:
        raise ValueError(f"{name} needs at least 2 decoder layers, the model has {depth}")
    return n, depth, target


def check_highest_layer(name: str, layers: Sequence[int], highest: int, problem: str) -> None:
    """Reject an explicit ``layers`` hyperparameter with a layer above ``highest`` on this
    model; ``problem`` says what is wrong with that layer."""
    beyond = [layer for layer in layers if layer > highest]
    if beyond:
        raise ValueError(f"{name}.layers={list(layers)}: layer {beyond[0]} {problem}")


def lowest_average(n_visual: int, n_layers: int, layers: Sequence[int]) -> float:
    """The lowest eq. (4) average a schedule on ``layers`` reaches: 1 token kept at each stage."""
    return average_visual(n_visual, n_layers, layers, [1] * len(layers))


def out_of_reach(name: str, target: float, of: str, reach: str, hint: str) -> ValueError:
    """The error of a plan whose average budget ``target`` no schedule reaches: ``of`` names
    the layers and the model, ``reach`` what they can reach, ``hint`` what to change."""
    return ValueError(
        f"{name}: an average of {target:g} visual tokens is out of reach of {of} ({reach}); {hint}"
    )


def pdrop_scores(attention: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Eq. (1): attention the query rows give each visual token, mean over heads and rows.

    attention: (H, Q, S) softmax rows (Q = 1: the last instruction token) of layer l_s's
    own attention on its input (or layer l_s - 1's, ``rank_attention="previous"``).
    visual: (V,) positions of the visual tokens in the current sequence. Returns (V,).
    """
    return attention[:, :, visual].float().mean(dim=(0, 1))


@register
@dataclass(frozen=True)
class PyramidDrop(PruningMethod):
    """See the module docstring. ``layers``: first decoder layer (0-based) of each stage after
    the first, i.e. the official ``layer_list``; None = 8,16,24 or 2,8,16 (whichever reaches the
    budget with lambda closest to 0.5) scaled to the model's depth. ``lam``: None = solved from
    the budget; a number = fixed lambda with the first-stage keep solved. ``rank_attention``:
    which layer's attention ranks at stage l_s (``self``: l_s's own q/k, as official)."""

    layers: tuple[int, ...] | None = None
    lam: float | None = None
    rank_attention: Literal["self", "previous"] = "self"

    name: ClassVar[str] = "pdrop"
    version: ClassVar[str] = "2"  # 2: ranking by layer l_s's own attention (was l_s - 1)
    stages: ClassVar[str] = "layers 8,16,24 of 32 (2,8,16 at low budgets), scaled to depth"
    budget_is_average: ClassVar[bool] = True
    paper: ClassVar[str] = "Xing et al., CVPR 2025, arXiv:2410.17247"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", check_layers("pdrop", self.layers, 1))
        if self.lam is not None and not 0.0 < self.lam <= 1.0:
            raise HyperparameterError(f"pdrop.lam={self.lam}: must be in (0, 1] (or null)")

    def plan(self, ctx: PlanContext) -> Plan:
        n, depth, target = plan_inputs("pdrop", ctx)
        if self.layers is not None:
            check_highest_layer(
                "pdrop",
                self.layers,
                depth - 1,
                f"is beyond the last decoder layer ({depth - 1}) of a model with {depth} layers",
            )
            candidates = [self.layers]
        else:
            candidates = [
                scale_layers(PAPER_LAYERS, depth, 1, depth - 1),
                scale_layers(LOW_BUDGET_LAYERS, depth, 1, depth - 1),
            ]
        solved = [
            (layers, solve_keeps(n, depth, layers, target, pyramid_ratios(len(layers), self.lam)))
            for layers in candidates
        ]
        reachable = [(layers, found) for layers, found in solved if found is not None]
        if not reachable:
            layers = candidates[-1]
            ratios = pyramid_ratios(len(layers), self.lam)
            lowest = lowest_average(n, depth, layers)  # the schedule of ratios(0.0)
            highest = average_visual(n, depth, layers, _schedule(n, ratios(1.0)))
            hint = (
                "give method.layers with an earlier first stage"
                if target < lowest
                else "give a larger method.lam"
            )
            lam = "" if self.lam is None else f" with lam={self.lam}"
            raise out_of_reach(
                "pdrop",
                target,
                f"stage layers {list(layers)}{lam} on a model with {depth} layers "
                f"and {n} visual tokens",
                f"reachable: {lowest:.1f} to {highest:.1f}",
                hint,
            )
        # the paper's stage structure: the solved ratio closest to its lambda = 0.5 (or to lam)
        pyramid = PAPER_LAMBDA if self.lam is None else self.lam
        layers, (keeps, _) = min(reachable, key=lambda item: abs(item[1][1] - pyramid))

        def make(layer: int, keep: int) -> LayerStep:
            return LayerStep(
                layer=layer,
                keep=keep,
                queries="last",
                positions="renumber",
                attention_from=self.rank_attention,
            )

        return Plan(layers=layer_steps(n, layers, keeps, make))

    def score_layer(self, step: LayerStep, signals: LayerSignals) -> torch.Tensor:
        assert signals.attention is not None
        return pdrop_scores(signals.attention, signals.visual)

    def select_layer(self, step: LayerStep, signals: LayerSignals) -> torch.Tensor:
        return top_k_sorted(self.score_layer(step, signals), step.keep)
