"""Several samples through one prefill and greedy decode, each with its own pruning selection.

A batch is left-padded (:func:`pad_batch`): every sample's LLM input ends at the last column,
so the last position is each sample's last prompt token, and the attention mask hides the pad
columns from every real query. Position ids are each sample's own (the unpadded ones), so a
sample's logits are those of its batch-1 run up to floating-point reassociation.

:class:`BatchedLayerPruner` is :class:`~prunelab.workers.pruning.LayerPruner` for such a
batch: at a layer step it hands the method one sample at a time (the unpadded view of its
sequence: the same signals a batch-1 run gives), and gathers each sample's kept tokens, a
(B, S') index, from the hidden states, per-layer position embeddings, position ids and mask.
Every sample keeps its pad columns (a prefix, masked), its text and ``step.keep`` visual
tokens, so S' is the same for all. Later layers compute keys and values of the kept tokens
only, so each sample's KV cache holds only its kept tokens there; decode steps gather the
mask columns of those tokens.

What it does not do (the runner falls back to batch 1 for these): renumbered positions
(``LayerStep.positions="renumber"``), attention computed from a layer's own projections
(``attention_from="self"``), input embeddings (``needs_embeddings``), guidance scores,
and samples whose visual-token counts differ at a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prunelab.methods.base import LayerSelection, LayerSignals, LayerStep, PruningMethod
from prunelab.workers.attention import AttentionProbe
from prunelab.workers.pruning import LayerHooks, LayerLengths

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["BatchInput", "BatchedLayerPruner", "pad_batch", "step_problem"]


@dataclass
class BatchInput:
    """Left-padded LLM inputs of B samples (L = the longest sample's length)."""

    inputs_embeds: torch.Tensor  # (B, L, D), pad columns zero
    attention_mask: torch.Tensor  # (B, L) long, 0 on pad columns
    position_ids: torch.Tensor  # (B, L) each sample's own position ids (0 on pad columns)
    is_visual: torch.Tensor  # (B, L) bool: the visual tokens of each sample
    pads: list[int]  # pad columns in front of each sample
    lengths: list[int]  # each sample's unpadded length


def pad_batch(
    embeds: Sequence[torch.Tensor],
    position_ids: Sequence[torch.Tensor],
    visual_positions: Sequence[torch.Tensor],
) -> BatchInput:
    """Left-pad B samples' (1, L_b, D) ``embeds`` with their (1, L_b) ``position_ids`` and
    (V_b,) ``visual_positions`` into one :class:`BatchInput`."""
    import torch

    lengths = [int(e.shape[1]) for e in embeds]
    longest = max(lengths)
    first = embeds[0]
    batch, device = len(embeds), first.device
    out = first.new_zeros(batch, longest, first.shape[-1])
    mask = torch.zeros(batch, longest, dtype=torch.long, device=device)
    ids = torch.zeros(batch, longest, dtype=torch.long, device=device)
    is_visual = torch.zeros(batch, longest, dtype=torch.bool, device=device)
    pads = [longest - n for n in lengths]
    for b, (e, p, v, pad) in enumerate(
        zip(embeds, position_ids, visual_positions, pads, strict=True)
    ):
        out[b, pad:] = e[0]
        mask[b, pad:] = 1
        ids[b, pad:] = p.reshape(-1).to(device)
        is_visual[b, pad + v.to(device)] = True
    return BatchInput(out, mask, ids, is_visual, pads, lengths)


def step_problem(step: LayerStep) -> str | None:
    """Why :class:`BatchedLayerPruner` cannot run ``step`` (None: it can)."""
    if step.positions != "original":
        return "its layer stage renumbers positions"
    if step.queries is not None and step.attention_from != "previous":
        return "its layer stage computes attention from the layer's own projections"
    if step.needs_embeddings:
        return "its layer stage reads the input embeddings"
    return None


def _gather_rows(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` gathered along ``dim`` with (B, S') ``index`` (each batch element its own)."""
    shape = [1] * t.dim()
    shape[0], shape[dim] = index.shape[0], index.shape[1]
    view = index.reshape(shape)
    expanded = list(t.shape)
    expanded[0], expanded[dim] = index.shape[0], index.shape[1]
    return t.gather(dim, view.expand(expanded))


class BatchedLayerPruner(LayerHooks):
    """Pre-hooks on every decoder layer for one batched generation; see the module docstring.

    ``generators``: each sample's seeded generator (stochastic methods), in batch order.
    ``probe``: the generation's attention probe; it must record per batch element
    (``chunks=True``). ``lengths[b]`` is what each layer saw of sample b (unpadded).
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        batch: BatchInput,
        method: PruningMethod | None = None,
        steps: Sequence[LayerStep] = (),
        probe: AttentionProbe | None = None,
        generators: Sequence[torch.Generator | None] = (),
    ) -> None:
        import torch

        super().__init__(layers, method, steps, probe)
        self.pads = list(batch.pads)
        size = len(self.pads)
        self.generators = list(generators) or [None] * size
        self.is_visual = batch.is_visual
        self.seq_len = int(batch.is_visual.shape[1])
        device = batch.is_visual.device
        # (B, S) indices into the padded prefill sequence of the tokens each sample still has
        self.current = torch.arange(self.seq_len, device=device).expand(size, -1)
        self.lengths = [LayerLengths() for _ in range(size)]
        self.layer_tokens: dict[int, torch.Tensor] = {}  # pruned layer -> (B, S') its tokens
        self.carry: list[torch.Tensor | None] = [None] * size
        for step in steps:
            problem = step_problem(step)
            if problem is not None:
                raise ValueError(f"a batched generation cannot run this plan: {problem}")
            self._check_layer(step)
            if step.queries is None:
                continue
            if probe is None or not probe.chunks:
                raise ValueError("a layer step asks for attention rows: give a chunks probe")
            probe.queries[step.layer - 1] = self._query_positions(step)

    @staticmethod
    def _query_positions(step: LayerStep):
        """The probe's query rows: the last token (the same column in every sample) or every
        row, from which each sample's rows are taken (its text or visual tokens differ)."""
        import torch

        if step.queries == "last":
            return lambda length: torch.tensor([length - 1])
        return "all"

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        index = self._layer_index(module)
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._prefill_done:
            return args, self._decode_kwargs(index, kwargs)
        step = self.steps.get(index)
        if step is not None:
            hidden = self._apply_step(step, index, hidden)
        visual_now = self.is_visual.gather(1, self.current).sum(dim=1).tolist()
        for b, lengths in enumerate(self.lengths):
            lengths.tokens.append(int(hidden.shape[1]) - self.pads[b])
            lengths.visual.append(int(visual_now[b]))
        if self.current.shape[1] != self.seq_len:
            self.layer_tokens[index] = self.current
            kwargs = self._slice_kwargs(kwargs)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _signals(
        self, b: int, step: LayerStep, index: int, hidden: torch.Tensor
    ) -> tuple[LayerSignals, torch.Tensor]:
        """Sample ``b``'s signals at ``step``: the unpadded view of its sequence (what its
        batch-1 run sees), and its (V,) visual positions in that view."""
        import torch

        pad = self.pads[b]
        flags = self.is_visual[b, self.current[b]][pad:]
        visual = flags.nonzero().squeeze(-1)
        text = (~flags).nonzero().squeeze(-1)
        attention = positions = None
        if step.queries is not None:
            assert self.probe is not None
            rows = self.probe.rows.get(index - 1)
            if not rows or len(rows) != len(self.pads):
                raise RuntimeError(f"no attention rows were recorded at layer {index - 1}")
            row = rows[b][..., pad:]  # (H, Q, S_b)
            if step.queries == "last":
                attention = row
                positions = torch.tensor([flags.shape[0] - 1], device=visual.device)
            else:
                length = flags.shape[0]
                wanted = {"text": text, "visual": visual}.get(
                    step.queries, torch.arange(length, device=visual.device)
                )
                attention = row[:, pad + wanted.to(row.device)]
                positions = wanted
        signals = LayerSignals(
            visual=visual,
            text=text,
            attention=attention,
            query_positions=positions,
            hidden=hidden[b, pad:] if step.needs_hidden else None,
            generator=self.generators[b],
            carry=self.carry[b],
        )
        return signals, visual

    def _apply_step(self, step: LayerStep, index: int, hidden: torch.Tensor) -> torch.Tensor:
        import torch

        assert self.method is not None
        selected: list[torch.Tensor] = []
        replaced = False
        for b, pad in enumerate(self.pads):
            signals, visual = self._signals(b, step, index, hidden)
            selection = self.method.select_layer(step, signals)
            if isinstance(selection, LayerSelection):
                keep, merged, self.carry[b] = selection.keep, selection.hidden, selection.carry
            else:
                keep, merged, self.carry[b] = selection, None, None
            if keep.numel() != min(step.keep, visual.numel()):
                raise RuntimeError(
                    f"{self.method.name} kept {keep.numel()} visual tokens at layer {index}, "
                    f"planned {step.keep}"
                )
            keep = keep.to(visual.device)
            if merged is not None:
                if not replaced:
                    hidden, replaced = hidden.clone(), True
                hidden[b, pad + visual[keep]] = merged.to(hidden.dtype)
            device = visual.device
            prefix = torch.arange(pad, device=device)
            kept = torch.cat([prefix, pad + signals.text, pad + visual[keep]]).sort().values
            selected.append(kept)
        counts = {int(s.numel()) for s in selected}
        if len(counts) != 1:
            raise RuntimeError(
                f"samples keep different visual-token counts at layer {index}: cannot batch"
            )
        chosen = torch.stack(selected).to(self.current.device)  # (B, S') into the current
        self.current = self.current.gather(1, chosen)
        return _gather_rows(hidden, chosen.to(hidden.device), 1)

    def _slice_kwargs(self, kwargs: dict) -> dict:
        """The per-layer inputs of the tokens each sample still has (prefill)."""
        import torch

        current = self.current
        kwargs = dict(kwargs)
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is not None:
            kwargs["position_embeddings"] = tuple(
                _gather_rows(t.expand(current.shape[0], *t.shape[1:]), current.to(t.device), 1)
                for t in cos_sin
            )
        ids = kwargs.get("position_ids")
        if ids is not None:
            ids = ids.expand(current.shape[0], -1)
            kwargs["position_ids"] = ids.gather(1, current.to(ids.device))
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            index = current.to(mask.device)
            mask = mask.expand(current.shape[0], *mask.shape[1:])
            kwargs["attention_mask"] = _gather_rows(_gather_rows(mask, index, 2), index, 3)
        return kwargs

    def _decode_kwargs(self, index: int, kwargs: dict) -> dict:
        """A decode step at a pruned layer: its cache holds each sample's kept tokens only, so
        its mask keeps those columns (and the generated tokens')."""
        import torch

        kept = self.layer_tokens.get(index)
        if kept is None:
            return kwargs
        mask = kwargs.get("attention_mask")
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
            return kwargs
        kwargs = dict(kwargs)
        kept = kept.to(mask.device)
        generated = torch.arange(self.seq_len, mask.shape[-1], device=mask.device)
        columns = torch.cat([kept, generated.expand(kept.shape[0], -1)], dim=1)
        mask = mask.expand(kept.shape[0], *mask.shape[1:])
        kwargs["attention_mask"] = _gather_rows(mask, columns, 3)
        return kwargs
