"""``clp-transfer`` command line: one subcommand per pipeline stage.

Each subcommand lives in its own module, which provides ``add_cli_arguments(parser)`` (the flags of its
config dataclass, :func:`clp_transfer.config.add_dataclass_arguments`) and ``cli_main(args) -> int | None``.
Only the chosen module is imported, so ``clp-transfer transfer --help`` does not pay for the training stack.

The parser of every subcommand is a ``jsonargparse.ArgumentParser``. Why jsonargparse: it is what litgpt
builds its CLI on, actively maintained, and a drop-in ``argparse`` parser, so every flag keeps its spelling
(``--foo_bar`` and ``--foo-bar``, ``--no-chat``, ``--params a=1 b=2``) while it adds what argparse lacks:
``--config FILE.yaml`` on every subcommand with its keys and values checked against the command's flags, and
``--print_config`` to write the merged configuration as YAML. On top, this module gives ``--config`` the
lowest precedence wherever it appears (flags on the command line win) and accepts dotted overrides of
``key=value`` list fields: ``--params.top_k 20`` changes one key of the ``params`` from the YAML file.
(Typer/Click were the alternatives; they would need every flag re-declared and do not read YAML configs.)
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import re
import signal
import sys
import traceback
from typing import Any

from .errors import ClpError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("clp_transfer.data.pipeline", "build the pretraining corpus: split, tokenize, pack into shards"),
    "transfer": ("clp_transfer.transfer.pipeline", "initialise a target-language model from a source and a helper model"),
    "train": ("clp_transfer.train.loop", "continued pretraining with embedding-tuning phases"),
    "perplexity": ("clp_transfer.evaluate.perplexity", "token perplexity, bits per byte and word perplexity on text"),
    "evaluate": ("clp_transfer.evaluate.harness", "downstream tasks through lm-evaluation-harness"),
    "make-tasks": ("clp_transfer.evaluate.tasks", "build local lm-eval tasks from your own text and word pairs"),
    "compare": ("clp_transfer.evaluate.compare", "print and plot several models' results side by side"),
    "helper": ("clp_transfer.transfer.helper", "train a small target-language helper (tokenizer + LM, or --kind embeddings: token vectors) from text"),
    "demo": ("clp_transfer.demo.run", "the whole pipeline offline on a real English model"),
}

log = logging.getLogger("clp_transfer")

DEBUG_ENV = "CLP_TRANSFER_DEBUG"  # =1: print the traceback of every error, as --debug does


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, SLURM, ``docker stop``), raised like Ctrl-C so that every cleanup runs."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


_OS_HINTS = {
    errno.EACCES: "check the permissions, or choose another location",
    errno.EPERM: "check the permissions, or choose another location",
    errno.EROFS: "the file system is read-only; choose another location",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "a directory was given where a file is expected",
    errno.ENOENT: "it does not exist (was it moved or deleted while the run was using it?)",
    errno.ENOSPC: "the disk is full; free some space or choose another location",
    errno.EDQUOT: "the disk quota is exceeded; free some space or choose another location",
}


_OS_CLASSES = ((FileNotFoundError, errno.ENOENT), (PermissionError, errno.EACCES),
               (NotADirectoryError, errno.ENOTDIR), (IsADirectoryError, errno.EISDIR))


def describe_failure(e: BaseException) -> str | None:
    """One actionable line for an *expected* failure (user input or environment), or None for a real bug.

    Covers OS errors (permissions, paths through files, files that vanished, full disks), text that is not
    UTF-8, truncated or corrupt safetensors / torch zip / JSON files, and models that need their own code.
    """
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if "trust_remote_code" in text:
        return ("the model needs to run code from its own repository, which is off by default; pass "
                "--trust_remote_code if you trust that code")
    if isinstance(e, UnicodeDecodeError):
        return (f"an input file is not valid UTF-8 text (byte 0x{e.object[e.start]:02x}); convert it to UTF-8 "
                "(e.g. iconv -f latin1 -t utf-8)")
    if isinstance(e, OSError):
        # Some libraries (safetensors) raise FileNotFoundError & co. without errno: take it from the class.
        code = e.errno if e.errno is not None else next(
            (c for cls, c in _OS_CLASSES if isinstance(e, cls)), None)
        where = " -> ".join(repr(str(f)) for f in (e.filename, e.filename2) if f is not None)
        head = f"{e.strerror}" + (f": {where}" if where else "") if e.strerror else first
        hint = _OS_HINTS.get(code, "") if code is not None else ""
        return head + (f"; {hint}" if hint else "")
    kind = type(e).__name__
    module = type(e).__module__ or ""
    if "safetensors" in module or kind == "SafetensorError":
        return f"a .safetensors file is truncated or corrupt ({first}); restore or re-create it"
    if kind in ("BadZipFile", "UnpicklingError", "EOFError") or "PytorchStreamReader" in text:
        return f"a checkpoint file (torch zip/pickle) is truncated or corrupt ({first}); restore or re-create it"
    if kind == "JSONDecodeError":
        return f"a JSON file is corrupt or truncated ({first}); restore or re-create it"
    if isinstance(e, MemoryError):
        return "out of memory; use a smaller model, batch size or --num_proc"
    return None


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clp-transfer",
        description="Move a language model to a new language: prepare -> transfer -> train -> evaluate.",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--debug", action="store_true",
                   help=f"print the traceback of an error (also: {DEBUG_ENV}=1); for bug reports")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def build_parser(command: str, module: Any | None = None) -> Any:
    """The ``jsonargparse`` parser of a subcommand: its module's flags, ``--config`` and ``--debug``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    module = module if module is not None else importlib.import_module(SUBCOMMANDS[command][0])
    parser = ArgumentParser(prog=f"clp-transfer {command}", description=SUBCOMMANDS[command][1])
    module.add_cli_arguments(parser)
    parser.add_argument("--config", action=ActionConfigFile,
                        help="YAML file whose keys are this command's flags without the dashes (see configs/); "
                             "flags given on the command line win, wherever --config stands")
    parser.add_argument("--debug", action="store_true", dest="clp_debug",
                        help=f"print the traceback of an error (also: {DEBUG_ENV}=1)")
    return parser


