"""prunelab: ablation sweeps of visual-token pruning methods on vision-language models."""

__version__ = "0.1.0"
__all__ = ["__version__"]
