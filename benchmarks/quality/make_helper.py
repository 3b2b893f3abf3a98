"""Train the benchmark's German helper: ~7M-parameter GPT-2, its own 16k byte-level BPE, ~20 CPU minutes.

    python benchmarks/quality/make_helper.py [--cache DIR] [--time_budget_minutes 20] [--overwrite]
    # it takes the whole budget; to keep the shell:
    nohup python benchmarks/quality/make_helper.py > /dev/null 2>&1 &

Runs ``clp-transfer helper`` (``clp_transfer.transfer.helper.train_helper``) on ``<cache>/splits/helper_train.jsonl``
(made by ``data.py``) and writes ``<cache>/helper-de/`` (model, tokenizer, helper_report.json). The log goes to
``<cache>/make_helper.log`` as well as to stderr. Never sees the dev or test split.
"""

from __future__ import annotations

import argparse
import sys

from common import cache_dir, splits_dir, train_helper_logged

from clp_transfer.transfer.helper import HelperConfig

# The helper of CONTEXT.md section 6; peak lr and warm-up sized for the ~600 steps 20 CPU minutes allow.
SETTINGS = dict(vocab_size=16000, tokenizer_kind="bpe", architecture="gpt2", hidden_size=256, num_layers=4,
                num_heads=4, block_size=256, batch_size=8, learning_rate=2e-3, warmup_steps=50,
                logging_steps=25, num_threads=2, torch_compile=True, seed=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=None, help="benchmark cache directory (default: benchmarks/.cache/quality)")
    p.add_argument("--time_budget_minutes", "--time-budget-minutes", type=float, default=20.0)
    p.add_argument("--max_steps", "--max-steps", type=int, default=None)
    p.add_argument("--no_compile", "--no-compile", action="store_true", help="train eagerly (no torch.compile)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    root = cache_dir(a.cache)
    settings = dict(SETTINGS, torch_compile=not a.no_compile)
    cfg = HelperConfig(text=[str(splits_dir(a.cache) / "helper_train.jsonl")], output_dir=str(root / "helper-de"),
                       time_budget_minutes=a.time_budget_minutes, max_steps=a.max_steps, overwrite=a.overwrite,
                       **settings)
    return train_helper_logged(cfg, root, "make_helper")


if __name__ == "__main__":
    sys.exit(main())
