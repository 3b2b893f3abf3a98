"""``transfer``: vocabulary matching, the methods, calibration, checkpoint surgery and the pipeline
(``clp-transfer transfer``), the in-memory API (:func:`transfer_embeddings`) and the helper it needs."""

from .._lazy import lazy_exports

_EXPORTS = {
    "transfer": ".pipeline",
    "run_transfer": ".pipeline",
    "TransferConfig": ".pipeline",
    "TransferResult": ".pipeline",
    "transfer_embeddings": ".embeddings",
    "TransferredEmbeddings": ".embeddings",
    "EmbeddingReport": ".embeddings",
    "CalibrationStats": ".embeddings",
    "TransferProblem": ".embeddings",
    "build_problem": ".embeddings",
    "match_tokens": ".embeddings",
    "solve": ".embeddings",
    "train_helper": ".helper",
    "HelperConfig": ".helper",
    "build_helper_space": ".helper_space",
    "SpaceConfig": ".helper_space",
    "load_helper_space": ".helper_space",
    "is_helper_space": ".helper_space",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
