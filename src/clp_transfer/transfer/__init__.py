"""``transfer``: vocabulary matching, the methods, calibration, checkpoint surgery and the pipeline
(``clp-transfer transfer``), the in-memory API (:func:`transfer_embeddings`) and the helper it needs."""

from .._lazy import lazy_exports

_MODULES = {  # module -> the public names it defines
    ".pipeline": "transfer run_transfer TransferConfig TransferResult",
    ".embeddings": "transfer_embeddings TransferredEmbeddings EmbeddingReport CalibrationStats TransferProblem build_problem match_tokens solve",
    ".helper": "train_helper HelperConfig",
    ".helper_space": "build_helper_space SpaceConfig load_helper_space is_helper_space",
}
__all__ = sorted(name for names in _MODULES.values() for name in names.split())
__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
