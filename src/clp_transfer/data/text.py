"""Reading the user's text files: the one reader of target-language text for every stage.

``perplexity``, ``make-tasks``, the transfer's calibration and the helper read documents through
:func:`read_documents`: ``.jsonl`` / ``.json`` lines hold a ``"text"`` field, any other file holds one
document per line; ``.gz`` is decompressed on the fly; text must be UTF-8. (``prepare`` reads corpora through
:mod:`clp_transfer.data.sources`, which adds more formats, compression schemes and skip counting.)
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import ClpError

def open_text(path: Path) -> io.TextIOBase:
    """A text file for reading as UTF-8, gunzipped on the fly when it ends in ``.gz``."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_documents(path: str | os.PathLike, text_key: str = "text") -> Iterator[str]:
    """Documents of a file: ``.jsonl`` -> the ``text_key`` field of each line; else one document per line.

    ``.gz`` files are read transparently. Blank lines are skipped; a text line's trailing newline is not part
    of the document.
    """
    p = Path(path)
    is_jsonl = ".jsonl" in p.suffixes or ".json" in p.suffixes
    try:
        yield from _documents(p, is_jsonl, text_key)
    except UnicodeDecodeError as e:
        raise ClpError(f"{str(p)!r} is not valid UTF-8 text (byte 0x{e.object[e.start]:02x}); convert it to "
                       "UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _documents(p: Path, is_jsonl: bool, text_key: str) -> Iterator[str]:
    with open_text(p) as f:
        for lineno, line in enumerate(f, 1):
            if is_jsonl:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ClpError(f"{str(p)!r} line {lineno} is not JSON: {e}") from None
                if not isinstance(obj, dict) or text_key not in obj:
                    raise ClpError(f"{str(p)!r} line {lineno} has no {text_key!r} field")
                text = obj[text_key]
                if text:
                    yield str(text)
            else:
                text = line.rstrip("\r\n")
                if text.strip():
                    yield text


def count_lines(paths: list[Path]) -> int | None:
    """Lines in plain files (a progress bar total); None for compressed ones."""
    n = 0
    for p in paths:
        if p.suffix == ".gz":
            return None
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                n += block.count(b"\n")
    return n


def resolve_text_sources(data: str | None, split: str, text_files: Sequence[str] | None) -> tuple[list[Path], str]:
    """Files to read and a description; checks they exist and are not empty."""
    if bool(data) == bool(text_files):
        raise ClpError("give either --data DIR (a prepared data directory) or --text_files FILE..., not both")
    if data:
        d = Path(data)
        if not d.is_dir():
            raise ClpError(f"--data {data!r} is not a directory (expected the output of `clp-transfer prepare`)")
        f = d / f"{split}.jsonl"
        if not f.is_file():
            gz = d / f"{split}.jsonl.gz"
            if gz.is_file():
                f = gz
            else:
                have = sorted(p.name for p in d.glob("*.jsonl*"))
                raise ClpError(
                    f"{str(d)!r} has no {split}.jsonl (found: {', '.join(have) or 'none'}); the raw documents are "
                    "needed so that models with different tokenizers score the same text. Pick another --split "
                    "or re-run `clp-transfer prepare`"
                )
        files, desc = [f], f"{d}:{split}"
    else:
        files = [Path(t) for t in text_files or []]
        desc = ", ".join(str(f) for f in files)
    for f in files:
        if not f.is_file():
            raise ClpError(f"text file {str(f)!r} does not exist")
        if f.stat().st_size == 0:
            raise ClpError(f"text file {str(f)!r} is empty; give files with one document per line (.txt) or "
                           "one {\"text\": ...} object per line (.jsonl)")
    return files, desc
