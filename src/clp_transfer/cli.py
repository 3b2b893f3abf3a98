"""``clp-transfer`` command line: one subcommand per pipeline stage.

Each subcommand lives in its own module, which provides ``add_cli_arguments(parser)`` and
``cli_main(args) -> int | None``. Only the chosen module is imported, so ``clp-transfer transfer --help``
does not pay for importing the training stack.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import ClpError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("clp_transfer.prepare", "build the pretraining corpus: split, tokenize, pack into shards"),
    "transfer": ("clp_transfer.transfer", "initialise a target-language model from a source and a helper model"),
    "train": ("clp_transfer.train", "continued pretraining with embedding-tuning phases"),
    "perplexity": ("clp_transfer.perplexity", "token perplexity, bits per byte and word perplexity on text"),
    "evaluate": ("clp_transfer.evaluate", "downstream tasks through lm-evaluation-harness"),
    "make-tasks": ("clp_transfer.tasks", "build local lm-eval tasks from your own text and word pairs"),
    "compare": ("clp_transfer.compare", "print and plot several models' results side by side"),
    "helper": ("clp_transfer.helper", "train a small target-language helper (tokenizer + LM, or --kind embeddings: token vectors) from text"),
    "demo": ("clp_transfer.demo", "the whole pipeline offline on a real English model"),
}

log = logging.getLogger("clp_transfer")


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clp-transfer",
        description="Move a language model to a new language: prepare -> transfer -> train -> evaluate.",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    # Split "[--log-level L] COMMAND rest..." by hand so that only COMMAND's module is imported.
    level = "INFO"
    while argv and argv[0].startswith("--log-level"):
        opt = argv.pop(0)
        level = opt.split("=", 1)[1] if "=" in opt else argv.pop(0)
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        top.parse_args([command])  # argparse prints "invalid choice" with the list, exits 2
    setup_logging(level)
    module = importlib.import_module(SUBCOMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"clp-transfer {command}", description=SUBCOMMANDS[command][1])
    module.add_cli_arguments(parser)
    args = parser.parse_args(rest)
    try:
        code = module.cli_main(args)
    except ClpError as e:
        log.debug("error details", exc_info=True)
        print(f"clp-transfer {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clp-transfer {command}: interrupted; no partial output was left in place", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
