"""``data``: the corpus stage - sources, the one reader of user text, tokenizing, token shards, ``prepare``."""

from .._lazy import lazy_exports

_EXPORTS = {
    "prepare": ".pipeline",
    "run_prepare": ".pipeline",
    "PrepareConfig": ".pipeline",
    "PrepareResult": ".pipeline",
    "TokenShards": ".shards",
    "ShardIndex": ".shards",
    "ShardWriter": ".shards",
    "tokenizer_fingerprint": ".shards",
    "dtype_for_vocab": ".shards",
    "read_documents": ".text",
    "open_text": ".text",
    "count_lines": ".text",
    "resolve_text_sources": ".text",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
