"""What a worker keeps across trials: byte-bounded LRU caches of work that is the same in every
trial of a (model, benchmark, sample).

- :class:`ByteLRU`: the store under each cache, bounded by the bytes of its tensors; least
  recently used entries go first once it is full.
- :class:`VisionCache`: a sample's prepared inputs (the processor's output: token ids, pixel
  values, the family's extras) and the vision tower's outputs for a set of wanted signals (the
  projected visual tokens, their coordinates, CLS attention, encoder keys). Kept on the CPU,
  so it never takes accelerator memory from a trial (nor shows in its ``peak_mem_mb``), and
  copied to the model's device on each hit, so nothing a trial does to the tensors it is
  handed reaches the cache.

Exactness. An entry is what ``adapter.prepare(sample)`` / ``adapter.vision_signals(prepared,
wanted)`` returned for the same model (weights, dtype, device, attention kernel, prompt
template, processor settings: :func:`model_identity`), benchmark (its ``describe()``) and
sample id; vision outputs are keyed by the wanted signals too, because probing the encoder may
run it through another kernel (Qwen2-VL under FlashAttention 2). Both calls are pure functions
of those, so a hit gives the tensors a fresh call gives, bit for bit
(``tests/workers/test_vision_cache.py`` checks whole trials with the cache on and off). A
method whose stages change the encoder's own computation (``PruningMethod.changes_encoder``:
merging or pruning inside the encoder, an encoder-stage hook) bypasses the cache: the runner
neither reads nor writes it for that method's trials.

What it does not cover: the guidance model's inputs and vision outputs (computed per trial),
and samples timed for latency (``eval.timed_samples``), which run the vision tower for real so
that ``prefill_ms`` includes it as the papers measure it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import torch

from prunelab.methods.base import VisionSignals
from prunelab.workers.adapters.base import Prepared

__all__ = [
    "DEFAULT_VISION_CACHE_MB",
    "ByteLRU",
    "CacheStats",
    "VisionCache",
    "model_identity",
    "tensor_bytes",
]

DEFAULT_VISION_CACHE_MB = 2048.0
"""A worker's vision cache when its settings give none (``workers.vision_cache_mb``): about
390 samples of LLaVA-1.5-7B (5.4 MB each: 576 x 4096 bf16 tokens and a 336 px bf16 image),
every sample of a default trial (``eval.limit`` 64) several times over.

An LRU keeps nothing of use when a trial's samples do not fit: each trial reads its samples in
the same order, so by the time the next trial starts over, the first ones are gone. Size it to
the samples of a trial (``eval.limit``) times their size."""

V = TypeVar("V")


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value``: a tensor, a dataclass, a mapping or a sequence of
    them (other values count nothing)."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(tensor_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def _copy_to(value: Any, device: torch.device) -> Any:
    """``value`` with each of its tensors copied to ``device`` (always a new tensor, detached)
    and its containers rebuilt; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _copy_to(getattr(value, f.name), device) for f in dataclasses.fields(value)
        }
        return dataclasses.replace(value, **changes)
    if isinstance(value, dict):
        return {k: _copy_to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_to(v, device) for v in value)
    return value


class ByteLRU(Generic[V]):
    """A mapping bounded by the bytes of its values, least recently used first out.

    ``put`` takes the value's size; once the total exceeds ``max_bytes``, the least recently
    used entries are evicted, but never the newest one (a single entry larger than the bound
    stays until the next ``put``; callers that must not hold it skip the ``put``).
    Each call is atomic (a lock): the runner's prefetch thread reads and fills the vision
    cache while the trial's thread does.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: V, nbytes: int) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            self._entries[key] = (value, nbytes)
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes and len(self._entries) > 1:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.nbytes -= evicted

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0


@dataclasses.dataclass
class CacheStats:
    """Lookups of a :class:`VisionCache`: prepared inputs and vision outputs, hits and misses."""

    input_hits: int = 0
    input_misses: int = 0
    vision_hits: int = 0
    vision_misses: int = 0

    def since(self, earlier: CacheStats) -> CacheStats:
        """The lookups made after ``earlier`` (a copy taken then)."""
        return CacheStats(
            *(getattr(self, f.name) - getattr(earlier, f.name) for f in dataclasses.fields(self))
        )

    def describe(self) -> str:
        return (
            f"vision outputs {self.vision_hits} hits / {self.vision_misses} misses, "
            f"inputs {self.input_hits} / {self.input_misses}"
        )


def _hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_identity(loaded: Any) -> str:
    """What a cached input or vision output depends on besides the sample: the weights
    (``info.revision``), every setting of the model config (dtype, attention kernel, prompt
    template, processor overrides, ...) and the device it runs on."""
    spec = dataclasses.asdict(loaded.spec)
    return f"{loaded.info.revision}:{_hash(spec)}:{loaded.device}"


SampleKey = tuple[str, str, str]
"""(model identity, benchmark identity, sample id)."""


class VisionCache:
    """Prepared inputs and vision-tower outputs of samples, kept by a worker across trials
    (see the module docstring); at most ``max_bytes`` of tensors, held on the CPU.

    ``max_bytes`` 0 turns it off: every lookup computes, nothing is kept or counted.
    """

    def __init__(self, max_bytes: int) -> None:
        self._store: ByteLRU[Prepared | VisionSignals] = ByteLRU(max_bytes)
        self.stats = CacheStats()

    @property
    def max_bytes(self) -> int:
        return self._store.max_bytes

    @property
    def nbytes(self) -> int:
        return self._store.nbytes

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def _lookup(self, key: Hashable, make: Callable[[], V], device: torch.device) -> tuple[V, bool]:
        """The entry of ``key`` copied to ``device`` (a hit), or ``make()`` kept as a CPU copy
        when it fits (a miss); and whether it was a hit."""
        cached = self._store.get(key)
        if cached is not None:
            return _copy_to(cached, device), True
        value = make()
        nbytes = tensor_bytes(value)
        if nbytes <= self.max_bytes:
            self._store.put(key, _copy_to(value, torch.device("cpu")), nbytes)
        return value, False

    def prepared(
        self, key: SampleKey, make: Callable[[], Prepared], device: torch.device
    ) -> Prepared:
        """The sample's prepared inputs on ``device``: cached, or ``make()`` (the adapter's
        ``prepare``)."""
        if not self.enabled:
            return make()
        value, hit = self._lookup(("inputs", *key), make, device)
        if hit:
            self.stats.input_hits += 1
        else:
            self.stats.input_misses += 1
        return value

    def signals(
        self,
        key: SampleKey,
        wanted: frozenset[str],
        make: Callable[[], VisionSignals],
        device: torch.device,
    ) -> VisionSignals:
        """The sample's vision signals for ``wanted`` on ``device``: cached, or ``make()`` (the
        adapter's ``vision_signals``). Kept as the adapter returned them, before the runner
        sets the per-trial fields (generator, guidance, ...)."""
        if not self.enabled:
            return make()
        value, hit = self._lookup(("vision", *key, tuple(sorted(wanted))), make, device)
        if hit:
            self.stats.vision_hits += 1
        else:
            self.stats.vision_misses += 1
        return value
