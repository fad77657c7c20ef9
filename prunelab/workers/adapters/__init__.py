"""Model adapters: everything model-family specific a method may need, behind one interface."""

from prunelab.workers.adapters.base import Adapter, Generation, Prepared

__all__ = ["Adapter", "Generation", "Prepared", "adapter_for"]


def adapter_for(loaded) -> Adapter:
    """The adapter for a :class:`~prunelab.workers.models.LoadedModel`."""
    if loaded.spec.family == "llava":
        from prunelab.workers.adapters.llava import LlavaAdapter

        return LlavaAdapter(loaded)
    raise ValueError(f"no adapter for family {loaded.spec.family!r}")
