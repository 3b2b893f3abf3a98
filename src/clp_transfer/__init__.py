"""clp-transfer: move a large language model to a new language cheaply.

The public API (imported lazily, so ``import clp_transfer`` stays cheap):

- :func:`transfer_embeddings`  CLP-Transfer on tensors: source and helper embeddings + two vocabularies
  -> new embedding matrices and an :class:`EmbeddingReport` (no files, no models loaded)
- :func:`run_transfer` / :class:`TransferConfig`  the same on model directories: read, transfer, write a model
- :func:`compute_target_embeddings` / :class:`EmbeddingProblem`  the methods' maths on a prepared problem

Pipeline stages, each a subcommand of the ``clp-transfer`` CLI with a typed Python function behind it:
prepare (corpus -> token shards), transfer, train (continued pretraining), perplexity and evaluate.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "transfer_embeddings": "clp_transfer.embeddings",
    "TransferredEmbeddings": "clp_transfer.embeddings",
    "EmbeddingReport": "clp_transfer.embeddings",
    "CalibrationStats": "clp_transfer.embeddings",
    "build_problem": "clp_transfer.embeddings",
    "match_tokens": "clp_transfer.embeddings",
    "run_transfer": "clp_transfer.transfer",
    "TransferConfig": "clp_transfer.transfer",
    "TransferResult": "clp_transfer.transfer",
    "EmbeddingProblem": "clp_transfer.methods",
    "compute_target_embeddings": "clp_transfer.methods",
    "ClpError": "clp_transfer.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clp_transfer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
