"""``demo``: the whole pipeline offline on a real English model (``clp-transfer demo``)."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__)
