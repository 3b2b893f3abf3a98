"""``data``: the corpus stage - sources, the one reader of user text, tokenizing, token shards, ``prepare``."""

from .._lazy import lazy_exports

_MODULES = {  # module -> the public names it defines
    ".pipeline": "prepare run_prepare PrepareConfig PrepareResult",
    ".shards": "TokenShards ShardIndex ShardWriter tokenizer_fingerprint dtype_for_vocab",
    ".text": "read_documents open_text count_lines resolve_text_sources",
}
__all__ = sorted(name for names in _MODULES.values() for name in names.split())
__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
