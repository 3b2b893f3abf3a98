"""Build a source that already knows German (issue 15): a small Llama pretrained on mixed English and German text
with its own 12k byte-level BPE.

    python benchmarks/quality/make_mixed_source.py [--cache DIR] [--max_steps 600] [--overwrite]

No source of that kind is available offline here (SmolLM2-135M is English-only), and the automatic choice of the
initialisation must be measured on one: when the source's own pieces already carry German, FVT-like rows should
win over the helper's similarities. Runs ``clp-transfer helper`` (``train_helper``) on ``en_train.jsonl`` (9.7 MB of
English) plus ``helper_train.jsonl`` (11.6 MB of German) from ``data.py`` and writes ``<cache>/mixed-en-de/``. A
fixed step count (not a time budget) so the model is the same on every machine for a seed. Never sees the dev or
test split.
"""

from __future__ import annotations

import argparse
import sys

from common import cache_dir, splits_dir, train_helper_logged

from clp_transfer.transfer.helper import HelperConfig

SETTINGS = dict(vocab_size=12000, tokenizer_kind="bpe", architecture="llama", hidden_size=256, num_layers=4,
                num_heads=4, block_size=256, batch_size=8, learning_rate=2e-3, warmup_steps=50,
                logging_steps=25, num_threads=1, torch_compile=False, seed=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=None, help="benchmark cache directory (default: benchmarks/.cache/quality)")
    p.add_argument("--max_steps", "--max-steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    root = cache_dir(a.cache)
    splits = splits_dir(a.cache)
    cfg = HelperConfig(text=[str(splits / "en_train.jsonl"), str(splits / "helper_train.jsonl")],
                       output_dir=str(root / "mixed-en-de"), max_steps=a.max_steps, overwrite=a.overwrite,
                       **dict(SETTINGS, num_threads=a.threads))
    return train_helper_logged(cfg, root, "make_mixed_source")


if __name__ == "__main__":
    sys.exit(main())
