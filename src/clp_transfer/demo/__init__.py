"""``demo``: the whole pipeline offline on a real English model (``clp-transfer demo``)."""

from .._lazy import lazy_exports

_EXPORTS = {
    "run_demo": ".run",
    "DemoConfig": ".run",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
