"""``evaluate``: perplexity and bits per byte, lm-eval tasks, local tasks from text, comparisons."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__)
