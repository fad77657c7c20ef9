"""Model configs, tiny random builders, and loading through ``from_pretrained``.

A model config (``sweeps/model/<name>.yaml``) is a mapping:

``name``: how sweeps refer to it. ``family``: adapter family (``llava``, ...). ``source``:
``tiny`` (built from ``tiny`` config overrides with random weights, seeded, no download) or
``pretrained`` (``path`` = hub id, local directory, or ``builtin:<name>`` for a model shipped in
``prunelab/models/``, e.g. the trained ``toy-llava``; optional ``revision``). ``dtype``,
``attn_implementation`` (``sdpa`` or ``flash_attention_2``), ``device`` (``auto``: CUDA when
present), ``prompt_template`` with ``{question}`` and the image placeholder, ``processor``:
keyword overrides of the processor's settings (e.g. Qwen2-VL ``min_pixels`` / ``max_pixels``),
``guidance``: the name of a smaller model config of the same family for guidance methods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "LoadedModel",
    "ModelInfo",
    "ModelSpec",
    "describe_model",
    "load_model",
    "shipped_config",
]

DTYPES = ("float32", "bfloat16", "float16")  # the names of torch dtypes a config may give
BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "models"  # prunelab/models/<name>
HUB_CONFIGS_DIR = BUILTIN_DIR / "hub"
"""``<org>/<name>/config.json`` of the hub checkpoints that ``sweeps/model/`` names: the config
alone (no weights, a few KB), so that a sweep of them is planned and validated offline."""


def shipped_config(path: str | None) -> Path | None:
    """The shipped config directory of hub checkpoint ``path`` (``org/name``), if any."""
    if not path or path.count("/") != 1 or Path(path).expanduser().exists():
        return None
    directory = HUB_CONFIGS_DIR / path
    return directory if (directory / "config.json").is_file() else None


def resolve_builtin(path: str) -> str:
    """``builtin:<name>`` -> the directory of model ``<name>`` shipped in ``prunelab/models``
    (independent of the working directory); any other path unchanged."""
    if not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX) :]
    target = BUILTIN_DIR / name
    if not name or "/" in name or not (target / "config.json").is_file():
        shipped = sorted(p.parent.name for p in BUILTIN_DIR.glob("*/config.json"))
        raise ValueError(
            f"path={path!r}: no built-in model {name!r} (shipped: {', '.join(shipped) or 'none'})"
        )
    return str(target)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    source: str = "tiny"
    path: str | None = None
    revision: str | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    device: str = "auto"
    seed: int = 0
    prompt_template: str = "USER: <image>\n{question} ASSISTANT:"
    tiny: dict[str, Any] = field(default_factory=dict)
    # keyword overrides of the processor's settings, e.g. {min_pixels: ..., max_pixels: ...} for
    # Qwen2-VL (they change the visual token count, so they are part of the trial key)
    processor: dict[str, Any] = field(default_factory=dict)
    # a smaller model config of the same family that guidance methods (sgp) run alongside
    guidance: str | None = None

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown model key(s) {', '.join(unknown)}")
        spec = cls(**cfg)
        from prunelab.workers.adapters import family_problem  # lazy: adapters import us

        if (problem := family_problem(spec.family)) is not None:
            raise ValueError(problem)
        if spec.source not in ("tiny", "pretrained"):
            raise ValueError(f"source={spec.source!r}: expected 'tiny' or 'pretrained'")
        if spec.source == "pretrained" and not spec.path:
            raise ValueError("source=pretrained needs `path` (hub id or local directory)")
        if spec.dtype not in DTYPES:
            raise ValueError(f"dtype={spec.dtype!r}: expected one of {', '.join(DTYPES)}")
        if spec.path and spec.path.startswith(BUILTIN_PREFIX):
            spec = dataclasses.replace(spec, path=resolve_builtin(spec.path))
        return spec


@dataclass(frozen=True)
class ModelInfo:
    """What validation and cost accounting need, read without loading weights."""

    family: str
    n_layers: int
    n_visual: int  # visual tokens entering the LLM for one image (unpruned)
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    revision: str  # identifies the weights: part of the trial key
    mlp_matrices: int = 3  # weight matrices of one MLP (gate/up/down: 3)
    vision_flops: float = 0.0  # exact FLOPs of the vision tower + projector for one image

    @classmethod
    def from_text_config(
        cls, family: str, text: Any, n_visual: int, revision: str, vision_flops: float
    ) -> ModelInfo:
        """The LLM's shapes from a transformers text config (Llama / Qwen2 style, gated MLP)."""
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(
            family=family,
            n_layers=text.num_hidden_layers,
            n_visual=n_visual,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            n_heads=text.num_attention_heads,
            n_kv_heads=text.num_key_value_heads or text.num_attention_heads,
            head_dim=head_dim,
            vocab_size=text.vocab_size,
            revision=revision,
            mlp_matrices=3,
            vision_flops=vision_flops,
        )


@dataclass
class LoadedModel:
    spec: ModelSpec
    info: ModelInfo
    model: torch.nn.Module
    processor: Any
    device: torch.device


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _family_module(family: str):
    from prunelab.workers.adapters import family_module

    return family_module(family)


