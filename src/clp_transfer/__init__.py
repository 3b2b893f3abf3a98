"""clp-transfer: move a large language model to a new language cheaply.

Pipeline stages, each a module with a typed Python API and a subcommand of the ``clp-transfer`` CLI:

- ``clp_transfer.prepare.prepare``        corpus -> train/valid split -> packed token shards
- ``clp_transfer.transfer.transfer``      source model + target-language helper -> target model
- ``clp_transfer.train.train``            continued pretraining with embedding-tuning phases
- ``clp_transfer.perplexity.perplexity``  token perplexity, bits per byte, word perplexity
- ``clp_transfer.evaluate.evaluate``      downstream tasks through lm-evaluation-harness

The pure tensor maths of the transfer is in ``clp_transfer.methods`` (no file I/O).
"""

__version__ = "0.1.0"
