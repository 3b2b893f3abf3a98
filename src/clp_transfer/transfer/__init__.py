"""``transfer``: vocabulary matching, the methods, calibration, checkpoint surgery and the pipeline
(``clp-transfer transfer``), the in-memory API (:func:`transfer_embeddings`) and the helper it needs."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__)
