"""``train``: continued pretraining - the loop (``clp-transfer train``), its config and schedule."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__)
