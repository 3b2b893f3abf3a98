"""Lazy public names for packages: ``from clp_transfer.data import TokenShards`` imports only the module
that defines it, so that ``import clp_transfer`` or one stage's CLI does not pay for every stage."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, modules: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose module ``m`` (relative, e.g. ``".shards"``) defines
    the space-separated public names ``modules[m]``."""
    exports = {name: module for module, names in modules.items() for name in names.split()}

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
