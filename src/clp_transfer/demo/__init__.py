"""``demo``: the whole pipeline offline on a real English model (``clp-transfer demo``)."""

from .._lazy import lazy_exports

_MODULES = {  # module -> the public names it defines
    ".run": "run_demo DemoConfig",
}
__all__ = sorted(name for names in _MODULES.values() for name in names.split())
__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
