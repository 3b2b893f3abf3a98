"""The public names of each package, imported lazily: ``from clp_transfer.data import TokenShards`` imports
only the module that defines it, so that ``import clp_transfer`` or one stage's CLI does not pay for every
stage. :data:`PUBLIC` is the one list of what each package exports (a stage imports another stage only
through these names; ``tests/test_layout.py``)."""

from __future__ import annotations

import importlib
from typing import Any, Callable

PUBLIC: dict[str, dict[str, str]] = {  # package -> {module (relative): its public names}
    "clp_transfer": {
        ".transfer.embeddings": "transfer_embeddings TransferredEmbeddings EmbeddingReport CalibrationStats build_problem match_tokens",
        ".transfer.pipeline": "run_transfer TransferConfig TransferResult",
        ".transfer.methods": "EmbeddingProblem compute_target_embeddings",
        ".errors": "ClpError",
    },
    "clp_transfer.data": {
        ".pipeline": "prepare run_prepare PrepareConfig PrepareResult",
        ".shards": "TokenShards ShardIndex ShardWriter tokenizer_fingerprint dtype_for_vocab",
        ".text": "read_documents open_text count_lines resolve_text_sources",
    },
    "clp_transfer.demo": {
        ".run": "run_demo DemoConfig",
    },
    "clp_transfer.evaluate": {
        ".harness": "evaluate run_evaluate EvaluateConfig",
        ".perplexity": "run_perplexity PerplexityConfig PerplexityResult score_documents score_token_stream",
        ".tasks": "make_tasks MakeTasksConfig",
        ".compare": "plot_comparison",
    },
    "clp_transfer.train": {
        ".loop": "train TrainResult",
        ".config": "TrainConfig",
        ".schedule": "Phase plan_phases",
    },
    "clp_transfer.transfer": {
        ".pipeline": "transfer run_transfer TransferConfig TransferResult",
        ".embeddings": "transfer_embeddings TransferredEmbeddings EmbeddingReport CalibrationStats TransferProblem build_problem match_tokens solve",
        ".helper": "train_helper HelperConfig",
        ".helper_space": "build_helper_space SpaceConfig load_helper_space is_helper_space",
    },
}


def lazy_exports(package: str) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package`` from its entry in :data:`PUBLIC`."""
    exports = {name: module for module, names in PUBLIC[package].items() for name in names.split()}

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__, sorted(exports)
