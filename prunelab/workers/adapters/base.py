"""The adapter interface, and the base class every decoder-only VLM family builds on.

A family adapter (one module per family in this package) knows how its model

- turns a benchmark sample into a prompt with one placeholder per visual token (`prepare`);
- computes the signals a method asks for (`vision_signals`): projected visual tokens, their
  (tile, row, col) coordinates, CLS attention and keys of the vision encoder;
- lays a (possibly shorter) list of visual tokens out in the LLM input (`_sequence`), keeping the
  family's structure consistent (position ids, newline tokens, tiles);
- counts its vision-side FLOPs (`vision_flops`).

Everything else is shared and lives in :class:`VLMAdapter`: the LLM input of a vision stage's
tokens (`llm_input`), the layer-stage pruner for it (`layer_pruner`, built by the caller before
the generation), the greedy generation loop under that pruner (`generate`), attention probing of
the LLM and of the vision encoder, and decoding.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from prunelab.methods.base import LayerStep, PruningMethod, VisionSignals
from prunelab.workers.attention import AttentionProbe, probe_attention, wrap_attention
from prunelab.workers.batched import BatchedLayerPruner, BatchInput, pad_batch
from prunelab.workers.benchmarks.base import Sample
from prunelab.workers.models import ModelSpec
from prunelab.workers.pruning import LayerLengths, LayerPruner

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "TINY_TEXT",
    "TINY_VISION",
    "Adapter",
    "Generation",
    "LLMInput",
    "Prepared",
    "VLMAdapter",
    "feature_attention_layer",
    "greedy_generate",
    "grid_coords",
    "pretrained_model",
    "seeded_model",
    "tiny_text_config",
]

# the vision tower of the tiny CLIP / InternViT models, less the family's image and patch sizes;
# a model config's ``tiny.vision`` updates it
TINY_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
}

# the LLM of the tiny models (Llama or Qwen2 shapes); a model config's ``tiny.text`` updates it
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


@dataclass
class Prepared:
    """One sample, tokenised and preprocessed on the model's device."""

    input_ids: torch.Tensor  # (1, L) with one placeholder per visual token
    pixel_values: torch.Tensor  # family-specific image tensor
    visual_positions: torch.Tensor  # (N,) positions of the prunable visual tokens in input_ids
    coords: torch.Tensor  # (N, 3) (tile, row, col) of each visual token
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific processor outputs

    @property
    def n_visual(self) -> int:
        return int(self.visual_positions.numel())


@dataclass
class LLMInput:
    """The LLM prefill input after the vision stage, and how decoding continues it."""

    inputs_embeds: torch.Tensor  # (1, L', D)
    visual_positions: torch.Tensor  # (M,) positions of the visual tokens in the L' sequence
    position_ids: torch.Tensor | None = None  # family layout, e.g. (3, 1, L') for M-RoPE
    # position ids of the t-th generated token fed back (t >= 1); None: the model counts
    next_position_ids: Callable[[int], torch.Tensor] | None = None


@dataclass
class Generation:
    token_ids: list[int]
    first_logprobs: torch.Tensor  # (vocab,) float32 log-softmax of the first generated token
    lengths: LayerLengths  # what each LLM layer saw in the prefill
    visual_in: int  # visual tokens the LLM would have received unpruned
    vision_flops: float = 0.0  # exact FLOPs of the vision tower + projector for this sample
    prefill_s: float = 0.0  # vision encoding + method + LLM prefill, to the first token's logits
    decode_s: float = 0.0  # the remaining tokens


