"""Training and loading the VIB head of PGP (``prunelab.methods.pgp``) on its guide model.

Training (eq. 5 of the PGP paper), per sample (X, V, Y):

1. first forward of the small VLM on [V; X]: the hidden states V' (N, d) of the visual tokens at
   the head's ``guide_layer`` (-1: the last hidden states, after the final norm);
2. the head gives the posterior N(μ_θ(V'), σ_θ²(V')) (eq. 1, 3) and the token KLs (eq. 2);
   Z = μ + σ ⊙ ε (eq. 4);
3. second forward on [Z; X; Y] (Z in place of V, the answer Y teacher-forced): the answer's
   cross-entropy; loss = CE + β(s) · mean_i KL_i (eq. 5), β(s) by the §4.5 schedule.

The guide is frozen; with ``lora_rank > 0`` low-rank deltas on its attention q/v projections
are trained with the head (the paper fine-tunes the small VLM with LoRA to bridge the shift
from V to Z inputs). LoRA is applied with forward hooks, removed on exit, so a guide cached by
a worker is left untouched (no peft dependency). The result is one safetensors blob: ``head.*``
(the :class:`VIBHead`), ``lora.<module>.A`` / ``.B``, and metadata (shapes, gate, layer, key).

No Ray, no MLflow: the orchestrator (``prunelab.orchestrator.vib_stage``) decides when to train
and where the blob is kept.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prunelab.methods.pgp import kl_weight, reparameterize
from prunelab.trial import Trial
from prunelab.workers.benchmarks import build_benchmark
from prunelab.workers.benchmarks.base import Sample

if TYPE_CHECKING:
    import torch
    from torch import nn

    from prunelab.methods.pgp import VIBHead

__all__ = [
    "HEAD_FILE",
    "TRAIN_DEFAULTS",
    "VibResult",
    "capture_hidden",
    "decode_head",
    "lora_applied",
    "train_vib",
    "trial_assets",
]

HEAD_FILE = "vib_head.safetensors"
LORA_TARGETS = ("q_proj", "v_proj")

TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 0,  # optimiser steps; 0: one epoch over `limit` samples (the paper: one epoch)
    "batch_size": 4,  # samples per step (gradient accumulation, sequences differ in length)
    "lr": 1e-4,
    "weight_decay": 0.0,
    "lora_alpha": 16.0,  # LoRA scale = alpha / rank
    "limit": 256,  # training samples (seeded subset of the split; None: all)
    "seed": 0,
    "max_answer_tokens": 16,
    "eval_samples": 8,  # fixed samples and noise on which the loss is measured before/after
}


@dataclass
class VibResult:
    """A trained head: the safetensors blob and what happened while training."""

    blob: bytes
    metadata: dict[str, str]
    losses: list[dict[str, float]] = field(default_factory=list)  # per step: loss, ce, kl, beta
    eval_before: float = math.nan  # loss on the eval samples with β = τ_max, before training
    eval_after: float = math.nan  # the same after training
    seconds: float = 0.0


# -- hooks on the guide -----------------------------------------------------------------------
def _output_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _Capture:
    """The output of one module at its first call inside the block: (1, L, d)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.value is None:
            self.value = _output_tensor(output)


@contextlib.contextmanager
def capture_hidden(adapter: Any, layer: int) -> Iterator[_Capture]:
    """Record the LLM hidden states of the first forward in the block: ``layer = -1`` the last
    hidden states (output of the final norm), ``k >= 0`` the output of decoder layer k."""
    if layer == -1:
        module = adapter.llm.norm
    elif 0 <= layer < len(adapter.layers):
        module = adapter.layers[layer]
    else:
        raise ValueError(f"guide_layer={layer}: must be -1 or in [0, {len(adapter.layers) - 1}]")
    capture = _Capture()
    handle = module.register_forward_hook(capture.hook)
    try:
        yield capture
    finally:
        handle.remove()


def _lora_modules(adapter: Any) -> dict[str, nn.Linear]:
    """The guide's LoRA targets: ``layers.<i>.self_attn.<q_proj|v_proj>`` -> module."""
    from torch import nn

    modules = {}
    for i, layer in enumerate(adapter.layers):
        for target in LORA_TARGETS:
            module = getattr(layer.self_attn, target, None)
            if isinstance(module, nn.Linear):
                modules[f"layers.{i}.self_attn.{target}"] = module
    return modules


