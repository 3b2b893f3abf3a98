#!/usr/bin/env python
"""The study project's corpus script, kept command-compatible with its README:

    python prepare.py --dataset_name=oscar --dataset_config_name=unshuffled_deduplicated_de \\
        --output_dir=data/oscar_de --subsample_size_mb=4096

It runs ``clp-transfer prepare`` with the same flags (any other ``clp-transfer prepare`` flag works too, e.g.
``--files`` for local text, ``--tokenizer`` for token shards; see ``python prepare.py --help``).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import clp_transfer  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))


def main(argv: list[str] | None = None) -> int:
    from clp_transfer.cli import main as cli

    return cli(["prepare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