_DOTTED = re.compile(r"^--([A-Za-z]\w*)\.(\w+)(?:=(.*))?$")


def _config_first(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` into its ``--config FILE`` arguments and the rest, so the files can be read first."""
    configs, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            configs += argv[i:i + 2]
            i += 2
            continue
        (configs if a.startswith("--config=") else rest).append(a)
        i += 1
    return configs, rest


def _split_dotted(argv: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Take ``--field.key VALUE`` / ``--field.key=VALUE`` out of ``argv`` as (field, key, value)."""
    rest, dotted, i = [], [], 0
    while i < len(argv):
        m = _DOTTED.match(argv[i])
        if m and m.group(3) is None and i + 1 < len(argv):
            dotted.append((m.group(1).replace("-", "_"), m.group(2), argv[i + 1]))
            i += 2
            continue
        if m and m.group(3) is not None:
            dotted.append((m.group(1).replace("-", "_"), m.group(2), m.group(3)))
        else:
            rest.append(argv[i])
        i += 1
    return rest, dotted


def _apply_dotted(args: Any, dotted: list[tuple[str, str, str]]) -> None:
    """Set one key of a ``key=value`` list field (``params``) per dotted override, keeping the others."""
    for name, key, value in dotted:
        current = getattr(args, name, None) or []
        if not isinstance(current, list) or not all(isinstance(x, str) and "=" in x for x in current):
            raise ClpError(f"--{name}.{key}: only key=value list flags (such as --params) take dotted keys")
        pairs = dict(x.split("=", 1) for x in current)
        pairs[key] = value
        setattr(args, name, [f"{k}={v}" for k, v in pairs.items()])


def parse_command_args(parser: Any, argv: list[str]) -> Any:
    """Parse a subcommand's arguments: ``--config`` files first (lowest precedence), then the flags, then the
    dotted overrides."""
    configs, rest = _config_first(argv)
    rest, dotted = _split_dotted(rest)
    known = {opt.lstrip("-").replace("-", "_") for action in parser._actions for opt in action.option_strings}
    for name, key, _ in dotted:
        if name not in known:
            parser.error(f"unrecognized arguments: --{name}.{key}")
    args = parser.parse_args(configs + rest)
    _apply_dotted(args, dotted)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    # Split "[--log-level L] [--debug] COMMAND rest..." by hand so that only COMMAND's module is imported.
    level = "INFO"
    debug = _debug_requested(argv)
    while argv and (argv[0].startswith("--log-level") or argv[0] == "--debug"):
        opt = argv.pop(0)
        if opt.startswith("--log-level"):
            level = opt.split("=", 1)[1] if "=" in opt else argv.pop(0)
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        top.parse_args([command])  # argparse prints "invalid choice" with the list, exits 2
    setup_logging(level)
    module = importlib.import_module(SUBCOMMANDS[command][0])
    try:
        args = parse_command_args(build_parser(command, module), rest)
    except ClpError as e:
        print(f"clp-transfer {command}: error: {e}", file=sys.stderr)
        return 2
    return run_command(command, module, args, debug or bool(getattr(args, "clp_debug", False)))


def run_command(command: str, module: Any, args: argparse.Namespace, debug: bool = False) -> int:
    """Run a subcommand; every expected failure becomes one line on stderr and a non-zero exit code.

    SIGTERM is handled like Ctrl-C (the stages' cleanup runs). Tracebacks are printed only with ``--debug``
    or ``CLP_TRANSFER_DEBUG=1``; an exception that is not an expected failure is a bug and keeps its traceback.
    """
    prefix = f"clp-transfer {command}"
    previous = None
    with_handler = hasattr(signal, "SIGTERM") and _in_main_thread()
    if with_handler:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = module.cli_main(args)
    except ClpError as e:
        if debug:
            traceback.print_exc()
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exc()
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        after = ("the checkpoints written so far are kept; continue with --resume" if command == "train"
                 else "no partial output was left in place")
        print(f"{prefix}: {what}; {after}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:
        message = describe_failure(e)
        if message is None:
            raise  # a real bug: keep the traceback
        if debug:
            traceback.print_exc()
        else:
            log.debug("error details", exc_info=True)
        print(f"{prefix}: error: {message}" + ("" if debug else " (run with --debug for details)"),
              file=sys.stderr)
        return 2
    finally:
        if with_handler:
            signal.signal(signal.SIGTERM, previous)
    return int(code or 0)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