def init_lora(adapter: Any, rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """LoRA factors A (r, in) ~ Kaiming-uniform and B (out, r) = 0 per target (ΔW = B A = 0)."""
    import torch

    lora = {}
    for name, module in _lora_modules(adapter).items():
        bound = 1.0 / math.sqrt(module.in_features)
        a = (torch.rand(rank, module.in_features, generator=generator) * 2 - 1) * bound
        lora[f"{name}.A"] = a.to(module.weight.device)
        lora[f"{name}.B"] = torch.zeros(module.out_features, rank, device=module.weight.device)
    return lora


@contextlib.contextmanager
def lora_applied(adapter: Any, lora: dict[str, torch.Tensor], scale: float) -> Iterator[None]:
    """Add ``scale · x Aᵀ Bᵀ`` to each target projection's output during the block."""
    import torch.nn.functional as F

    handles = []
    try:
        for name, module in _lora_modules(adapter).items():
            if f"{name}.A" not in lora:
                continue
            a, b = lora[f"{name}.A"], lora[f"{name}.B"]

            def hook(mod: nn.Module, args: tuple, out: torch.Tensor, a=a, b=b) -> torch.Tensor:
                x = args[0]
                delta = F.linear(F.linear(x.to(a.dtype), a.to(x.device)), b.to(x.device))
                return out + (scale * delta).to(out.dtype)

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


# -- the loss ---------------------------------------------------------------------------------
def _positions(llm_input: Any, extra: int) -> torch.Tensor | None:
    """Position ids of the prompt plus ``extra`` teacher-forced tokens (None: the model counts)."""
    import torch

    if llm_input.position_ids is None:
        return None
    parts = [llm_input.position_ids]
    parts += [llm_input.next_position_ids(t) for t in range(1, extra + 1)]
    return torch.cat(parts, dim=-1)


def sample_loss(
    adapter: Any,
    head: VIBHead,
    sample: Sample,
    layer: int,
    generator: torch.Generator,
    max_answer_tokens: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer cross-entropy, mean token KL) of one sample: the two terms of eq. 5."""
    import torch
    import torch.nn.functional as F

    model = adapter.model
    prepared = adapter.prepare(sample)
    with torch.no_grad():
        tokens = adapter.vision_signals(prepared, frozenset()).tokens  # (N, D), frozen tower
    llm_input = adapter._sequence(prepared, tokens, None)
    with capture_hidden(adapter, layer) as captured:  # 1st forward: V'
        model(
            inputs_embeds=llm_input.inputs_embeds,
            position_ids=llm_input.position_ids,
            use_cache=False,
            logits_to_keep=1,
        )
    assert captured.value is not None
    v = captured.value[0, llm_input.visual_positions].float()  # (N, d)
    kl, mean, logvar = head.kl(v)
    z = reparameterize(mean, logvar, generator)  # eq. 4
    tokenizer = adapter.tokenizer
    answer = tokenizer(sample.answers[0], add_special_tokens=False)["input_ids"][:max_answer_tokens]
    if tokenizer.eos_token_id is not None:
        answer = [*answer, tokenizer.eos_token_id]
    target = torch.tensor(answer, device=adapter.device)
    z_input = adapter._sequence(prepared, z.to(model.dtype), None)  # Z in place of V
    teacher = model.get_input_embeddings()(target[None, :-1])
    embeds = torch.cat([z_input.inputs_embeds, teacher.to(z_input.inputs_embeds.dtype)], dim=1)
    logits = model(  # 2nd forward: the answer given (X, Z)
        inputs_embeds=embeds,
        position_ids=_positions(z_input, target.numel() - 1),
        use_cache=False,
        logits_to_keep=target.numel(),
    ).logits[0]
    ce = F.cross_entropy(logits.float(), target)
    return ce, kl.mean()


# -- training ---------------------------------------------------------------------------------
def _train_samples(train: dict[str, Any]) -> list[Sample]:
    benchmark = build_benchmark(train["benchmark"])
    return benchmark.samples(train.get("limit"), int(train.get("seed", 0)))


def train_vib(
    train: dict[str, Any],
    loaded: tuple[Any, Any] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> VibResult:
    """Train a head from a training config (see ``prunelab.orchestrator.vib_stage``):
    ``guide`` (model config), ``benchmark`` (benchmark config of the training data), ``head``
    (``PGP.head_hparams()``), ``key``, and the settings of :data:`TRAIN_DEFAULTS`.
    ``loaded``: the guide as (LoadedModel, adapter), else loaded from ``guide``."""
    import torch
    from safetensors.torch import save as save_safetensors

    from prunelab.methods.pgp import VIBHead
    from prunelab.workers.adapters import adapter_for
    from prunelab.workers.models import load_model

    start = time.perf_counter()
    settings = {**TRAIN_DEFAULTS, **{k: v for k, v in train.items() if k in TRAIN_DEFAULTS}}
    hp = train["head"]
    if loaded is None:
        guide = load_model(train["guide"])
        loaded = (guide, adapter_for(guide))
    guide, adapter = loaded
    seed = int(settings["seed"])
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = guide.device

    for param in guide.model.parameters():
        param.requires_grad_(False)
    dim = guide.info.hidden_size
    head = VIBHead(dim, int(hp["head_hidden"]), hp["gate"]).to(device)
    rank = int(hp["lora_rank"])
    lora = init_lora(adapter, rank, generator) if rank > 0 else {}
    scale = float(settings["lora_alpha"]) / rank if rank > 0 else 1.0
    for tensor in lora.values():
        tensor.requires_grad_(True)
    params = [*head.parameters(), *lora.values()]
    optimizer = torch.optim.AdamW(
        params, lr=float(settings["lr"]), weight_decay=float(settings["weight_decay"])
    )

    samples = _train_samples({**train, **settings})
    if not samples:
        raise ValueError("the training split has no samples")
    batch = max(1, int(settings["batch_size"]))
    steps = int(settings["steps"]) or math.ceil(len(samples) / batch)
    layer = int(hp["guide_layer"])
    max_answer = int(settings["max_answer_tokens"])
    eval_set = samples[: max(1, int(settings["eval_samples"]))]

    def evaluate() -> float:
        import torch

        noise = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad(), lora_applied(adapter, lora, scale):
            total = 0.0
            for sample in eval_set:
                ce, kl = sample_loss(adapter, head, sample, layer, noise, max_answer)
                total += float(ce + hp["tau_max"] * kl)
        return total / len(eval_set)

    result = VibResult(blob=b"", metadata={})
    result.eval_before = evaluate()
    order = torch.randperm(len(samples), generator=generator).tolist()
    cursor = 0
    with lora_applied(adapter, lora, scale), torch.enable_grad():
        for step in range(steps):
            beta = kl_weight(
                step, hp["tau_min"], hp["tau_max"], int(hp["warmup_steps"]), hp["kl_schedule"]
            )
            optimizer.zero_grad(set_to_none=True)
            sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0}
            for _ in range(batch):
                if cursor == len(order):
                    order = torch.randperm(len(samples), generator=generator).tolist()
                    cursor = 0
                sample = samples[order[cursor]]
                cursor += 1
                ce, kl = sample_loss(adapter, head, sample, layer, generator, max_answer)
                loss = ce + beta * kl  # eq. 5 (minimised: −log-likelihood + β·KL)
                (loss / batch).backward()
                sums["loss"] += float(loss.detach()) / batch
                sums["ce"] += float(ce.detach()) / batch
                sums["kl"] += float(kl.detach()) / batch
            optimizer.step()
            result.losses.append({**sums, "beta": beta})
            if progress is not None:
                progress(step + 1, steps, sums["loss"])
    head.eval()
    result.eval_after = evaluate()

    tensors = {
        f"head.{k}": v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()
    }
    tensors.update({f"lora.{k}": v.detach().float().cpu().contiguous() for k, v in lora.items()})
    result.metadata = {
        "format": "prunelab.vib/1",
        "key": str(train.get("key", "")),
        "dim": str(dim),
        "hidden": str(head.hidden),
        "gate": hp["gate"],
        "guide_layer": str(layer),
        "lora_rank": str(rank),
        "lora_scale": repr(scale),
        "guide": str(train["guide"].get("name", "")),
        "config": json.dumps(train, sort_keys=True, default=str),
    }
    result.blob = save_safetensors(tensors, metadata=result.metadata)
    result.seconds = time.perf_counter() - start
    return result


# -- loading on a worker ----------------------------------------------------------------------
def decode_head(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a head blob written by :func:`train_vib`."""
    from safetensors.torch import load as load_safetensors

    tensors = load_safetensors(blob)
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_len])
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != "prunelab.vib/1":
        raise ValueError("not a prunelab VIB head (safetensors metadata format != prunelab.vib/1)")
    return tensors, metadata


_HEADS: OrderedDict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = OrderedDict()


def trial_assets(trial: Trial) -> dict[str, Any]:
    """What a trial's trained assets are, decoded (kept for the next trials): the VIB head of
    ``trial.vib_head``, given as its ``state`` (the blob, attached by the orchestrator at
    dispatch) or its ``path`` (a local safetensors file). {} when the trial has none."""
    spec = trial.vib_head
    if not spec:
        return {}
    key = str(spec.get("key", ""))
    if key and key in _HEADS:
        _HEADS.move_to_end(key)
        return {"vib_head": _HEADS[key]}
    if spec.get("state") is not None:
        blob = spec["state"]
    elif spec.get("path"):
        with open(spec["path"], "rb") as handle:
            blob = handle.read()
    else:  # not attached (planning, estimates): the method says so if it has to score
        return {}
    decoded = decode_head(blob)
    if key and decoded[1].get("key") and decoded[1]["key"] != key:
        raise RuntimeError(f"VIB head key {decoded[1]['key'][:12]} != expected {key[:12]}")
    if key:
        _HEADS[key] = decoded
        while len(_HEADS) > 4:
            _HEADS.popitem(last=False)
    return {"vib_head": decoded}
