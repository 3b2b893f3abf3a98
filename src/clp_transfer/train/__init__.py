"""``train``: continued pretraining - the loop (``clp-transfer train``), its config and schedule."""

from .._lazy import lazy_exports

_EXPORTS = {
    "train": ".loop",
    "TrainResult": ".loop",
    "TrainConfig": ".config",
    "Phase": ".schedule",
    "plan_phases": ".schedule",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
