"""``train``: continued pretraining - the loop (``clp-transfer train``), its config and schedule."""

from .._lazy import lazy_exports

_MODULES = {  # module -> the public names it defines
    ".loop": "train TrainResult",
    ".config": "TrainConfig",
    ".schedule": "Phase plan_phases",
}
__all__ = sorted(name for names in _MODULES.values() for name in names.split())
__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
