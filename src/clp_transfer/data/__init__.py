"""``data``: the corpus stage - sources, the one reader of user text, tokenizing, token shards, ``prepare``."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__)
