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

from ._lazy import lazy_exports

__version__ = "0.1.0"

__getattr__, __dir__, _names = lazy_exports(__name__)
__all__ = ["__version__", *_names]
