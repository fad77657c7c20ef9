"""Several samples through one prefill and greedy decode, each with its own pruning selection.

A batch is left-padded (:func:`pad_batch`): every sample's LLM input ends at the last column,
so the last position is each sample's last prompt token, and the attention mask hides the pad
columns from every real query. Position ids are each sample's own (the unpadded ones: 1-D,
or the (3, L) rows of M-RoPE families such as Qwen2-VL), so a sample's logits are those of its
batch-1 run up to floating-point reassociation. Samples may have different lengths and
different numbers of visual tokens (dynamic-resolution images).

:class:`BatchedLayerPruner` is :class:`~prunelab.workers.pruning.LayerPruner` for such a
batch: at a layer step it hands the method one sample at a time (the unpadded view of its
sequence: the same signals a batch-1 run gives) with that sample's own step (its ``keep`` may
differ: a budget is a share of each sample's visual tokens), and gathers each sample's kept
tokens, a (B, S') index, from the hidden states, per-layer position embeddings, position ids
and mask. Each sample's text and kept visual tokens move to the end of its row and the row is
left-padded again: S' is the longest sample's kept length, and a shorter sample's front
columns are fillers (a copy of one of its tokens) that the mask hides from every real query,
as it hides pad columns. Later layers compute keys and values of those columns only, so each
sample's KV cache holds its kept tokens (and masked fillers) there; decode steps gather the
mask columns of those tokens and hide the fillers.

Several layer steps run one after another (a later step's attention rows come from rows
that already hold fillers, which the mask hides). What it does not do (the runner falls back
to batch 1 for these): renumbered positions (``LayerStep.positions="renumber"``), attention
computed from a layer's own projections (``attention_from="self"``), input embeddings
(``needs_embeddings``) and guidance scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from prunelab.methods.base import LayerSelection, LayerSignals, LayerStep, PruningMethod
from prunelab.workers.attention import AttentionProbe
from prunelab.workers.pruning import LayerHooks, LayerLengths

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["BatchInput", "BatchedLayerPruner", "pad_batch", "step_problem", "steps_problem"]


@dataclass
class BatchInput:
    """Left-padded LLM inputs of B samples (L = the longest sample's length)."""

    inputs_embeds: torch.Tensor  # (B, L, D), pad columns zero
    attention_mask: torch.Tensor  # (B, L) long, 0 on pad columns
    # each sample's own position ids, 0 on pad columns: (B, L) for 1-D RoPE, (R, B, L) for a
    # family whose rotary embedding takes R rows (M-RoPE: R = 3, temporal / height / width)
    position_ids: torch.Tensor
    is_visual: torch.Tensor  # (B, L) bool: the visual tokens of each sample
    pads: list[int]  # pad columns in front of each sample
    lengths: list[int]  # each sample's unpadded length


def pad_batch(
    embeds: Sequence[torch.Tensor],
    position_ids: Sequence[torch.Tensor],
    visual_positions: Sequence[torch.Tensor],
) -> BatchInput:
    """Left-pad B samples' (1, L_b, D) ``embeds`` with their position ids and (V_b,)
    ``visual_positions`` into one :class:`BatchInput`.

    ``position_ids``: each sample's (1, L_b) 1-D ids, or (R, 1, L_b) rows (M-RoPE), the same
    layout for every sample; the batch's are (B, L) or (R, B, L) accordingly."""
    import torch

    lengths = [int(e.shape[1]) for e in embeds]
    longest = max(lengths)
    first = embeds[0]
    batch, device = len(embeds), first.device
    layouts = {p.dim() for p in position_ids}
    if len(layouts) != 1 or layouts - {2, 3}:
        raise ValueError(
            "position ids must all be (1, L) or all (R, 1, L); got "
            f"{[tuple(p.shape) for p in position_ids]}"
        )
    rows = int(position_ids[0].shape[0]) if layouts == {3} else 1
    out = first.new_zeros(batch, longest, first.shape[-1])
    mask = torch.zeros(batch, longest, dtype=torch.long, device=device)
    ids = torch.zeros(rows, batch, longest, dtype=torch.long, device=device)
    is_visual = torch.zeros(batch, longest, dtype=torch.bool, device=device)
    pads = [longest - n for n in lengths]
    for b, (e, p, v, pad) in enumerate(
        zip(embeds, position_ids, visual_positions, pads, strict=True)
    ):
        out[b, pad:] = e[0]
        mask[b, pad:] = 1
        ids[:, b, pad:] = p.reshape(rows, -1).to(device)
        is_visual[b, pad + v.to(device)] = True
    return BatchInput(out, mask, ids if layouts == {3} else ids[0], is_visual, pads, lengths)


def step_problem(step: LayerStep) -> str | None:
    """Why :class:`BatchedLayerPruner` cannot run ``step`` (None: it can)."""
    if step.positions != "original":
        return "its layer stage renumbers positions"
    if step.queries is not None and step.attention_from != "previous":
        return "its layer stage computes attention from the layer's own projections"
    if step.needs_embeddings:
        return "its layer stage reads the input embeddings"
    return None


def steps_problem(sample_steps: Sequence[Sequence[LayerStep]]) -> str | None:
    """Why samples with these layer steps cannot share a batched generation (None: they can):
    their steps must be at the same layers, of the same kind; only ``keep`` may differ."""
    shapes = {tuple(replace(step, keep=0) for step in steps) for steps in sample_steps}
    if len(shapes) > 1:
        return "samples of one batch have layer stages at different layers or of another kind"
    return None


def _gather_rows(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` gathered along ``dim`` with (B, S') ``index`` (each batch element its own)."""
    shape = [1] * t.dim()
    shape[0], shape[dim] = index.shape[0], index.shape[1]
    view = index.reshape(shape)
    expanded = list(t.shape)
    expanded[0], expanded[dim] = index.shape[0], index.shape[1]
    return t.gather(dim, view.expand(expanded))


def _hide_columns(mask: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """A 4-D attention ``mask`` (B, 1|H, Q, K), boolean (True: attend) or additive, with the
    key columns where (B, K) ``visible`` is False masked out."""
    import torch

    columns = visible[:, None, None, :].to(mask.device)
    if mask.dtype == torch.bool:
        return mask & columns
    return mask.masked_fill(~columns, torch.finfo(mask.dtype).min)


def _gather_ids(ids: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Position ids (B|1, S) or (R, B|1, S) of the (B, S') ``current`` columns of each sample."""
    import torch

    if ids.dim() == 3:
        return torch.stack([_gather_ids(row, current) for row in ids])
    return ids.expand(current.shape[0], -1).gather(1, current.to(ids.device))


class BatchedLayerPruner(LayerHooks):
    """Pre-hooks on every decoder layer for one batched generation; see the module docstring.

    ``steps``: the layer steps; ``sample_steps``: each sample's own, in batch order (at the
    same layers and of the same kind as ``steps``, :func:`steps_problem`; their ``keep`` may
    differ), default ``steps`` for every sample. ``generators``: each sample's seeded
    generator (stochastic methods), in batch order. ``probe``: the generation's attention
    probe; it must record per batch element (``chunks=True``). ``lengths[b]`` is what each
    layer saw of sample b (unpadded, fillers not counted).
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        batch: BatchInput,
        method: PruningMethod | None = None,
        steps: Sequence[LayerStep] = (),
        probe: AttentionProbe | None = None,
        generators: Sequence[torch.Generator | None] = (),
        sample_steps: Sequence[Sequence[LayerStep]] = (),
    ) -> None:
        import torch

        super().__init__(layers, method, steps, probe)
        self.pads = list(batch.pads)  # pad or filler columns in front of each sample, now
        size = len(self.pads)
        self.generators = list(generators) or [None] * size
        own = [list(s) for s in sample_steps] or [list(steps)] * size
        if len(own) != size:
            raise ValueError(f"layer steps for {len(own)} samples, the batch has {size}")
        problem = steps_problem([list(steps), *own])
        if problem is not None:
            raise ValueError(f"a batched generation cannot run these plans: {problem}")
        self.sample_steps = [{step.layer: step for step in s} for s in own]
        self.is_visual = batch.is_visual
        self.seq_len = int(batch.is_visual.shape[1])
        device = batch.is_visual.device
        # (B, S) indices into the padded prefill sequence of the columns each sample has now,
        # and which of them are its tokens (False: a pad or filler column, masked)
        self.current = torch.arange(self.seq_len, device=device).expand(size, -1)
        self.valid = batch.attention_mask.to(device).bool()
        self.pruned = False  # a layer step has run: later layers see the gathered columns
        self._has_fillers = False  # some sample has filler columns (set by a layer step)
        self.lengths = [LayerLengths() for _ in range(size)]
        self.layer_tokens: dict[int, torch.Tensor] = {}  # pruned layer -> (B, S') its columns
        self.layer_valid: dict[int, torch.Tensor] = {}  # pruned layer -> (B, S') not fillers
        self.carry: list[torch.Tensor | None] = [None] * size
        self._decode_step = 0  # generated tokens fed back so far (decode forwards)
        # FlashAttention takes (B, K) padding masks, the other kernels (B, 1, Q, K) masks
        config = getattr(getattr(layers[0], "self_attn", None), "config", None)
        self._flash = "flash" in str(getattr(config, "_attn_implementation", ""))
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
            if index == 0:
                self._decode_step += 1
            return args, self._decode_kwargs(index, kwargs)
        if index in self.steps:
            hidden = self._apply_step(index, hidden)
        visual_now = (self.is_visual.gather(1, self.current) & self.valid).sum(dim=1).tolist()
        for b, lengths in enumerate(self.lengths):
            lengths.tokens.append(int(hidden.shape[1]) - self.pads[b])
            lengths.visual.append(int(visual_now[b]))
        if self.pruned:
            self.layer_tokens[index] = self.current
            self.layer_valid[index] = self.valid
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

    def _apply_step(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Each sample's selection at layer ``index`` (its own step), its text and kept visual
        tokens gathered to the end of its row, fillers in front of the shorter ones."""
        import torch

        assert self.method is not None
        kept_columns: list[torch.Tensor] = []  # per sample: its columns that stay, in order
        replaced = False
        for b, pad in enumerate(self.pads):
            step = self.sample_steps[b][index]
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
            kept_columns.append(torch.cat([pad + signals.text, pad + visual[keep]]).sort().values)
        width = max(int(columns.numel()) for columns in kept_columns)
        device = self.current.device
        rows, valid = [], []
        for columns in kept_columns:
            fill = width - int(columns.numel())
            columns = columns.to(device)
            rows.append(torch.cat([columns[:1].expand(fill), columns]))
            valid.append(torch.arange(width, device=device) >= fill)
        chosen = torch.stack(rows)  # (B, S') into the current columns
        self.current = self.current.gather(1, chosen)
        self.valid = torch.stack(valid)
        self.pads = [width - int(columns.numel()) for columns in kept_columns]
        self.pruned = True
        self._has_fillers = any(self.pads)
        return _gather_rows(hidden, chosen.to(hidden.device), 1)

    def _causal_mask(self) -> torch.Tensor:
        """The prefill mask of the current columns where the model gave none (no padding:
        the kernel's own causal mask), now that there are fillers: causal in the original
        order, fillers hidden (a filler row sees the token it copies, so no row is empty)."""
        if self._flash:
            return self.valid.long()  # FlashAttention's (B, S') padding mask
        current = self.current
        allowed = (current[:, None, :] <= current[:, :, None]) & self.valid[:, None, :]
        return allowed[:, None]  # (B, 1, S', S') True: attend

    def _slice_kwargs(self, kwargs: dict) -> dict:
        """The per-layer inputs of the columns each sample has now (prefill)."""
        import torch

        current = self.current
        kwargs = dict(kwargs)
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is not None:  # (B|1, S, hd) each, M-RoPE's rows already combined
            kwargs["position_embeddings"] = tuple(
                _gather_rows(t.expand(current.shape[0], *t.shape[1:]), current.to(t.device), 1)
                for t in cos_sin
            )
        ids = kwargs.get("position_ids")
        if ids is not None:
            kwargs["position_ids"] = _gather_ids(ids, current)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            index = current.to(mask.device)
            mask = mask.expand(current.shape[0], *mask.shape[1:])
            mask = _gather_rows(_gather_rows(mask, index, 2), index, 3)
            kwargs["attention_mask"] = _hide_columns(mask, self.valid)
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:  # FlashAttention's padding
            kwargs["attention_mask"] = self.valid.to(mask.device, mask.dtype)
        elif mask is None and self._has_fillers:
            kwargs["attention_mask"] = self._causal_mask()
        return kwargs

    def _decode_kwargs(self, index: int, kwargs: dict) -> dict:
        """A decode step at a pruned layer: its cache holds each sample's kept columns only, so
        its mask keeps those columns (and the generated tokens'), fillers hidden."""
        import torch

        kept = self.layer_tokens.get(index)
        if kept is None:
            return kwargs
        valid = self.layer_valid[index]
        size = kept.shape[0]
        mask = kwargs.get("attention_mask")
        kwargs = dict(kwargs)
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            generated = torch.arange(self.seq_len, mask.shape[-1], device=mask.device)
            columns = torch.cat([kept.to(mask.device), generated.expand(size, -1)], dim=1)
            mask = _gather_rows(mask.expand(size, *mask.shape[1:]), columns, 3)
            visible = torch.cat([valid, valid.new_ones(size, generated.numel())], dim=1)
            kwargs["attention_mask"] = _hide_columns(mask, visible)
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:  # FlashAttention's padding
            generated = mask[:, self.seq_len :]
            kwargs["attention_mask"] = torch.cat([valid.to(mask.device, mask.dtype), generated], 1)
        elif mask is None and self._has_fillers:  # one query over the whole cache
            visible = torch.cat([valid, valid.new_ones(size, self._decode_step)], dim=1)
            kwargs["attention_mask"] = visible.long() if self._flash else visible[:, None, None]
        return kwargs