def _config(spec: ModelSpec):
    family = _family_module(spec.family)
    if spec.source == "tiny":
        return family.tiny_config(spec)
    from transformers import AutoConfig

    shipped = shipped_config(spec.path) if spec.revision is None else None
    try:
        if shipped is not None:  # shapes without the hub: planning works offline
            return AutoConfig.from_pretrained(shipped)
        return AutoConfig.from_pretrained(spec.path, revision=spec.revision)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the config of {spec.path!r}: {exc}") from None


class _NotStated(Exception):
    """A key a ``config.json`` does not state: transformers' default for it would apply."""


class _Stated:
    """Attribute access to the values of a ``config.json`` mapping as a transformers config
    gives them; nested mappings (``text_config``, ``vision_config``) are views too, and a key
    the file does not state raises :class:`_NotStated` (not AttributeError: a ``getattr`` with
    a default must not stand in for transformers' default)."""

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getattr__(self, name: str) -> Any:
        try:
            value = self._values[name]
        except KeyError:
            raise _NotStated(name) from None
        return _Stated(value) if isinstance(value, dict) else value


def shipped_config_file(spec: ModelSpec) -> Path | None:
    """The ``config.json`` in the package that describes ``spec`` (a built-in model's, or a
    hub checkpoint's under ``models/hub``), or None."""
    if spec.source != "pretrained" or spec.revision is not None or not spec.path:
        return None
    if Path(spec.path).parent == BUILTIN_DIR:  # ``builtin:<name>``, resolved by ModelSpec
        return Path(spec.path) / "config.json"
    shipped = shipped_config(spec.path)
    return None if shipped is None else shipped / "config.json"


def describe_model(cfg: dict[str, Any] | ModelSpec, *, library: bool = False) -> ModelInfo:
    """Shapes of the model named by ``cfg`` from its config alone (no weights loaded).

    A ``config.json`` the package ships is read as plain JSON, without transformers (whose
    import is most of a dry run's time and holds the library in the orchestrator's memory),
    when it states every value the family reads; anything else, or ``library=True``, goes
    through transformers' config classes. ``tests/orchestrator/test_command_cost.py`` checks
    that both ways describe every shipped model config alike.
    """
    spec = cfg if isinstance(cfg, ModelSpec) else ModelSpec.from_config(cfg)
    family = _family_module(spec.family)
    if spec.source == "tiny":
        revision = "tiny-" + _hash({"tiny": spec.tiny, "seed": spec.seed})
    elif spec.revision:
        revision = spec.revision
    elif spec.path and Path(spec.path).parent == BUILTIN_DIR:
        revision = "builtin-" + _content_hash(spec.path)
    else:
        revision = "local-" + _hash(_local_fingerprint(spec.path))
    file = None if library else shipped_config_file(spec)
    if file is not None and file.is_file():
        try:
            return family.model_info(
                _Stated(json.loads(file.read_text())), revision, spec.processor
            )
        except _NotStated:
            pass  # a value transformers would default: read through transformers
    return family.model_info(_config(spec), revision, spec.processor)


def _local_fingerprint(path: str | None) -> Any:
    """Names, sizes and mtimes of a local model directory (a hub id fingerprints as itself)."""
    if path is None or not Path(path).is_dir():
        return path
    return sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in Path(path).iterdir())


@functools.lru_cache(maxsize=16)
def _content_hash_cached(path: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    for file in sorted(Path(path).iterdir()):
        if file.is_file():
            digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _content_hash(path: str) -> str:
    """Hash of the files of a built-in model directory: the same weights give the same revision
    in every checkout (mtimes differ between clones)."""
    return _content_hash_cached(path, tuple(_local_fingerprint(path)))


@contextlib.contextmanager
def _no_loading_bars() -> Iterator[None]:
    """transformers' own tqdm bars (``Loading weights``) off inside the block, restored after.

    The hub's download bars keep their state (a download still shows), and nothing of
    transformers' logging changes: its warnings and errors are printed as before.
    """
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hub_was_disabled = are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # switches the hub's bars off too ...
    if not hub_was_disabled:
        enable_progress_bars()  # ... so switch those back
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
            if hub_was_disabled:
                disable_progress_bars()


def load_model(cfg: dict[str, Any] | ModelSpec) -> LoadedModel:
    """Build (tiny) or ``from_pretrained`` (pretrained) the model, its processor and info."""
    import torch

    spec = cfg if isinstance(cfg, ModelSpec) else ModelSpec.from_config(cfg)
    family = _family_module(spec.family)
    info = describe_model(spec)
    device = _resolve_device(spec.device)
    dtype = getattr(torch, spec.dtype)
    if spec.source == "tiny":
        model, processor = family.build_tiny(spec, _config(spec))
        model = model.to(device=device, dtype=dtype)
    else:
        with _no_loading_bars():  # one "Loading weights" bar per load and worker otherwise
            model, processor = family.from_pretrained(spec, dtype=dtype, device=device)
        loaded = family.model_info(model.config, info.revision, spec.processor)
        if loaded != info:  # the checkpoint's own config is what runs
            warnings.warn(
                f"model {spec.name!r}: the checkpoint's config describes {loaded}, the config "
                f"it was planned with {info}; the trial runs on the checkpoint's",
                stacklevel=2,
            )
            info = loaded
    model.eval()
    return LoadedModel(spec=spec, info=info, model=model, processor=processor, device=device)
