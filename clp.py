#!/usr/bin/env python
"""The study project's entry point, kept command-compatible with its README:

    python clp.py apply_clp \\
        --source_model_name_or_path EleutherAI/pythia-410m \\
        --helper_model_name_or_path malteos/gpt2-wechsel-german-ds-meg \\
        --target_model_path <output_dir>

It runs ``clp-transfer transfer`` (method ``clp`` by default; ``--random_init`` for the random baselines).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import clp_transfer  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clp.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    a = sub.add_parser("apply_clp", help="initialise a target model with CLP-Transfer")
    a.add_argument("--source_model_name_or_path", required=True, help="large source model (other language)")
    a.add_argument("--helper_model_name_or_path", required=True, help="small helper model in the target language")
    a.add_argument("--target_model_path", required=True, help="output directory")
    a.add_argument("--helper_tokenizer_name_or_path", default=None, help="helper tokenizer, if stored apart")
    a.add_argument("--seed", type=int, default=42)
    a.add_argument("--override", action="store_true", help="overwrite an existing target_model_path")
    a.add_argument("--random_init", action="store_true", help="random new embeddings instead of CLP")
    a.add_argument("--random_init_method", choices=["small_init", "xavier_normal", "normal"], default="small_init")
    a.add_argument("--method", default=None, help="any clp-transfer method (default: clp, or random with --random_init)")
    a.add_argument("--allow_pickle", action="store_true", help="allow pickle (*.bin) checkpoints")
    a.add_argument("--trust_remote_code", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from clp_transfer.cli import main as cli

    method = args.method or ("random" if args.random_init else "clp")
    forwarded = [
        "transfer",
        "--source", args.source_model_name_or_path,
        "--helper", args.helper_model_name_or_path,
        "--output", args.target_model_path,
        "--method", method,
        "--seed", str(args.seed),
    ]
    if args.helper_tokenizer_name_or_path:
        forwarded += ["--helper_tokenizer", args.helper_tokenizer_name_or_path]
    if method == "random":
        forwarded += ["--params", f"init={args.random_init_method}"]
    if args.override:
        forwarded.append("--overwrite")
    if args.allow_pickle:
        forwarded.append("--allow_pickle")
    if args.trust_remote_code:
        forwarded.append("--trust_remote_code")
    return cli(forwarded)


if __name__ == "__main__":
    sys.exit(main())