class Adapter(Protocol):
    family: str
    attention_modules: dict[int, int]  # id() of each LLM attention module -> its layer index
    layers: list[nn.Module]  # the LLM's decoder layers, in order

    def prepare(self, sample: Sample) -> Prepared: ...

    def vision_signals(self, prepared: Prepared, wanted: frozenset[str]) -> VisionSignals: ...

    def llm_input(
        self,
        prepared: Prepared,
        visual_tokens: torch.Tensor,
        kept: torch.Tensor | None = None,
        positions: str | None = None,
    ) -> LLMInput: ...

    def layer_pruner(
        self,
        llm_input: LLMInput,
        *,
        method: PruningMethod | None = None,
        steps: Sequence[LayerStep] = (),
        probe: AttentionProbe | None = None,
        generator: torch.Generator | None = None,
        guidance: torch.Tensor | None = None,
    ) -> LayerPruner: ...

    def generate(
        self,
        prepared: Prepared,
        llm_input: LLMInput,
        max_new_tokens: int,
        clock: Callable[[], Any],
        pruner: LayerPruner | None = None,
    ) -> tuple[Generation, Any]: ...

    def decode(self, token_ids: list[int]) -> str: ...


def grid_coords(rows: int, cols: int, tile: int = 0, device: Any = None) -> torch.Tensor:
    """(rows * cols, 3) (tile, row, col) of a row-major token grid."""
    import torch

    r, c = torch.meshgrid(
        torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij"
    )
    t = torch.full_like(r, tile)
    return torch.stack([t, r, c], dim=-1).reshape(-1, 3)


def tiny_text_config(
    text_cls: type, spec: ModelSpec, defaults: dict[str, Any], tokenizer: Any, **fixed: Any
) -> Any:
    """A tiny model's LLM config (``text_cls``): ``defaults`` updated by ``spec.tiny["text"]``,
    the vocabulary size (unless given there) and special tokens of the word-level
    ``tokenizer``, and the family's ``fixed`` settings."""
    text = {**defaults, **spec.tiny.get("text", {})}
    text.setdefault("vocab_size", len(tokenizer))
    return text_cls(
        **text,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **fixed,
    )


def seeded_model(model_cls: type[nn.Module], spec: ModelSpec, config: Any) -> nn.Module:
    """A randomly initialised ``model_cls`` from ``config`` (seeded with ``spec.seed``), its
    LLM and vision tower on ``spec.attn_implementation``: the model of ``build_tiny``."""
    import torch

    torch.manual_seed(spec.seed)
    config.text_config._attn_implementation = spec.attn_implementation
    config.vision_config._attn_implementation = spec.attn_implementation
    return model_cls(config)


