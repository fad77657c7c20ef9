"""Layer-stage pruning inside a decoder-only LLM, through forward pre-hooks.

One :class:`LayerPruner` serves one generation (prefill + greedy decode) of one sample. It

- records the sequence length and visual-token count every decoder layer sees (cost accounting);
- asks the attention probe for the rows a :class:`~prunelab.methods.LayerStep` needs at layer
  ``step.layer - 1``, or computes them with layer ``step.layer``'s own q/k projections on its
  input (``attention_from="self"``);
- at the input of ``step.layer`` lets the method choose which visual tokens stay, then drops the
  others from the hidden states, and from the per-layer inputs every later layer receives
  (rotary embeddings, position ids, attention mask). Keys and values of dropped tokens are never
  computed for later layers, so the KV cache holds only kept tokens there and decoding is exact
  for the pruned model;
- records, per step, which visual tokens it kept (``kept_at``) and the scores the method ranked
  them by (``scores_at``, from ``PruningMethod.score_layer``): what an importance heatmap draws;
- hands each step the ``carry`` its previous step returned (``LayerSelection.carry``: state a
  method keeps across the stages of one sample, e.g. SparseVLM's first-stage raters).

All hooks are removed when the context exits; the model is untouched afterwards.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Self

from prunelab.methods.base import LayerSelection, LayerSignals, LayerStep, PruningMethod
from prunelab.workers.attention import AttentionProbe, attention_rows

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["LayerHooks", "LayerLengths", "LayerPruner"]


@dataclass
class LayerLengths:
    """Sequence length and visual-token count each decoder layer saw in the prefill."""

    tokens: list[int] = field(default_factory=list)  # (n_layers,)
    visual: list[int] = field(default_factory=list)  # (n_layers,)


class LayerHooks:
    """A forward pre-hook on each LLM decoder layer for the lifetime of one generation (a
    context manager): what :class:`LayerPruner` and the batched
    :class:`~prunelab.workers.batched.BatchedLayerPruner` share: the layers, the method and
    its layer steps by layer, the attention probe. A subclass defines ``_pre_hook``."""

    def __init__(
        self,
        layers: Sequence[nn.Module],
        method: PruningMethod | None,
        steps: Sequence[LayerStep],
        probe: AttentionProbe | None,
    ) -> None:
        self.layers = list(layers)
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}
        self.method = method
        self.steps = {s.layer: s for s in steps}
        self.probe = probe
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._prefill_done = False

    def _layer_index(self, module: nn.Module) -> int:
        """The index of decoder layer ``module``."""
        return self._index[id(module)]

    def _check_layer(self, step: LayerStep) -> None:
        """A layer step must come after the first decoder layer and before the end."""
        if not 1 <= step.layer < len(self.layers):
            raise ValueError(f"layer step at {step.layer}: must be in [1, {len(self.layers) - 1}]")

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            for layer in self.layers:
                self._handles.append(
                    layer.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
                )
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def end_prefill(self) -> None:
        """Call after the prefill forward: later forwards are decode steps (no probing)."""
        self._prefill_done = True
        if self.probe is not None:
            self.probe.queries.clear()


class LayerPruner(LayerHooks):
    """Pre-hooks on every decoder layer; see the module docstring.

    layers: the LLM's decoder layers, in order, each with an attention module at ``self_attn``
        carrying ``layer_idx``.
    visual_positions: (V0,) positions of the visual tokens in the prefill sequence (batch 0).
    guidance: (V0,) scores of the visual tokens from a guidance model (sgp), aligned with
        ``visual_positions``; each layer step sees those of the tokens still present.
    rotary: called as ``rotary(hidden, position_ids)`` with 1-D ids (1, L) to rebuild
        (cos, sin) when a step renumbers positions (later layers, prefill and decode); unused
        otherwise.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        seq_len: int,
        visual_positions: torch.Tensor,
        method: PruningMethod | None = None,
        steps: Sequence[LayerStep] = (),
        probe: AttentionProbe | None = None,
        rotary: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
        | None = None,
        generator: torch.Generator | None = None,
        guidance: torch.Tensor | None = None,
    ) -> None:
        import torch

        super().__init__(layers, method, steps, probe)
        self.rotary = rotary
        self.generator = generator
        self.visual_positions = visual_positions
        self.guidance = guidance
        if guidance is not None and guidance.shape != visual_positions.shape:
            raise ValueError(
                f"guidance scores for {guidance.numel()} visual tokens, the sequence has "
                f"{visual_positions.numel()}"
            )
        device = visual_positions.device
        self.seq_len = seq_len
        self.is_visual = torch.zeros(seq_len, dtype=torch.bool, device=device)
        self.is_visual[visual_positions] = True
        # original indices (into the prefill sequence) of the tokens currently in the sequence
        self.current = torch.arange(seq_len, device=device)
        self.renumbered = False
        self.lengths = LayerLengths()
        self.kept_visual: torch.Tensor = visual_positions  # original positions still present
        # per layer step (its decoder layer): the original positions of the visual tokens it kept
        self.kept_at: dict[int, torch.Tensor] = {}
        # per layer step whose method scores tokens (``PruningMethod.score_layer``): (V0,) float32
        # aligned with visual_positions, the step's score of each token present, NaN if gone
        self.scores_at: dict[int, torch.Tensor] = {}
        # per layer: the prefill tokens it processed (its KV cache entries), when pruned
        self.layer_tokens: dict[int, torch.Tensor] = {}
        self.renumbered_layers: set[int] = set()  # layers that saw renumbered positions
        self._decode_step = 0  # generated tokens fed back so far (decode forwards)
        # (S0, D) the LLM's input embeddings of the prefill, kept when a step asks for them
        self.embeddings: torch.Tensor | None = None
        self._keep_embeddings = any(step.needs_embeddings for step in steps)
        self.carry: torch.Tensor | None = None  # the last layer step's LayerSelection.carry
        for step in steps:
            self._check_layer(step)
            if step.queries is None or step.attention_from == "self":
                continue
            if probe is None:
                raise ValueError("a layer step asks for attention rows but no probe is given")
            probe.queries[step.layer - 1] = self._query_positions(step)

    # -- hooks -----------------------------------------------------------------------------
    def _query_positions(self, step: LayerStep) -> Callable[[int], torch.Tensor]:
        def positions(length: int) -> torch.Tensor:
            import torch

            visual = self.is_visual[self.current]
            if step.queries == "last":
                return torch.tensor([length - 1], device=self.current.device)
            if step.queries == "text":
                return (~visual).nonzero().squeeze(-1)
            if step.queries == "visual":
                return visual.nonzero().squeeze(-1)
            return torch.arange(length, device=self.current.device)

        return positions

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        index = self._layer_index(module)
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._prefill_done:
            if index == 0:
                self._decode_step += 1
            return args, self._decode_kwargs(index, kwargs, hidden)
        if index == 0 and self._keep_embeddings:
            self.embeddings = hidden[0]
        step = self.steps.get(index)
        if step is not None:
            hidden = self._apply_step(step, module, hidden, kwargs)
        visual_now = int(self.is_visual[self.current].sum())
        self.lengths.tokens.append(int(hidden.shape[1]))
        self.lengths.visual.append(visual_now)
        if self.current.shape[0] != self.seq_len:
            self.layer_tokens[index] = self.current
            if self.renumbered:
                self.renumbered_layers.add(index)
            kwargs = self._slice_kwargs(kwargs, hidden)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _apply_step(
        self, step: LayerStep, layer: nn.Module, hidden: torch.Tensor, kwargs: dict
    ) -> torch.Tensor:
        import torch

        assert self.method is not None
        index = self._layer_index(layer)
        visual_flags = self.is_visual[self.current]
        visual = visual_flags.nonzero().squeeze(-1)  # (V,) positions in the current sequence
        text = (~visual_flags).nonzero().squeeze(-1)
        attention = positions = None
        if step.queries is not None and step.attention_from == "self":
            positions = self._query_positions(step)(hidden.shape[1]).to(hidden.device)
            attention = self._own_attention(layer, hidden, kwargs, positions)
        elif step.queries is not None:
            assert self.probe is not None
            attention = self.probe.rows.get(index - 1)
            positions = self.probe.query_positions.get(index - 1)
            if attention is None:
                raise RuntimeError(f"no attention rows were recorded at layer {index - 1}")
        signals = LayerSignals(
            visual=visual,
            text=text,
            attention=attention,
            query_positions=positions,
            hidden=hidden[0] if step.needs_hidden else None,
            embeddings=self._embeddings() if step.needs_embeddings else None,
            generator=self.generator,
            guidance=self._guidance(visual),
            carry=self.carry,
        )
        self._record_scores(index, visual, self.method.score_layer(step, signals))
        selection = self.method.select_layer(step, signals)
        if isinstance(selection, LayerSelection):
            keep, merged, self.carry = selection.keep, selection.hidden, selection.carry
        else:
            keep, merged, self.carry = selection, None, None  # (k,) indices into `visual`
        if keep.numel() != min(step.keep, visual.numel()):
            raise RuntimeError(
                f"{self.method.name} kept {keep.numel()} visual tokens at layer {index}, "
                f"planned {step.keep}"
            )
        keep = keep.to(visual.device)
        if merged is not None:
            if merged.shape != (keep.numel(), hidden.shape[-1]):
                raise RuntimeError(
                    f"{self.method.name} returned merged hidden states of shape "
                    f"{tuple(merged.shape)} for {keep.numel()} kept tokens at layer {index}"
                )
            hidden = hidden.clone()
            hidden[0, visual[keep]] = merged.to(hidden.dtype)
        selected = torch.cat([text, visual[keep]]).sort().values  # (S',)
        self.current = self.current[selected]
        self.kept_visual = self.current[self.is_visual[self.current]]
        self.kept_at[index] = self.kept_visual
        if step.positions == "renumber":
            self.renumbered = True
        return hidden[:, selected]

    def _own_attention(
        self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict, queries: torch.Tensor
    ) -> torch.Tensor:
        """(H, Q, S) softmax rows of ``queries`` (Q,) computed with ``layer``'s own attention
        on its input ``hidden`` (1, S, D): input norm, q/k projections (and q/k norms where the
        model has them), the rotary embedding of the current positions, causal mask, head by
        head. Only Q query rows and S keys are projected: O(S * D * D_kv) extra work."""
        import torch

        attn = layer.self_attn
        x = layer.input_layernorm(hidden)  # (1, S, D)
        length, head_dim = x.shape[1], attn.head_dim
        q = attn.q_proj(x[:, queries]).view(1, queries.numel(), -1, head_dim)
        k = attn.k_proj(x).view(1, length, -1, head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (1, H, Q, hd), (1, H_kv, S, hd)
        if self.current.shape[0] != self.seq_len:  # the positions of the current tokens
            kwargs = self._slice_kwargs(kwargs, hidden)
        cos, sin = kwargs["position_embeddings"]  # (1, S, hd)
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        q = rotate(q, q, cos[:, queries], sin[:, queries])[0]
        k = rotate(k, k, cos, sin)[0]
        causal = torch.arange(length, device=x.device)[None, :] <= queries[:, None]  # (Q, S)
        rows = torch.arange(queries.numel(), device=x.device)
        return attention_rows(q, k, rows, attn.scaling, causal[None, None])

    def _record_scores(self, index: int, visual: torch.Tensor, scores: torch.Tensor | None) -> None:
        """``scores_at[index]``: the (V,) ``scores`` of the visual tokens now at ``visual``
        placed on the (V0,) prefill visual tokens (NaN for those an earlier step dropped)."""
        import torch

        if scores is None:
            return
        if scores.shape != visual.shape:
            raise RuntimeError(
                f"{self.method.name} scored {tuple(scores.shape)} visual tokens at "
                f"layer {index}, the sequence has {visual.numel()}"
            )
        slots = torch.searchsorted(self.visual_positions, self.current[visual])
        placed = torch.full(self.visual_positions.shape, float("nan"), device=slots.device)
        placed[slots] = scores.detach().float().to(slots.device)
        self.scores_at[index] = placed

    def _embeddings(self) -> torch.Tensor:
        """(S, D) input embeddings of the tokens currently in the sequence."""
        if self.embeddings is None:
            raise RuntimeError("a layer step needs the input embeddings; none were recorded")
        return self.embeddings[self.current]

    def _guidance(self, visual: torch.Tensor) -> torch.Tensor | None:
        """Guidance scores (V,) of the visual tokens now at positions ``visual``."""
        import torch

        if self.guidance is None:
            return None
        original = self.current[visual]  # positions in the prefill sequence
        index = torch.searchsorted(self.visual_positions, original)
        return self.guidance.to(index.device)[index]

    def _decode_kwargs(self, index: int, kwargs: dict, hidden: torch.Tensor) -> dict:
        """A decode step at a pruned layer: its cache lacks the dropped keys, so must its mask;
        where positions were renumbered, the new token continues the renumbered sequence."""
        import torch

        kept = self.layer_tokens.get(index)
        if kept is None:
            return kwargs
        kwargs = dict(kwargs)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            generated = torch.arange(self.seq_len, mask.shape[-1], device=kept.device)
            kwargs["attention_mask"] = mask[..., torch.cat([kept, generated])]
        if index in self.renumbered_layers and self.rotary is not None:
            start = kept.shape[0] + self._decode_step - 1
            ids = torch.arange(start, start + hidden.shape[1], device=kept.device)[None]
            kwargs["position_embeddings"] = self.rotary(hidden, ids)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = ids
        return kwargs

    def _slice_kwargs(self, kwargs: dict, hidden: torch.Tensor) -> dict:
        import torch

        current = self.current
        kwargs = dict(kwargs)
        if self.renumbered and self.rotary is not None:
            ids = torch.arange(current.shape[0], device=current.device)[None]
            kwargs["position_embeddings"] = self.rotary(hidden, ids)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = ids
        else:
            cos_sin = kwargs.get("position_embeddings")
            if cos_sin is not None:
                kwargs["position_embeddings"] = tuple(t[..., current, :] for t in cos_sin)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"][..., current]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            kwargs["attention_mask"] = mask[:, :, current][:, :, :, current]
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = kwargs["cache_position"][current]
        return kwargs