def pretrained_model(
    model_cls: Any, spec: ModelSpec, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """``model_cls`` loaded from ``spec.path`` (a hub id or a local directory) at
    ``spec.revision`` in ``dtype`` on ``device``: the model of ``from_pretrained``."""
    return model_cls.from_pretrained(
        spec.path, revision=spec.revision, dtype=dtype, attn_implementation=spec.attn_implementation
    ).to(device)


def greedy_generate(
    forward: Callable[..., torch.Tensor],
    embed: Callable[[torch.Tensor], torch.Tensor],
    llm_input: LLMInput,
    pruner: LayerPruner,
    max_new_tokens: int,
    eos_token_id: int | None,
    cache: Any,
    clock: Callable[[], Any],
) -> tuple[list[int], torch.Tensor, float]:
    """Prefill ``llm_input`` under ``pruner``, then decode greedily through the KV cache.

    ``forward(inputs_embeds=..., cache=cache[, position_ids=...])`` returns
    last-position logits (1, V). Returns the generated ids, the first token's log-probabilities
    (V,), and the ``clock()`` mark (a time, or a CUDA event) taken when the first token's logits
    were ready.
    """
    import torch

    device = llm_input.inputs_embeds.device
    with pruner:
        kwargs: dict[str, Any] = {}
        if llm_input.position_ids is not None:
            kwargs["position_ids"] = llm_input.position_ids
        logits = forward(inputs_embeds=llm_input.inputs_embeds, cache=cache, **kwargs)
        pruner.end_prefill()
        first_logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        first_ready = clock()
        token = int(logits[0].argmax())
        tokens = [token]
        while len(tokens) < max_new_tokens and token != eos_token_id:
            step = embed(torch.tensor([[token]], device=device))
            if llm_input.next_position_ids is not None:
                kwargs["position_ids"] = llm_input.next_position_ids(len(tokens))
            logits = forward(inputs_embeds=step, cache=cache, **kwargs)
            token = int(logits[0].argmax())
            tokens.append(token)
    return tokens, first_logprobs.cpu(), first_ready


def _original_positions(
    llm_input: LLMInput, prepared: Prepared, kept: torch.Tensor | None, sorted_kept: bool
) -> LLMInput:
    """``llm_input`` (a 1-D RoPE layout whose visual tokens fill the image block in ``kept``
    order, or in increasing ``kept`` with ``sorted_kept``) with 1-D position ids from the
    unpruned sequence: each visual token at its anchor's position, each other token at its
    own, the generated tokens after the unpruned length."""
    import torch

    if kept is None:
        return llm_input
    placeholders = prepared.visual_positions
    kept = kept.to(placeholders.device)
    anchors = placeholders[torch.sort(kept).values if sorted_kept else kept]  # (M,)
    length = prepared.input_ids.shape[1]
    visual = llm_input.visual_positions
    # the layout keeps every non-visual token in order: map new index -> original index
    is_text = torch.ones(length, dtype=torch.bool, device=placeholders.device)
    is_text[placeholders] = False
    text_original = is_text.nonzero().squeeze(-1)
    new_length = llm_input.inputs_embeds.shape[1]
    is_new_visual = torch.zeros(new_length, dtype=torch.bool, device=placeholders.device)
    is_new_visual[visual] = True
    ids = torch.empty(new_length, dtype=torch.long, device=placeholders.device)
    ids[visual] = anchors
    ids[~is_new_visual] = text_original
    return dataclasses.replace(
        llm_input,
        position_ids=ids[None],
        next_position_ids=lambda t: torch.full((1, 1), length + t - 1, device=ids.device),
    )


class VLMAdapter:
    """Shared machinery of the decoder-only families; subclasses fill in the family hooks.

    ``self.llm`` is the language model (``model.model.language_model`` in transformers 5 for
    every supported family); its attention and the vision encoder's run through the probing
    wrappers of :mod:`prunelab.workers.attention`, so SDPA / FlashAttention 2 stay on.
    """

    family: ClassVar[str] = ""
    # how a vision stage's kept tokens are numbered (the trial axis ``vision_positions``), the
    # family's default first: ``packed`` (consecutive, as official VisionZip) or ``original``
    # (each keeps its position in the unpruned sequence)
    vision_positions: ClassVar[tuple[str, ...]] = ("packed", "original")
    sorts_kept: ClassVar[bool] = False  # ``_sequence`` lays the kept tokens out in input order
    # several samples can share one prefill and decode (:meth:`generate_batch`): left-padded,
    # each with its own position ids (1-D, or M-RoPE rows), lengths and visual-token counts
    batches: ClassVar[bool] = False

    def __init__(self, loaded) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.device: torch.device = loaded.device
        self.spec = loaded.spec
        self.info = loaded.info
        self.llm = self.model.model.language_model
        self.llm.config._attn_implementation = wrap_attention(self.spec.attn_implementation)
        self.layers = list(self.llm.layers)
        self.attention_modules = {id(layer.self_attn): i for i, layer in enumerate(self.layers)}
        vision_layers = self._vision_attention()
        self.vision_attention_modules = {id(m): i for i, m in enumerate(vision_layers)}
        vision_configs = {id(m.config): m.config for m in vision_layers}.values()
        for config in vision_configs:
            config._attn_implementation = wrap_attention(self.spec.attn_implementation)
        self._attention_configs = [self.llm.config, *vision_configs]

    # -- family hooks ------------------------------------------------------------------------
    def prepare(self, sample: Sample) -> Prepared:
        raise NotImplementedError

    def vision_signals(self, prepared: Prepared, wanted: frozenset[str]) -> VisionSignals:
        raise NotImplementedError

    def vision_flops(self, prepared: Prepared) -> float:
        """Exact FLOPs (2 per multiply-add) of the vision tower and projector for ``prepared``."""
        raise NotImplementedError

    def _vision_attention(self) -> list[nn.Module]:
        """The vision encoder's attention modules, in layer order (each has ``config``)."""
        raise NotImplementedError

    def _sequence(
        self, prepared: Prepared, visual_tokens: torch.Tensor, kept: torch.Tensor | None
    ) -> LLMInput:
        """Lay ``visual_tokens`` (M, D) out in the LLM input in place of the N placeholders.

        ``kept`` (M,) is the index of the input token each output is anchored on (None: M == N,
        the tokens as they are). Default, for 1-D RoPE families: the first M placeholders take
        the tokens and the rest are removed, so positions stay contiguous.
        """
        import torch

        ids = prepared.input_ids[0]
        placeholders = prepared.visual_positions
        m = visual_tokens.shape[0]
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[placeholders[m:]] = False
        embeds = self.model.get_input_embeddings()(ids[keep][None]).clone()  # (1, L', D)
        visual_positions = placeholders[:m]
        embeds[0, visual_positions] = visual_tokens.to(embeds.dtype)
        return LLMInput(inputs_embeds=embeds, visual_positions=visual_positions)

    def _rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) for renumbered 1-D ``position_ids`` (1, L)."""
        return self.llm.rotary_emb(hidden, position_ids=position_ids)

    # -- shared ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def attention_implementation(self, name: str) -> Iterator[None]:
        """Run the LLM and vision encoder with another attention kernel during the block
        (``"eager"`` for ``FlopCounterMode``, which does not count SDPA on CPU). No probing."""
        saved = [config._attn_implementation for config in self._attention_configs]
        try:
            for config in self._attention_configs:
                config._attn_implementation = name
            yield
        finally:
            for config, value in zip(self._attention_configs, saved, strict=True):
                config._attn_implementation = value

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def _check_placeholders(self, input_ids: torch.Tensor, expected: int) -> torch.Tensor:
        positions = (input_ids[0] == self.model.config.image_token_id).nonzero().squeeze(-1)
        if positions.numel() != expected:
            raise RuntimeError(
                f"prompt has {positions.numel()} image tokens, the {self.family} model makes "
                f"{expected} visual tokens for this image"
            )
        return positions

    @contextlib.contextmanager
    def probe_vision(
        self, layer: int, queries: Any = None, keys: bool = False, chunks: bool = False
    ) -> Iterator[AttentionProbe]:
        """Record attention rows (``queries``: tensor, callable or "all") and/or keys of
        vision-encoder ``layer`` (negative: counted from the end) during the block."""
        n = len(self.vision_attention_modules)
        index = layer % n
        probe = AttentionProbe(
            modules=self.vision_attention_modules,
            queries={index: queries} if queries is not None else {},
            keys=frozenset({index}) if keys else frozenset(),
            chunks=chunks,
        )
        with probe_attention(probe):
            yield probe

    def llm_input(
        self,
        prepared: Prepared,
        visual_tokens: torch.Tensor,
        kept: torch.Tensor | None = None,
        positions: str | None = None,
    ) -> LLMInput:
        """The LLM input with ``visual_tokens`` (M, D) in place of the N visual placeholders.

        ``kept`` (M,) anchors each of the M tokens on an input token (a vision stage's
        selection); it may be None only when M == N. ``positions``: how the M tokens are
        numbered, one of :attr:`vision_positions` (None: the family's default).
        """
        if kept is None and visual_tokens.shape[0] != prepared.n_visual:
            raise ValueError(
                f"{visual_tokens.shape[0]} visual tokens for {prepared.n_visual} placeholders "
                "need `kept` (the input token each one stands for)"
            )
        positions = positions or self.vision_positions[0]
        if positions not in self.vision_positions:
            raise ValueError(
                f"vision_positions={positions!r}: the {self.family} family numbers a vision "
                f"stage's tokens {' or '.join(self.vision_positions)}"
            )
        llm_input = self._sequence(prepared, visual_tokens, kept)
        if positions == "original" and self.vision_positions[0] != "original":
            llm_input = _original_positions(llm_input, prepared, kept, self.sorts_kept)
        return llm_input

    def layer_pruner(
        self,
        llm_input: LLMInput,
        *,
        method: PruningMethod | None = None,
        steps: Sequence[LayerStep] = (),
        probe: AttentionProbe | None = None,
        generator: torch.Generator | None = None,
        guidance: torch.Tensor | None = None,
    ) -> LayerPruner:
        """The layer-stage pruner of a generation from ``llm_input``: ``method`` applies
        ``steps`` (none: it only records the lengths each layer sees); see
        :class:`~prunelab.workers.pruning.LayerPruner` for the rest."""
        return LayerPruner(
            self.layers,
            llm_input.inputs_embeds.shape[1],
            llm_input.visual_positions,
            method=method,
            steps=steps,
            probe=probe,
            rotary=self._rotary,
            generator=generator,
            guidance=guidance,
        )

    def generate(
        self,
        prepared: Prepared,
        llm_input: LLMInput,
        max_new_tokens: int,
        clock: Callable[[], Any],
        pruner: LayerPruner | None = None,
    ) -> tuple[Generation, Any]:
        """Generate greedily from ``llm_input`` (see :meth:`llm_input`) of ``prepared``.

        ``pruner`` (built by :meth:`layer_pruner` for this ``llm_input``) runs the layer stages
        during the prefill; None: an unpruned generation. Returns the generation and the
        ``clock()`` mark taken when the first logits were ready.
        """
        from transformers import DynamicCache  # here: the module is imported where no model runs

        if pruner is None:
            pruner = self.layer_pruner(llm_input)

        def forward(**kwargs: Any) -> torch.Tensor:
            return self.model(use_cache=True, logits_to_keep=1, **kwargs).logits[:, -1]

        tokens, first_logprobs, first_ready = greedy_generate(
            forward=forward,
            embed=self.model.get_input_embeddings(),
            llm_input=llm_input,
            pruner=pruner,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            cache=DynamicCache(config=self.llm.config),
            clock=clock,
        )
        generation = Generation(
            token_ids=tokens,
            first_logprobs=first_logprobs,
            lengths=pruner.lengths,
            visual_in=prepared.n_visual,
            vision_flops=self.vision_flops(prepared),
        )
        return generation, first_ready

    # -- batched generation (families with ``batches``) ----------------------------------
    def batch_input(self, llm_inputs: Sequence[LLMInput]) -> BatchInput:
        """Left-pad the LLM inputs of several samples into one batch. Each sample keeps its
        own position ids: those of ``llm_input.position_ids`` ((1, L) 1-D or (R, 1, L) rows,
        e.g. M-RoPE's (3, 1, L)), or consecutive 1-D ids; samples may differ in length."""
        import torch

        if not self.batches:
            raise NotImplementedError(f"the {self.family} family does not batch")
        ids = []
        for llm_input in llm_inputs:
            length = llm_input.inputs_embeds.shape[1]
            given = llm_input.position_ids
            if given is None:
                given = torch.arange(length, device=llm_input.inputs_embeds.device)[None]
            ids.append(given)
        return pad_batch(
            [i.inputs_embeds for i in llm_inputs], ids, [i.visual_positions for i in llm_inputs]
        )

    def batch_pruner(
        self,
        batch: BatchInput,
        *,
        method: PruningMethod | None = None,
        steps: Sequence[LayerStep] = (),
        probe: AttentionProbe | None = None,
        generators: Sequence[torch.Generator | None] = (),
        sample_steps: Sequence[Sequence[LayerStep]] = (),
    ) -> BatchedLayerPruner:
        """The layer-stage pruner of a batched generation of ``batch`` (see
        :class:`~prunelab.workers.batched.BatchedLayerPruner`; ``sample_steps``: each
        sample's own steps, default ``steps``)."""
        return BatchedLayerPruner(
            self.layers,
            batch,
            method=method,
            steps=steps,
            probe=probe,
            generators=generators,
            sample_steps=sample_steps,
        )

    def generate_batch(
        self,
        prepared: Sequence[Prepared],
        llm_inputs: Sequence[LLMInput],
        batch: BatchInput,
        max_new_tokens: int,
        pruner: BatchedLayerPruner | None = None,
    ) -> list[Generation]:
        """Generate greedily for several samples at once: ``batch`` is
        :meth:`batch_input` of their ``llm_inputs``, ``pruner`` (from :meth:`batch_pruner`)
        runs each sample's layer stages in the prefill (None: unpruned). Each sample stops at
        its own end-of-sequence token or ``max_new_tokens``; the generations are those of
        :meth:`generate` one sample at a time (in fp32, up to floating-point reassociation)."""
        import torch
        from transformers import DynamicCache  # here: the module is imported where no model runs

        if pruner is None:
            pruner = self.batch_pruner(batch)
        size = len(llm_inputs)
        device = batch.inputs_embeds.device
        eos = self.tokenizer.eos_token_id
        embed = self.model.get_input_embeddings()
        cache = DynamicCache(config=self.llm.config)
        mask = batch.attention_mask

        def forward(embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            output = self.model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                cache=cache, use_cache=True, logits_to_keep=1,
            )  # fmt: skip
            return output.logits[:, -1]  # (B, V)

        rows = batch.position_ids.shape[0] if batch.position_ids.dim() == 3 else None

        def next_positions(t: int) -> torch.Tensor:
            """(B, 1), or (R, B, 1) for R rows (M-RoPE), of the t-th token fed back."""
            ids = []
            for llm_input, length in zip(llm_inputs, batch.lengths, strict=True):
                if llm_input.next_position_ids is not None:
                    ids.append(llm_input.next_position_ids(t).reshape(rows or 1, 1, 1))
                else:
                    ids.append(torch.full((rows or 1, 1, 1), length + t - 1))
            stacked = torch.cat([i.to(device) for i in ids], dim=1)  # (R, B, 1)
            return stacked if rows is not None else stacked[0]

        with pruner:
            logits = forward(batch.inputs_embeds, batch.position_ids)
            pruner.end_prefill()
            first_logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            token = logits.argmax(dim=-1)  # (B,)
            tokens = [[int(t)] for t in token.tolist()]
            done = [t[0] == eos or max_new_tokens <= 1 for t in tokens]
            fed = 1
            while not all(done):
                mask = torch.cat([mask, mask.new_ones(size, 1)], dim=1)
                logits = forward(embed(token[:, None]), next_positions(fed))
                fed += 1
                token = logits.argmax(dim=-1)
                for b, value in enumerate(token.tolist()):
                    if not done[b]:
                        tokens[b].append(int(value))
                        done[b] = value == eos or len(tokens[b]) >= max_new_tokens
        return [
            Generation(
                token_ids=tokens[b],
                first_logprobs=first_logprobs[b],
                lengths=pruner.lengths[b],
                visual_in=prepared[b].n_visual,
                vision_flops=self.vision_flops(prepared[b]),
            )
            for b in range(size)
        ]

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()


def feature_attention_layer(feature_layer: int, n_layers: int) -> int:
    """The encoder layer whose output is ``hidden_states[feature_layer]`` (index 0: embeddings)."""
    index = feature_layer % (n_layers + 1)
    if index == 0:
        raise ValueError("vision_feature_layer=0 selects the embeddings: no attention layer")
    return index - 1
